"""State as a pure fold of the event log: one small handler per event type.

`replay(events) -> State` does no I/O. Whether a completed stage's artefacts still match
is a separate check (`artifacts_intact`), made by whoever needs it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from nexus_core.broker.keys import StageStatus
from nexus_core.errors import CorruptLogError
from nexus_core.records.registry import Teacher
from nexus_core.storage.atomic import sha256_file


@dataclass
class TeacherState:
    teacher_id: str
    teacher: Teacher  # as registered (TeacherAdded/TeacherUpdated)
    fingerprint: str  # its inputs' identity, as the event recorded it
    source: str
    active: bool = True


@dataclass
class StageState:
    job_id: str
    stage: str
    teacher_id: str | None = None
    dataset: str | None = None
    plan: str | None = None
    description: str = ""
    status: StageStatus = StageStatus.QUEUED
    spec: dict | None = None
    depends_on: list = field(default_factory=list)
    artifacts: list = field(default_factory=list)
    progress: dict = field(default_factory=dict)
    result: dict = field(default_factory=dict)
    error: str | None = None
    resume: dict = field(default_factory=dict)
    started_ts: str | None = None
    finished_ts: str | None = None
    attempts: int = 0
    last_checkpoint: dict | None = None
    failed_seq: int | None = None
    bad_input: bool = False


@dataclass
class State:
    last_seq: int = 0
    teachers: dict = field(default_factory=dict)  # teacher_id -> TeacherState
    rejections: dict = field(default_factory=dict)  # source file -> {reason -> {teacher_id, seq, file_sha}}
    file_shas: dict = field(default_factory=dict)  # source file -> hash of the bytes the last registry event saw
    stages: dict = field(default_factory=dict)  # job_id -> StageState
    checkpoints: list = field(default_factory=list)
    thermal: dict = field(default_factory=lambda: {"paused": False})
    oom: list = field(default_factory=list)
    resets: int = 0
    runs: list = field(default_factory=list)
    refused: list = field(default_factory=list)  # jobs the worker would not run: {job_id, reason, seq}

    def active_teachers(self) -> list[Teacher]:
        return [t.teacher for t in sorted(self.teachers.values(), key=lambda t: t.teacher_id) if t.active]

    def stage(self, job_id: str) -> StageState | None:
        return self.stages.get(job_id)


def _stage(state: State, e) -> StageState:
    st = state.stages.get(e.job_id)
    if st is None:
        st = state.stages[e.job_id] = StageState(job_id=e.job_id, stage=e.stage or e.job_id.split("-")[0],
                                                  teacher_id=e.teacher_id)
    return st


def _teacher_added(state, e):
    t = Teacher.from_dict(e.data["teacher"])
    fp = e.data.get("fingerprint") or t.fingerprint()
    state.teachers[e.teacher_id] = TeacherState(e.teacher_id, t, fp, t.source, True)
    _registry_file(state, t.source, e.data.get("file_sha"))


def _registry_file(state, source: str, sha: str | None) -> None:
    """A registry event saw `source` with these bytes: rejections of its earlier contents no longer stand."""
    if state.file_shas.get(source) != sha:
        state.file_shas[source] = sha
        kept = {r: v for r, v in state.rejections.get(source, {}).items() if v.get("file_sha") == sha}
        if kept:
            state.rejections[source] = kept
        else:
            state.rejections.pop(source, None)


def _teacher_removed(state, e):
    if e.teacher_id in state.teachers:
        state.teachers[e.teacher_id].active = False


def _teacher_rejected(state, e):
    source = e.data.get("source", "")
    _registry_file(state, source, e.data.get("file_sha"))
    reason = e.data.get("reason")
    state.rejections.setdefault(source, {})[reason] = {"teacher_id": e.teacher_id, "seq": e.seq,
                                                       "file_sha": e.data.get("file_sha")}


def _stage_queued(state, e):
    st = _stage(state, e)
    st.status = StageStatus.QUEUED
    st.description = e.data.get("description", st.description)
    st.dataset = e.data.get("dataset", st.dataset)
    st.plan = e.data.get("plan", st.plan)
    st.spec = e.data.get("spec", st.spec)
    st.depends_on = e.data.get("depends_on", st.depends_on)
    st.error = None


def _stage_started(state, e):
    st = _stage(state, e)
    st.status = StageStatus.RUNNING
    st.started_ts = e.ts
    st.attempts += 1
    st.resume = dict(e.data)
    st.error = None


def _stage_progress(state, e):
    _stage(state, e).progress = e.data  # events are immutable facts: no copy needed


def _stage_completed(state, e):
    st = _stage(state, e)
    st.status = StageStatus.DONE
    st.finished_ts = e.ts
    st.artifacts = e.data.get("artifacts", [])
    st.result = {k: v for k, v in e.data.items() if k != "artifacts"}


def _stage_skipped(state, e):
    st = _stage(state, e)
    # skipped because an earlier completion's artefacts are intact: done, as it was
    st.status = StageStatus.DONE if st.artifacts else StageStatus.SKIPPED
    st.finished_ts = e.ts


def _stage_failed(state, e):
    st = _stage(state, e)
    st.status = StageStatus.FAILED
    st.failed_seq = e.seq
    st.bad_input = bool(e.data.get("bad_input"))
    st.finished_ts = e.ts
    st.error = e.data.get("error", "failed")


def _stage_paused(state, e):
    st = _stage(state, e)
    if e.data.get("reason") in ("sigusr1", "sigterm", "sigint", "interrupted"):
        st.status = StageStatus.PAUSED
    st.progress = {**st.progress, "paused": e.data.get("reason")}


def _checkpoint_saved(state, e):
    state.checkpoints.append({"job_id": e.job_id, "seq": e.seq, **e.data})
    if e.job_id:
        _stage(state, e).last_checkpoint = dict(e.data)


def _thermal_pause(state, e):
    state.thermal = {"paused": True, "since": e.ts, **e.data}


def _thermal_resume(state, e):
    state.thermal = {"paused": False, "resumed": e.ts, **e.data}


def _job_refused(state, e):
    state.refused.append({"job_id": e.job_id, "seq": e.seq, **e.data})
    st = state.stages.get(e.job_id)
    if st is not None:  # one of ours, refused (e.g. its teacher changed since it was queued)
        st.status, st.failed_seq, st.finished_ts = StageStatus.FAILED, e.seq, e.ts
        st.error = f"refused: {e.data.get('reason', '')}"


def _oom(state, e):
    state.oom.append({"job_id": e.job_id, **e.data})


def _reset(state, e):
    state.resets += 1


def _run(state, e):
    state.runs.append({"type": e.type, "ts": e.ts, **e.data})


HANDLERS = {
    "TeacherAdded": _teacher_added,
    "TeacherUpdated": _teacher_added,
    "TeacherRemoved": _teacher_removed,
    "TeacherRejected": _teacher_rejected,
    "StageQueued": _stage_queued,
    "StageStarted": _stage_started,
    "StageProgress": _stage_progress,
    "StageCompleted": _stage_completed,
    "StageSkipped": _stage_skipped,
    "StageFailed": _stage_failed,
    "StagePaused": _stage_paused,
    "CheckpointSaved": _checkpoint_saved,
    "ThermalPause": _thermal_pause,
    "ThermalResume": _thermal_resume,
    "OOMRecovered": _oom,
    "PipelineReset": _reset,
    "RunStarted": _run,
    "RunFinished": _run,
    "JobRefused": _job_refused,
}


def replay(events, state: State | None = None) -> State:
    """Fold events (in seq order, gapless) into a State, a fresh one or `state` (which is updated and
    returned: new events folded onto what the caller already holds). Unknown types are kept out."""
    state = State() if state is None else state
    for e in events:
        if state.last_seq and e.seq != state.last_seq + 1:
            what = "a duplicated or out-of-order event" if e.seq <= state.last_seq else "a gap in the log"
            raise CorruptLogError(f"event seq {e.seq} follows {state.last_seq}: {what}")
        state.last_seq = e.seq
        handler = HANDLERS.get(e.type)
        if handler is not None:
            handler(state, e)
    return state


_VERIFIED: dict[tuple, bool] = {}  # (path, size, mtime_ns, sha256) -> matched: hash each file once per change


def artifacts_intact(stage: StageState, home: Path) -> bool:
    """A done stage counts only while every artefact still has its recorded size and sha256."""
    return stage.status == StageStatus.DONE and files_intact(stage.artifacts, home)


def files_intact(artifacts: list, home: Path) -> bool:
    """Every recorded artefact ({path, size, sha256}) is on disk unchanged; False when none."""
    if not artifacts:
        return False
    for a in artifacts:
        p = Path(home) / a["path"]
        try:
            st = p.stat()
        except OSError:
            return False
        if st.st_size != a["size"]:
            return False
        key = (str(p), st.st_size, st.st_mtime_ns, a["sha256"])
        if key not in _VERIFIED:
            _VERIFIED[key] = sha256_file(p) == a["sha256"]
        if not _VERIFIED[key]:
            return False
    return True
