"""The append-only event log (events/log.jsonl): the source of truth, and its fold.

Appends from several processes are serialised by an exclusive flock, numbered with a
gapless `seq`, and fsync'd before `append` returns. A torn last line (a crash mid-write)
is ignored by readers and cut off by the next writer; anything else unreadable is
corruption and is reported with its line number, never silently refolded.
"""

from __future__ import annotations

import fcntl
import gc
import json
import operator
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

import orjson

from nexus_core.errors import CorruptLogError
from nexus_core.records.state import State
from nexus_core.records.state import replay as fold

SCHEMA_VERSION = 1
EVENT_TYPES = frozenset({
    "TeacherAdded", "TeacherUpdated", "TeacherRemoved", "TeacherRejected",
    "StageQueued", "StageStarted", "StageProgress", "StageCompleted", "StageSkipped",
    "StageFailed", "StagePaused", "CheckpointSaved", "ThermalPause", "ThermalResume",
    "OOMRecovered", "PipelineReset", "StudentWarmStarted", "RunStarted", "RunFinished",
    "JobRefused",  # a job on the queue that the worker would not run (foreign function, bad payload, ...)
})


class Event(NamedTuple):
    """An immutable fact. A NamedTuple rather than a dataclass: replay builds 100k+ of them."""

    seq: int
    ts: str
    type: str
    teacher_id: str | None = None
    stage: str | None = None
    job_id: str | None = None
    data: dict = {}
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
    if "v" not in obj:
        obj = _upgrade(obj)
    g = obj.get
    return Event(obj["seq"], obj["ts"], obj["type"], g("teacher_id"), g("stage"), g("job_id"), g("data") or {}, obj["v"])


def parse_lines(raw: bytes, source: str = "events/log.jsonl") -> list[dict]:
    """Decode log bytes into event dicts. A torn final line is dropped; other bad lines raise."""
    end = raw.rfind(b"\n") + 1  # bytes after the last newline are a torn write: ignored
    body = raw[:end]
    if not body:
        return []
    try:
        # one parse over the whole log, with orjson: ~2x faster than json line by line
        out = orjson.loads(b"[" + body[:-1].replace(b"\n", b",") + b"]")
        if all(isinstance(o, dict) for o in out) and len(out) == body.count(b"\n"):
            _check_seqs(out, source)
            return out
    except (orjson.JSONDecodeError, ValueError, RecursionError):
        pass
    return _parse_line_by_line(body, source)  # slow path: find the bad line and say which


def _check_seqs(out: list[dict], source: str) -> None:
    try:  # the common case, checked in C: gapless ints and string types
        seqs = [o["seq"] for o in out]
        if (seqs == list(range(seqs[0], seqs[0] + len(seqs))) and all(type(x) is int for x in seqs)
                and all(type(o["type"]) is str for o in out)):
            return
    except (KeyError, TypeError, IndexError):
        pass
    prev = None
    for i, obj in enumerate(out, start=1):
        seq = obj.get("seq")
        if not isinstance(seq, int) or not isinstance(obj.get("type"), str):
            raise CorruptLogError(f"{source}: line {i} is not a valid event; restore the log from a backup "
                                  f"or archive it with `nexus reset`")
        if prev is not None and seq != prev + 1:
            if seq <= prev:  # a line written twice (a copy-paste, a restored backup): not a gap
                raise CorruptLogError(f"{source}: line {i} repeats seq {seq} (expected {prev + 1}): a duplicated "
                                      f"or out-of-order line; remove it, or archive the log with `nexus reset`")
            raise CorruptLogError(f"{source}: line {i} has seq {seq}, expected {prev + 1} (a gap: lines are missing)")
        prev = seq


def _parse_line_by_line(body: bytes, source: str) -> list[dict]:
    out: list[dict] = []
    for i, line in enumerate(body.split(b"\n")[:-1], start=1):
        if not line.strip():
            raise CorruptLogError(f"{source}: line {i} is empty; the log was edited or corrupted")
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict):
                raise ValueError("not an event")
        except (ValueError, RecursionError):
            raise CorruptLogError(f"{source}: line {i} is not a valid event; restore the log from a backup "
                                  f"or archive it with `nexus reset`") from None
        out.append(obj)
    _check_seqs(out, source)
    return out


_FIELDS = operator.itemgetter(*Event._fields)


def read_events(path: Path) -> list[Event]:
    path = Path(path)
    if not path.exists():
        return []
    # Hundreds of thousands of fresh dicts would trigger the cyclic GC over and over, for
    # nothing (they hold no cycles): it is paused while they are built (~2x faster).
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        objs = parse_lines(path.read_bytes(), str(path))
        try:  # the writer always writes every field: build the tuples in C
            return list(map(Event._make, map(_FIELDS, objs)))
        except KeyError:  # older or hand-made lines: upgrade them field by field
            return [_event_from(o) for o in objs]
    finally:
        if was_enabled:
            gc.enable()


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
        from nexus_core.broker import keys

        try:  # best effort: the file is the source of truth
            self.redis.xadd(keys.EVENTS_STREAM, {"event": event.to_json()},
                            maxlen=keys.EVENTS_STREAM_MAXLEN, approximate=True)
        except Exception:
            pass

    def read(self) -> list[Event]:
        return read_events(self.path)


def replay(events):
    """State as a pure fold of `events` (see nexus_core.records.state)."""
    return fold(events)


def load_state(paths) -> State:
    """A workdir's state: its log read once and folded (no Redis needed). Read it once per decision and
    pass it down."""
    return fold(read_events(paths.log))
