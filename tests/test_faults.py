"""Reliability faults, fast part (default run): crash, lose Redis, corrupt artefacts, fill the disk.

Every case ends with a `nexus run` (or worker) that completes, and compares its shards and
final weights byte for byte with an undisturbed reference run of the same settings; no
stage may complete twice and the log must read back gapless. Seeded multi-point kill
matrix: tests/test_faults_slow.py (`-m slow`). Table of results: RELIABILITY.md.
"""

from __future__ import annotations

import errno
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nexus_core.errors import CorruptLogError, DiskFullError
from nexus_core.paths import Paths
from nexus_core.records.events import Event, parse_lines, read_events
from nexus_core.storage import checkpoint as ckpt
from tests.helpers import (
    ENV,
    SHARDS,
    assert_same_outputs,
    completed_once,
    kill_embedded_redis,
    kill_tree,
    make_workdir,
    nexus,
    no_temp_files,
    of_type,
    spawn,
    wait_for,
)

# ---------------------------------------------------------------- process and Redis faults

# The undisturbed run's bytes: a refactor must not move a single bit. They hold for the library versions of
# constraints.txt (the library versions decide the tiny teacher's bytes: re-recorded on 2026-12-02, when a
# fresh venv without constraints — transformers 5.24.0, tokenizers 0.23.3 — moved every hash; not bisected)
# and for the CPU's float kernels: the same code and venv give other bits on another CPU (BLAS picks its
# kernels by CPU), so each set below is one machine kind's. The run must give one of them exactly. A change
# that means to alter what extraction or distillation compute updates them all, and says so in its commit.
RECORDED = {
    # the machine of stop 23 (and of CI, which passed with it)
    "stop-23": {
        "memory/tiny/code__snippets/shard-00000.safetensors": "4cd80217696eaa5fcdb2e74156e26ea8c520ae14dcd4a11dd53d20f3f7c07061",
        "memory/tiny/code__snippets/shard-00001.safetensors": "c291d17817496bef262a9158d5d3debf9bb859881129605bcc74d9c7286e572a",
        "memory/tiny/code__snippets/shard-00002.safetensors": "646df41548f9f4090bcbc1b10c9b5bfbb707be8b30c45685e566cdf29cbb88d6",
        "memory/tiny/reasoning__arith/shard-00000.safetensors": "2f855db8d637f86859b5c2645aa9f6f84d78a8d4b1819ec8f5f65c3acaa78543",
        "memory/tiny/reasoning__arith/shard-00001.safetensors": "426bd4f7bd46d0c0f3712d5830d036d492a070e9edb33b2ab6fd304e3a8c8be0",
        "memory/tiny/reasoning__arith/shard-00002.safetensors": "416b0a995bd620ae1fcd3068f8cfd2be4121ec53ff4e8e81cbecc95a81e03368",
        "nexus-release-v1/model.safetensors": "87523b222985a38e9ea789e8516014bb339ff6c52f701b58c5c62e3ad177d2bf",
    },
    # AMD EPYC, torch CPU capability AVX2 (stop 24): the same code as above, other float bits
    "amd-epyc-avx2": {
        "memory/tiny/code__snippets/shard-00000.safetensors": "804264326f23a4666ae90092236169239bb58f232d3d1cc87593ea7751519bd7",
        "memory/tiny/code__snippets/shard-00001.safetensors": "3d50ae15c47be95579c0ff5aae9248b13734b84c649c539fe0feef81490744fe",
        "memory/tiny/code__snippets/shard-00002.safetensors": "1d517c696139c0edf95a67dd7028dd20de4c92450f92b1b6c109df28c176631c",
        "memory/tiny/reasoning__arith/shard-00000.safetensors": "f82343fb034bcdb8fa886f5058c83ac0330019f3de75818c17ce948b9a385a7d",
        "memory/tiny/reasoning__arith/shard-00001.safetensors": "f1930b53139d2156ad8be445c793df107aa658f8abdc0bd1044970c4f3a2f614",
        "memory/tiny/reasoning__arith/shard-00002.safetensors": "9a89b8ad562f8a89dc75f2c00627f324a5e0ee0f4f034d0109605140ee87944d",
        "nexus-release-v1/model.safetensors": "1e56de490800476db8875d047556d32766258e401dbf4591bc671ddb5b56ba0d",
    },
    # Intel Xeon, torch CPU capability AVX512 (stop 25): c0f0029 and 9a8bdb2 give these same bytes
    "intel-xeon-avx512": {
        "memory/tiny/code__snippets/shard-00000.safetensors": "2f762a01ef716f98a835287dd6be35d055e98a3806b08becdcc85eb2406a1251",
        "memory/tiny/code__snippets/shard-00001.safetensors": "271f7d247774631fc278857982625796853ec486054450a393090b7a940dc6ea",
        "memory/tiny/code__snippets/shard-00002.safetensors": "972d73076152546c56f454abd02b7ca92012bce0c88e3aa0bad689b789f851a8",
        "memory/tiny/reasoning__arith/shard-00000.safetensors": "a3ebd31be9c7ff263821a8a0891578ab0ef834624df4a8788c8960fc29222212",
        "memory/tiny/reasoning__arith/shard-00001.safetensors": "6ce2af5536001ff859236b15d3a9f8be22ab220672b5fe81fe67d960ce87ce4c",
        "memory/tiny/reasoning__arith/shard-00002.safetensors": "1488d19136b6e39bc3fbc58244b5133702c694680581491577ef9e0c6560a733",
        "nexus-release-v1/model.safetensors": "1c095e2c887f0c600e1482186f0e6b9155f4160c6ad953f92267a8fe576070d6",
    },
}


def test_the_reference_run_reproduces_the_recorded_bytes(reference):
    import hashlib

    got = {k: hashlib.sha256(v).hexdigest() for k, v in reference.items()}
    assert got in RECORDED.values(), f"the reference run's bytes match no recorded machine: {got}"


def test_kill_9_of_everything_with_embedded_redis_then_rerun(tmp_path, tiny_teacher_dir, reference):
    """kill -9 `nexus run`'s process group (worker, monitor) and its redis-server mid-extract."""
    paths = make_workdir(tmp_path, tiny_teacher_dir)
    proc = spawn(paths, "run", env_extra=ENV)
    wait_for(paths, lambda ev: of_type(ev, "StageProgress", "extract"), proc=proc)
    assert (paths.redis_dir / "pid").exists()
    kill_tree(proc)
    kill_embedded_redis(paths)
    rerun = nexus(paths, "run", env_extra=ENV)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    events = completed_once(paths)
    assert len(of_type(events, "RunStarted")) == 2
    assert_same_outputs(paths, reference)
    assert not no_temp_files(paths)


def test_embedded_redis_dying_mid_run_ends_with_one_line_and_a_rerun_completes(tmp_path, tiny_teacher_dir, reference):
    """redis-server killed while a stage runs: one line saying what happened (no traceback), exit 1;
    nothing lost: the rerun starts a new server and completes with the undisturbed run's bytes."""
    paths = make_workdir(tmp_path, tiny_teacher_dir)
    proc = spawn(paths, "run", env_extra=ENV)
    wait_for(paths, lambda ev: of_type(ev, "StageProgress", "extract"), proc=proc)
    kill_embedded_redis(paths)
    code = proc.wait(timeout=300)
    out = proc.stdout.read()
    assert code == 1, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert [line for line in out.splitlines() if "went away" in line and "rerun" in line], out[-3000:]
    rerun = nexus(paths, "run", env_extra=ENV)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert_same_outputs(paths, reference)


def test_redis_flushed_mid_run_the_run_or_a_rerun_completes(tmp_path, tiny_teacher_dir, reference, redis_conn,
                                                            redis_url):
    """FLUSHDB (Redis restarted without persistence) while a stage runs: the log rebuilds the queue."""
    paths = make_workdir(tmp_path, tiny_teacher_dir)
    proc = spawn(paths, "run", redis_url=redis_url, env_extra=ENV)
    wait_for(paths, lambda ev: of_type(ev, "StageCompleted", "extract"), proc=proc)
    redis_conn.flushdb()
    proc.wait(timeout=300)
    rerun = nexus(paths, "run", redis_url=redis_url, env_extra=ENV)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    completed_once(paths)
    assert_same_outputs(paths, reference)


def test_replay_requeue_rebuilds_the_queue_after_a_crash_and_a_flush(tmp_path, tiny_teacher_dir, reference,
                                                                     redis_conn, redis_url):
    """kill -9 mid-extract, Redis loses everything, `nexus replay --requeue` + a worker finish the plan."""
    paths = make_workdir(tmp_path, tiny_teacher_dir)
    proc = spawn(paths, "run", redis_url=redis_url, env_extra=ENV)
    wait_for(paths, lambda ev: of_type(ev, "StageProgress", "extract"), proc=proc)
    kill_tree(proc)
    redis_conn.flushdb()
    before = read_events(paths.log)
    unfinished = {e.job_id for e in of_type(before, "StageQueued")} - {e.job_id for e in of_type(before, "StageCompleted")}
    assert any(j.startswith("distill-") for j in unfinished)
    requeue = nexus(paths, "replay", "--requeue", redis_url=redis_url, env_extra=ENV)
    assert requeue.returncode == 0, requeue.stderr[-3000:]
    from rq.job import Job

    from producer.enqueue import queue_for

    queued = {e.job_id for e in of_type(read_events(paths.log)[len(before):], "StageQueued")}
    assert queued == unfinished, (queued, unfinished)
    assert all(Job.exists(j, connection=redis_conn) for j in unfinished)
    assert queue_for(redis_conn).count >= 1
    worker = nexus(paths, "worker", "--burst", redis_url=redis_url, env_extra=ENV)
    assert worker.returncode == 0, worker.stderr[-3000:]
    completed_once(paths)
    assert_same_outputs(paths, reference)


# ---------------------------------------------------------------- artefact faults and a full disk

def test_disk_full_in_extract_then_space_returns_then_corrupt_release_and_checkpoint(
        tmp_path, tiny_teacher_dir, reference, redis_conn, redis_url):
    paths = make_workdir(tmp_path, tiny_teacher_dir)
    # 1. the shard disk holds ~1.5 shards: a clear error, no partial shard, the stage fails (exit 1)
    one_shard = min(len(v) for k, v in reference.items() if "shard-" in k)
    full = nexus(paths, "run", "--datasets", "reasoning/arith", redis_url=redis_url,
                 env_extra={**ENV, "NEXUS_TEST_DISK_LIMIT_BYTES": str(int(one_shard * 1.5))})
    assert full.returncode == 1, full.stderr[-3000:]
    failed = of_type(read_events(paths.log), "StageFailed", "extract")
    assert failed and "disk" in failed[0].data["error"].lower() and "\n" not in failed[0].data["error"]
    assert failed[0].data["kind"] == "DiskFullError" and not failed[0].data["bad_input"]
    assert not no_temp_files(paths)
    for f in paths.memory.glob(SHARDS.split("/", 1)[1]):
        assert f"memory/{f.relative_to(paths.memory)}" in reference  # no shard beyond the limit, none torn
        assert f.read_bytes() == reference[f"memory/{f.relative_to(paths.memory)}"]
    # 2. space returns: the run resumes and matches the undisturbed run
    again = nexus(paths, "run", redis_url=redis_url, env_extra=ENV)
    assert again.returncode == 0, again.stderr[-3000:]
    assert_same_outputs(paths, reference)
    n_events = len(read_events(paths.log))
    # 3. a released weight file corrupted after completion: detected by sha256, distill redone
    weights = next(paths.release.glob("*.safetensors"))
    blob = bytearray(weights.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    weights.write_bytes(bytes(blob))
    # 4. ... and checkpoint_latest.pt truncated: never loaded as garbage
    latest = ckpt.latest_path(paths)
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 3])
    redo = nexus(paths, "run", redis_url=redis_url, env_extra=ENV)
    assert redo.returncode == 0, redo.stderr[-3000:]
    after = read_events(paths.log)[n_events:]
    assert [e.stage for e in of_type(after, "StageCompleted")] == ["distill"], [e.type for e in after]
    assert_same_outputs(paths, reference)
    ckpt.load(latest)  # the checkpoint is whole again


def test_disk_full_while_checkpointing_leaves_the_old_checkpoint_and_no_temp(tmp_path, monkeypatch):
    """ENOSPC inside torch.save: DiskFullError naming the file; the previous checkpoint stays loadable."""
    paths = Paths(tmp_path / "home").ensure()
    state = {ckpt.MODEL: {"w": torch.arange(6.0)}, ckpt.STEP: 2, ckpt.PLAN_FP: "p", ckpt.CONFIG_HASH: "c",
             ckpt.STUDENT_CONFIG: "{}"}
    ckpt.save(paths, state, keep=2)
    good = ckpt.latest_path(paths).read_bytes()

    class FullDisk:  # a file whose disk fills after 100 bytes, as a real full disk does
        def __init__(self, fh):
            self.fh, self.n = fh, 0

        def write(self, b):
            if self.n + len(b) > 100:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.n += len(b)
            return self.fh.write(b)

        def __getattr__(self, name):
            return getattr(self.fh, name)

    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: real_save(obj, FullDisk(f), *a, **k))
    with pytest.raises(DiskFullError, match="disk full while writing .*checkpoint_latest.pt"):
        ckpt.save(paths, {**state, ckpt.STEP: 4}, keep=2)
    assert ckpt.latest_path(paths).read_bytes() == good
    assert not list(paths.checkpoints.glob(".*.tmp"))
    assert ckpt.load(ckpt.latest_path(paths))[ckpt.STEP] == 2
    monkeypatch.setattr(torch, "save", real_save)  # space returns
    ckpt.save(paths, {**state, ckpt.STEP: 4}, keep=2)
    assert ckpt.load(ckpt.latest_path(paths))[ckpt.STEP] == 4


def test_checkpoint_on_a_real_full_device(tmp_path, monkeypatch):
    """/dev/full returns ENOSPC on every write: the real kernel error path, not a simulation."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    paths = Paths(tmp_path / "home").ensure()
    real_open = open

    def open_full(file, mode="r", *a, **k):  # the checkpoint's temp file lands on a full device
        if "w" in mode and ".checkpoint_latest.pt." in str(file):
            return real_open("/dev/full", mode, *a, **k)
        return real_open(file, mode, *a, **k)

    monkeypatch.setattr("builtins.open", open_full)
    state = {ckpt.MODEL: {"w": torch.zeros(10_000)}, ckpt.STEP: 1, ckpt.PLAN_FP: "p", ckpt.CONFIG_HASH: "c",
             ckpt.STUDENT_CONFIG: "{}"}
    with pytest.raises(DiskFullError):
        ckpt.save(paths, state, keep=1)
    monkeypatch.setattr("builtins.open", real_open)
    assert not ckpt.latest_path(paths).exists() and not list(paths.checkpoints.iterdir())


# ---------------------------------------------------------------- the event log reader, fuzzed

def _line(seq: int, payload: str) -> bytes:
    return Event(seq, "2024-01-01T00:00:00.000000Z", "StageProgress", data={"p": payload}).to_json().encode() + b"\n"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_fuzz_log_reader_random_bytes_only_ever_raise_corrupt_log(raw):
    try:
        out = parse_lines(raw)
    except CorruptLogError:
        return
    assert all(isinstance(o, dict) for o in out)


@settings(max_examples=200, deadline=None)
@given(payloads=st.lists(st.text(max_size=30), min_size=0, max_size=12),
       torn=st.binary(max_size=60).filter(lambda b: b"\n" not in b))
def test_fuzz_valid_log_with_a_torn_tail_reads_back_exactly(payloads, torn, tmp_path_factory):
    raw = b"".join(_line(i + 1, p) for i, p in enumerate(payloads))
    path = tmp_path_factory.mktemp("log") / "log.jsonl"
    path.write_bytes(raw + torn)
    events = read_events(path)
    assert [e.seq for e in events] == list(range(1, len(payloads) + 1))
    assert [e.data["p"] for e in events] == payloads


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(max_size=20), min_size=2, max_size=10), st.data())
def test_fuzz_log_damaged_in_the_middle_names_the_line(payloads, data):
    lines = [_line(i + 1, p) for i, p in enumerate(payloads)]
    bad = data.draw(st.integers(0, len(lines) - 2))  # not the last line: that one would be "torn"
    cut = data.draw(st.integers(1, len(lines[bad]) - 2))  # at least the closing brace goes
    lines[bad] = lines[bad][:cut] + b"\n"  # truncated in the middle of the file
    with pytest.raises(CorruptLogError, match=rf"line {bad + 1}\b"):
        parse_lines(b"".join(lines))


def test_corrupt_checkpoints_are_restored_from_a_good_copy_or_discarded(tmp_path):
    paths = Paths(tmp_path / "home").ensure()
    state = {ckpt.MODEL: {"w": torch.arange(4.0)}, ckpt.PLAN_FP: "p", ckpt.CONFIG_HASH: "c", ckpt.STUDENT_CONFIG: "{}"}
    for step in (2, 4):
        ckpt.save(paths, {**state, ckpt.STEP: step}, keep=3)
    latest = ckpt.latest_path(paths)
    torn = latest.read_bytes()[:50]
    latest.unlink()  # a torn file put in its place (checkpoint_00000004.pt, its hard link, keeps the bytes)
    latest.write_bytes(torn)
    assert ckpt.load_latest_good(paths)[ckpt.STEP] == 4  # the numbered copy of step 4
    assert ckpt.load(latest)[ckpt.STEP] == 4  # ... restored over the bad latest
    for p in paths.checkpoints.glob("checkpoint_*.pt"):
        p.write_bytes(b"PK\x03\x04 garbage")
    assert ckpt.load_latest_good(paths) is None  # nothing trustworthy: start afresh
    assert not latest.exists() and (paths.checkpoints / "checkpoint_latest.pt.corrupt").exists()
