"""Registry parsing and the scan: every rejection case gives one TeacherRejected with a reason."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nexus_core.records.events import EventLog, read_events, replay
from nexus_core.records.registry import parse_registry_file
from producer.scan import scan_registry


@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"\0" * 16)
    (d / "tokenizer.json").write_text("{}")
    return d


def _parse(workdir, body, name="t.json"):
    f = workdir.registry / name
    f.write_text(body if isinstance(body, str) else json.dumps(body))
    return parse_registry_file(f, workdir.home)


def test_single_list_and_roster_forms(workdir, model_dir):
    one = {"teacher_id": "a", "path": str(model_dir), "status": "ready"}
    two = {"teacher_id": "b", "path": str(model_dir), "status": "draft", "params": "7B", "weight": 2}
    assert [t.teacher_id for t in _parse(workdir, one)[0]] == ["a"]
    assert [t.teacher_id for t in _parse(workdir, [one, two])[0]] == ["a", "b"]
    teachers, rej = _parse(workdir, {"teachers": [one, two]}, "registry.json")
    assert [t.teacher_id for t in teachers] == ["a", "b"] and not rej
    assert teachers[1].weight == 2.0 and not teachers[1].ready


@pytest.mark.parametrize("body, field", [
    ("{not json", "not valid JSON"),
    ('{"teacher_id": "a", "path": ', "not valid JSON"),
    ({"path": "/x", "status": "ready"}, "'teacher_id' is required"),
    ({"teacher_id": "../evil", "path": "/x", "status": "ready"}, "teacher_id"),
    ({"teacher_id": "a/b", "path": "/x", "status": "ready"}, "teacher_id"),
    ({"teacher_id": "a\u0000b", "path": "/x", "status": "ready"}, "teacher_id"),
    ({"teacher_id": 5, "path": "/x", "status": "ready"}, "teacher_id"),
    ({"teacher_id": "a", "path": 3, "status": "ready"}, "'path' must be"),
    ({"teacher_id": "a", "path": "/x", "status": "ready", "weight": "heavy"}, "'weight'"),
    ({"teacher_id": "a", "path": "/x", "status": "ready", "weight": -1}, "'weight'"),
    ({"teacher_id": "a", "path": "/x", "status": "ready", "trust_remote_code": "yes"}, "trust_remote_code"),
    ({"teacher_id": "a", "path": "/x", "status": "ready", "colour": "red"}, "unknown field"),
    ({"teacher_id": "a", "path": "/x", "status": "ready", "datasets": ["nocategory"]}, "'datasets'"),
    ({"teacher_id": "a", "path": "/does/not/exist", "status": "ready"}, "does not exist"),
    ([], "no teachers"),
    ("[" * 100000 + "]" * 100000, "nested too deeply"),
])
def test_rejections_name_the_field(workdir, body, field):
    teachers, rejections = _parse(workdir, body)
    assert not teachers
    assert len(rejections) == 1 and field in str(rejections[0])
    assert "t.json" in str(rejections[0])


def test_model_folder_checks(workdir, tmp_path, model_dir):
    (tmp_path / "notdir").write_text("x")
    _, rej = _parse(workdir, {"teacher_id": "a", "path": str(tmp_path / "notdir"), "status": "ready"})
    assert "not a folder" in rej[0].reason
    pickle_only = tmp_path / "pickle"
    pickle_only.mkdir()
    (pickle_only / "config.json").write_text("{}")
    (pickle_only / "pytorch_model.bin").write_bytes(b"x")
    _, rej = _parse(workdir, {"teacher_id": "a", "path": str(pickle_only), "status": "ready"})
    assert "pickle" in rej[0].reason and "safetensors" in rej[0].reason
    (model_dir / "tokenizer.json").unlink()
    _, rej = _parse(workdir, {"teacher_id": "a", "path": str(model_dir), "status": "ready"})
    assert "tokenizer" in rej[0].reason


def test_huge_file_is_rejected(workdir):
    _, rej = _parse(workdir, '{"teacher_id": "a", "x": "' + "y" * (2 << 20) + '"}')
    assert "bytes" in rej[0].reason


def test_one_bad_teacher_in_a_list_leaves_the_others(workdir, model_dir):
    good = {"teacher_id": "good", "path": str(model_dir), "status": "ready"}
    teachers, rej = _parse(workdir, [good, {"teacher_id": "bad"}, dict(good)])
    assert [t.teacher_id for t in teachers] == ["good"]
    assert len(rej) == 2 and "duplicate" in rej[1].reason


def test_scan_records_added_updated_removed_rejected_once(workdir, model_dir):
    log = EventLog(workdir.log)
    f = workdir.registry / "a.json"
    f.write_text(json.dumps({"teacher_id": "a", "path": str(model_dir), "status": "ready"}))
    (workdir.registry / "bad.json").write_text("{oops")
    import os
    import time
    past = time.time() - 10
    os.utime(workdir.registry / "bad.json", (past, past))
    scan_registry(workdir, log, replay(log.read()))
    scan_registry(workdir, log, replay(log.read()))  # nothing new the second time
    assert [e.type for e in log.read()] == ["TeacherAdded", "TeacherRejected"]
    # duplicate id in another file is rejected, the first keeps it
    (workdir.registry / "b.json").write_text(json.dumps({"teacher_id": "a", "path": str(model_dir), "status": "ready"}))
    scan_registry(workdir, log, replay(log.read()))
    ev = log.read()[-1]
    assert ev.type == "TeacherRejected" and "already registered by registry/a.json" in ev.data["reason"]
    (workdir.registry / "b.json").unlink()
    f.write_text(json.dumps({"teacher_id": "a", "path": str(model_dir), "status": "ready", "weight": 3}))
    scan_registry(workdir, log, replay(log.read()))
    assert log.read()[-1].type == "TeacherUpdated"
    f.unlink()
    scan_registry(workdir, log, replay(log.read()))
    assert log.read()[-1].type == "TeacherRemoved"
    assert replay(read_events(workdir.log)).teachers["a"].active is False


def test_a_roster_with_a_good_and_a_bad_teacher_reports_the_bad_one_once(workdir, model_dir):
    """The good teacher's TeacherAdded must not make the next scan forget (and repeat) the file's rejections."""
    log = EventLog(workdir.log)
    f = workdir.registry / "roster.json"
    f.write_text(json.dumps([{"teacher_id": "a", "path": str(model_dir), "status": "ready"},
                             {"teacher_id": "b", "path": "/no/such/model", "status": "ready"},
                             {"teacher_id": "c", "path": str(model_dir), "status": "ready", "weight": -1}]))
    for _ in range(3):
        scan_registry(workdir, log, replay(log.read()))
    assert sorted(e.type for e in log.read()) == ["TeacherAdded", "TeacherRejected", "TeacherRejected"]
    assert len(replay(log.read()).rejections["registry/roster.json"]) == 2
    f.write_text(json.dumps([{"teacher_id": "a", "path": str(model_dir), "status": "ready"}]))  # fixed
    scan_registry(workdir, log, replay(log.read()))
    assert "registry/roster.json" not in replay(log.read()).rejections  # status no longer shows them


def test_a_symlink_in_the_registry_is_followed_and_its_target_recorded(workdir, model_dir, tmp_path):
    outside = tmp_path / "elsewhere.json"
    outside.write_text(json.dumps({"teacher_id": "linked", "path": str(model_dir), "status": "ready"}))
    (workdir.registry / "linked.json").symlink_to(outside)
    log = EventLog(workdir.log)
    scan_registry(workdir, log, replay(log.read()))
    (added,) = [e for e in log.read() if e.type == "TeacherAdded"]
    assert added.data["link_target"] == str(outside.resolve())


@settings(max_examples=150, deadline=None)
@given(st.one_of(st.binary(max_size=300), st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False) | st.integers() | st.text(max_size=20),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.sampled_from(
        ["teacher_id", "path", "status", "weight", "datasets", "primary", "x"]), c, max_size=5), max_leaves=20)))
def test_fuzz_registry_parser_never_crashes(tmp_path_factory, blob):
    home = tmp_path_factory.mktemp("fz")
    f = home / "t.json"
    f.write_bytes(blob if isinstance(blob, bytes) else json.dumps(blob).encode())
    teachers, rejections = parse_registry_file(f, home)
    assert all(r.reason and "t.json" in str(r) for r in rejections)
    assert teachers or rejections
