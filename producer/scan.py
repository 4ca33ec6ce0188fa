"""Registry scan: compare registry/ with the replayed state and return the events to record.

`diff_registry` is pure (files' parse results + state -> events); `scan_registry` reads the
folder, retries half-written files, and appends what `diff_registry` returns.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

from nexus_core.errors import RegistryError
from nexus_core.paths import Paths
from nexus_core.records.events import EventLog
from nexus_core.records.registry import MAX_FILE_BYTES, Teacher, parse_registry_file, registry_files, source_name
from nexus_core.records.state import State

FRESH_WRITE_S = 2.0  # a file modified this recently that does not parse may still be being written


@dataclass
class PlannedEvent:
    type: str
    teacher_id: str | None
    data: dict


@dataclass
class ScanResult:
    events: list = field(default_factory=list)  # the Event objects appended
    pending: list = field(default_factory=list)  # files still being written: retry later

    @property
    def rejected(self) -> list:
        return [e for e in self.events if e.type == "TeacherRejected"]


def _recorded(state: State, source: str, reason: str, sha: str | None) -> bool:
    """This rejection of this file's current bytes is on record already (say it once, not every scan)."""
    prior = state.rejections.get(source, {}).get(reason)
    return prior is not None and prior.get("file_sha") == sha


def diff_registry(parsed: dict[str, tuple[list[Teacher], list[RegistryError]]], state: State,
                  files: dict[str, dict] | None = None) -> list[PlannedEvent]:
    """Events that bring `state` in line with the parsed registry files (source -> result).

    `files` (source -> {"file_sha", and "link_target" for a symlink}) is recorded with each event."""
    files = files or {}
    out: list[PlannedEvent] = []
    claimed: dict[str, str] = {}  # teacher_id -> source that owns it this scan
    # An id already registered keeps its file; others are claimed in sorted file order.
    for tid, ts in state.teachers.items():
        if ts.active and ts.source in parsed and any(t.teacher_id == tid for t in parsed[ts.source][0]):
            claimed[tid] = ts.source
    for source in sorted(parsed):
        teachers, rejections = parsed[source]
        about = files.get(source, {})
        sha = about.get("file_sha")
        for exc in rejections:
            if not _recorded(state, source, exc.reason, sha):
                out.append(PlannedEvent("TeacherRejected", exc.teacher_id, {"source": source, "reason": exc.reason,
                                                                            "message": str(exc), **about}))
        for t in teachers:
            owner = claimed.setdefault(t.teacher_id, source)
            if owner != source:
                reason = f"field 'teacher_id': {t.teacher_id!r} is already registered by {owner}; rename one of them"
                if not _recorded(state, source, reason, sha):
                    out.append(PlannedEvent("TeacherRejected", t.teacher_id, {"source": source, "reason": reason,
                                                                              "message": f"{source}: {reason}", **about}))
                continue
            current = state.teachers.get(t.teacher_id)
            data = {"teacher": t.to_dict(), "fingerprint": t.fingerprint(), **about}
            if current is None or not current.active:
                out.append(PlannedEvent("TeacherAdded", t.teacher_id, data))
            elif current.fingerprint != t.fingerprint():
                out.append(PlannedEvent("TeacherUpdated", t.teacher_id, data))
            elif state.rejections.get(source) and state.file_shas.get(source) != sha:
                # same teacher, but its file was edited: record the new bytes, so that rejections of the
                # file's earlier contents stop standing (nexus status)
                out.append(PlannedEvent("TeacherUpdated", t.teacher_id, data))
    for tid, ts in sorted(state.teachers.items()):
        if ts.active and claimed.get(tid) is None:
            out.append(PlannedEvent("TeacherRemoved", tid, {"source": ts.source}))
    return out


def _parse_with_retry(file: Path, home: Path, wait: bool) -> tuple[list[Teacher], list[RegistryError]] | None:
    """Parse; a file that is not valid JSON yet and was written just now is retried (or deferred)."""
    while True:
        result = parse_registry_file(file, home)
        teachers, rejections = result
        half_written = (not teachers and rejections and "not valid JSON" in rejections[0].reason)
        try:
            age = time.time() - file.stat().st_mtime
        except FileNotFoundError:
            return None
        if not half_written or age >= FRESH_WRITE_S:
            return result
        if not wait:
            return None  # caller retries after its debounce
        time.sleep(min(0.25, FRESH_WRITE_S - age + 0.01))


def _about(file: Path) -> dict:
    """What the events record of a registry file: a hash of its bytes, and where a symlink leads."""
    about = {}
    try:
        about["file_sha"] = hashlib.sha256(file.read_bytes()[:MAX_FILE_BYTES + 1]).hexdigest()[:16]
    except OSError:
        pass
    if file.is_symlink():  # followed, and said: the teacher comes from wherever the link points
        about["link_target"] = str(file.resolve())
    return about


def scan_registry(paths: Paths, log: EventLog, state: State, wait: bool = True) -> ScanResult:
    """Read every registry file, append TeacherAdded/Updated/Removed/Rejected as needed."""
    result = ScanResult()
    parsed, files = {}, {}
    for file in registry_files(paths.registry):
        r = _parse_with_retry(file, paths.home, wait)
        source = source_name(file, paths.home)
        files[source] = _about(file)
        if r is None:
            if file.exists():
                result.pending.append(file)
                # keep what the state knows about this file until it settles
                parsed[source] = ([t.teacher for t in state.teachers.values()
                                   if t.active and t.source == source], [])
            continue
        parsed[source] = r
    for pe in diff_registry(parsed, state, files):
        result.events.append(log.append(pe.type, teacher_id=pe.teacher_id, data=pe.data))
    return result
