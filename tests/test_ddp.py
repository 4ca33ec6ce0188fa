"""Distill on two processes (torchrun, gloo on CPU) against one process with the same global batch.

Tolerance: with grad_accum a multiple of the processes every rank runs whole micro-batches, so
each micro-batch's forward and backward are the one-process ones and the gradient sum g0 + g1
is one fp32 addition either way: the curves agree to the last bit, and the test allows 1e-6
relative for a gloo build that reduces in another order. When micro-batches are cut in row
slices, the forwards run on smaller batches and the loss sums add up in another order: fp32
rounding (~1e-7 relative per operation) then moves the weights by ~1e-7 per step (measured:
1.2e-7 after 8 steps), so losses must agree to 1e-4 relative and weights to 1e-5.
"""

import dataclasses
import os
import shutil
import signal
from pathlib import Path

import pytest

from nexus_core.config import load_settings
from nexus_core.context import Control, StageContext
from nexus_core.errors import ConfigError, CorruptArtifactError, StageInterrupted
from nexus_core.paths import Paths
from nexus_core.records.events import read_events
from nexus_core.stages.distill import run_distill
from nexus_core.storage import checkpoint as ckpt
from tests.helpers import build_workdir, nexus, of_type, spawn, wait_for


class RecCtx(StageContext):
    """Records what the stage reports. poll() answers from `script` (then CONTINUE), or with
    `pause_then_stop` as a thermal pause would until the stage waited, then with SIGUSR1."""

    def __init__(self, script=(), pause_then_stop=False):
        self.events, self.script, self.paused, self.pause_then_stop = [], list(script), 0, pause_then_stop

    def started(self, **d):
        self.events.append(("started", d))

    def progress(self, **d):
        self.events.append(("progress", d))

    def checkpoint_saved(self, step, reason, path=None):
        self.events.append(("checkpoint", {"step": step, "reason": reason, "path": path}))

    def note(self, event_type, **d):
        self.events.append((event_type, d))

    def poll(self):
        if self.pause_then_stop:
            return Control.STOP_USR1 if self.paused else Control.PAUSE
        return self.script.pop(0) if self.script else Control.CONTINUE

    def wait_while_paused(self):
        self.paused += 1

    def of(self, kind):
        return [d for k, d in self.events if k == kind]


def _with(cfg, **distill):
    return dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, **distill))


def _copy(base, tmp_path) -> Paths:
    dst = tmp_path / "w"
    shutil.copytree(base, dst, ignore=shutil.ignore_patterns("models"))
    return Paths(dst)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    home = tmp_path_factory.mktemp("ddp")
    cfg, plan, _, _ = build_workdir(home, hidden_layers=(0, 2), distill={"grad_accum": 2, "hidden_weight": 0.5})
    return home, cfg, plan


def _reference(base, tmp_path_factory, **distill):
    home, cfg, plan = base
    paths = _copy(home, tmp_path_factory.mktemp("ref"))
    ctx = RecCtx()
    run_distill(_with(cfg, **distill), plan, paths, ctx)
    return ctx, ckpt.load(ckpt.latest_path(paths))


@pytest.fixture(scope="module")
def reference(base, tmp_path_factory):
    """One process, uninterrupted: global batch 4 sequences x 2 micro-batches."""
    return _reference(base, tmp_path_factory)


def _losses(ctx):
    return [p["loss"] for p in ctx.of("progress")]


def _assert_same_weights(got, want, atol):
    assert got.keys() == want.keys()
    worst = max((got[k] - want[k]).abs().max().item() for k in want)
    assert worst <= atol, f"weights differ by {worst}"


def test_two_gloo_processes_give_the_one_process_loss_curve(base, reference, tmp_path):
    home, cfg, plan = base
    paths = _copy(home, tmp_path)
    ctx = RecCtx()
    result = run_distill(_with(cfg, nproc=2), plan, paths, ctx)
    assert _losses(ctx) == pytest.approx(_losses(reference[0]), rel=1e-6) and len(_losses(ctx)) == 8
    _assert_same_weights(ckpt.load(ckpt.latest_path(paths))[ckpt.MODEL], reference[1][ckpt.MODEL], atol=1e-6)
    # rank 0 alone reported: the same events as one process, once each
    assert [(c["step"], c["reason"]) for c in ctx.of("checkpoint")] == [(3, "periodic"), (6, "periodic"), (8, "periodic")]
    assert len(ctx.of("started")) == 1 and ctx.of("started")[0]["resume_step"] == 0
    assert result.data["steps"] == 8 and (paths.release / "model.safetensors").exists()
    assert all(Path(p).exists() for p in result.artifacts)
    assert not list(paths.state_dir.glob("ddp-*"))  # the relay folder is gone


@pytest.mark.slow
def test_paused_then_stopped_ddp_run_resumes_in_one_process_to_the_same_weights(base, reference, tmp_path):
    home, cfg, plan = base
    paths = _copy(home, tmp_path)
    # rank 0 checkpoints and waits for this context's pause, then is told to stop
    ctx = RecCtx(pause_then_stop=True)
    with pytest.raises(StageInterrupted) as err:
        run_distill(_with(cfg, nproc=2), plan, paths, ctx)
    assert err.value.reason == "sigusr1" and ctx.paused == 1
    saved = [(c["step"], c["reason"]) for c in ctx.of("checkpoint")]
    assert [r for _, r in saved] == ["pause", "sigusr1"] and saved[1][0] < 8
    stopped = ckpt.load(ckpt.latest_path(paths))
    assert stopped[ckpt.STEP] == saved[1][0]
    ctx = RecCtx()
    run_distill(cfg, plan, paths, ctx)  # one process resumes the two-process checkpoint
    assert ctx.of("started")[0]["resume_step"] == saved[1][0]
    _assert_same_weights(ckpt.load(ckpt.latest_path(paths))[ckpt.MODEL], reference[1][ckpt.MODEL], atol=1e-6)


def test_nproc_must_be_positive(tmp_path):
    with pytest.raises(ConfigError, match="--distill-nproc"):
        load_settings(tmp_path, environ={"NEXUS_DISTILL_NPROC": "0"})
    assert load_settings(tmp_path, environ={}).distill.nproc == 1


@pytest.mark.slow
def test_row_slices_when_grad_accum_is_not_a_multiple(base, tmp_path_factory, tmp_path):
    home, cfg, plan = base
    want_ctx, want = _reference(base, tmp_path_factory, grad_accum=1)
    paths = _copy(home, tmp_path)
    ctx = RecCtx()
    run_distill(_with(cfg, grad_accum=1, nproc=2), plan, paths, ctx)
    assert _losses(ctx) == pytest.approx(_losses(want_ctx), rel=1e-4)
    _assert_same_weights(ckpt.load(ckpt.latest_path(paths))[ckpt.MODEL], want[ckpt.MODEL], atol=1e-5)


@pytest.mark.slow
def test_ddp_resumes_a_one_process_checkpoint(base, reference, tmp_path):
    home, cfg, plan = base
    paths = _copy(home, tmp_path)
    with pytest.raises(StageInterrupted):
        run_distill(cfg, plan, paths, RecCtx(script=[Control.CONTINUE] * 3 + [Control.STOP_TERM]))
    assert ckpt.load(ckpt.latest_path(paths))[ckpt.STEP] == 4
    ctx = RecCtx()
    run_distill(_with(cfg, nproc=2), plan, paths, ctx)
    assert ctx.of("started")[0]["resume_step"] == 4
    assert _losses(ctx) == pytest.approx(_losses(reference[0])[4:], rel=1e-6)
    _assert_same_weights(ckpt.load(ckpt.latest_path(paths))[ckpt.MODEL], reference[1][ckpt.MODEL], atol=1e-6)


@pytest.mark.slow
def test_a_rank_error_reaches_the_caller_with_its_type(base, tmp_path):
    home, cfg, plan = base
    paths = _copy(home, tmp_path)
    shard = next(paths.memory.rglob("shard-00001.safetensors"))
    raw = bytearray(shard.read_bytes())
    raw[-3] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(CorruptArtifactError, match="sha256"):
        run_distill(_with(cfg, nproc=2), plan, paths, RecCtx())
    assert not ckpt.latest_path(paths).exists()


def _our_processes(home: Path) -> list[int]:
    """Processes whose command line names the workdir (torchrun and its ranks carry the relay folder)."""
    pids = []
    for p in Path("/proc").iterdir():
        try:
            if p.name.isdigit() and str(home) in (p / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(p.name))
        except OSError:
            pass
    return pids


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ctrl_c_mid_ddp_leaves_a_resumable_checkpoint_and_no_orphans(demo_workdir, redis_url, redis_conn):
    """`nexus run --distill-nproc 2`: Ctrl+C (SIGINT to the terminal's process group) while the
    two ranks train; the rerun resumes the distill from the checkpoint and completes."""
    paths = demo_workdir
    env = {"NEXUS_DISTILL_MAX_STEPS": "60", "NEXUS_DISTILL_EPOCHS": "20", "NEXUS_DISTILL_CHECKPOINT_EVERY": "100"}
    proc = spawn(paths, "run", "--device", "cpu", "--distill-nproc", "2", redis_url=redis_url, env_extra=env)
    wait_for(paths, lambda ev: any(e.data.get("step", 0) >= 2 for e in of_type(ev, "StageProgress", "distill")),
             timeout=400, proc=proc)
    os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl+C: torchrun runs in its own session
    proc.wait(timeout=120)
    out = proc.stdout.read()  # e2e._Output: a file, not a pipe
    assert proc.returncode == 130, out[-3000:]
    events = read_events(paths.log)
    saved = of_type(events, "CheckpointSaved", "distill")
    assert saved and saved[-1].data["reason"] == "sigint" and 2 <= saved[-1].data["step"] < 60
    assert of_type(events, "StagePaused", "distill")[-1].data["reason"] == "sigint"
    assert _our_processes(paths.home) == []
    done = nexus(paths, "run", "--device", "cpu", "--distill-nproc", "2", redis_url=redis_url, env_extra=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    events = read_events(paths.log)
    assert of_type(events, "StageStarted", "distill")[-1].data["resume_step"] == saved[-1].data["step"]
    assert of_type(events, "StageCompleted", "distill")[-1].data["steps"] == 60
    assert (paths.release / "model.safetensors").exists() and _our_processes(paths.home) == []
