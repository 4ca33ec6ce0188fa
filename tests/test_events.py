"""The event log: gapless across processes, torn tails, corruption, replay."""

from __future__ import annotations

import json
import multiprocessing as mp

import pytest

from nexus_core.broker.keys import StageStatus
from nexus_core.errors import CorruptLogError
from nexus_core.records.events import EventLog, read_events, replay


def _writer(path, n, tag):
    log = EventLog(path)
    for i in range(n):
        log.append("StageProgress", job_id=f"j-{tag}", stage="extract", data={"i": i, "tag": tag})


def test_concurrent_appends_from_processes_are_gapless(tmp_path):
    path = tmp_path / "log.jsonl"
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(path, 60, t)) for t in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        assert p.exitcode == 0
    lines = path.read_text().splitlines()
    assert len(lines) == 240
    seqs = [json.loads(line)["seq"] for line in lines]  # every line parses: no interleaving
    assert seqs == list(range(1, 241))
    per_tag = {}
    for line in lines:
        d = json.loads(line)["data"]
        per_tag.setdefault(d["tag"], []).append(d["i"])
    assert all(v == list(range(60)) for v in per_tag.values())


def test_torn_last_line_is_ignored_then_repaired(tmp_path):
    path = tmp_path / "log.jsonl"
    log = EventLog(path)
    log.append("RunStarted", data={"pid": 1})
    log.append("RunFinished", data={"pid": 1})
    with open(path, "ab") as fh:
        fh.write(b'{"seq": 3, "ts": "2026-11-24T00:00:00Z", "type": "Stage')  # crash mid-write
    assert [e.seq for e in read_events(path)] == [1, 2]
    e = log.append("RunStarted", data={"pid": 2})
    assert e.seq == 3
    raw = path.read_bytes()
    assert raw.endswith(b"\n") and raw.count(b"\n") == 3
    assert [x.seq for x in read_events(path)] == [1, 2, 3]


def test_corruption_in_the_middle_is_reported_with_line_number(tmp_path):
    path = tmp_path / "log.jsonl"
    log = EventLog(path)
    for _ in range(3):
        log.append("RunStarted")
    lines = path.read_bytes().split(b"\n")
    lines[1] = b'{"seq": 2, "ts": "x", "type": "RunSt'  # truncated in the middle
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(CorruptLogError, match="line 2"):
        read_events(path)


def test_gap_in_seq_is_an_error(tmp_path):
    path = tmp_path / "log.jsonl"
    log = EventLog(path)
    for _ in range(3):
        log.append("RunStarted")
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], lines[2]]) + "\n")
    with pytest.raises(CorruptLogError, match="gap"):
        read_events(path)


def test_a_duplicated_line_is_named_as_such_not_as_a_gap(tmp_path):
    path = tmp_path / "log.jsonl"
    log = EventLog(path)
    for _ in range(3):
        log.append("RunStarted")
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], lines[1], lines[1], lines[2]]) + "\n")
    with pytest.raises(CorruptLogError, match="line 3 repeats seq 2.*duplicated") as err:
        read_events(path)
    assert "missing" not in str(err.value)


def test_replay_of_a_recorded_log_gives_the_expected_state(tmp_path):
    log = EventLog(tmp_path / "log.jsonl")
    teacher = {"teacher_id": "t1", "path": "/m", "status": "ready", "source": "registry/t1.json"}
    log.append("TeacherAdded", teacher_id="t1", data={"teacher": teacher})
    log.append("TeacherRejected", data={"source": "registry/bad.json", "reason": "not valid JSON"})
    log.append("StageQueued", teacher_id="t1", stage="profile", job_id="profile-aaa", data={"description": "profile t1"})
    log.append("StageStarted", teacher_id="t1", stage="profile", job_id="profile-aaa")
    log.append("StageCompleted", teacher_id="t1", stage="profile", job_id="profile-aaa",
               data={"artifacts": [{"path": "results/profiles/t1.json", "size": 3, "sha256": "x"}]})
    log.append("StageQueued", teacher_id="t1", stage="extract", job_id="extract-bbb", data={"dataset": "a/b"})
    log.append("StageStarted", teacher_id="t1", stage="extract", job_id="extract-bbb", data={"resume_shard": 0})
    log.append("CheckpointSaved", teacher_id="t1", stage="extract", job_id="extract-bbb", data={"step": 2, "reason": "sigusr2"})
    log.append("StageFailed", teacher_id="t1", stage="extract", job_id="extract-bbb", data={"error": "disk full"})
    log.append("ThermalPause", data={"temp_c": 90})
    log.append("TeacherRemoved", teacher_id="t1", data={"source": "registry/t1.json"})
    state = replay(log.read())
    assert state.last_seq == 11
    assert state.teachers["t1"].active is False
    assert list(state.rejections["registry/bad.json"]) == ["not valid JSON"]
    assert state.stages["profile-aaa"].status == StageStatus.DONE
    ext = state.stages["extract-bbb"]
    assert (ext.status, ext.dataset, ext.error, ext.attempts) == (StageStatus.FAILED, "a/b", "disk full", 1)
    assert ext.last_checkpoint == {"step": 2, "reason": "sigusr2"}
    assert state.thermal["paused"] is True and state.thermal["temp_c"] == 90


def test_events_are_mirrored_to_the_redis_stream(tmp_path, redis_conn):
    log = EventLog(tmp_path / "log.jsonl", redis=redis_conn)
    log.append("RunStarted", data={"pid": 7})
    entries = redis_conn.xrange("nexus:events")
    assert len(entries) == 1
    assert json.loads(entries[0][1][b"event"])["data"] == {"pid": 7}


def test_old_event_versions_are_upgraded_on_read(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text(json.dumps({"seq": 1, "ts": "2026-01-01T00:00:00Z", "type": "RunStarted", "data": {}}) + "\n")
    (event,) = read_events(path)
    assert event.v == 1
    assert path.read_text().count('"v"') == 0  # the log itself is never rewritten


def test_a_completed_stage_requeued_as_an_orphan_and_skipped_is_done_again(tmp_path):
    """A worker killed between recording StageCompleted and telling RQ: the job is requeued,
    the rerun skips it (artefacts intact), and the fold says done, not queued or skipped."""
    log = EventLog(tmp_path / "log.jsonl")
    art = [{"path": "results/router_weights/router.json", "size": 2, "sha256": "0" * 64}]
    log.append("StageQueued", stage="router", job_id="router-abc", data={})
    log.append("StageStarted", stage="router", job_id="router-abc")
    log.append("StageCompleted", stage="router", job_id="router-abc", data={"artifacts": art})
    log.append("StageQueued", stage="router", job_id="router-abc", data={"reason": "orphaned"})
    assert replay(log.read()).stages["router-abc"].status == StageStatus.QUEUED
    log.append("StageSkipped", stage="router", job_id="router-abc", data={"reason": "intact"})
    st = replay(log.read()).stages["router-abc"]
    assert st.status == StageStatus.DONE and st.artifacts == art
