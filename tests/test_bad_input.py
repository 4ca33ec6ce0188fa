"""Bad input through the real CLI: every bad teacher JSON, model folder and dataset at once.

Each is reported by a TeacherRejected (registry problems) or a StageFailed with
bad_input=true (model/dataset problems) whose reason is one line naming the file or field;
`nexus run` exits 2; the good teacher in the same registry still completes. Nothing
pickled and no custom model code is ever executed (marker files prove it).
Parser-level cases and its hypothesis fuzz: tests/test_registry.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nexus_core.records.events import read_events
from tests.helpers import ARITH, CODE, FAST_SETTINGS, bad_model_folders, nexus, of_type, register, write_dataset

ENV = dict(FAST_SETTINGS)


def _write(paths, name: str, text: str) -> str:
    (paths.registry / name).write_text(text)
    return f"registry/{name}"


@pytest.fixture
def markers(tmp_path) -> Path:
    m = tmp_path / "markers"
    m.mkdir()
    return m


def test_every_bad_teacher_is_reported_and_the_good_one_completes(workdir, tiny_teacher_dir, redis_conn, redis_url,
                                                                   tmp_path, markers):
    paths = workdir
    write_dataset(paths, "reasoning/arith", [{"text": t} for t in ARITH])
    register(paths, "tiny", tiny_teacher_dir)
    folders = bad_model_folders(tmp_path / "models", tiny_teacher_dir, markers)
    good = str(tiny_teacher_dir)

    def teacher(tid, path=good, **extra):
        return json.dumps({"teacher_id": tid, "path": str(path), "status": "ready", **extra})

    # registry-level problems -> TeacherRejected naming the file (and the field)
    rejected = {
        _write(paths, "malformed.json", '{"teacher_id": "m", "path": ' + json.dumps(good) + ', status: ready}'): "JSON",
        _write(paths, "partial.json", teacher("partial")[:25]): "JSON",
        _write(paths, "wrongtype.json", json.dumps({"teacher_id": "wt", "path": 5, "status": "ready"})): "'path'",
        _write(paths, "wrongtype2.json", teacher("wt2", weight="heavy")): "'weight'",
        _write(paths, "unknown.json", teacher("uf", colour="red")): "'colour'",
        _write(paths, "zz-duplicate.json", teacher("tiny")): "already registered",
        _write(paths, "dotdot.json", teacher("../evil")): "'teacher_id'",
        _write(paths, "slash.json", teacher("a/b")): "'teacher_id'",
        _write(paths, "nul.json", teacher("a\u0000b")): "'teacher_id'",
        _write(paths, "missing.json", teacher("missing", "/no/such/model")): "does not exist",
        _write(paths, "notmodel.json", teacher("notmodel", folders["empty"])): "no config.json",
        _write(paths, "pickled.json", teacher("pickled", folders["pickled"])): "pickle",
        _write(paths, "huge.json", '{"teacher_id": "huge", "pad": "' + "x" * (2 << 20) + '"}'): "bytes",
        _write(paths, "deep.json", "[" * 100_000 + "]" * 100_000): "nested too deeply",
        _write(paths, "deep2.json", '{"teacher_id": "deep2", "path": ' + json.dumps(good) + ', "x": '
               + "[" * 3000 + "]" * 3000 + "}"): ("'x'", "nested too deeply"),
    }
    # model-level problems -> StageFailed(profile, bad_input=true)
    failing = {"mismatch": "config.json", "badtok": "tokenizer", "remote": "trust_remote_code",
               "layers": "num_hidden_layers=1000000", "wide": "intermediate_size=1000000000"}
    for tid in failing:
        _write(paths, f"{tid}.json", teacher(tid, folders[tid]))

    result = nexus(paths, "run", redis_url=redis_url, env_extra=ENV)
    assert result.returncode == 2, result.stderr[-3000:]
    events = read_events(paths.log)
    by_source = {e.data["source"]: e for e in of_type(events, "TeacherRejected")}
    for source, word in rejected.items():
        assert source in by_source, (source, sorted(by_source))
        message = by_source[source].data["message"]
        words = word if isinstance(word, tuple) else (word,)
        assert "\n" not in message and message.startswith(source) and any(w in message for w in words), message
        assert result.stderr.count(f"rejected: {source}") == 1, result.stderr  # said on the terminal, once
    for tid, word in failing.items():
        failed = [e for e in of_type(events, "StageFailed", "profile") if e.teacher_id == tid]
        assert len(failed) == 1, (tid, [e.data.get("error") for e in of_type(events, "StageFailed")])
        err = failed[0].data["error"]
        assert failed[0].data["bad_input"] and "\n" not in err and word in err, err
    assert not list(markers.iterdir()), "pickled or remote code was executed"
    assert {e.teacher_id for e in of_type(events, "TeacherAdded")} == {"tiny", *failing}
    done = {e.stage for e in of_type(events, "StageCompleted")}
    assert done == {"profile", "extract", "distill", "router"}
    assert all(e.teacher_id in (None, "tiny") for e in of_type(events, "StageCompleted"))
    assert not (paths.memory / "evil").exists() and not (paths.home.parent / "evil").exists()
    # the report names each teacher left out of the plan, with its profile's one-line reason
    report = json.loads((paths.results / "report.json").read_text())
    failed_rows = {t["teacher_id"]: t["failed"] for t in report["teachers"] if t.get("failed")}
    assert set(failed_rows) == set(failing) and all(w in failed_rows[t] for t, w in failing.items())
    assert "Left out of the plan" in (paths.results / "report.md").read_text()


def test_bad_datasets_fail_their_extract_and_the_good_ones_complete(workdir, tiny_teacher_dir, redis_conn, redis_url):
    paths = workdir
    write_dataset(paths, "reasoning/arith", [{"text": t} for t in ARITH])
    write_dataset(paths, "code/snippets", [{"text": t} for t in CODE])
    (paths.datasets / "bad" / "empty").mkdir(parents=True)
    (paths.datasets / "bad" / "empty" / "data.jsonl").write_text("")
    (paths.datasets / "bad" / "binary").mkdir(parents=True)
    (paths.datasets / "bad" / "binary" / "data.jsonl").write_bytes(bytes(range(256)) * 64)
    write_dataset(paths, "bad/nocolumn", [{"id": i, "score": i * 0.5} for i in range(50)])
    register(paths, "tiny", tiny_teacher_dir)
    result = nexus(paths, "run", redis_url=redis_url, env_extra=ENV)
    assert result.returncode == 2, result.stderr[-3000:]
    events = read_events(paths.log)
    failed = {e.job_id: e for e in of_type(events, "StageFailed")}
    extract_failed = [e for e in failed.values() if e.stage == "extract"]
    datasets = {e.job_id: e.data.get("dataset") for e in of_type(events, "StageQueued", "extract")}
    assert sorted(datasets[e.job_id] for e in extract_failed) == ["bad/binary", "bad/empty", "bad/nocolumn"]
    for e in extract_failed:
        assert e.data["bad_input"] and "\n" not in e.data["error"] and datasets[e.job_id] in e.data["error"], e.data
    # the first plan's distill waited on every extract: it fails visibly, naming its cause, and
    # the re-plan without the bad datasets distils the good ones
    others = [e for e in failed.values() if e.stage != "extract"]
    assert all(e.data.get("cause") in datasets and e.data["error"].startswith("dependency") for e in others
               if e.stage == "distill"), [e.data["error"] for e in others]
    done = [e.stage for e in of_type(events, "StageCompleted")]
    assert sorted(done) == ["distill", "extract", "extract", "profile", "router"]
    plan = json.loads((paths.results / "eval.json").read_text())
    assert sorted(plan["datasets"]) == ["code/snippets", "reasoning/arith"]


@pytest.mark.parametrize("args, words", [
    (("--datasets", "nope/none"), "does not exist"),
    (("--datasets", "../../etc"), "dataset"),
    (("--distill-max-steps", "many"), "max"),
    (("--sli", "sometimes"), "sli"),
])
def test_bad_command_line_exits_2_with_a_one_line_reason(workdir, tiny_teacher_dir, args, words):
    write_dataset(workdir, "reasoning/arith", [{"text": t} for t in ARITH])
    register(workdir, "tiny", tiny_teacher_dir)
    result = nexus(workdir, "run", *args, env_extra=ENV)
    assert result.returncode == 2, (result.stdout[-2000:], result.stderr[-2000:])
    assert words in result.stderr.lower(), result.stderr[-2000:]
    assert not list(workdir.memory.iterdir())  # nothing ran
