"""Distill: train the student on the teachers' stored top-k distributions.

One loop, top to bottom (nanoGPT style): batch -> teacher targets -> loss -> step -> log ->
checkpoint. The pieces it calls live in kd/: streams and loader (shards), loss, training (the run's
state, its checkpoint and one micro-batch's forward/backward), student, evaluate; and storage/release.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import structlog
import torch

from nexus_core import progress
from nexus_core.config import Settings
from nexus_core.context import Control, StageContext, StageResult
from nexus_core.errors import StageInterrupted
from nexus_core.kd import ddp
from nexus_core.kd import loss as kd_loss
from nexus_core.kd.evaluate import evaluate
from nexus_core.kd.loader import ShardLoader
from nexus_core.kd.streams import open_streams
from nexus_core.kd.student import student_layer_for
from nexus_core.kd.training import KDStep, TrainingRun
from nexus_core.paths import Paths
from nexus_core.records.plan import DistillPlan
from nexus_core.storage import checkpoint as ckpt
from nexus_core.storage.atomic import write_json
from nexus_core.storage.profiles import read_profiles
from nexus_core.storage.release import write_release
from nexus_core.teachers.loading import tokenizer_from

log = structlog.get_logger("nexus.distill")
_REASON = {Control.CHECKPOINT: "sigusr2", Control.PAUSE: "pause", Control.STOP_USR1: "sigusr1",
           Control.STOP_TERM: "sigterm", Control.STOP_INT: "sigint"}


def _oom_batches(cfg: Settings) -> set[int]:
    return {int(x) for x in cfg.faults.oom_at_batches.split(",") if x.strip()}


def _epochs_cap(d, planned: int, per_epoch: int) -> dict | None:
    """When `epochs` ends the run before `max_steps`, say so once (a silent cap looks like a bug)."""
    if not 0 < planned < d.max_steps:
        return None
    capped = {"epochs": d.epochs, "max_steps": d.max_steps, "steps": planned, "batches_per_epoch": per_epoch}
    log.warning(f"distill: epochs={d.epochs} caps max_steps={d.max_steps} at {planned} steps "
                f"({per_epoch} micro-batches per epoch); raise --distill-epochs to train longer", **capped)
    return capped


def run_distill(cfg: Settings, plan: DistillPlan, paths: Paths, ctx: StageContext = StageContext()) -> StageResult:
    d, group = cfg.distill, ddp.Group.current()
    if d.nproc > 1 and group.world == 1:
        return ddp.launch(cfg, plan, paths, ctx)  # torchrun: each of its ranks runs this function below
    device = group.device(cfg.resolved_device())  # rank r of N: its own GPU
    torch.manual_seed(cfg.run.seed)
    paths.checkpoints.mkdir(parents=True, exist_ok=True)

    # 1. Inputs, read once: the teachers' profiles, the student's tokenizer, every shard checked against
    #    the plan (then read lazily, in a seeded order).
    profiles = read_profiles(paths, plan.teachers)
    primary = profiles.get(plan.primary) or {}
    tokenizer = tokenizer_from(plan.primary_teacher.path, plan.primary_teacher.trust_remote_code)
    streams, shard_info = open_streams(cfg, plan, paths, profiles)
    usage = shard_info["teacher_usage"]  # per teacher: how its signal is used (report, events)
    for tid, u in usage.items():
        log.info("distill.teacher_signal", teacher=tid, tokenizer=u["tokenizer"], domains=u["domains"])
    vocab = shard_info["vocab"] or len(tokenizer)
    stored = set(next((s.sources[0].manifest.get("hidden_layers") or [] for s in streams
                       if s.sources[0].teacher_id == plan.primary), []))
    hidden_layers = [i for i in primary.get("critical_layers", []) if i in stored] if d.hidden_weight > 0 else []
    loader = ShardLoader(streams, d.batch_size, cfg.run.seed, hidden_layers, primary=plan.primary)
    planned = math.ceil(d.epochs * loader.per_epoch / d.grad_accum)
    capped = _epochs_cap(d, planned, loader.per_epoch)

    # 2. The student, its optimiser and schedule: resumed (with RNG and position), warm-started or fresh.
    run = TrainingRun.start(cfg, plan, paths, device, ctx, primary, hidden_layers,
                            min(d.max_steps, planned) if d.max_steps > 0 else planned, group)
    info, n_student = run.info, run.model.config.num_hidden_layers
    to_student = {t: student_layer_for(t, info["kept_layers"], n_student, info["teacher_layers"]) for t in hidden_layers}
    step_fn = KDStep(run, vocab, to_student, device)
    first_step = run.step
    ctx.started(resume_step=run.step if run.resumed else 0, start_step=run.step, end_step=run.end,
                warm_start=not run.resumed and run.step > 0, student=info["source"], primary=plan.primary,
                primary_reason=plan.primary_reason, **({"steps_capped_by_epochs": capped} if capped else {}))
    log.info("distill.student_seed", primary=plan.primary, reason=plan.primary_reason or "given by the plan")
    ctx.note("TeacherSignalsAligned", teacher_usage=usage, left_out=shard_info["left_out"], xtok_loss=d.xtok_loss)

    oom_at, saved_at = _oom_batches(cfg), -1
    log_every, t0, tokens, last = max(1, min(10, (run.end - run.step) // 20 or 1)), time.perf_counter(), 0, {}
    with progress.Bar("distill", total=run.end, done=run.step, unit="steps", enabled=group.rank == 0) as bar:
        while run.step < run.end:
            # 3. Batch: this rank's share of the step's micro-batches (all of them in one process); the
            #    loss divides by the real tokens of the whole step, summed over the ranks.
            micro = group.share(loader, (run.step - run.base) * d.grad_accum, d.grad_accum)  # [(j, micro-batch)]
            masks = [kd_loss.masks(mb.attention_mask) for _, mb in micro]
            n_kd, n_ce = map(int, group.sum(sum(int(k.sum()) for k, _ in masks), sum(int(c.sum()) for _, c in masks)))
            # 4. Teacher targets come with the batch (top-k shards); loss and backward per micro-batch.
            kd_sum = ce_sum = 0.0
            oom_skipped, oom_hit = 0, False
            for j, mb in micro:
                inject = run.step * d.grad_accum + j in oom_at
                oom_hit |= inject
                k_, c_, s_ = step_fn.micro(mb.to(device), n_kd, n_ce, inject)
                kd_sum, ce_sum, oom_skipped = kd_sum + k_, ce_sum + c_, oom_skipped + s_
            # 5. Step: gradients (and loss sums) summed over the ranks, clip, AdamW, schedule.
            params = [p for g in run.opt.param_groups for p in g["params"]]
            group.sum_grads(params)
            kd_sum, ce_sum, oom_skipped, oom_hit = group.sum(kd_sum, ce_sum, oom_skipped, oom_hit)
            if d.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, d.grad_clip)
            run.opt.step()
            run.sched.step()
            run.opt.zero_grad(set_to_none=True)
            run.step += 1
            tokens += n_kd
            if oom_hit or oom_skipped:
                run.skipped += int(oom_skipped)
                ctx.oom_recovered(step=run.step, skipped=int(oom_skipped), stage="distill")
            # 6. Log.
            kd, ce = kd_sum / max(n_kd, 1), ce_sum / max(n_ce, 1)
            last = {"loss": d.alpha * d.temperature ** 2 * kd + (1 - d.alpha) * ce, "kd": kd, "ce": ce}
            if run.step % log_every == 0 or run.step == run.end:
                ctx.progress(step=run.step, steps=run.end, loss=round(last["loss"], 5), kd=round(kd, 5), ce=round(ce, 5),
                             lr=run.sched.get_last_lr()[0], tokens_per_s=round(tokens / (time.perf_counter() - t0), 1))
            bar.update(run.step, tokens=n_kd, loss=last["loss"])
            # 7. Checkpoint: periodic, or on request (SIGUSR2, thermal pause, stop), as rank 0 decides.
            control = group.agree(ctx.poll())
            if control != Control.CONTINUE or run.step % max(d.checkpoint_every, 1) == 0:
                if group.rank == 0:  # one writer
                    run.save(paths, ctx, _REASON.get(control, "periodic"))
                saved_at = run.step
            if control == Control.PAUSE:
                ctx.wait_while_paused()
            elif control.stops:
                raise StageInterrupted(control.value, f"distill checkpointed at step {run.step}")
    if saved_at != run.step and not (run.resumed and run.step == first_step) and group.rank == 0:
        run.save(paths, ctx, "periodic")
    loader.close()
    if group.rank != 0:  # rank 0 alone evaluates and writes the release
        return StageResult([], {})
    result = _finish(cfg, plan, paths, run, tokenizer, device, last, profiles)
    result.data["teacher_usage"] = usage
    return result


def _finish(cfg, plan, paths, run: TrainingRun, tokenizer, device, last, profiles) -> StageResult:
    """Held-out evaluation (results/eval.json) and the release folder."""
    model, info, step = run.model, run.info, run.step
    model.eval()
    if cfg.distill.grad_checkpointing:
        model.gradient_checkpointing_disable()
    model.config.use_cache = True
    with progress.Bar("evaluate", total=None, unit="sequences").current():  # kd.evaluate advances it
        metrics = evaluate(cfg, plan, paths, model, tokenizer, device, profiles)
    summary = {"plan_fp": plan.fingerprint(), "steps": step, "student": info, "datasets": metrics,
               "teachers": [t.teacher_id for t in plan.teachers], "primary": plan.primary}
    eval_path = paths.results / "eval.json"
    write_json(eval_path, summary)
    card = {"teachers": [{"teacher_id": t.teacher_id, "weight": t.weight} for t in plan.teachers],
            "primary": plan.primary, "datasets": list(plan.datasets), "steps": step, "plan_fp": plan.fingerprint(),
            "student": info, "eval": metrics, "temperature": cfg.distill.temperature, "alpha": cfg.distill.alpha}
    release_files = write_release(paths, model.to("cpu").float(), tokenizer, card)
    warm = not run.resumed and run.base > 0
    data = {"steps": step, "skipped_sequences": run.skipped, "eval": metrics, "student": info, "warm_started": warm,
            "final": {k: round(v, 6) for k, v in last.items()}}
    return StageResult(artifacts=[ckpt.latest_path(paths), eval_path, *release_files], data=data)


if __name__ == "__main__":  # one rank under torchrun (kd.ddp.launch starts `-m nexus_core.stages.distill RUN_DIR`)
    sys.exit(ddp.rank_main(Path(sys.argv[1]), run_distill))
