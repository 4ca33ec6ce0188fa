"""The worker's StageContext: records events, honours signals and the pause key.

Signal handlers only set flags; the stage acts on them at its next batch boundary
through `poll()`. A second SIGINT/SIGTERM aborts at once (KeyboardInterrupt).
"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

from nexus_core.broker import keys
from nexus_core.context import Control, StageContext
from nexus_core.records.events import EVENT_TYPES, EventLog

PAUSE_CHECK_EVERY_S = 0.25


class Flags:
    """Process-wide signal flags (one job runs at a time in this process)."""

    usr1 = False
    usr2 = False
    term = 0
    stop_signal = "sigterm"  # which one asked to stop: recorded as the checkpoint's reason (Ctrl+C -> sigint)
    stop_after_job = False  # the worker stops taking jobs (USR1, TERM)
    device: str | None = None  # `nexus worker --device cuda:1` overrides the jobs' device
    home: Path | None = None  # the workdir this worker serves (jobs for another one are refused)

    @classmethod
    def clear_handled(cls) -> None:
        """After a job: its signals were acted on. (Signals that arrive between jobs stay set,
        so the next job pauses or checkpoints at its first batch boundary.)"""
        cls.usr1 = cls.usr2 = False
        cls.term = 0


def _on_usr1(signum, frame):
    Flags.usr1 = True
    Flags.stop_after_job = True


def _on_usr2(signum, frame):
    Flags.usr2 = True


def _on_term(signum, frame):
    Flags.term += 1
    Flags.stop_signal = "sigint" if signum == signal.SIGINT else "sigterm"
    Flags.stop_after_job = True  # also when it lands after the stage's last poll: no next job
    if Flags.term >= 2:
        raise KeyboardInterrupt("second interrupt: aborting the current batch")


def install_process_handlers() -> None:
    """For `nexus run` / `nexus worker` between jobs: USR1/USR2 only set flags (their default
    action would kill the process)."""
    signal.signal(signal.SIGUSR1, _on_usr1)
    signal.signal(signal.SIGUSR2, _on_usr2)


class signal_handlers:
    """Install the job-time handlers, restore the previous ones afterwards."""

    SIGNALS = {signal.SIGUSR1: _on_usr1, signal.SIGUSR2: _on_usr2, signal.SIGTERM: _on_term, signal.SIGINT: _on_term}

    def __enter__(self):
        self.previous = {s: signal.getsignal(s) for s in self.SIGNALS}
        for s, h in self.SIGNALS.items():
            signal.signal(s, h)
        return self

    def __exit__(self, *exc):
        for s, h in self.previous.items():
            signal.signal(s, h)
        return False


class WorkerContext(StageContext):
    def __init__(self, log: EventLog, conn, job_id: str, stage: str, teacher_id: str | None):
        self.log, self.conn = log, conn
        self.job_id, self.stage, self.teacher_id = job_id, stage, teacher_id
        self.was_started = False
        self._next_pause_check = 0.0
        self._paused_for: str | None = None

    def _append(self, type_: str, **data):
        return self.log.append(type_, teacher_id=self.teacher_id, stage=self.stage, job_id=self.job_id, data=data)

    def started(self, **data) -> None:
        if not self.was_started:
            self.was_started = True
            self._append("StageStarted", pid=os.getpid(), host=socket.gethostname(), **data)

    def progress(self, **data) -> None:
        self._append("StageProgress", **data)

    def checkpoint_saved(self, step, reason, path=None) -> None:
        self._append("CheckpointSaved", step=int(step), reason=reason, **({"path": str(path)} if path else {}))

    def oom_recovered(self, **data) -> None:
        self._append("OOMRecovered", **data)

    def note(self, event_type: str, **data) -> None:
        if event_type in EVENT_TYPES:
            self._append(event_type, **data)
        else:
            self._append("StageProgress", note=event_type, **data)

    def _pause_reason(self) -> dict | None:
        try:
            return keys.read_pause(self.conn)
        except Exception:
            return None  # Redis gone: keep working; the log is the source of truth

    def poll(self) -> Control:
        if Flags.term:
            return Control.STOP_INT if Flags.stop_signal == "sigint" else Control.STOP_TERM
        if Flags.usr1:
            return Control.STOP_USR1
        if Flags.usr2:
            Flags.usr2 = False
            return Control.CHECKPOINT
        now = time.monotonic()
        if now >= self._next_pause_check:
            self._next_pause_check = now + PAUSE_CHECK_EVERY_S
            if self._pause_reason():
                return Control.PAUSE
        return Control.CONTINUE

    def wait_while_paused(self) -> None:
        reason = self._pause_reason()
        if not reason:
            return
        t0 = time.monotonic()
        self._append("StagePaused", reason=reason.get("reason", "pause"), detail=reason)
        while self._pause_reason() and not (Flags.term or Flags.usr1):
            time.sleep(0.1)
        self._append("StageProgress", resumed=True, paused_s=round(time.monotonic() - t0, 3))

