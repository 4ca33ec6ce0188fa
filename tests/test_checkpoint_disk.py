"""Checkpoints on disk: latest and the newest numbered share one inode, older ones keep weights only,
and a run still resumes exactly from what is left."""

import os

import pytest
import torch

from nexus_core.paths import Paths
from nexus_core.storage import checkpoint as ckpt

MB = 1 << 20


def _state(step: int) -> dict:
    torch.manual_seed(step)
    weights = {"w": torch.randn(MB // 4)}  # 1 MiB of float32
    moments = {"state": {0: {"exp_avg": torch.randn(MB // 4), "exp_avg_sq": torch.randn(MB // 4)}},
               "param_groups": [{"lr": 0.1, "params": [0]}]}  # 2 MiB: what AdamW adds
    return {ckpt.MODEL: weights, ckpt.OPTIMIZER: moments, ckpt.SCHEDULER: {"last_epoch": step},
            ckpt.RNG: {"torch": torch.get_rng_state()}, ckpt.STEP: step, ckpt.PLAN_FP: "p", ckpt.CONFIG_HASH: "c",
            ckpt.STUDENT_CONFIG: "{}"}


def _disk_bytes(folder) -> int:
    """Bytes on disk, each inode counted once (what `du` reports)."""
    seen, total = set(), 0
    for p in folder.iterdir():
        st = p.stat()
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_size
    return total


def test_latest_is_a_link_and_older_checkpoints_keep_weights_only(tmp_path):
    paths = Paths(tmp_path / "home").ensure()
    for step in (2, 4, 6, 8):
        ckpt.save(paths, _state(step), keep=3)
    latest = ckpt.latest_path(paths)
    names = sorted(p.name for p in paths.checkpoints.glob("checkpoint_0*.pt"))
    assert names == ["checkpoint_00000004.pt", "checkpoint_00000006.pt", "checkpoint_00000008.pt"]
    newest = paths.checkpoints / "checkpoint_00000008.pt"
    assert os.path.samefile(latest, newest) and latest.stat().st_nlink == 2  # one file, two names
    full = ckpt.load(latest)
    assert full[ckpt.STEP] == 8 and ckpt.OPTIMIZER in full and not full.get(ckpt.WEIGHTS_ONLY)
    for step in (4, 6):  # older: the weights (bit for bit) and what describes them, no optimizer state
        old = ckpt.load(paths.checkpoints / f"checkpoint_{step:08d}.pt")
        assert old[ckpt.WEIGHTS_ONLY] and old[ckpt.STEP] == step
        assert not {ckpt.OPTIMIZER, ckpt.SCHEDULER, ckpt.RNG} & set(old)
        assert torch.equal(old[ckpt.MODEL]["w"], _state(step)[ckpt.MODEL]["w"])
    # one full checkpoint (~3 MiB) + two of weights (~1 MiB each); before: four full copies (~12 MiB)
    assert _disk_bytes(paths.checkpoints) < 5.5 * MB
    assert not list(paths.checkpoints.glob(".*.tmp"))


def test_a_torn_shared_latest_never_resumes_from_a_weights_only_checkpoint(tmp_path):
    paths = Paths(tmp_path / "home").ensure()
    for step in (2, 4):
        ckpt.save(paths, _state(step), keep=3)
    latest = ckpt.latest_path(paths)
    latest.write_bytes(latest.read_bytes()[:100])  # torn in place: its hard link checkpoint_00000004.pt too
    assert ckpt.load_latest_good(paths) is None  # step 2 is weights only: start afresh, deterministically
    assert (paths.checkpoints / "checkpoint_latest.pt.corrupt").exists()


def test_a_full_older_checkpoint_left_by_a_crash_is_restored_then_slimmed(tmp_path, monkeypatch):
    paths = Paths(tmp_path / "home").ensure()
    ckpt.save(paths, _state(2), keep=3)
    monkeypatch.setattr(ckpt, "_slim", lambda p: None)  # a crash between the link and the slimming
    ckpt.save(paths, _state(4), keep=3)
    monkeypatch.undo()
    latest = ckpt.latest_path(paths)
    latest.unlink()
    latest.write_bytes(b"PK\x03\x04 torn")  # and latest is lost: step 4's link is still whole
    assert ckpt.load_latest_good(paths)[ckpt.STEP] == 4
    (paths.checkpoints / "checkpoint_00000004.pt").unlink()
    latest.unlink()
    latest.write_bytes(b"PK\x03\x04 torn")
    assert ckpt.load_latest_good(paths)[ckpt.STEP] == 2  # still full: a valid resume point
    assert os.path.samefile(latest, paths.checkpoints / "checkpoint_00000002.pt")
    ckpt.save(paths, _state(6), keep=3)
    assert ckpt.load(paths.checkpoints / "checkpoint_00000002.pt")[ckpt.WEIGHTS_ONLY]


@pytest.mark.parametrize("keep", [0, 1])
def test_few_kept_checkpoints(tmp_path, keep):
    paths = Paths(tmp_path / "home").ensure()
    for step in (1, 2, 3):
        ckpt.save(paths, _state(step), keep=keep)
    assert len(list(paths.checkpoints.glob("checkpoint_0*.pt"))) == keep
    assert ckpt.load_latest_good(paths)[ckpt.STEP] == 3
