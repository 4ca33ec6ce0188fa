"""The file channel between the ranks of a multi-process distill and the stage's context.

The launcher (`nexus_core.ddp.launch`) and rank 0 share a folder:
- calls.jsonl: rank 0 appends each StageContext call (started, progress, checkpoint_saved, ...);
  the launcher replays them, in order, onto the real context (the worker's events).
- commands.jsonl: the launcher appends the controls its context's poll() returns (signals,
  thermal pause); rank 0 reads the new ones at each step and takes the strongest.
- resumed: how many pauses the launcher has waited out; every rank waits on it during a pause,
  without a collective that could time out while the GPU cools.
Only complete lines are read, so a half-written line is picked up at the next read.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from nexus_core.context import Control, StageContext
from nexus_core.errors import NexusError
from nexus_core.storage.atomic import write_text

_STRENGTH = {Control.CONTINUE: 0, Control.CHECKPOINT: 1, Control.PAUSE: 2, Control.STOP_USR1: 3, Control.STOP_TERM: 3,
             Control.STOP_INT: 3}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed worker stays a zombie until its parent reaps it
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _read_new_lines(path: Path, offset: int) -> tuple[list[str], int]:
    """Complete lines appended to `path` after byte `offset`, and the new offset."""
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except FileNotFoundError:
        return [], offset
    done = data[:data.rfind(b"\n") + 1]
    return done.decode().splitlines(), offset + len(done)


class RankContext(StageContext):
    """A rank's context. Rank 0 forwards every call to the launcher (calls.jsonl) and reads the
    launcher's commands (commands.jsonl); the other ranks record nothing. All ranks wait out a pause."""

    def __init__(self, run_dir: Path, rank: int, owner_pid: int):
        self.dir, self.rank, self.owner = run_dir, rank, owner_pid
        self._offset, self._pauses = 0, 0
        self._calls = open(run_dir / "calls.jsonl", "a") if rank == 0 else None

    def _forward(self, call: str, *args, **kwargs) -> None:
        if self._calls is not None:
            self._calls.write(json.dumps({"call": call, "args": args, "kwargs": kwargs}, default=str) + "\n")
            self._calls.flush()

    def _check_owner(self) -> None:
        if not _alive(self.owner):
            raise NexusError(f"the worker (pid {self.owner}) that launched this distill is gone; "
                             "stopping without a checkpoint (the job resumes from the last one)")

    def started(self, **data):
        self._forward("started", **data)

    def progress(self, **data):
        self._forward("progress", **data)

    def checkpoint_saved(self, step, reason, path=None):
        self._forward("checkpoint_saved", step=int(step), reason=reason, path=str(path) if path else None)

    def oom_recovered(self, **data):
        self._forward("oom_recovered", **data)

    def note(self, event_type, **data):
        self._forward("note", event_type, **data)

    def poll(self) -> Control:
        if self.rank != 0:
            return Control.CONTINUE
        self._check_owner()
        lines, self._offset = _read_new_lines(self.dir / "commands.jsonl", self._offset)
        return max((Control(json.loads(line)["cmd"]) for line in lines), key=_STRENGTH.get, default=Control.CONTINUE)

    def wait_while_paused(self):
        self._pauses += 1
        self._forward("wait_while_paused")
        while _resumed(self.dir) < self._pauses:
            self._check_owner()
            time.sleep(0.1)


def _resumed(run_dir: Path) -> int:  # how many pauses the launcher has waited out
    try:
        return int((run_dir / "resumed").read_text())
    except (FileNotFoundError, ValueError):
        return 0


class Relay:
    """The launcher's side: rank 0's calls onto the stage's context, the context's controls to rank 0."""

    def __init__(self, run_dir: Path, ctx: StageContext):
        self.dir, self.ctx = run_dir, ctx
        self._offset, self._resumed, self._sent = 0, 0, Control.CONTINUE
        self._commands = open(run_dir / "commands.jsonl", "a")

    def calls(self) -> None:
        lines, self._offset = _read_new_lines(self.dir / "calls.jsonl", self._offset)
        for line in lines:
            c = json.loads(line)
            if c["call"] == "wait_while_paused":
                self.ctx.wait_while_paused()
                self._resumed += 1
                self._sent = Control.CONTINUE  # a later pause is a new one
                write_text(self.dir / "resumed", str(self._resumed))
            elif c["call"] == "checkpoint_saved":
                kw = c["kwargs"]
                self.ctx.checkpoint_saved(kw["step"], kw["reason"], Path(kw["path"]) if kw["path"] else None)
            else:
                getattr(self.ctx, c["call"])(*c["args"], **c["kwargs"])

    def commands(self) -> None:
        control = self.ctx.poll()
        # a stop or pause stays in force while its cause does (flag, pause key): send it once
        if control == Control.CONTINUE or (control == self._sent and control != Control.CHECKPOINT):
            return
        self._sent = control
        self._commands.write(json.dumps({"cmd": control.value}) + "\n")
        self._commands.flush()

    def close(self) -> None:
        self._commands.close()
