"""Security: ids never escape their folders; no pickle loads; Redis only for its owner; the worker runs
Nexus's own stage jobs and nothing else."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from nexus_core.errors import UnsafePathError
from nexus_core.paths import Paths, safe_join
from nexus_core.records.events import read_events
from tests.helpers import ARITH, nexus, of_type, register, write_dataset

ROOT = Path(__file__).resolve().parent.parent
CODE_DIRS = ("nexus", "nexus_core", "producer", "workers", "bench")


def _sources():
    for d in CODE_DIRS:
        yield from (ROOT / d).rglob("*.py")


def test_no_pickle_and_every_torch_load_is_weights_only():
    offenders = []
    for f in _sources():
        text = f.read_text()
        for m in re.finditer(r"torch\.load\((?P<args>[^)]*)\)", text):
            if "weights_only=True" not in m.group("args"):
                offenders.append(f"{f.relative_to(ROOT)}: torch.load without weights_only=True")
        if re.search(r"pickle\.(loads?|Unpickler)\b|^\s*(import dill|import cloudpickle|from pickle import load)", text, re.M):
            offenders.append(f"{f.relative_to(ROOT)}: unpickles data")
        if re.search(r"trust_remote_code\s*=\s*True", text):
            offenders.append(f"{f.relative_to(ROOT)}: hard-codes trust_remote_code=True")
    assert not offenders, "\n".join(offenders)


@pytest.mark.parametrize("bad", ["../x", "a/b", "..", ".", "", "a\x00b", "/etc", "x" * 65, "-lead"])
def test_teacher_id_never_escapes(tmp_path, bad):
    paths = Paths(tmp_path)
    with pytest.raises(UnsafePathError):
        paths.teacher_memory(bad)
    with pytest.raises(UnsafePathError):
        paths.profile(bad)


def test_symlink_escape_is_refused(tmp_path):
    base = tmp_path / "memory"
    base.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (base / "evil").symlink_to(outside)
    with pytest.raises(UnsafePathError, match="outside"):
        safe_join(base, "evil")
    assert safe_join(base, "fine") == base / "fine"


def test_dataset_names_never_escape(tmp_path):
    from nexus_core.data import DatasetRef, select
    from nexus_core.errors import DatasetError

    for bad in ("../etc/passwd", "a/../../b", "a/b/c", "/abs/x"):
        with pytest.raises(DatasetError):
            select(Paths(tmp_path), bad)
    with pytest.raises(DatasetError):
        DatasetRef.parse("..//x")


def test_embedded_redis_is_not_on_the_network(tmp_path, monkeypatch):
    from nexus_core.broker.server import EmbeddedRedis, connect

    monkeypatch.delenv("REDIS_URL", raising=False)
    server = EmbeddedRedis(Paths(tmp_path).ensure())
    url = server.start()
    try:
        cfg = connect(url).config_get("*")
        if url.startswith("unix://"):
            assert cfg["port"] == "0" and cfg["unixsocketperm"] == "700"
        else:
            assert cfg["bind"].split() == ["127.0.0.1"]
    finally:
        server.stop()


# --- the queue: a job is data, and the worker runs only Nexus's own stage entry point ----------------

class _Evil:
    """Unpickling this runs a shell command: what a stranger's pickle payload would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_the_worker_refuses_pickles_foreign_functions_and_forged_payloads(workdir, tiny_teacher_dir, tmp_path,
                                                                          redis_conn, redis_url, fast_env):
    from rq import Queue
    from rq.serializers import JSONSerializer

    from nexus_core.config import load_settings
    from nexus_core.records.events import EventLog, load_state
    from nexus_core.records.job import JOB_FUNC, JobSerializer
    from producer.enqueue import enqueue_specs
    from producer.sync import sync_once

    paths = workdir
    write_dataset(paths, "reasoning/arith", [{"text": t} for t in ARITH])
    register(paths, "tiny", tiny_teacher_dir)
    markers = {name: tmp_path / f"ran-{name}" for name in ("pickle", "foreign", "callback", "forged")}
    stranger = Queue("nexus", connection=redis_conn)  # RQ's default serializer: pickle
    stranger.enqueue_call(func=JOB_FUNC, args=(_Evil(markers["pickle"]),), job_id="evil-pickle")
    as_json = Queue("nexus", connection=redis_conn, serializer=JSONSerializer)
    as_json.enqueue_call(func="os.system", args=(f"touch {markers['foreign']}",), job_id="evil-foreign")
    as_json.enqueue_call(func=JOB_FUNC, args=({"stage": "profile"},), job_id="evil-callback",
                         on_success="os.system")
    # a well-formed payload whose teacher points at another folder with custom code switched on
    cfg = load_settings(paths.home, environ=fast_env)  # the test's small settings (no augmentation) in the jobs
    log = EventLog(paths.log, redis=redis_conn)
    good = sync_once(paths, cfg, redis_conn, log)  # the real chain, behind the strangers' jobs
    profile = next(s for s in good.specs if s.stage == "profile")
    forged = profile.payload.to_dict()
    forged["teacher"] = {**forged["teacher"], "path": str(tmp_path), "trust_remote_code": True}
    as_json.enqueue_call(func=JOB_FUNC, args=(forged,), job_id="evil-forged", at_front=True)
    (tmp_path / "config.json").write_text('{"auto_map": {"AutoConfig": "x.Y"}}')
    (tmp_path / "x.py").write_text(f"import pathlib; pathlib.Path({str(markers['forged'])!r}).touch()\n")

    result = nexus(paths, "worker", "--burst", redis_url=redis_url, env_extra=fast_env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not [m for m in markers.values() if m.exists()], "a stranger's job ran code"
    refused = {e.job_id: e.data["reason"] for e in of_type(read_events(paths.log), "JobRefused")}
    assert "pickled" in refused["evil-pickle"] and "os.system" in refused["evil-foreign"]
    assert "callbacks" in refused["evil-callback"] and "differs from the one on record" in refused["evil-forged"]
    assert all("\n" not in r for r in refused.values())
    failed = Queue("nexus", connection=redis_conn, serializer=JobSerializer).failed_job_registry.get_job_ids()
    assert set(refused) <= set(failed)
    state = load_state(paths)  # and the good chain behind them ran to the end
    assert [s.status.value for s in state.stages.values()] == ["done"] * len(good.specs)
    assert not enqueue_specs(good.specs, redis_conn, log, state, paths.home, 60)


def test_job_payloads_round_trip_and_reject_anything_else(workdir, fake_model):
    from nexus_core.config import Settings
    from nexus_core.records.job import JobPayload, JobRefusedError
    from nexus_core.records.registry import parse_teacher
    from nexus_core.records.state import State, TeacherState
    from workers.admission import verify_payload

    t = parse_teacher({"teacher_id": "a", "path": str(fake_model), "status": "ready"}, "registry/a.json", workdir.home)
    from nexus_core.broker.keys import Stage
    from nexus_core.data import DatasetRef

    p = JobPayload(Stage.EXTRACT, str(workdir.home), Settings(), teacher=t, dataset=DatasetRef("a", "b"), part=(1, 3))
    assert JobPayload.from_dict(p.to_dict()) == p
    state = State(teachers={"a": TeacherState("a", t, t.fingerprint(), t.source)})
    assert verify_payload(p.to_dict(), state, workdir.home) == p
    bad = [
        ([1, 2], "not an object"), ({**p.to_dict(), "stage": "shell"}, "unknown stage"),
        ({**p.to_dict(), "cmd": "rm -rf /"}, "unexpected payload field"),
        ({**p.to_dict(), "dataset": "../../etc"}, "category/name"), ({**p.to_dict(), "range": [3, 3]}, "range"),
        ({**p.to_dict(), "settings": {"distill": {"lr": "fast"}}}, "not a valid float"),
        ({**p.to_dict(), "teacher": {"teacher_id": "a", "evil": 1}}, "not a teacher record"),
    ]
    for raw, words in bad:
        with pytest.raises(JobRefusedError, match=words):
            JobPayload.from_dict(raw)
    with pytest.raises(JobRefusedError, match="this worker serves"):
        verify_payload({**p.to_dict(), "home": "/elsewhere"}, state, workdir.home)
    with pytest.raises(JobRefusedError, match="not registered"):
        verify_payload(p.to_dict(), State(), workdir.home)
