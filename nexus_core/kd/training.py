"""The pieces of the distillation loop (stages/distill.py): the run's state and its checkpoint, and one
micro-batch's forward and backward with its out-of-memory split.

A `TrainingRun` is what a checkpoint holds: the student, its optimiser and schedule, the hidden-state
projections and the position (step, base, end). It starts resumed (same plan and settings), warm-started
(another plan: the student's weights only) or fresh (built from the primary teacher).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from dataclasses import dataclass

import structlog
import torch

from nexus_core.config import Settings
from nexus_core.context import StageContext
from nexus_core.kd import augment
from nexus_core.kd import loss as kd_loss
from nexus_core.kd.loader import MicroBatch
from nexus_core.kd.student import build_student, config_from_json, model_from_config
from nexus_core.paths import Paths
from nexus_core.records.plan import DistillPlan
from nexus_core.storage import checkpoint as ckpt
from nexus_core.teachers.runner import decoder_layers

log = structlog.get_logger("nexus.distill")
# Settings that change the numbers a run computes; a checkpoint made with others cannot be resumed.
_MATH_KEYS = ("epochs", "max_steps", "batch_size", "grad_accum", "lr", "weight_decay", "warmup_steps",
              "grad_clip", "temperature", "alpha", "hidden_weight", "xtok_loss", "xtok_align", "xtok_uld_weight",
              "teacher_quality_tau")


def config_hash(cfg: Settings) -> str:
    d = cfg.to_dict()
    body = {"distill": {k: d["distill"][k] for k in _MATH_KEYS}, "student": d["student"], "seed": cfg.run.seed,
            "extract": {k: d["extract"][k] for k in ("seq_len", "top_k", *augment.KEYS)}}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def lr_lambda(warmup: int, total: int):
    """Linear warm-up to the peak, then cosine decay to 10% of it at `total` steps."""
    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        frac = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * frac))
    return fn


def _optimizer(cfg: Settings, modules) -> torch.optim.AdamW:
    # Weight decay on matrices only (not on norms and biases), as in nanoGPT.
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    other = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.distill.weight_decay}, {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.distill.lr, betas=(0.9, 0.95))


def projections(model, teacher_width: int | None, hidden_layers: list[int]) -> torch.nn.ModuleDict:
    """A learned projection per critical layer when student and teacher widths differ."""
    t_width = teacher_width or model.config.hidden_size
    proj = torch.nn.ModuleDict()
    if t_width != model.config.hidden_size:
        for layer in hidden_layers:
            proj[str(layer)] = torch.nn.Linear(model.config.hidden_size, t_width, bias=False)
    return proj


class HiddenTap:
    """Forward hooks that keep the student's decoder-layer outputs for the hidden-state loss."""

    def __init__(self, model, layers: set[int]):
        self.out: dict[int, torch.Tensor] = {}
        blocks = decoder_layers(model)
        self._handles = [blocks[i].register_forward_hook(self._hook(i)) for i in sorted(layers)]

    def _hook(self, i):
        def hook(module, args, output):
            self.out[i] = output[0] if isinstance(output, tuple) else output  # (b, T, H)
        return hook


def _student(cfg: Settings, plan: DistillPlan, paths: Paths, device: str, ctx: StageContext, profile: dict):
    """(model, info, the checkpoint to resume or None, step, base): resumed, warm-started or fresh."""
    prev = ckpt.load_latest_good(paths)  # a truncated/corrupt checkpoint is never loaded
    plan_fp, chash = plan.fingerprint(), config_hash(cfg)
    resume = prev is not None and prev[ckpt.PLAN_FP] == plan_fp
    if resume and prev[ckpt.CONFIG_HASH] != chash:
        # Other distill settings for the same plan: a new run from scratch (the same inputs must
        # give the same weights); the old checkpoints are kept aside, never deleted.
        aside = paths.checkpoints / f"superseded-{prev[ckpt.CONFIG_HASH]}"
        aside.mkdir(parents=True, exist_ok=True)
        for f in paths.checkpoints.glob("*.pt"):
            f.replace(aside / f.name)
        log.warning("distill.settings_changed", old=prev[ckpt.CONFIG_HASH], new=chash, kept=str(aside))
        ctx.note("StageProgress", settings_changed=True, previous_checkpoints=str(aside.relative_to(paths.home)))
        prev, resume = None, False
    if prev is not None:  # on resume and warm start the architecture comes from the checkpoint
        model = model_from_config(config_from_json(prev[ckpt.STUDENT_CONFIG]))
        model.load_state_dict(prev[ckpt.MODEL])
        info = json.loads(prev[ckpt.STUDENT_INFO])
    else:
        model, info = build_student(cfg, plan, paths, device, profile)
    if cfg.distill.grad_checkpointing:
        model.gradient_checkpointing_enable()
    model.config.use_cache = False
    step = int(prev[ckpt.STEP]) if prev is not None else 0
    base = int(prev[ckpt.BASE_STEP]) if resume else step
    if prev is not None and not resume:
        log.info("distill.warm_start", from_plan=prev[ckpt.PLAN_FP], step=step)
        ctx.note("StudentWarmStarted", from_plan=prev[ckpt.PLAN_FP], step=step)
    return model.to(device).train(), info, prev if resume else None, step, base


@dataclass
class TrainingRun:
    """The student being trained and where it is: what a checkpoint saves and a resume restores."""

    cfg: Settings
    plan: DistillPlan
    model: torch.nn.Module
    proj: torch.nn.ModuleDict
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    info: dict  # how the student was made (source, kept layers, params)
    step: int
    base: int  # the step this plan's run started from (> 0 after a warm start)
    end: int
    skipped: int = 0  # sequences skipped for out-of-memory
    resumed: bool = False

    @classmethod
    def start(cls, cfg: Settings, plan: DistillPlan, paths: Paths, device: str, ctx: StageContext, profile: dict,
              hidden_layers: list[int], steps: int, group) -> "TrainingRun":
        """Resume this plan's checkpoint, warm-start from another plan's, or start fresh; `steps` more to go.
        Rank 0 alone repairs or sets aside checkpoints; every rank starts from identical weights."""
        with group.rank0_first():
            model, info, prev, step, base = _student(cfg, plan, paths, device, ctx, profile)
        proj = projections(model, profile.get("hidden"), hidden_layers).to(device)
        group.same_start([model, proj])
        end = base + steps
        opt = _optimizer(cfg, [model, proj])
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.distill.warmup_steps, end - base))
        run = cls(cfg, plan, model, proj, opt, sched, info, step, base, end)
        if prev is not None:  # the exact position, optimiser moments and RNG of the interrupted run
            run.end, run.skipped, run.resumed = int(prev[ckpt.END_STEP]), int(prev[ckpt.SKIPPED]), True
            proj.load_state_dict(prev[ckpt.PROJECTIONS])
            opt.load_state_dict(prev[ckpt.OPTIMIZER])
            sched.load_state_dict(prev[ckpt.SCHEDULER])
            ckpt.set_rng_state(prev[ckpt.RNG])
        return run

    def save(self, paths: Paths, ctx: StageContext, reason: str) -> None:
        state = {ckpt.MODEL: self.model.state_dict(), ckpt.OPTIMIZER: self.opt.state_dict(),
                 ckpt.SCHEDULER: self.sched.state_dict(), ckpt.PROJECTIONS: self.proj.state_dict(),
                 ckpt.RNG: ckpt.rng_state(), ckpt.STEP: self.step, ckpt.BASE_STEP: self.base,
                 ckpt.END_STEP: self.end, ckpt.DATA_POSITION: (self.step - self.base) * self.cfg.distill.grad_accum,
                 ckpt.CONFIG_HASH: config_hash(self.cfg), ckpt.PLAN_FP: self.plan.fingerprint(),
                 ckpt.STUDENT_CONFIG: self.model.config.to_json_string(), ckpt.STUDENT_INFO: json.dumps(self.info),
                 ckpt.SKIPPED: self.skipped}
        path = ckpt.save(paths, state, self.cfg.distill.keep_checkpoints)
        ctx.checkpoint_saved(step=self.step, reason=reason, path=path)


class KDStep:
    """Forward and backward of micro-batches against the teachers' stored targets."""

    def __init__(self, run: TrainingRun, vocab: int, to_student: dict[int, int], device: str):
        d = run.cfg.distill
        self.d, self.run, self.vocab, self.to_student, self.device = d, run, vocab, to_student, device
        self.tap = HiddenTap(run.model, set(to_student.values())) if to_student else None
        self.autocast = ((lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.startswith("cuda")
                         else contextlib.nullcontext)

    def _forward_backward(self, mb: MicroBatch, n_kd: int, n_ce: int) -> tuple[float, float]:
        d = self.d
        with self.autocast():
            logits = self.run.model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, use_cache=False).logits
        if mb.aligned:  # teachers with another tokenizer: per-position mixing over the teachers present
            sums = kd_loss.multi_loss_sums(logits, mb.input_ids, mb.attention_mask, mb.targets, mb.aligned,
                                           d.temperature, d.alpha, self.vocab, d.xtok_loss, d.xtok_uld_weight)
        else:
            sums = kd_loss.loss_sums(logits, mb.input_ids, mb.attention_mask, mb.targets, d.temperature, d.alpha,
                                     self.vocab)
        for t_layer, s_layer in self.to_student.items():
            if t_layer in mb.hidden:
                proj = self.run.proj[str(t_layer)] if str(t_layer) in self.run.proj else None
                sums.hidden = sums.hidden.to(self.device) + kd_loss.hidden_sum(
                    self.tap.out[s_layer], mb.hidden[t_layer], mb.attention_mask, proj)
        kd_loss.combine(sums, n_kd, n_ce, d.alpha, d.temperature, d.hidden_weight).backward()
        return sums.kd.item(), sums.ce.item()

    def micro(self, mb: MicroBatch, n_kd: int, n_ce: int, inject_oom: bool = False) -> tuple[float, float, int]:
        """(kd sum, ce sum, sequences skipped). On out-of-memory the micro-batch is split in halves (the loss
        is divided by the step's token counts, so the gradient is the same); a lone sequence that still does
        not fit is skipped."""
        try:
            if inject_oom:
                raise torch.OutOfMemoryError("injected out-of-memory (faults.oom_at_batches)")
            return (*self._forward_backward(mb, n_kd, n_ce), 0)
        except torch.OutOfMemoryError:
            pass  # leave the except block first so the exception's frames (and their tensors) are freed
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
        if mb.size == 1:
            log.warning("distill.sequence_skipped", step=self.run.step, reason="out of memory on a single sequence")
            return 0.0, 0.0, 1
        h = mb.size // 2
        a, b = self.micro(mb.select(slice(0, h)), n_kd, n_ce), self.micro(mb.select(slice(h, None)), n_kd, n_ce)
        return a[0] + b[0], a[1] + b[1], a[2] + b[2]
