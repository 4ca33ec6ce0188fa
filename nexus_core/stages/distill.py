"""Distill: train the student on the teachers' stored top-k distributions.

One loop, top to bottom (nanoGPT style): batch -> teacher targets -> loss -> step -> log ->
checkpoint. The pieces it calls live in kd_data (shards), kd_loss (loss), student
(initialisation), checkpoint, evaluate and release.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import sys
import time

import structlog
import torch

from nexus_core import augment
from nexus_core import checkpoint as ckpt
from nexus_core import ddp
from nexus_core import kd_loss
from nexus_core.atomic import write_json
from nexus_core.config import Settings
from nexus_core.errors import StageInterrupted
from nexus_core.evaluate import evaluate
from nexus_core.kd_data import MicroBatch, ShardLoader, open_streams, read_profile
from nexus_core.paths import Paths
from nexus_core.plan import DistillPlan
from nexus_core.release import write_release
from nexus_core.stages.context import Control, StageContext, StageResult
from nexus_core.student import build_student, config_from_json, model_from_config, student_layer_for
from nexus_core.teacher import decoder_layers

log = structlog.get_logger("nexus.distill")
_REASON = {Control.CHECKPOINT: "sigusr2", Control.PAUSE: "pause", Control.STOP_USR1: "sigusr1",
           Control.STOP_TERM: "sigterm"}
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


def _oom_batches(cfg: Settings) -> set[int]:
    return {int(x) for x in cfg.faults.oom_at_batches.split(",") if x.strip()}


class _HiddenTap:
    """Forward hooks that keep the student's decoder-layer outputs for the hidden-state loss."""

    def __init__(self, model, layers: set[int]):
        self.out: dict[int, torch.Tensor] = {}
        blocks = decoder_layers(model)
        self._handles = [blocks[i].register_forward_hook(self._hook(i)) for i in sorted(layers)]

    def _hook(self, i):
        def hook(module, args, output):
            self.out[i] = output[0] if isinstance(output, tuple) else output  # (b, T, H)
        return hook


def _setup(cfg, plan, paths, device, ctx):
    """Student, optimiser, schedule and position: resumed, warm-started or fresh."""
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
        s_config = config_from_json(prev[ckpt.STUDENT_CONFIG])
        model = model_from_config(s_config)
        model.load_state_dict(prev[ckpt.MODEL])
        info = json.loads(prev[ckpt.STUDENT_INFO])
    else:
        model, info = build_student(cfg, plan, paths, device)
    if cfg.distill.grad_checkpointing:
        model.gradient_checkpointing_enable()
    model.config.use_cache = False
    step = int(prev[ckpt.STEP]) if prev is not None else 0
    base = int(prev[ckpt.BASE_STEP]) if resume else step
    if prev is not None and not resume:
        log.info("distill.warm_start", from_plan=prev[ckpt.PLAN_FP], step=step)
        ctx.note("StudentWarmStarted", from_plan=prev[ckpt.PLAN_FP], step=step)
    return model.to(device).train(), info, prev if resume else None, step, base


def _projections(plan, paths, model, hidden_layers) -> torch.nn.ModuleDict:
    """A learned projection per critical layer when student and teacher widths differ."""
    profile = read_profile(paths, plan.primary) or {}
    t_width = profile.get("hidden") or model.config.hidden_size
    proj = torch.nn.ModuleDict()
    if t_width != model.config.hidden_size:
        for layer in hidden_layers:
            proj[str(layer)] = torch.nn.Linear(model.config.hidden_size, t_width, bias=False)
    return proj


def run_distill(cfg: Settings, plan: DistillPlan, paths: Paths, ctx: StageContext = StageContext()) -> StageResult:
    from nexus_core.teacher import tokenizer_from

    d, group = cfg.distill, ddp.Group.current()
    if d.nproc > 1 and group.world == 1:
        return ddp.launch(cfg, plan, paths, ctx)  # torchrun: each of its ranks runs this function below
    device = group.device(cfg.resolved_device())  # rank r of N: its own GPU
    torch.manual_seed(cfg.run.seed)
    paths.checkpoints.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer_from(plan.primary_teacher.path, plan.primary_teacher.trust_remote_code)

    # 1. Data: every shard checked against the plan first, then read lazily in a seeded order.
    streams, shard_info = open_streams(cfg, plan, paths)
    usage = shard_info["teacher_usage"]  # per teacher: how its signal is used (report, events)
    for tid, u in usage.items():
        log.info("distill.teacher_signal", teacher=tid, tokenizer=u["tokenizer"], domains=u["domains"])
    vocab = shard_info["vocab"] or len(tokenizer)
    with group.rank0_first():  # rank 0 alone repairs or sets aside checkpoints
        model, info, prev, step, base = _setup(cfg, plan, paths, device, ctx)
    primary_profile = read_profile(paths, plan.primary) or {}
    stored = set(next((s.sources[0].manifest.get("hidden_layers") or [] for s in streams
                       if s.sources[0].teacher_id == plan.primary), []))
    hidden_layers = [l for l in primary_profile.get("critical_layers", []) if l in stored] if d.hidden_weight > 0 else []
    n_student = model.config.num_hidden_layers
    to_student = {l: student_layer_for(l, info["kept_layers"], n_student, info["teacher_layers"]) for l in hidden_layers}
    tap = _HiddenTap(model, set(to_student.values())) if hidden_layers else None
    proj = _projections(plan, paths, model, hidden_layers).to(device)
    group.same_start([model, proj])
    loader = ShardLoader(streams, d.batch_size, cfg.run.seed, hidden_layers, primary=plan.primary)
    planned = math.ceil(d.epochs * loader.per_epoch / d.grad_accum)
    end = base + (min(d.max_steps, planned) if d.max_steps > 0 else planned)

    # 2. Optimiser and schedule (fresh on a warm start; restored, with RNG, on a resume).
    opt = _optimizer(cfg, [model, proj])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(d.warmup_steps, end - base))
    skipped = 0
    if prev is not None:
        end = int(prev[ckpt.END_STEP])
        proj.load_state_dict(prev[ckpt.PROJECTIONS])
        opt.load_state_dict(prev[ckpt.OPTIMIZER])
        sched.load_state_dict(prev[ckpt.SCHEDULER])
        ckpt.set_rng_state(prev[ckpt.RNG])
        skipped = int(prev[ckpt.SKIPPED])
    ctx.started(resume_step=step if prev is not None else 0, start_step=step, end_step=end,
                warm_start=prev is None and step > 0, student=info["source"])
    ctx.note("TeacherSignalsAligned", teacher_usage=usage, left_out=shard_info["left_out"], xtok_loss=d.xtok_loss)

    def save(reason: str) -> None:
        if group.rank != 0:  # one writer
            return
        state = {ckpt.MODEL: model.state_dict(), ckpt.OPTIMIZER: opt.state_dict(), ckpt.SCHEDULER: sched.state_dict(),
                 ckpt.PROJECTIONS: proj.state_dict(), ckpt.RNG: ckpt.rng_state(), ckpt.STEP: step,
                 ckpt.BASE_STEP: base, ckpt.END_STEP: end, ckpt.DATA_POSITION: (step - base) * d.grad_accum,
                 ckpt.CONFIG_HASH: config_hash(cfg), ckpt.PLAN_FP: plan.fingerprint(),
                 ckpt.STUDENT_CONFIG: model.config.to_json_string(), ckpt.STUDENT_INFO: json.dumps(info),
                 ckpt.SKIPPED: skipped}
        path = ckpt.save(paths, state, d.keep_checkpoints)
        ctx.checkpoint_saved(step=step, reason=reason, path=path)

    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.startswith("cuda") else contextlib.nullcontext
    oom_at, saved_at = _oom_batches(cfg), -1

    def forward_backward(mb: MicroBatch, n_kd: int, n_ce: int) -> tuple[float, float]:
        with autocast():
            logits = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, use_cache=False).logits
        if mb.aligned:  # teachers with another tokenizer: per-position mixing over the teachers present
            sums = kd_loss.multi_loss_sums(logits, mb.input_ids, mb.attention_mask, mb.targets, mb.aligned,
                                           d.temperature, d.alpha, vocab, d.xtok_loss, d.xtok_uld_weight)
        else:
            sums = kd_loss.loss_sums(logits, mb.input_ids, mb.attention_mask, mb.targets, d.temperature, d.alpha, vocab)
        for t_layer, s_layer in to_student.items():
            if t_layer in mb.hidden:
                sums.hidden = sums.hidden.to(device) + kd_loss.hidden_sum(
                    tap.out[s_layer], mb.hidden[t_layer], mb.attention_mask, proj[str(t_layer)] if str(t_layer) in proj else None)
        kd_loss.combine(sums, n_kd, n_ce, d.alpha, d.temperature, d.hidden_weight).backward()
        return sums.kd.item(), sums.ce.item()

    def train_micro(mb: MicroBatch, n_kd: int, n_ce: int, inject: bool) -> tuple[float, float, int]:
        """Forward+backward; on out-of-memory split the micro-batch in halves, skip a lone sequence."""
        try:
            if inject:
                raise torch.OutOfMemoryError("injected out-of-memory (faults.oom_at_batches)")
            return (*forward_backward(mb, n_kd, n_ce), 0)
        except torch.OutOfMemoryError:
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
            if mb.size == 1:
                log.warning("distill.sequence_skipped", step=step, reason="out of memory on a single sequence")
                return 0.0, 0.0, 1
            h = mb.size // 2
            a, b = train_micro(mb.select(slice(0, h)), n_kd, n_ce, False), train_micro(mb.select(slice(h, None)), n_kd, n_ce, False)
            return a[0] + b[0], a[1] + b[1], a[2] + b[2]

    bar = None
    if sys.stderr.isatty() and group.rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=end, initial=step, desc="distill", file=sys.stderr)
    log_every, t0, tokens, last = max(1, min(10, (end - step) // 20 or 1)), time.perf_counter(), 0, {}
    while step < end:
        # 1. Batch: this rank's share of the step's micro-batches (all of them in one process); the
        #    loss divides by the real tokens of the whole step, summed over the ranks.
        first = (step - base) * d.grad_accum
        micro = group.share(loader, first, d.grad_accum)  # [(j, micro-batch)]
        masks = [kd_loss.masks(mb.attention_mask) for _, mb in micro]
        n_kd, n_ce = map(int, group.sum(sum(int(k.sum()) for k, _ in masks), sum(int(c.sum()) for _, c in masks)))
        # 2-3. Teacher targets come with the batch (top-k shards); loss and backward per micro-batch.
        kd_sum = ce_sum = 0.0
        oom_skipped, oom_hit = 0, False
        for j, mb in micro:
            number = step * d.grad_accum + j
            inject = number in oom_at
            oom_hit |= inject
            k_, c_, s_ = train_micro(mb.to(device), n_kd, n_ce, inject)
            kd_sum, ce_sum, oom_skipped = kd_sum + k_, ce_sum + c_, oom_skipped + s_
        # 4. Step: gradients (and loss sums) summed over the ranks, clip, AdamW, schedule.
        params = [p for g in opt.param_groups for p in g["params"]]
        group.sum_grads(params)
        kd_sum, ce_sum, oom_skipped, oom_hit = group.sum(kd_sum, ce_sum, oom_skipped, oom_hit)
        if d.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, d.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        tokens += n_kd
        if oom_hit or oom_skipped:
            skipped += int(oom_skipped)
            ctx.oom_recovered(step=step, skipped=int(oom_skipped), stage="distill")
        # 5. Log.
        kd, ce = kd_sum / max(n_kd, 1), ce_sum / max(n_ce, 1)
        last = {"loss": d.alpha * d.temperature ** 2 * kd + (1 - d.alpha) * ce, "kd": kd, "ce": ce}
        if step % log_every == 0 or step == end:
            ctx.progress(step=step, steps=end, loss=round(last["loss"], 5), kd=round(kd, 5), ce=round(ce, 5),
                         lr=sched.get_last_lr()[0], tokens_per_s=round(tokens / (time.perf_counter() - t0), 1))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{last['loss']:.4f}")
        # 6. Checkpoint: periodic, or on request (SIGUSR2, thermal pause, stop), as rank 0 decides.
        control = group.agree(ctx.poll())
        if control != Control.CONTINUE or step % max(d.checkpoint_every, 1) == 0:
            save(_REASON.get(control, "periodic"))
            saved_at = step
        if control == Control.PAUSE:
            ctx.wait_while_paused()
        elif control.stops:
            raise StageInterrupted(control.value, f"distill checkpointed at step {step}")
    if bar is not None:
        bar.close()
    if saved_at != step and (prev is None or step != int(prev[ckpt.STEP])):
        save("periodic")
    loader.close()
    if group.rank != 0:  # rank 0 alone evaluates and writes the release
        return StageResult([], {})
    result = _finish(cfg, plan, paths, model, tokenizer, info, device, step, skipped, last, prev is None and base > 0)
    result.data["teacher_usage"] = usage
    return result


def _finish(cfg, plan, paths, model, tokenizer, info, device, step, skipped, last, warm) -> StageResult:
    """Held-out evaluation (results/eval.json) and the release folder."""
    model.eval()
    if cfg.distill.grad_checkpointing:
        model.gradient_checkpointing_disable()
    model.config.use_cache = True
    metrics = evaluate(cfg, plan, paths, model, tokenizer, device)
    summary = {"plan_fp": plan.fingerprint(), "steps": step, "student": info, "datasets": metrics,
               "teachers": [t.teacher_id for t in plan.teachers], "primary": plan.primary}
    eval_path = paths.results / "eval.json"
    write_json(eval_path, summary)
    card = {"teachers": [{"teacher_id": t.teacher_id, "weight": t.weight} for t in plan.teachers],
            "primary": plan.primary, "datasets": list(plan.datasets), "steps": step, "plan_fp": plan.fingerprint(),
            "student": info, "eval": metrics, "temperature": cfg.distill.temperature, "alpha": cfg.distill.alpha}
    release_files = write_release(paths, model.to("cpu").float(), tokenizer, card)
    data = {"steps": step, "skipped_sequences": skipped, "eval": metrics, "student": info, "warm_started": warm,
            "final": {k: round(v, 6) for k, v in last.items()}}
    return StageResult(artifacts=[ckpt.latest_path(paths), eval_path, *release_files], data=data)
