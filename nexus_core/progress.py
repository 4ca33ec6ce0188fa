"""Progress a person can watch: done/total, loss, tokens/s and ETA of a long loop, on stderr.

On a terminal it is a rich progress bar; otherwise (a log file, a pipe, a test) one plain line at
most every `NEXUS_PROGRESS_EVERY_S` seconds (default 30) and one at the end, so that a 15-minute
distill is never silent and a log never fills with bar redraws. stdout is left to results.

A loop owns its bar (`with Bar("distill", total=400, unit="steps") as bar: bar.update(n, ...)`);
a helper deep below that cannot take a bar argument advances the *current* one instead
(`advance(n)`), which the caller opened with `with Bar(...).current():`; with none open it is a no-op.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys
import time

_CURRENT: contextvars.ContextVar["Bar | None"] = contextvars.ContextVar("nexus_progress_bar", default=None)
DEFAULT_EVERY_S = 30.0


def _every_s() -> float:
    try:
        return float(os.environ.get("NEXUS_PROGRESS_EVERY_S", DEFAULT_EVERY_S))
    except ValueError:
        return DEFAULT_EVERY_S


def format_duration(seconds: float) -> str:
    s = int(round(max(seconds, 0.0)))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Bar:
    """One loop's progress. `update(done, tokens=..., loss=...)` takes absolute counts: a resumed loop
    starts at `done`, and rates and the ETA count only the work done in this process."""

    def __init__(self, what: str, total: int | None, done: int = 0, unit: str = "steps", enabled: bool = True,
                 stream=None, every_s: float | None = None):
        self.what, self.total, self.unit = what, total, unit
        self.done = self._done0 = done
        self.tokens, self.fields = 0, {}
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.every_s = _every_s() if every_s is None else every_s
        self._t0 = self._last_line = time.monotonic()
        self._rich = self._task = None
        self._printed, self._last_done = False, -1
        if enabled and total != 0 and getattr(self.stream, "isatty", lambda: False)():
            self._rich = self._start_rich()

    # -- numbers --------------------------------------------------------------------------

    def rate(self) -> float:
        """Units per second in this process."""
        return (self.done - self._done0) / max(time.monotonic() - self._t0, 1e-9)

    def tokens_per_s(self) -> float:
        return self.tokens / max(time.monotonic() - self._t0, 1e-9)

    def eta_s(self) -> float | None:
        r = self.rate()
        return (self.total - self.done) / r if self.total and r > 0 else None

    def line(self) -> str:
        """'distill: 40/400 steps (10%) loss 2.3100 1,234 tok/s ETA 5m12s'"""
        head = f"{self.what}: {self.done}/{self.total} {self.unit}" if self.total else f"{self.what}: {self.done} {self.unit}"
        if self.total:
            head += f" ({self.done / self.total:.0%})"
        parts = [head, *(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in self.fields.items())]
        if self.tokens:
            parts.append(f"{self.tokens_per_s():,.0f} tok/s")
        eta = self.eta_s()
        if eta is not None and self.done < (self.total or 0):
            parts.append(f"ETA {format_duration(eta)}")
        elif self.done > self._done0:
            parts.append(f"in {format_duration(time.monotonic() - self._t0)}")
        return " ".join(parts)

    # -- updates --------------------------------------------------------------------------

    def set_total(self, total: int) -> None:
        self.total = total
        if self._rich is not None:
            self._rich.update(self._task, total=total)

    def update(self, done: int, tokens: int = 0, **fields) -> None:
        """`done` units so far (absolute); `tokens` more tokens processed since the last update."""
        self.done, self.tokens = done, self.tokens + tokens
        self.fields.update(fields)
        if not self.enabled:
            return
        if self._rich is not None:
            self._rich.update(self._task, completed=done, info=self._info())
        elif time.monotonic() - self._last_line >= self.every_s:
            self._print_line()

    def advance(self, n: int = 1, tokens: int = 0, **fields) -> None:
        self.update(self.done + n, tokens, **fields)

    def close(self) -> None:
        if self._rich is not None:
            self._rich.stop()
            self._rich = None
        if self.enabled and self.done > self._done0 and not (self._printed and self._last_done == self.done):
            self._print_line()  # the final state, once, also under a rich bar (it is transient)
        self.enabled = False

    def __enter__(self) -> "Bar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def current(self):
        """Make this the bar that `advance()` moves, for the duration of the block; closed after it."""
        token = _CURRENT.set(self)
        try:
            yield self
        finally:
            _CURRENT.reset(token)
            self.close()

    # -- output ---------------------------------------------------------------------------

    def _info(self) -> str:
        parts = [f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in self.fields.items()]
        if self.tokens:
            parts.append(f"{self.tokens_per_s():,.0f} tok/s")
        return " ".join(parts)

    def _print_line(self) -> None:
        print(self.line(), file=self.stream, flush=True)
        self._last_line, self._printed, self._last_done = time.monotonic(), True, self.done

    def _start_rich(self):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(TextColumn(self.what), BarColumn(), MofNCompleteColumn(), TextColumn(self.unit),
                       TextColumn("{task.fields[info]}"), TextColumn("ETA"), TimeRemainingColumn(),
                       console=Console(file=self.stream), transient=True)
        bar.start()
        self._task = bar.add_task(self.what, total=self.total, completed=self.done, info="")
        return bar


def current() -> Bar | None:
    return _CURRENT.get()


def advance(n: int = 1, tokens: int = 0, **fields) -> None:
    """Move the current bar (see Bar.current) by n; nothing when no bar is current."""
    bar = _CURRENT.get()
    if bar is not None:
        bar.advance(n, tokens, **fields)


def expect(total: int) -> None:
    """Set the current bar's total once the work is known (its ETA needs it)."""
    bar = _CURRENT.get()
    if bar is not None and total > 0:
        bar.set_total(total)
