"""The append-only event log (events/log.jsonl): the source of truth, and its fold.

Appends from several processes are serialised by an exclusive flock, numbered with a
gapless `seq`, and fsync'd before `append` returns. A torn last line (a crash mid-write)
is ignored by readers and cut off by the next writer; anything else unreadable is
corruption and is reported with its line number, never silently refolded.
"""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from nexus_core.errors import CorruptLogError

SCHEMA_VERSION = 1
EVENT_TYPES = frozenset({
    "TeacherAdded", "TeacherUpdated", "TeacherRemoved", "TeacherRejected",
    "StageQueued", "StageStarted", "StageProgress", "StageCompleted", "StageSkipped",
    "StageFailed", "StagePaused", "CheckpointSaved", "ThermalPause", "ThermalResume",
    "OOMRecovered", "PipelineReset", "StudentWarmStarted", "RunStarted", "RunFinished",
})


@dataclass(frozen=True)
class Event:
    seq: int
    ts: str
    type: str
    teacher_id: str | None = None
    stage: str | None = None
    job_id: str | None = None
    data: dict = field(default_factory=dict)
    v: int = SCHEMA_VERSION

    def to_json(self) -> str:
        return json.dumps({"seq": self.seq, "ts": self.ts, "type": self.type, "teacher_id": self.teacher_id,
                           "stage": self.stage, "job_id": self.job_id, "data": self.data, "v": self.v},
                          separators=(",", ":"), sort_keys=False)


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _upgrade(obj: dict) -> dict:
    """Old event versions are upgraded on read, never by rewriting the log."""
    if "v" not in obj:  # v0: before the schema version field; same shape otherwise
        obj["v"] = 1
    return obj


def _event_from(obj: dict) -> Event:
    obj = _upgrade(obj)
    return Event(seq=obj["seq"], ts=obj["ts"], type=obj["type"], teacher_id=obj.get("teacher_id"),
                 stage=obj.get("stage"), job_id=obj.get("job_id"), data=obj.get("data") or {}, v=obj["v"])


def parse_lines(raw: bytes, source: str = "events/log.jsonl") -> list[dict]:
    """Decode log bytes into event dicts. A torn final line is dropped; other bad lines raise."""
    lines = raw.split(b"\n")
    torn_tail = lines[-1] != b""  # no final newline: the last write never finished
    body = lines[:-1]
    out: list[dict] = []
    for i, line in enumerate(body, start=1):
        if not line.strip():
            raise CorruptLogError(f"{source}: line {i} is empty; the log was edited or corrupted")
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict) or not isinstance(obj.get("seq"), int) or not isinstance(obj.get("type"), str):
                raise ValueError("not an event")
        except (ValueError, RecursionError):
            raise CorruptLogError(f"{source}: line {i} is not a valid event; restore the log from a backup "
                                  f"or archive it with `nexus reset`") from None
        expected = out[-1]["seq"] + 1 if out else None
        if expected is not None and obj["seq"] != expected:
            raise CorruptLogError(f"{source}: line {i} has seq {obj['seq']}, expected {expected} (a gap: lines are missing)")
        out.append(obj)
    if torn_tail and lines[-1].strip():
        pass  # ignored: the next writer repairs it
    return out


def read_events(path: Path) -> list[Event]:
    path = Path(path)
    if not path.exists():
        return []
    return [_event_from(o) for o in parse_lines(path.read_bytes(), str(path))]


def _last_seq_and_repair(fd: int) -> int:
    """Under the lock: cut a torn tail, return the seq of the last complete line (0 if none)."""
    size = os.lseek(fd, 0, os.SEEK_END)
    if size == 0:
        return 0
    window = 4096
    while True:
        start = max(0, size - window)
        os.lseek(fd, start, os.SEEK_SET)
        tail = os.read(fd, size - start)
        if tail.endswith(b"\n"):
            complete_end = size
        else:
            cut = tail.rfind(b"\n")
            if cut == -1 and start > 0:
                window *= 4
                continue
            complete_end = start + cut + 1 if cut != -1 else 0
            os.ftruncate(fd, complete_end)  # repair: drop the torn line
            os.fsync(fd)
            size = complete_end
            if size == 0:
                return 0
            continue
        body = tail[: complete_end - start - 1]
        nl = body.rfind(b"\n")
        if nl == -1 and start > 0:
            window *= 4
            continue
        last = body[nl + 1:]
        try:
            return int(json.loads(last)["seq"])
        except (ValueError, KeyError, TypeError):
            raise CorruptLogError("events/log.jsonl: its last complete line is not a valid event") from None


class EventLog:
    """Appender for one log file. Safe across processes; each append is durable on return."""

    def __init__(self, path: Path, redis=None):
        self.path = Path(path)
        self.redis = redis

    def append(self, type: str, *, teacher_id: str | None = None, stage: str | None = None,
               job_id: str | None = None, data: dict | None = None) -> Event:
        assert type in EVENT_TYPES, f"unknown event type {type}"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            seq = _last_seq_and_repair(fd) + 1
            event = Event(seq=seq, ts=utc_now(), type=type, teacher_id=teacher_id, stage=stage,
                          job_id=job_id, data=data or {})
            os.write(fd, (event.to_json() + "\n").encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)  # closing releases the flock
        self._mirror(event)
        return event

    def _mirror(self, event: Event) -> None:
        if self.redis is None:
            return
        from nexus_core import keys

        try:  # best effort: the file is the source of truth
            self.redis.xadd(keys.EVENTS_STREAM, {"event": event.to_json()},
                            maxlen=keys.EVENTS_STREAM_MAXLEN, approximate=True)
        except Exception:
            pass

    def read(self) -> list[Event]:
        return read_events(self.path)


def replay(events):
    """State as a pure fold of `events` (see nexus_core.state)."""
    from nexus_core.state import replay as _replay

    return _replay(events)
