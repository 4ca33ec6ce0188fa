"""Distillation on several processes of one machine (torchrun): one GPU each, or gloo on CPU.

With `[distill] nproc = N > 1`, `run_distill` calls `launch`, which starts
`python -m torch.distributed.run --standalone --nproc_per_node=N -m nexus_core.stages.distill RUN_DIR`
and
relays between the ranks and the stage's context until they exit. Every rank runs the same
`run_distill` loop (`rank_main` below, handed that function by distill's `__main__`); `Group` tells the loop its rank:

- Work: a step's global batch stays batch_size x grad_accum sequences, so the numbers do not
  depend on N and a checkpoint resumes on any N. When grad_accum is a multiple of N, rank r
  takes micro-batches r, r+N, ...; otherwise every micro-batch's rows are cut in N slices
  (smaller forwards: make grad_accum a multiple of N to keep full-size micro-batches).
- Gradients: each rank's loss is divided by the whole step's token counts (summed over the
  ranks first), so the gradients are *summed* over the ranks (all_reduce SUM, in buckets): the
  one-process gradients up to fp32 summation order. No DistributedDataParallel wrapper: a rank
  may run zero, one or several backward passes in a step (its share, out-of-memory splits,
  skipped sequences) and the projections go unused in some steps, which DDP's reducer does not
  allow; gradients are reduced once per step anyway (accumulation), so only DDP's overlap of
  that reduction with the last backward is given up.
- Control: rank 0 alone writes checkpoints, events, eval and the release. The launcher polls
  the stage's context (signals, thermal pause) and hands commands to rank 0 (`ddp_relay`);
  rank 0 broadcasts each step's decision, so every rank saves, pauses or stops at the same step.
- Checkpoints hold the plain model's state_dict and rank 0's RNG state, which every rank
  restores (the loop draws no per-rank random numbers: the data order is a function of the
  micro-batch number), so DDP and one-process checkpoints are interchangeable.
- Processes: torchrun runs in its own session, so a Ctrl+C at the terminal reaches only the
  worker, which asks rank 0 to checkpoint and stop. A second Ctrl+C, a job timeout or an error
  in the worker terminates torchrun, which terminates the ranks; ranks die with torchrun
  (PR_SET_PDEATHSIG), and rank 0 stops when the worker is gone (kill -9).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import structlog
import torch
import torch.distributed as dist

from nexus_core import errors
from nexus_core.config import Settings
from nexus_core.context import Control, StageContext, StageResult
from nexus_core.errors import BadInputError, NexusError, StageInterrupted
from nexus_core.kd.ddp_relay import RankContext, Relay
from nexus_core.paths import Paths
from nexus_core.records.plan import DistillPlan
from nexus_core.storage.atomic import write_json

log = structlog.get_logger("nexus.ddp")
RELAY_EVERY_S = 0.05  # the launcher polls the stage context and rank 0's calls this often
BUCKET_ELEMENTS = 1 << 24  # gradient elements per all_reduce (64 MiB of fp32)
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=60)  # rank 0 builds the student while the others wait
_CONTROLS = list(Control)  # broadcast as an index


def _cuda_index(device: str) -> int:  # "cuda:3" -> 3, "cuda" -> 0
    return int(device.split(":")[1]) if ":" in device else 0


@dataclass(frozen=True)
class Group:
    """This process's place among the ranks. In a one-process run every method is a no-op."""

    rank: int = 0
    world: int = 1
    comm_device: str = "cpu"  # where collective tensors live (cuda for nccl)

    @classmethod
    def current(cls) -> "Group":
        if not (dist.is_available() and dist.is_initialized()):
            return cls()
        comm = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
        return cls(dist.get_rank(), dist.get_world_size(), comm)

    def device(self, device: str) -> str:
        """Rank r trains on cuda:k+r when the run's device is cuda:k; cpu stays cpu."""
        if self.world == 1 or not device.startswith("cuda"):
            return device
        return f"cuda:{_cuda_index(device) + self.rank}"

    @contextlib.contextmanager
    def rank0_first(self):
        """Rank 0 runs the block first (it may repair or set aside checkpoints); the others then see the result."""
        if self.rank > 0:
            dist.barrier()
        yield
        if self.rank == 0 and self.world > 1:
            dist.barrier()

    def same_start(self, modules) -> None:
        """Every rank starts from rank 0's weights (as DDP's constructor does)."""
        if self.world == 1:
            return
        for t in (t for m in modules for t in [*m.parameters(), *m.buffers()]):
            dist.broadcast(t.data, 0)

    def share(self, loader, first: int, grad_accum: int) -> list:
        """This rank's part of the step whose first micro-batch is `first`: (j, micro-batch) pairs."""
        if grad_accum % self.world == 0:
            return [(j, loader.micro_batch(first + j)) for j in range(self.rank, grad_accum, self.world)]
        part = []
        for j in range(grad_accum):
            mb = loader.micro_batch(first + j)
            rows = -(-mb.size // self.world)  # ceil: the last ranks may get fewer rows, or none
            mine = mb.select(slice(self.rank * rows, (self.rank + 1) * rows))
            if mine.size:
                part.append((j, mine))
        return part

    def sum(self, *values: float) -> list[float]:
        """Each value summed over the ranks (float64, exact for token counts)."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.comm_device)
        dist.all_reduce(t)
        return t.tolist()

    def sum_grads(self, params: list[torch.Tensor]) -> None:
        """Sum the step's gradients over the ranks, in place. A parameter that no rank gave a
        gradient keeps none, so AdamW leaves it alone as in a one-process run."""
        if self.world == 1:
            return
        has = self.sum(*(float(p.grad is not None) for p in params))
        grads = []
        for p, h in zip(params, has):
            if h > 0:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                grads.append(p.grad)
        for bucket in _buckets(grads, BUCKET_ELEMENTS):
            flat = torch._utils._flatten_dense_tensors(bucket)
            dist.all_reduce(flat)
            for g, total in zip(bucket, torch._utils._unflatten_dense_tensors(flat, bucket)):
                g.copy_(total)

    def agree(self, control: Control) -> Control:
        """Rank 0's control, on every rank."""
        if self.world == 1:
            return control
        t = torch.tensor([_CONTROLS.index(control) if self.rank == 0 else 0], device=self.comm_device)
        dist.broadcast(t, 0)
        return _CONTROLS[int(t.item())]


def _buckets(tensors: list[torch.Tensor], limit: int):
    bucket, size = [], 0
    for t in tensors:
        if bucket and (size + t.numel() > limit or t.dtype != bucket[0].dtype):
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += t.numel()
    if bucket:
        yield bucket


def launch(cfg: Settings, plan: DistillPlan, paths: Paths, ctx: StageContext) -> StageResult:
    """Run the distill on cfg.distill.nproc processes under torchrun; returns rank 0's result."""
    n, device = cfg.distill.nproc, cfg.resolved_device()
    if device.startswith("cuda"):
        first, have = _cuda_index(device), torch.cuda.device_count()
        if first + n > have:
            raise BadInputError(f"--distill-nproc {n} needs GPUs cuda:{first}..cuda:{first + n - 1}, but {have} "
                                "are visible: lower --distill-nproc, or pick the first GPU with --device cuda:K")
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, device=device))  # every rank resolves alike
    paths.state_dir.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="ddp-", dir=paths.state_dir))
    write_json(run_dir / "job.json", {"home": str(paths.home), "settings": cfg.to_dict(), "plan": plan.to_dict(),
                                      "owner_pid": os.getpid()})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                                      os.environ.get("PYTHONPATH")]))}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))  # torchrun would say 1
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           "-m", "nexus_core.stages.distill", str(run_dir)]
    log.info("distill.ddp_launch", nproc=n, device=device, backend="nccl" if device.startswith("cuda") else "gloo")
    relay = Relay(run_dir, ctx)
    # own session: a terminal's Ctrl+C goes to the worker alone, which stops the ranks at a step boundary
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        while proc.poll() is None:
            relay.calls()
            relay.commands()
            time.sleep(RELAY_EVERY_S)
        relay.calls()
        return _outcome(run_dir, proc.returncode, n)
    finally:
        _stop(proc)
        relay.close()
        shutil.rmtree(run_dir, ignore_errors=True)


def _stop(proc: subprocess.Popen) -> None:
    """Terminate torchrun, which terminates its ranks (SIGKILL after 30 s); kill it if it lingers."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except BaseException:  # timed out, or another Ctrl+C: no more waiting
        proc.kill()
        proc.wait()


def _outcome(run_dir: Path, returncode: int, n: int) -> StageResult:
    results = {r["rank"]: r for r in (json.loads(p.read_text()) for p in run_dir.glob("result-*.json"))}
    failed = sorted((r for r in results.values() if "error" in r), key=lambda r: r["ts"])
    if failed:  # the first error is the cause; later ones are peers losing their connection
        raise _rebuild(failed[0])
    zero = results.get(0, {})
    if "interrupted" in zero:
        exc = StageInterrupted(zero["interrupted"])
        exc.args = (zero["message"],)
        raise exc
    if returncode == 0 and "artifacts" in zero:
        return StageResult([Path(a) for a in zero["artifacts"]], zero["data"])
    raise NexusError(f"distill on {n} processes failed: torchrun exited with {returncode} before rank 0 reported "
                     "(the ranks' output above says why)")


def _rebuild(r: dict) -> NexusError:
    """A rank's error as the worker would have seen it in a one-process run (type and exit code kept)."""
    cls = getattr(errors, r["type"], None)
    if isinstance(cls, type) and issubclass(cls, NexusError):
        try:
            return cls(r["message"])
        except TypeError:
            pass
    exc = NexusError(f"distill rank {r['rank']}: {r['type']}: {r['message']}")
    exc.exit_code = r["exit_code"]
    return exc


def _die_with_parent() -> None:
    """Linux: SIGKILL this rank when torchrun dies, even by kill -9, so that no orphan holds a GPU."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # torchrun was gone before prctl
        os._exit(1)


def rank_main(run_dir: Path, run_distill) -> int:
    """One rank (started by torchrun): the distill loop `run_distill`, then its outcome in result-<rank>.json."""
    _die_with_parent()
    job = json.loads((run_dir / "job.json").read_text())
    cfg, plan = Settings.from_dict(job["settings"]), DistillPlan.from_dict(job["plan"])
    assert plan.fingerprint() == job["plan"]["fingerprint"]
    rank, device = int(os.environ["RANK"]), cfg.run.device
    if device.startswith("cuda"):
        torch.cuda.set_device(_cuda_index(device) + int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=COLLECTIVE_TIMEOUT)
    ctx = RankContext(run_dir, rank, job["owner_pid"])
    structlog.contextvars.bind_contextvars(rank=rank)  # every rank logs; say which
    try:
        result = run_distill(cfg, plan, Paths(Path(job["home"])), ctx)
        out = {"artifacts": [str(p) for p in result.artifacts], "data": result.data}
    except StageInterrupted as exc:
        out = {"interrupted": exc.reason, "message": str(exc)}
    except BaseException as exc:
        write_json(run_dir / f"result-{rank}.json", {
            "rank": rank, "ts": time.time(), "error": traceback.format_exc(limit=8)[-3000:], "type": type(exc).__name__,
            "message": str(exc).splitlines()[0][:500] if str(exc) else "", "exit_code": getattr(exc, "exit_code", 1)})
        raise
    write_json(run_dir / f"result-{rank}.json", {"rank": rank, "ts": time.time(), **out})
    dist.destroy_process_group()
    return 0
