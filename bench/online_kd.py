"""Offline stored top-k (Nexus) against online KD (the teacher run in every student step), at equal steps.

    python bench/bench_kd.py --online                      # both teachers (dispatches here)
    python bench/online_kd.py [--teachers bench,smollm2] [--steps N] [--seeds 3] [--quick]

What TRL's GKD trainer (lmbda=0: no on-policy samples, beta=0: forward KL) and DistillKit's online mode
do is run the teacher forward in every student step and take the KL to its full-vocabulary
distribution. Three students start from the same weights, see the same micro-batches in the same
order for the same steps with the same optimizer, schedule, alpha (KD vs CE mix) and temperature; only
the teacher signal differs:
  (a) online: the teacher's full logits, every step; KD term = TRL's own
      `GKDTrainer.generalized_jsd_loss(student, teacher, labels, beta=0, reduction="sum")`
      (TRL 1.16 pip-installed into bench/out/cache/trl: it installs beside transformers 5.24 without
      changing anything, `pip install --dry-run trl` adds trl alone);
  (b) stored top-32 + tail (Nexus's shards and loss, nexus_core/kd/loss.py: a (k+1)-bucket KL);
  (c) stored top-32 renormalised without the tail (what stores without a tail bucket do): the teacher's
      top-32 renormalised to 1, against the student's full-vocabulary log-probabilities at those ids.
Held-out loss per domain after the steps (nexus_core/kd/evaluate.py's held-out split and lm_loss).
Per-step time, interleaved (a)/(b)/(c): (a) includes the teacher forward, (b) and (c) the read of
the stored rows from the shards. Extraction cost: run_extract on the same data in a scratch copy of
the workdir (teacher load + shard loop + writes). Break-even: extraction seconds / (online step -
offline step) / steps per epoch = epochs after which extracting once costs less than running the
teacher online every epoch.

Teachers: `bench` — bench_kd's (kd_workdir.prepare: a 4-layer llama trained on the demo's data, 2-layer
student); `smollm2` — SmolLM2-135M-Instruct (bench/smollm2.py), profiled and extracted by Nexus on the
same demo data, a student keeping 6 of its 30 layers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import kd_workdir as kw  # noqa: E402

from nexus_core import data  # noqa: E402
from nexus_core.kd import loss as kd_loss  # noqa: E402
from nexus_core.kd.evaluate import heldout, lm_loss  # noqa: E402
from nexus_core.kd.loader import ShardLoader  # noqa: E402
from nexus_core.kd.streams import open_streams  # noqa: E402
from nexus_core.kd.student import build_student  # noqa: E402
from nexus_core.kd.training import _optimizer, lr_lambda  # noqa: E402
from nexus_core.paths import Paths  # noqa: E402
from nexus_core.records.plan import DistillPlan  # noqa: E402
from nexus_core.records.registry import Teacher, _weight_files  # noqa: E402
from nexus_core.stages.extract import run_extract  # noqa: E402
from nexus_core.storage.profiles import read_profile, read_profiles  # noqa: E402
from nexus_core.teachers.runner import FullRunner  # noqa: E402

OUT = kw.OUT
TRL = ("trl", "1.16.0")
VARIANTS = ("online", "topk_tail", "topk_renorm")
LABELS = {"online": "(a) online, full logits (TRL GKD loss)", "topk_tail": "(b) stored top-32 + tail (Nexus)",
          "topk_renorm": "(c) stored top-32 renormalised, no tail"}
# SmolLM2's workdir: the demo's data, shorter budget (a 135M teacher and a 49k vocabulary on 2 CPU cores).
SMOL = dataclasses.replace(kw.Spec(), seq_len=128, distill_sequences=32, arith_rows=1500, stdlib_bytes=300_000)


def trl_kd_loss():
    """TRL's GKD loss function (pip-installed into bench/out/cache/trl, no dependencies: ours suffice)."""
    target = OUT / "cache" / "trl"
    if not (target / "trl" / "__init__.py").is_file():
        import subprocess

        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                        f"{TRL[0]}=={TRL[1]}"], check=True)
    sys.path.insert(0, str(target))
    import warnings

    warnings.simplefilter("ignore")
    from trl.experimental.gkd.gkd_trainer import GKDTrainer

    return GKDTrainer.generalized_jsd_loss


# --- workdirs -------------------------------------------------------------------------------------------

def smollm2_workdir(log) -> tuple[Path, dict]:
    """bench/out/online_smollm2/<fp>: the demo's data, SmolLM2 (a registry teacher by path) profiled and extracted."""
    from smollm2 import hf_folder

    folder = hf_folder()

    def build(home: Path, spec, log_):
        paths = Paths(home).ensure()
        cfg = kw.settings(home, spec)
        kw.demo_splits(paths, spec, cfg.extract.heldout_fraction)
        teacher = Teacher(teacher_id="smollm2", path=str(folder), status="ready", source="registry/smollm2.json",
                          weight_files=_weight_files(folder))
        log_("profile and extract SmolLM2 (run_profile, run_extract)")
        t0 = time.perf_counter()
        kw.profile_and_extract(cfg, teacher, paths)
        return {"teacher": teacher.to_dict(), "setup_s": round(time.perf_counter() - t0, 1),
                "spec": dataclasses.asdict(spec)}

    return kw.cached_workdir("online_smollm2", SMOL, build, log)


def workdir(name: str, quick: bool, log) -> tuple[Path, object, Teacher, int]:
    """(home, spec, teacher, student layers)."""
    if name == "bench":
        spec = kw.QUICK if quick else kw.Spec()
        home, setup = kw.prepare(spec, log)
        return home, spec, Teacher.from_dict(setup["teacher"]), 0
    if name == "smollm2":
        home, setup = smollm2_workdir(log)
        return home, SMOL, Teacher.from_dict(setup["teacher"]), 6
    raise SystemExit(f"unknown teacher {name!r}; choose bench or smollm2")


# --- the three losses -----------------------------------------------------------------------------------

def renorm_sum(logits: torch.Tensor, targets, kd_mask: torch.Tensor, temperature: float, vocab: int) -> torch.Tensor:
    """(c): sum over KD positions of KL(q_renorm || p_student restricted to the top-k ids), q_renorm = the stored
    top-k renormalised to 1 (no tail), p_student the student's full-vocabulary softmax at those ids."""
    logp_T = F.log_softmax(logits[..., :vocab].float() / temperature, dim=-1)  # (b, T, V)
    kd = torch.zeros((), device=logits.device)
    total_w = sum(t.weight for t in targets)
    for t in targets:
        q_log = F.log_softmax(t.topk_logprobs.float() / temperature, dim=-1)  # (b, T, k), renormalised
        s_log = logp_T.gather(-1, t.topk_ids.long())  # (b, T, k)
        kl = (q_log.exp() * (q_log - s_log)).sum(-1)  # (b, T)
        kd = kd + (t.weight / total_w) * torch.where(kd_mask, kl, 0.0).sum()
    return kd


class Trainer:
    """One student and its optimizer; `step(variant, mb)` is what run_distill does per optimizer step
    (forward, loss sums, combine, backward, clip, AdamW, schedule) with the variant's teacher signal."""

    def __init__(self, cfg, plan, paths, profile, vocab, teacher_model, gkd_loss, steps):
        self.model, _ = build_student(cfg, plan, paths, "cpu", profile)
        self.model.config.use_cache = False
        self.model.train()
        self.opt = _optimizer(cfg, [self.model])
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(cfg.distill.warmup_steps, steps))
        self.cfg, self.vocab, self.teacher, self.gkd = cfg, vocab, teacher_model, gkd_loss

    def step(self, variant: str, mb) -> float:
        d = self.cfg.distill
        T, alpha = d.temperature, d.alpha
        kd_m, ce_m = kd_loss.masks(mb.attention_mask)
        logits = self.model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, use_cache=False).logits
        if variant == "topk_tail":
            sums = kd_loss.loss_sums(logits, mb.input_ids, mb.attention_mask, mb.targets, T, alpha, self.vocab)
        else:
            sums = kd_loss.loss_sums(logits, mb.input_ids, mb.attention_mask, [], T, 0.0, self.vocab)  # CE only
            if variant == "online":
                with torch.no_grad():
                    t_logits = self.teacher(input_ids=mb.input_ids, attention_mask=mb.attention_mask,
                                            use_cache=False).logits  # (b, T, V) every step
                labels = torch.where(kd_m, 0, -100)
                sums.kd = self.gkd(logits[..., :self.vocab].float(), t_logits[..., :self.vocab].float(), labels=labels,
                                   beta=0.0, temperature=T, reduction="sum")
            else:
                sums.kd = renorm_sum(logits, mb.targets, kd_m, T, self.vocab)
        loss = kd_loss.combine(sums, int(kd_m.sum()), int(ce_m.sum()), alpha, T)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), d.grad_clip)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss)


def evaluate(model, cfg, paths, tok, vocab) -> dict:
    model.eval()
    out = {}
    for d in kw.DATASETS:
        ids, mask, chars = heldout(cfg, paths, tok, d)
        out[d] = lm_loss(FullRunner.of(model, "cpu"), ids, mask, chars, vocab, "cpu")["loss"]
    model.train()
    return out


def extraction_cost(home: Path, cfg, teacher: Teacher, log) -> dict:
    """run_extract on both domains in a scratch copy of the workdir (datasets and profile shared, shards new):
    wall seconds including the teacher load, and tokens."""
    scratch = OUT / "online_runs" / f"extract-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    (scratch / "results").mkdir(parents=True)
    for sub in ("datasets", "results/profiles"):
        os.symlink(home / sub, scratch / sub)
    paths = Paths(scratch)
    t0, tokens = time.perf_counter(), 0
    for d in kw.DATASETS:
        tokens += run_extract(cfg, teacher, data.DatasetRef.parse(d), paths).data["tokens"]
    seconds = time.perf_counter() - t0
    shard_bytes = sum(f.stat().st_size for f in (scratch / "memory").rglob("*.safetensors"))
    shutil.rmtree(scratch, ignore_errors=True)
    log(f"extraction: {tokens} tokens in {seconds:.1f} s")
    return {"seconds": seconds, "tokens": tokens, "shard_bytes": shard_bytes}


def bench_teacher(name: str, steps: int, seeds: int, pairs: int, quick: bool, log) -> dict:
    from transformers import AutoModelForCausalLM

    from nexus_core.teachers.loading import tokenizer_from

    home, spec, teacher, layers = workdir(name, quick, log)
    paths = Paths(home)
    plan = DistillPlan(teachers=(teacher,), primary=teacher.teacher_id, datasets=kw.DATASETS)
    gkd = trl_kd_loss()
    t_model = AutoModelForCausalLM.from_pretrained(teacher.path, dtype=torch.float32).eval()
    tok = tokenizer_from(teacher.path)
    profile = read_profile(paths, plan.primary) or {}
    res: dict = {"teacher": name, "teacher_path": teacher.path, "steps": steps, "spec": dataclasses.asdict(spec),
                 "student_layers": layers, "seeds": [], "losses": {v: [] for v in VARIANTS}}
    teacher_loss = None
    for seed in kw.SEEDS[:seeds]:
        cfg = kw.settings(home, spec, seed, student_layers=layers, max_steps=steps)
        streams, info = open_streams(cfg, plan, paths, read_profiles(paths, plan.teachers))
        vocab = info["vocab"]
        if teacher_loss is None:
            teacher_loss = evaluate(t_model, cfg, paths, tok, vocab)
            res.update(vocab=vocab, alpha=cfg.distill.alpha, temperature=cfg.distill.temperature, lr=cfg.distill.lr,
                       batch_size=cfg.distill.batch_size, teacher_loss=teacher_loss)
        loader = ShardLoader(streams, cfg.distill.batch_size, seed)
        res["steps_per_epoch"] = loader.per_epoch
        for v in VARIANTS:
            tr = Trainer(cfg, plan, paths, profile, vocab, t_model, gkd, steps)
            t0 = time.perf_counter()
            for s in range(steps):
                tr.step(v, loader.micro_batch(s))
            ev = evaluate(tr.model, cfg, paths, tok, vocab)
            res["losses"][v].append(ev)
            res.setdefault("kept_layers", tr.model.config.num_hidden_layers)
            log(f"{name} seed {seed} {v}: {steps} steps in {time.perf_counter() - t0:.1f} s, held-out {ev}")
            del tr
        res["seeds"].append(seed)
        loader.close()
    # Step time, interleaved: the three variants on the same micro-batches, rotating which goes first.
    cfg = kw.settings(home, spec, kw.SEEDS[0], student_layers=layers, max_steps=steps)
    streams, info = open_streams(cfg, plan, paths, read_profiles(paths, plan.teachers))
    loader = ShardLoader(streams, cfg.distill.batch_size, kw.SEEDS[0])
    trainers = {v: Trainer(cfg, plan, paths, profile, info["vocab"], t_model, gkd, 10 ** 6) for v in VARIANTS}
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for i in range(pairs + 2):  # the first 2 rounds warm up
        order = VARIANTS[i % 3:] + VARIANTS[:i % 3]
        for v in order:
            t0 = time.perf_counter()
            mb = loader.micro_batch(i)  # (b) and (c) read their stored rows; (a) reads the ids only, but the same way
            trainers[v].step(v, mb)
            if i >= 2:
                times[v].append(time.perf_counter() - t0)
    loader.close()
    res["step_s"] = {v: {"median": statistics.median(x), "min": min(x), "max": max(x)} for v, x in times.items()}
    res["online_over_offline"] = statistics.median(a / b for a, b in zip(times["online"], times["topk_tail"]))
    res["pairs"] = pairs
    res["extraction"] = extraction_cost(home, kw.settings(home, spec), teacher, log)
    extra = res["step_s"]["online"]["median"] - res["step_s"]["topk_tail"]["median"]
    res["break_even_epochs"] = (res["extraction"]["seconds"] / (extra * res["steps_per_epoch"])) if extra > 0 else None
    res["mean_loss"] = {v: {d: statistics.mean(x[d] for x in res["losses"][v]) for d in kw.DATASETS} for v in VARIANTS}
    return res


def render(r: dict) -> str:
    lines = [f"Load average {r['load_before']} before, {r['load_after']} after; 1 torch thread; CPU."]
    for t in r["teachers"]:
        lines += ["", f"**{t['teacher']}** (teacher {Path(t['teacher_path']).name}; student keeps "
                  f"{t.get('kept_layers', '?')} layers; {t['steps']} steps x batch {t['batch_size']} x "
                  f"{t['spec']['seq_len']} tokens, alpha {t['alpha']}, T {t['temperature']}, lr {t['lr']}; "
                  f"{t['spec']['distill_sequences']} sequences per domain, {t['steps_per_epoch']} steps per epoch; "
                  f"seeds {t['seeds']}, losses averaged)", "",
                  "| teacher signal | " + " | ".join(f"held-out {d}" for d in kw.DATASETS)
                  + " | step s median [min, max] |", "|---|" + "---|" * (len(kw.DATASETS) + 1)]
        lines.append("| the teacher itself | " + " | ".join(f"{t['teacher_loss'][d]:.4f}" for d in kw.DATASETS) + " | |")
        for v in VARIANTS:
            s = t["step_s"][v]
            lines.append(f"| {LABELS[v]} | " + " | ".join(
                f"{t['mean_loss'][v][d]:.4f} ({t['mean_loss'][v][d] - t['mean_loss']['online'][d]:+.4f})"
                for d in kw.DATASETS) + f" | {s['median'] * 1e3:.1f} ms [{s['min'] * 1e3:.1f}, {s['max'] * 1e3:.1f}] |")
        ex = t["extraction"]
        be = t["break_even_epochs"]
        lines += ["", f"Online step / stored-top-k step (median of {t['pairs']} interleaved rounds): "
                  f"{t['online_over_offline']:.2f}x. Extraction (run_extract, both domains, teacher load included): "
                  f"{ex['seconds']:.1f} s for {ex['tokens']:,} tokens, {ex['shard_bytes'] / 2**20:.1f} MiB of shards. "
                  + (f"Break-even: extraction pays for itself after **{be:.2f} epochs** (extraction s / "
                     f"((online - stored) step s x {t['steps_per_epoch']} steps per epoch))." if be is not None else
                     "The online step was not slower here: no break-even.")]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--online", action="store_true", help=argparse.SUPPRESS)  # bench_kd.py's dispatch flag
    ap.add_argument("--teachers", default="bench,smollm2")
    ap.add_argument("--steps", type=int, help="student steps per variant (default: bench 200, smollm2 30)")
    ap.add_argument("--seeds", type=int, help="student seeds (default: bench 3, smollm2 1)")
    ap.add_argument("--timing-rounds", type=int, help="interleaved (a)/(b)/(c) rounds timed (default: bench 30, smollm2 5)")
    ap.add_argument("--quick", action="store_true", help="bench_kd's quick teacher, a few steps: a smoke test")
    ap.add_argument("--json", type=Path, default=OUT / "bench_kd_online.json")
    a = ap.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(1)  # as bench_kd: one thread is steadiest on a shared 2-core machine
    t_start = time.perf_counter()
    log = lambda m: print(f"[online_kd {time.perf_counter() - t_start:6.1f}s] {m}", file=sys.stderr, flush=True)  # noqa: E731
    names = ["bench"] if a.quick else [t.strip() for t in a.teachers.split(",") if t.strip()]
    res = {"command": "python bench/" + " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
           "load_before": [round(x, 2) for x in os.getloadavg()], "teachers": []}
    for name in names:
        big = name == "smollm2"
        steps = a.steps or (4 if a.quick else 30 if big else 200)
        seeds = a.seeds or (1 if a.quick or big else 3)
        rounds = a.timing_rounds or (2 if a.quick else 5 if big else 30)
        res["teachers"].append(bench_teacher(name, steps, seeds, rounds, a.quick, log))
    res["load_after"] = [round(x, 2) for x in os.getloadavg()]
    res["total_s"] = round(time.perf_counter() - t_start, 1)
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(res, indent=2))
    print(render(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
