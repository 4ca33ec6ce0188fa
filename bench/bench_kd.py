"""KD vs plain cross-entropy at equal steps and data, on the demo's kind of data, through the real stages.

    python bench/bench_kd.py            # full: ~6-8 min on 2 busy CPU cores (first run; the teacher is cached)
    python bench/bench_kd.py --quick    # smoke test, ~40 s
    python bench/bench_kd.py --no-sweep # without the table of other settings (student depth, alpha, T, lr, steps)

What runs (everything a user's run goes through, only smaller):
1. Data as `nexus run --demo` makes it (nexus_core.demo_data): `reasoning/arithmetic` and
   `code/python-stdlib`; a byte-level BPE tokenizer trained on their train split.
2. A 4-layer llama teacher trained on the whole train split of both domains (demo.train_causal_lm).
3. run_profile (block influence), then run_extract per domain: top-k shards, k=32 + tail bucket.
   The distillation data budget is `extract.max_samples` sequences per domain, a subset of what
   the teacher saw (as in real use, where the teacher was trained on far more than we distill on).
4. run_distill from identical starts (the depth-pruned student of nexus_core/student.py, same seed,
   data order, steps and schedule): the KD setting, and alpha=0 (plain cross-entropy) at each lr of
   CE_LRS. The baseline is the plain fine-tune at its best lr per domain (and, when KD runs more
   steps than the default, at the better of the default and those steps: early stopping): at KD's
   lr it overfits the small distillation set, and a gap measured against an overfitted baseline
   overstates KD. The same-lr, same-steps comparison is printed beside it.
   --augment / --augment-samples: the KD student also learns on the teacher's new rows near the
   distillation sequences (extract.augment*, nexus_core/augment.py); the plain fine-tune keeps the
   real rows, since without a teacher's labels the new rows are noise.
   Held-out loss per domain comes from run_distill's own evaluation (nexus_core/evaluate.py).
   Repeated for --seeds student seeds (data order; default 3): the arithmetic CE-teacher gap is a few
   hundredths of a nat, the size of the seed-to-seed spread, so one pair is not a measurement. The
   headline is the gap closed by the seed-mean losses, with the per-seed figures beside it.
   Diagnostic: arithmetic's held-out loss split into question lines (random operands, mostly
   irreducible) and answer lines (echo + result: what a trained teacher knows), to show where the gap is.
5. Step time: both students step on the same pre-loaded micro-batches, interleaved A/B/B/A, each
   step timed by this process's CPU time and by wall time; medians and min/max are reported.

Prints a markdown table and writes bench/out/bench_kd.json.
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

import structlog
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from kd_workdir import (
    ARITH,
    DATASETS,
    OUT,
    QUICK,
    SEEDS,
    Spec,
    distill_run,
    prepare,
    prepare_augmented,
    settings,  # noqa: E402  (bench/ is on sys.path when run as a script)
)

from nexus_core import data
from nexus_core.config import DistillSettings  # noqa: E402
from nexus_core.kd import loss as kd_loss
from nexus_core.kd.evaluate import MAX_HELDOUT_SEQUENCES
from nexus_core.kd.loader import ShardLoader
from nexus_core.kd.streams import open_streams
from nexus_core.kd.student import AUTO_LAYER_RATIO, build_student
from nexus_core.kd.training import _optimizer  # noqa: E402
from nexus_core.paths import Paths  # noqa: E402
from nexus_core.records.plan import DistillPlan
from nexus_core.records.registry import Teacher
from nexus_core.storage.profiles import read_profile, read_profiles

TARGET_GAP, TARGET_RATIO = 0.85, 1.10  # share of the CE-teacher gap KD closes; KD/CE step time


# --- 4: quality through run_distill ------------------------------------------------------------

def distill(home: Path, spec: Spec, plan: DistillPlan, name: str, seed: int = SEEDS[0], **knobs) -> dict:
    """One run_distill from scratch in a run folder that shares the cached shards; per-domain losses,
    and the arithmetic held-out loss split into question and answer lines (see answer_split)."""
    run, res, seconds = distill_run(home, "kd_runs", name, lambda d: settings(d, spec, seed, **knobs), plan)
    ev = res.data["eval"]
    out = {"knobs": knobs, "seed": seed, "seconds": seconds,
           "kept_layers": res.data["student"]["kept_layers"],
           "student": {d: ev[d]["student"]["loss"] for d in ev},
           "teacher": {d: ev[d]["teachers"]["teacher"]["loss"] for d in ev},
           "arith_lines": answer_split(home, spec, run / "nexus-release-v1")}
    shutil.rmtree(run, ignore_errors=True)
    return out


def answer_split(home: Path, spec: Spec, model_dir: Path) -> dict:
    """Mean held-out arithmetic loss on question-line and answer-line targets ("What is 37 + 45?" /
    "37 + 45 = 82" + EOS), same tokens as run_distill's evaluation.

    Why: the question's operands are random, so its tokens are mostly irreducible noise; what a
    teacher knows about this domain (echo the operands, compute the result) shows in the answer line.
    """
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(str(home / "models" / "teacher"))
    texts = data.load_texts(Paths(home), data.DatasetRef.parse(ARITH), "")
    _, held = data.split(texts, settings(home, spec).extract.heldout_fraction)
    stream, answer = [], []
    for text in held:  # data.pack's stream, with a flag per token
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        stream += enc["input_ids"] + [tok.eos_token_id]
        answer += [start > text.index("\n") for start, _ in enc["offset_mapping"]] + [True]
        if len(stream) >= MAX_HELDOUT_SEQUENCES * spec.seq_len:
            break
    ids, mask = data.pack(tok, held, spec.seq_len, MAX_HELDOUT_SEQUENCES)
    flag = torch.zeros(ids.shape, dtype=torch.bool)
    flag.view(-1)[: min(len(answer), flag.numel())] = torch.tensor(answer[: flag.numel()])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids.long(), attention_mask=mask.long()).logits[..., :len(tok)].float(), -1)
    nll = -logp[:, :-1].gather(-1, ids[:, 1:].long().unsqueeze(-1)).squeeze(-1)  # (n, T-1)
    real = (mask[:, :-1] * mask[:, 1:]).bool()
    return {name: float(nll[real & (flag[:, 1:] == want)].mean()) for name, want in (("question", False), ("answer", True))}


def gap_closed(ce: float, kd: float, teacher: float) -> float | None:
    return (ce - kd) / (ce - teacher) if ce > teacher else None


# --- 5: step time, interleaved -----------------------------------------------------------------

def time_steps(home: Path, spec: Spec, plan: DistillPlan, n_pairs: int, alpha: float, temperature: float,
               student_layers: int = 0) -> dict:
    """KD and CE steps on identical students and batches, interleaved A/B/B/A; per-step CPU and wall seconds.

    A step is what run_distill does per optimizer step minus reading shards: forward, loss sums,
    combine, backward, clip, AdamW. Batches are read once up front so disk reads do not enter.
    """
    cfg = settings(home, spec, student_layers=student_layers)
    paths = Paths(home)
    streams, info = open_streams(cfg, plan, paths, read_profiles(paths, plan.teachers))
    loader = ShardLoader(streams, cfg.distill.batch_size, cfg.run.seed)
    batches = [loader.micro_batch(i) for i in range(min(loader.per_epoch, 16))]
    vocab = info["vocab"]
    students = {}
    for mode, a in (("ce", 0.0), ("kd", alpha)):
        model, _ = build_student(cfg, plan, paths, "cpu", read_profile(paths, plan.primary) or {})
        model.config.use_cache = False
        students[mode] = (model.train(), _optimizer(cfg, [model]), a)

    def step(mode: str, mb) -> tuple[float, float]:
        model, opt, a = students[mode]
        c0, w0 = time.process_time(), time.perf_counter()
        kd_m, ce_m = kd_loss.masks(mb.attention_mask)
        logits = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, use_cache=False).logits
        sums = kd_loss.loss_sums(logits, mb.input_ids, mb.attention_mask, mb.targets, temperature, a, vocab)
        kd_loss.combine(sums, int(kd_m.sum()), int(ce_m.sum()), a, temperature).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.process_time() - c0, time.perf_counter() - w0

    times = {"ce": [], "kd": []}
    for i in range(n_pairs + 3):  # the first 3 pairs warm up allocators and caches
        mb = batches[i % len(batches)]
        order = ("kd", "ce") if i % 2 else ("ce", "kd")
        for mode in order:
            t = step(mode, mb)
            if i >= 3:
                times[mode].append(t)
    loader.close()

    def stats(xs: list[float]) -> dict:
        return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}

    res = {m: {"cpu": stats([t[0] for t in ts]), "wall": stats([t[1] for t in ts])} for m, ts in times.items()}
    # Ratios per interleaved pair, then their median: each pair ran under the same machine load.
    for clock, j in (("cpu", 0), ("wall", 1)):
        r = [k[j] / c[j] for k, c in zip(times["kd"], times["ce"])]
        res[f"ratio_{clock}"] = {**stats(r), "of_medians": res["kd"][clock]["median"] / res["ce"][clock]["median"]}
    res["pairs"] = n_pairs
    return res


# --- main --------------------------------------------------------------------------------------

# The plain fine-tune's learning rates: the baseline gets the best of them per domain. At KD's lr it
# overfits the small distillation set (code: 3.96 nats at 1e-3 vs 3.42 at 1e-4), and a gap measured
# against an overfitted baseline overstates what KD closes.
CE_LRS = (1e-4, 3e-4, 1e-3)
CE_EARLY_STEPS = 200  # the plain fine-tune may also stop here (it overfits 96 sequences well before 800 steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test (~40 s)")
    ap.add_argument("--steps", type=int, help="student optimizer steps (both students); default: DistillSettings.max_steps (quick: 20)")
    ap.add_argument("--teacher-steps", type=int, help="teacher training steps (default 2000; quick: 150)")
    ap.add_argument("--teacher-layers", type=int, help="teacher depth (default 4)")
    ap.add_argument("--distill-sequences", type=int, help="extract.max_samples: the KD/CE data budget per domain "
                    "(default 96; quick 24)")
    ap.add_argument("--student-layers", type=int, default=0, help="teacher layers the student keeps (default: "
                    "student.AUTO_LAYER_RATIO of them)")
    ap.add_argument("--alpha", type=float, default=None, help="KD student's alpha (default: DistillSettings')")
    ap.add_argument("--temperature", type=float, default=None)
    ap.add_argument("--lr", type=float, default=None, help="KD student's peak lr (default: DistillSettings'); the "
                    f"plain fine-tune takes the best of {CE_LRS} and this one")
    ap.add_argument("--timing-pairs", type=int, help="interleaved KD/CE step pairs timed (default 60; quick 10)")
    ap.add_argument("--no-sweep", action="store_true", help="skip the table of other settings (student depth, alpha, "
                    "T, lr, steps)")
    ap.add_argument("--seeds", type=int, help=f"student seeds (data order), at most {len(SEEDS)}; losses are "
                    "averaged over them (default 3; quick 1)")
    ap.add_argument("--augment", type=int, default=-1, help="extract.augment for the KD student: it also trains on "
                    "this many teacher-perturbed copies of the distillation sequences (nexus_core/augment.py); "
                    "default -1: the product's automatic rule (augment.resolve); 0: off")
    ap.add_argument("--augment-p", type=float, default=0.15, help="share of tokens a perturbed copy replaces")
    ap.add_argument("--augment-samples", type=int, default=-1, help="extract.augment_samples for the KD student "
                    "(default -1: the automatic rule; 0: off): "
                    "continuations of each sequence's first tokens sampled from the teacher")
    ap.add_argument("--augment-temperature", type=float, default=0.8)
    ap.add_argument("--ce-on-new-rows", action="store_true", help="a control: the plain fine-tune also trains on the "
                    "teacher's new rows (the sampled and redrawn tokens as hard labels)")
    ap.add_argument("--json", type=Path, default=OUT / "bench_kd.json", help="where the results go (default: %(default)s)")
    args = ap.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))  # stdout carries the table only
    torch.set_num_threads(1)  # on a shared 2-core machine extra threads mostly spin; one thread is steadiest
    spec = QUICK if args.quick else Spec()
    for field, value in (("teacher_steps", args.teacher_steps), ("layers", args.teacher_layers),
                         ("distill_sequences", args.distill_sequences)):
        if value is not None:
            spec = dataclasses.replace(spec, **{field: value})
    defaults = DistillSettings()
    steps = args.steps or (20 if args.quick else defaults.max_steps)
    pairs = args.timing_pairs or (10 if args.quick else 60)
    seeds = SEEDS[:max(1, min(len(SEEDS), args.seeds or (1 if args.quick else 3)))]
    alpha = defaults.alpha if args.alpha is None else args.alpha
    temperature = defaults.temperature if args.temperature is None else args.temperature
    lr = defaults.lr if args.lr is None else args.lr
    t_start = time.perf_counter()
    log = lambda msg: print(f"[bench_kd {time.perf_counter() - t_start:6.1f}s] {msg}", file=sys.stderr, flush=True)  # noqa: E731

    home, setup = prepare(spec, log)
    plan = DistillPlan(teachers=(Teacher.from_dict(setup["teacher"]),), primary="teacher", datasets=DATASETS)
    log(f"setup {'cached' if setup['cached'] else 'built'}")
    kd_home, kd_aug = home, {}
    if args.augment or args.augment_samples:
        kd_aug = {"augment": args.augment, "augment_p": args.augment_p, "augment_samples": args.augment_samples,
                  "augment_temperature": args.augment_temperature}
        kd_home = prepare_augmented(home, spec, plan.primary_teacher, kd_aug, log)
    runs: dict[tuple, dict] = {}  # (alpha, T, lr, steps, layers, seed) -> distill result; CE runs: alpha 0, T 1

    def get(alpha_: float, t_: float, lr_: float, steps_: int, layers: int, seed: int) -> dict:
        key = (alpha_, t_, lr_, steps_, layers, seed)
        if key not in runs:
            log(f"run_distill alpha={alpha_} T={t_} lr={lr_} steps={steps_} student_layers={layers or 'default'} "
                f"seed={seed}")
            new_rows = alpha_ > 0 or args.ce_on_new_rows  # by default the plain fine-tune keeps the real rows
            runs[key] = distill(kd_home if new_rows else home, spec, plan, "run", seed,
                                augment=kd_aug if new_rows else None,
                                student_layers=layers, alpha=alpha_, temperature=t_,
                                lr=lr_, max_steps=steps_)
        return runs[key]

    def compare(alpha_: float, t_: float, lr_: float, steps_: int, layers: int, seeds_) -> dict:
        """KD at one setting vs the plain fine-tune at its best lr per domain, same student and data, and at
        most as many steps: with more steps than the default it may also stop at the default (early stopping)."""
        budgets = sorted({min(steps_, CE_EARLY_STEPS), steps_})
        ce = {(c, n): seed_mean([get(0.0, 1.0, c, n, layers, s) for s in seeds_])
              for c in sorted({*CE_LRS, lr_}) for n in budgets}
        kd_runs = [get(alpha_, t_, lr_, steps_, layers, s) for s in seeds_]
        kd = seed_mean(kd_runs)
        out = {"alpha": alpha_, "temperature": t_, "lr": lr_, "steps": steps_, "kept_layers": kd["kept_layers"],
               "ce_by_lr_steps": {f"{c:g}@{n}": r["student"] for (c, n), r in ce.items()}, "kd": kd["student"],
               "teacher": kd["teacher"], "arith_lines": {"kd": kd["arith_lines"]}, "domains": {}}
        for d in DATASETS:
            best = min(ce, key=lambda c: ce[c]["student"][d])
            per_seed = [gap_closed(get(0.0, 1.0, *best, layers, s)["student"][d], k["student"][d], k["teacher"][d])
                        for s, k in zip(seeds_, kd_runs)]
            out["domains"][d] = {
                "teacher": kd["teacher"][d], "kd": kd["student"][d], "ce": ce[best]["student"][d], "ce_lr": best[0],
                "ce_steps": best[1],
                "gap_nats": ce[best]["student"][d] - kd["teacher"][d],
                "gap_closed": gap_closed(ce[best]["student"][d], kd["student"][d], kd["teacher"][d]),
                "gap_closed_per_seed": per_seed,
                "ce_same_lr": ce[lr_, steps_]["student"][d],
                "gap_closed_same_lr": gap_closed(ce[lr_, steps_]["student"][d], kd["student"][d], kd["teacher"][d])}
            if d == ARITH:
                out["arith_lines"]["ce"] = ce[best]["arith_lines"]
        return out

    head = compare(alpha, temperature, lr, steps, args.student_layers, seeds)
    log("timing")
    timing = time_steps(home, spec, plan, pairs, alpha, temperature, args.student_layers)
    per_domain = head["domains"]
    teacher_lines = answer_split(home, spec, home / "models" / "teacher")
    per_domain[ARITH]["lines"] = {m: {"teacher": teacher_lines[m], "ce": head["arith_lines"]["ce"][m],
                                      "kd": head["arith_lines"]["kd"][m],
                                      "gap_closed": gap_closed(head["arith_lines"]["ce"][m], head["arith_lines"]["kd"][m],
                                                               teacher_lines[m])} for m in teacher_lines}
    sweep = None if args.quick or args.no_sweep else run_sweep(compare, spec.layers, alpha, temperature, lr,
                                                                steps, args.student_layers, seeds[:1])
    mean = lambda key: statistics.mean(v[key] for v in per_domain.values())  # noqa: E731
    summary = {
        "command": "python bench/bench_kd.py " + " ".join(sys.argv[1:]), "device": "cpu", "threads": 1,
        "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()], "spec": dataclasses.asdict(spec), "spec_fp": spec.fp(),
        "setup": {k: setup[k] for k in ("setup_s", "cached", "teacher_rows", "teacher_heldout")},
        "steps": steps, "seeds": list(seeds), "teacher_steps": spec.teacher_steps, "batch_size": 8, "alpha": alpha,
        "temperature": temperature, "lr": lr, "augment": kd_aug, "ce_on_new_rows": args.ce_on_new_rows,
        "ce_lrs": sorted({*CE_LRS, lr}), "kept_layers": head["kept_layers"],
        "per_domain": per_domain,
        "gap_closed_min": min((v["gap_closed"] for v in per_domain.values() if v["gap_closed"] is not None), default=None),
        "timing": timing, "sweep": sweep, "total_s": round(time.perf_counter() - t_start, 1),
        "targets": {"gap_closed": TARGET_GAP, "kd_over_ce_step_time": TARGET_RATIO},
        # Flat keys kept for bench/run_all.py: domain-averaged losses (CE at its best lr) and step-time ratios.
        "teacher_heldout_loss": mean("teacher"), "ce_heldout_loss": mean("ce"), "kd_heldout_loss": mean("kd"),
        "kd_over_ce_step_time": timing["ratio_wall"]["median"],
        "kd_over_ce_step_time_p10": timing["ratio_wall"]["min"],
        "kd_over_ce_step_cpu_time": timing["ratio_cpu"]["median"],
    }
    summary["gap_closed"] = gap_closed(summary["ce_heldout_loss"], summary["kd_heldout_loss"],
                                       summary["teacher_heldout_loss"])
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=2))
    print(table(summary))


def seed_mean(rs: list[dict]) -> dict:
    """The runs' losses averaged over seeds (teacher losses do not depend on the student's seed)."""
    mean = lambda key: {d: statistics.mean(r[key][d] for r in rs) for d in rs[0][key]}  # noqa: E731
    return {**rs[0], "seed": [r["seed"] for r in rs], "student": mean("student"), "arith_lines": mean("arith_lines"),
            "seconds": statistics.mean(r["seconds"] for r in rs)}


def run_sweep(compare, teacher_layers: int, alpha: float, temperature: float, lr: float, steps: int, layers: int,
              seeds) -> list[dict]:
    """Other settings, one seed each, every one against the plain fine-tune at its best lr for the same
    student and steps: a deeper student (the capacity question), KD's own knobs, and twice the steps."""
    deeper = (layers or round(teacher_layers * AUTO_LAYER_RATIO)) + 1
    grid = [(f"student keeps {deeper} of {teacher_layers} layers", (alpha, temperature, lr, steps, deeper))] * (
        deeper <= teacher_layers)
    grid += [("alpha 1.0 (no CE term)", (1.0, temperature, lr, steps, layers)),
            ("alpha 0.5", (0.5, temperature, lr, steps, layers)),
            ("T 2", (alpha, 2.0, lr, steps, layers)),
            ("KD lr 3e-3", (alpha, temperature, 3e-3, steps, layers)),
            (f"{2 * steps} steps", (alpha, temperature, lr, 2 * steps, layers))]
    return [{"label": label, **compare(*knobs, seeds)} for label, knobs in grid]


def _ce_at(v: dict, steps: int) -> str:
    """The plain fine-tune's winning lr, and its steps when it stopped early."""
    n = v.get("ce_steps", steps)
    return f"lr {v['ce_lr']:g}" + (f", {n} steps" if n != steps else "")


def _aug_text(a: dict) -> str:
    parts = ["the automatic rule (augment.resolve)"] if -1 in (a.get("augment"), a.get("augment_samples")) else []
    if a.get("augment", 0) > 0:
        parts.append(f"{a['augment']} perturbed copies of each, p={a['augment_p']}")
    if a.get("augment_samples", 0) > 0:
        parts.append(f"{a['augment_samples']} samples from each one's first tokens at T={a['augment_temperature']}")
    return "extract.augment*: " + "; ".join(parts)


def _pct(x: float | None) -> str:
    return "n/a (no gap)" if x is None else f"{x:.1%}"


def table(s: dict) -> str:
    t, pd = s["timing"], s["per_domain"]
    lines = [f"KD vs plain fine-tune (CE): {s['steps']} steps x batch {s['batch_size']}, student seeds {s['seeds']} (losses "
             f"averaged); KD: alpha {s['alpha']}, T {s['temperature']}, lr {s['lr']}, k={s['spec']['top_k']} + tail; CE: "
             f"the best of lr {s['ce_lrs']} (and of {CE_EARLY_STEPS} steps when KD takes more) per "
             f"domain; student = teacher layers {s['kept_layers']} of "
             f"{s['spec']['layers']}; teacher trained {s['teacher_steps']} steps; {s['spec']['distill_sequences']} distill "
             f"sequences x {s['spec']['seq_len']} tokens per domain"
             + (f"; the KD student also learns on the teacher's new rows near them ({_aug_text(s['augment'])})"
                if s.get("augment") else "") + ("; the plain fine-tune learns on them too (hard labels)"
                                                if s.get("ce_on_new_rows") else "")
             + f"; load avg {s['load_avg_1_5_15']}", "",
             "| domain | teacher | CE student (best lr, steps) | KD student | CE-teacher gap (nats) | gap closed by KD | target "
             "| CE at KD's lr: loss, gap closed |", "|---|---|---|---|---|---|---|---|"]
    for d, v in pd.items():
        ok = v["gap_closed"] is not None and v["gap_closed"] >= TARGET_GAP
        per_seed = [x for x in v["gap_closed_per_seed"] if x is not None]
        spread = (f" (per seed {', '.join(_pct(x) for x in per_seed)}; sd {statistics.stdev(per_seed):.1%})"
                  if len(per_seed) > 1 else "")
        lines.append(f"| {d} | {v['teacher']:.4f} | {v['ce']:.4f} ({_ce_at(v, s['steps'])}) | {v['kd']:.4f} | {v['gap_nats']:.4f} | "
                     f"{_pct(v['gap_closed'])}{spread} | >= 85% ({'meets' if ok else 'MISSES'}) | "
                     f"{v['ce_same_lr']:.4f}, {_pct(v['gap_closed_same_lr'])} |")
    for m, v in pd[ARITH]["lines"].items():
        lines.append(f"| {ARITH}, {m} lines only | {v['teacher']:.4f} | {v['ce']:.4f} | {v['kd']:.4f} | "
                     f"{v['ce'] - v['teacher']:.4f} | {_pct(v['gap_closed'])} | (diagnostic) | |")
    lines += ["", "| step time (1 thread, interleaved, %d pairs) | CE median [min, max] ms | KD median [min, max] ms "
              "| KD/CE median of pair ratios [min, max] | target |" % t["pairs"], "|---|---|---|---|---|"]
    for clock in ("cpu", "wall"):
        c, k, r = t["ce"][clock], t["kd"][clock], t[f"ratio_{clock}"]
        ok = "meets" if r["median"] <= TARGET_RATIO else "MISSES"
        lines.append(f"| {clock} time | {c['median'] * 1e3:.1f} [{c['min'] * 1e3:.1f}, {c['max'] * 1e3:.1f}] | "
                     f"{k['median'] * 1e3:.1f} [{k['min'] * 1e3:.1f}, {k['max'] * 1e3:.1f}] | {r['median']:.3f}x "
                     f"[{r['min']:.2f}, {r['max']:.2f}] | <= 1.10x ({ok}) |")
    if s.get("sweep"):
        lines += ["", f"Other settings (seed {s['seeds'][0]}; each KD run against the plain fine-tune at its best lr for the "
                  "same student and steps; held-out loss CE (lr) -> KD, share of the gap closed):", "",
                  "| setting | student layers | " + " | ".join(DATASETS) + " |", "|---|---|" + "---|" * len(DATASETS)]
        for r in s["sweep"]:
            lines.append(f"| {r['label']} | {r['kept_layers']} | " + " | ".join(
                f"{v['ce']:.4f} ({_ce_at(v, r['steps'])}) -> {v['kd']:.4f} (teacher {v['teacher']:.4f}), {_pct(v['gap_closed'])}"
                for v in (r["domains"][d] for d in DATASETS)) + " |")
    lines.append(f"\n{s['command']}: {s['total_s']} s (setup {s['setup']['setup_s']} s, cached={s['setup']['cached']})")
    return "\n".join(lines)


if __name__ == "__main__":
    if "--online" in sys.argv[1:]:  # offline stored top-k vs online KD (TRL GKD-style): bench/online_kd.py
        from online_kd import main as online_main

        sys.exit(online_main(sys.argv[1:]))
    main()
