"""Distill checkpoints you can trust: atomic, numbered, loaded weights-only.

A checkpoint holds only tensors and primitive containers, so it loads with
torch.load(weights_only=True) and never runs pickled code. `checkpoint_latest.pt` is
replaced atomically (temp file, fsync, rename); the newest numbered `checkpoint_<step>.pt` is a
hard link to it (the same bytes on disk, not a copy), and the older numbered ones, up to `keep`
in all, are slimmed to the student's weights: optimizer moments, schedule and RNG live only in
the newest, the one a resume needs. So the disk holds one full checkpoint plus keep - 1 weights.
Only rank 0 of a multi-process distill writes them (the plain model's state_dict, never a wrapper's).
"""

from __future__ import annotations

import errno
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import structlog
import torch

from nexus_core.errors import CorruptArtifactError
from nexus_core.paths import Paths
from nexus_core.storage.atomic import atomic_path

FORMAT = 1
# Key names (constants, so that writer and reader cannot drift apart).
MODEL, OPTIMIZER, SCHEDULER, PROJECTIONS = "model", "optimizer", "scheduler", "projections"
RNG, STEP, BASE_STEP, END_STEP, DATA_POSITION = "rng", "step", "base_step", "end_step", "data_position"
CONFIG_HASH, PLAN_FP, STUDENT_CONFIG, STUDENT_INFO = "config_hash", "plan_fp", "student_config", "student_info"
SKIPPED, VERSION = "skipped_sequences", "format"
WEIGHTS_ONLY = "weights_only"  # set on a slimmed (older) checkpoint: it cannot resume a run exactly
_RESUME_ONLY = (OPTIMIZER, SCHEDULER, RNG)  # what slimming drops
LATEST = "checkpoint_latest.pt"
log = structlog.get_logger("nexus.checkpoint")
_NUMBERED = re.compile(r"checkpoint_(\d{8})\.pt")


def latest_path(paths: Paths) -> Path:
    return paths.checkpoints / LATEST


def rng_state() -> dict:
    """This process's RNG state. A run on several processes saves rank 0's, and every rank restores
    it: the loop draws no per-rank random numbers, so the checkpoint resumes on any number of them."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _torch_save(state: dict, tmp: Path) -> None:
    # through a Python file object: ENOSPC then surfaces as OSError (-> DiskFullError in
    # atomic_path); torch.save(state, path) reports it as an opaque RuntimeError instead
    with open(tmp, "wb") as fh:
        try:
            torch.save(state, fh)
        except RuntimeError as exc:  # torch's zip writer masks the OSError in its cleanup
            if isinstance(exc.__context__, OSError):
                raise exc.__context__ from None
            raise


def _link(src: Path, target: Path) -> None:
    """`target` becomes another name of `src`'s bytes, atomically (link to a temp name, rename, fsync
    the folder); a copy where the filesystem has no hard links."""
    with atomic_path(target) as tmp:
        tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
            shutil.copyfile(src, tmp)


def _numbered(paths: Paths) -> list[Path]:
    """The numbered checkpoints, oldest first."""
    return sorted(p for p in paths.checkpoints.iterdir() if _NUMBERED.fullmatch(p.name))


def _slim(path: Path) -> None:
    """Rewrite an older numbered checkpoint with its weights only (atomically); one already slim, or one
    without optimizer state, is left alone. Memory-mapped: only the tensors kept are read."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # unreadable: load_latest_good never trusts it anyway; leave it for a person to see
        return
    if not isinstance(state, dict) or not any(k in state for k in _RESUME_ONLY):
        return
    slim = {k: v for k, v in state.items() if k not in _RESUME_ONLY}
    with atomic_path(path) as tmp:
        _torch_save({**slim, WEIGHTS_ONLY: True}, tmp)


def save(paths: Paths, state: dict, keep: int) -> Path:
    """Write checkpoint_latest.pt atomically, link checkpoint_<step>.pt to it, slim the older numbered
    ones to weights and prune those beyond `keep`."""
    state = {**state, VERSION: FORMAT}
    latest = latest_path(paths)
    with atomic_path(latest) as tmp:
        _torch_save(state, tmp)
    if keep > 0:
        _link(latest, paths.checkpoints / f"checkpoint_{int(state[STEP]):08d}.pt")
        numbered = _numbered(paths)
        for p in numbered[:-keep]:
            p.unlink(missing_ok=True)
        for p in numbered[-keep:]:
            if not os.path.samefile(p, latest):  # a crash mid-way leaves a full copy: slimmed next time
                _slim(p)
    return latest


def load(path: Path, map_location="cpu") -> dict:
    """Load a checkpoint with weights_only=True; anything else is a CorruptArtifactError naming the file."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, TypeError, ValueError) as exc:
        raise CorruptArtifactError(
            f"checkpoint {path}: cannot load it as a weights-only checkpoint (it is truncated, or holds pickled "
            f"objects other than tensors and plain containers, which Nexus never unpickles): "
            f"{str(exc).splitlines()[0][:200]}; delete it (or `nexus reset`) to start the distill afresh") from None
    if not isinstance(state, dict) or state.get(VERSION) != FORMAT:
        raise CorruptArtifactError(f"checkpoint {path}: not a Nexus distill checkpoint (format {FORMAT}); delete it to start afresh")
    missing = [k for k in (MODEL, STEP, PLAN_FP, CONFIG_HASH, STUDENT_CONFIG) if k not in state]
    if missing:
        raise CorruptArtifactError(f"checkpoint {path}: missing keys {', '.join(missing)}; delete it to start afresh")
    return state


def load_latest_good(paths: Paths, map_location="cpu") -> dict | None:
    """The newest checkpoint that loads: checkpoint_latest.pt, else the numbered copies newest first.

    A truncated or corrupt file is never used: a good full numbered checkpoint is restored as
    checkpoint_latest.pt; weights-only (slimmed) ones are skipped, as they cannot resume the run
    exactly. When none qualifies, the bad latest is renamed `*.corrupt` and None is returned (the
    distill starts afresh, deterministically).
    """
    latest = latest_path(paths)
    if not latest.exists():
        return None
    try:
        return load(latest, map_location)
    except CorruptArtifactError as exc:
        problem = str(exc)
    for p in reversed(_numbered(paths)):
        try:
            state = load(p, map_location)
        except CorruptArtifactError:
            continue
        if state.get(WEIGHTS_ONLY):  # no optimizer state: resuming from it would not give the same run
            continue
        _link(p, latest)
        log.warning("checkpoint.restored", bad=problem[:200], restored_from=p.name)
        return state
    os.replace(latest, latest.with_name(LATEST + ".corrupt"))
    log.warning("checkpoint.discarded", bad=problem[:200])
    return None
