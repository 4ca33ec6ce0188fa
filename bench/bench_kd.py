"""KD vs plain cross-entropy at equal steps and data, on the demo's kind of data, through the real stages.

    python bench/bench_kd.py            # full: ~6-8 min on 2 busy CPU cores (first run; the teacher is cached)
    python bench/bench_kd.py --quick    # smoke test, ~30 s
    python bench/bench_kd.py --sweep    # also a table of KD settings (alpha, temperature, lr, steps)

What runs (everything a user's run goes through, only smaller):
1. Data as `nexus run --demo` makes it (nexus_core.demo_data): `reasoning/arithmetic` and
   `code/python-stdlib`; a byte-level BPE tokenizer trained on their train split.
2. A 4-layer llama teacher trained on the whole train split of both domains (demo.train_causal_lm).
3. run_profile (block influence), then run_extract per domain: top-k shards, k=32 + tail bucket.
   The distillation data budget is `extract.max_samples` sequences per domain, a subset of what
   the teacher saw (as in real use, where the teacher was trained on far more than we distill on).
4. run_distill twice from identical starts (the depth-pruned student of nexus_core/student.py,
   same seed, data order, steps and lr schedule): alpha=0 (plain cross-entropy) and the KD setting.
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
import fcntl
import hashlib
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

from nexus_core import data, kd_loss  # noqa: E402
from nexus_core.config import DistillSettings, load_settings  # noqa: E402
from nexus_core.demo import eval_causal_lm, train_causal_lm  # noqa: E402
from nexus_core.demo_data import DataSpec, dataset_texts, ensure_datasets  # noqa: E402
from nexus_core.evaluate import MAX_HELDOUT_SEQUENCES  # noqa: E402
from nexus_core.kd_data import ShardLoader, open_streams  # noqa: E402
from nexus_core.model_factory import build_model, make_config, save_model, train_tokenizer  # noqa: E402
from nexus_core.paths import Paths  # noqa: E402
from nexus_core.plan import DistillPlan  # noqa: E402
from nexus_core.registry import Teacher, _weight_files  # noqa: E402
from nexus_core.stages.distill import _optimizer, run_distill  # noqa: E402
from nexus_core.stages.extract import run_extract  # noqa: E402
from nexus_core.stages.profile import run_profile  # noqa: E402
from nexus_core.student import build_student  # noqa: E402

OUT = ROOT / "bench" / "out"
ARITH, CODE = "reasoning/arithmetic", "code/python-stdlib"
DATASETS = (CODE, ARITH)  # sorted, as DistillPlan keeps them
TARGET_GAP, TARGET_RATIO = 0.85, 1.10
MARKER = "bench_marker.json"
SEEDS = (7, 8, 9, 10, 11)  # run.seed of the students (their data order); the first is the single-seed default


@dataclasses.dataclass(frozen=True)
class Spec:
    """Everything that makes the teacher and its shards (the cache key)."""

    arith_rows: int = 3000
    stdlib_bytes: int = 500_000
    stdlib_max_file: int = 12_000  # many small files, so the 5% hash split holds out several
    vocab: int = 768
    seq_len: int = 64
    hidden: int = 96
    layers: int = 4
    intermediate: int = 256
    teacher_steps: int = 500
    teacher_batch: int = 16
    teacher_lr: float = 3e-3
    distill_sequences: int = 96  # extract.max_samples: the KD/CE data budget per domain
    top_k: int = 32

    def fp(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:12]


QUICK = Spec(arith_rows=600, stdlib_bytes=150_000, stdlib_max_file=6_000, vocab=384, hidden=48, intermediate=128, teacher_steps=150,
             distill_sequences=24)


def settings(home: Path, spec: Spec, seed: int = SEEDS[0], **distill):
    d = {"batch_size": 8, "epochs": 1000, "checkpoint_every": 100_000, "keep_checkpoints": 1}
    d.update(distill)
    return load_settings(home, environ={}, run={"device": "cpu", "seed": seed},
                         extract={"seq_len": spec.seq_len, "top_k": spec.top_k, "max_samples": spec.distill_sequences,
                                  "shard_size": 64, "batch_size": 16},
                         distill=d, memory={"budget": "8GB"})


# --- 1-3: data, teacher, profile, shards (cached by the spec's fingerprint) ----------------------

def prepare(spec: Spec, log) -> tuple[Path, dict]:
    """A workdir with datasets, a trained teacher, its profile and its shards; reused when complete.

    A lock file serialises concurrent benchmark runs (e.g. bench/run_all.py and a manual run): the
    second waits and then reuses the first one's workdir. (The dir cannot be built under a temporary
    name and renamed: the teacher's fingerprint, stamped into profile and shards, includes its path.)
    """
    home = OUT / "kd_cache" / spec.fp()
    home.parent.mkdir(parents=True, exist_ok=True)
    with open(home.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (home / MARKER).exists():
            return home, {**json.loads((home / MARKER).read_text()), "cached": True}
        info = _build(home, spec, log)
        (home / MARKER).write_text(json.dumps(info, indent=1))
        return home, {**info, "cached": False}


def _build(home: Path, spec: Spec, log) -> dict:
    shutil.rmtree(home, ignore_errors=True)
    paths = Paths(home).ensure()
    cfg = settings(home, spec)
    t0 = time.perf_counter()
    ensure_datasets(paths, DataSpec(arithmetic_rows=spec.arith_rows, stdlib_bytes=spec.stdlib_bytes,
                                    stdlib_max_file_bytes=spec.stdlib_max_file))
    parts = {k: data.split(v, cfg.extract.heldout_fraction) for k, v in dataset_texts(paths).items()}
    tok = train_tokenizer(parts[CODE][0] + parts[ARITH][0], vocab_size=spec.vocab)
    # The teacher sees every training row of both domains (more than the distillation budget).
    rows = [data.pack(tok, parts[d][0], spec.seq_len) for d in DATASETS]
    ids, mask = torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])
    config = make_config("llama", vocab_size=len(tok), hidden=spec.hidden, layers=spec.layers, heads=4, kv_heads=2,
                         intermediate=spec.intermediate, max_pos=spec.seq_len * 2, tokenizer=tok)
    model = build_model(config, seed=11)
    log(f"training the teacher: {spec.teacher_steps} steps on {ids.shape[0]} rows")
    losses = train_causal_lm(model, ids, mask, spec.teacher_steps, spec.teacher_lr, spec.teacher_batch, seed=11)
    held = {d: eval_causal_lm(model, *data.pack(tok, parts[d][1], spec.seq_len, 64)) for d in DATASETS}
    folder = home / "models" / "teacher"
    save_model(model, tok, folder)
    teacher = Teacher(teacher_id="teacher", path=str(folder.resolve()), status="ready", source="registry/teacher.json",
                      weight_files=_weight_files(folder))
    refs = [data.DatasetRef.parse(d) for d in DATASETS]
    log("profile and extract (run_profile, run_extract)")
    run_profile(cfg, teacher, paths, refs)
    for ref in refs:
        run_extract(cfg, teacher, ref, paths)
    return {"teacher": teacher.to_dict(), "teacher_rows": int(ids.shape[0]), "teacher_final_train_loss":
            sum(losses[-10:]) / 10, "teacher_heldout": held, "setup_s": round(time.perf_counter() - t0, 1),
            "spec": dataclasses.asdict(spec)}


# --- 4: quality through run_distill ------------------------------------------------------------

def distill(home: Path, spec: Spec, plan: DistillPlan, name: str, seed: int = SEEDS[0], **knobs) -> dict:
    """One run_distill from scratch in a run folder that shares the cached shards; per-domain losses,
    and the arithmetic held-out loss split into question and answer lines (see answer_split)."""
    run = OUT / "kd_runs" / f"{name}-{os.getpid()}"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    (run / "results").mkdir()
    for sub in ("memory", "datasets", "results/profiles"):  # read-only inputs shared with the cache
        os.symlink(home / sub, run / sub)
    t0 = time.perf_counter()
    res = run_distill(settings(run, spec, seed, **knobs), plan, Paths(run))
    ev = res.data["eval"]
    out = {"knobs": knobs, "seed": seed, "seconds": round(time.perf_counter() - t0, 1),
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

def time_steps(home: Path, spec: Spec, plan: DistillPlan, n_pairs: int, alpha: float, temperature: float) -> dict:
    """KD and CE steps on identical students and batches, interleaved A/B/B/A; per-step CPU and wall seconds.

    A step is what run_distill does per optimizer step minus reading shards: forward, loss sums,
    combine, backward, clip, AdamW. Batches are read once up front so disk reads do not enter.
    """
    cfg = settings(home, spec)
    paths = Paths(home)
    streams, info = open_streams(cfg, plan, paths)
    loader = ShardLoader(streams, cfg.distill.batch_size, cfg.run.seed)
    batches = [loader.micro_batch(i) for i in range(min(loader.per_epoch, 16))]
    vocab = info["vocab"]
    students = {}
    for mode, a in (("ce", 0.0), ("kd", alpha)):
        model, _ = build_student(cfg, plan, paths, "cpu")
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

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test (~30 s)")
    ap.add_argument("--steps", type=int, help="student optimizer steps (both students); default: DistillSettings.max_steps (quick: 20)")
    ap.add_argument("--teacher-steps", type=int, help="teacher training steps (default 500; quick: 60)")
    ap.add_argument("--alpha", type=float, default=None, help="KD student's alpha (default: DistillSettings')")
    ap.add_argument("--temperature", type=float, default=None)
    ap.add_argument("--lr", type=float, default=None, help="peak lr of both students (default: DistillSettings')")
    ap.add_argument("--timing-pairs", type=int, help="interleaved KD/CE step pairs timed (default 60; quick 10)")
    ap.add_argument("--no-sweep", action="store_true", help="skip the table of KD settings (alpha, T, lr, steps)")
    ap.add_argument("--seeds", type=int, help=f"CE/KD pairs with different student seeds (data order), at most "
                    f"{len(SEEDS)}; the gap closed is that of the seed-mean losses (default 3; quick 1)")
    args = ap.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))  # stdout carries the table only
    torch.set_num_threads(1)  # on a shared 2-core machine extra threads mostly spin; one thread is steadiest
    spec = QUICK if args.quick else Spec()
    if args.teacher_steps is not None:
        spec = dataclasses.replace(spec, teacher_steps=args.teacher_steps)
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
    runs: dict[tuple, dict] = {}  # (alpha, T, lr, steps) -> distill result; CE runs have alpha 0 and T 1

    def get(alpha_: float, t_: float, lr_: float, steps_: int, seed: int = SEEDS[0]) -> dict:
        key = (alpha_, t_, lr_, steps_) + ((seed,) if seed != SEEDS[0] else ())
        if key not in runs:
            log(f"run_distill alpha={alpha_} T={t_} lr={lr_} steps={steps_} seed={seed}")
            runs[key] = distill(home, spec, plan, "run", seed, alpha=alpha_, temperature=t_, lr=lr_, max_steps=steps_)
        return runs[key]

    # The CE-teacher gap can be a few hundredths of a nat (arithmetic), the size of the seed-to-seed
    # spread, so the headline pairs CE and KD per seed and reports the gap closed by the seed-mean losses.
    ce_runs = [get(0.0, 1.0, lr, steps, s) for s in seeds]
    kd_runs = [get(alpha, temperature, lr, steps, s) for s in seeds]
    ce, kd = seed_mean(ce_runs), seed_mean(kd_runs)
    log("timing")
    timing = time_steps(home, spec, plan, pairs, alpha, temperature)
    per_domain = {d: {"teacher": ce["teacher"][d], "ce": ce["student"][d], "kd": kd["student"][d],
                      "gap_nats": ce["student"][d] - ce["teacher"][d],
                      "gap_closed": gap_closed(ce["student"][d], kd["student"][d], ce["teacher"][d]),
                      "gap_closed_per_seed": [gap_closed(c["student"][d], k["student"][d], c["teacher"][d])
                                              for c, k in zip(ce_runs, kd_runs)]} for d in DATASETS}
    teacher_lines = answer_split(home, spec, home / "models" / "teacher")
    per_domain[ARITH]["lines"] = {m: {"teacher": teacher_lines[m], "ce": ce["arith_lines"][m], "kd": kd["arith_lines"][m],
                                      "gap_closed": gap_closed(ce["arith_lines"][m], kd["arith_lines"][m], teacher_lines[m])}
                                  for m in teacher_lines}
    sweep = None if args.quick or args.no_sweep else run_sweep(get, steps)
    # The honest reading: KD against the best CE run made (tuned baseline), since a higher lr or more steps
    # "close" more of the gap mostly by making CE overfit the small distillation set.
    ces = [r for k, r in runs.items() if k[0] == 0.0]
    kds = [r for k, r in runs.items() if k[0] > 0.0]
    for d, v in per_domain.items():
        best_ce = min(r["student"][d] for r in ces)
        best_kd = min(r["student"][d] for r in kds)
        v["best_ce"], v["best_kd"] = best_ce, best_kd
        v["default_kd_vs_best_ce"] = gap_closed(best_ce, v["kd"], v["teacher"])
        v["best_kd_vs_best_ce"] = gap_closed(best_ce, best_kd, v["teacher"])
    uptime = os.getloadavg()
    summary = {
        "command": "python bench/bench_kd.py " + " ".join(sys.argv[1:]), "device": "cpu", "threads": 1,
        "load_avg_1_5_15": [round(x, 2) for x in uptime], "spec": dataclasses.asdict(spec), "spec_fp": spec.fp(),
        "setup": {k: setup[k] for k in ("setup_s", "cached", "teacher_rows", "teacher_heldout")},
        "steps": steps, "seeds": list(seeds), "teacher_steps": spec.teacher_steps, "batch_size": 8, "alpha": alpha,
        "temperature": temperature, "lr": lr, "kept_layers": kd["kept_layers"], "per_domain": per_domain,
        "gap_closed_min": min((v["gap_closed"] for v in per_domain.values() if v["gap_closed"] is not None), default=None),
        "timing": timing, "sweep": sweep, "total_s": round(time.perf_counter() - t_start, 1),
        "targets": {"gap_closed": TARGET_GAP, "kd_over_ce_step_time": TARGET_RATIO},
        # Flat keys kept for bench/run_all.py: domain-averaged losses and median step times.
        "teacher_heldout_loss": statistics.mean(ce["teacher"].values()),
        "ce_heldout_loss": statistics.mean(ce["student"].values()),
        "kd_heldout_loss": statistics.mean(kd["student"].values()),
        "kd_over_ce_step_time": timing["ratio_wall"]["median"],
        "kd_over_ce_step_time_p10": timing["ratio_wall"]["min"],
        "kd_over_ce_step_cpu_time": timing["ratio_cpu"]["median"],
        "runs": {m: {"alpha": a, "step_time_s": timing[m]["wall"]["median"], "step_cpu_time_s": timing[m]["cpu"]["median"],
                     "per_dataset": r["student"], "seconds": r["seconds"]}
                 for m, a, r in (("ce", 0.0, ce), ("kd", alpha, kd))},
    }
    summary["gap_closed"] = gap_closed(summary["ce_heldout_loss"], summary["kd_heldout_loss"],
                                       summary["teacher_heldout_loss"])
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "bench_kd.json").write_text(json.dumps(summary, indent=2))
    print(table(summary))


def seed_mean(rs: list[dict]) -> dict:
    """The runs' losses averaged over seeds (teacher losses do not depend on the student's seed)."""
    mean = lambda key: {d: statistics.mean(r[key][d] for r in rs) for d in rs[0][key]}  # noqa: E731
    return {**rs[0], "seed": [r["seed"] for r in rs], "student": mean("student"), "arith_lines": mean("arith_lines"),
            "seconds": statistics.mean(r["seconds"] for r in rs)}


def run_sweep(get, steps: int) -> list[dict]:
    """A few principled settings; each KD run is compared with a CE run at the same lr and steps."""
    grid = [(a, 1.0, 1e-3, steps) for a in (0.5, 0.9, 1.0)]
    grid += [(1.0, 2.0, 1e-3, steps), (0.9, 1.0, 3e-3, steps), (1.0, 1.0, 3e-3, steps), (0.9, 1.0, 3e-3, 2 * steps)]
    rows = []
    for alpha, t, lr, n in grid:
        ce, kd = get(0.0, 1.0, lr, n), get(alpha, t, lr, n)
        rows.append({"alpha": alpha, "temperature": t, "lr": lr, "max_steps": n,
                     **{f"gap_{d}": gap_closed(ce["student"][d], kd["student"][d], ce["teacher"][d]) for d in DATASETS},
                     "ce": ce["student"], "kd": kd["student"], "teacher": ce["teacher"]})
    return rows


def _pct(x: float | None) -> str:
    return "n/a (no gap)" if x is None else f"{x:.1%}"


def table(s: dict) -> str:
    t, pd = s["timing"], s["per_domain"]
    lines = [f"KD vs CE: {s['steps']} steps x batch {s['batch_size']}, student seeds {s['seeds']} (losses averaged), lr {s['lr']}, alpha {s['alpha']}, "
             f"T {s['temperature']}, k={s['spec']['top_k']} + tail; student = teacher layers {s['kept_layers']} "
             f"of {s['spec']['layers']}; {s['spec']['distill_sequences']} distill sequences x {s['spec']['seq_len']} "
             f"tokens per domain; load avg {s['load_avg_1_5_15']}", "",
             "| domain | teacher | CE student | KD student | CE-teacher gap (nats) | gap closed by KD | target |",
             "|---|---|---|---|---|---|---|"]
    for d, v in pd.items():
        ok = v["gap_closed"] is not None and v["gap_closed"] >= TARGET_GAP
        per_seed = [x for x in v["gap_closed_per_seed"] if x is not None]
        spread = (f" (per seed {', '.join(_pct(x) for x in per_seed)}; sd {statistics.stdev(per_seed):.1%})"
                  if len(per_seed) > 1 else "")
        lines.append(f"| {d} | {v['teacher']:.4f} | {v['ce']:.4f} | {v['kd']:.4f} | {v['gap_nats']:.4f} | "
                     f"{_pct(v['gap_closed'])}{spread} | >= 85% ({'meets' if ok else 'MISSES'}) |")
    for m, v in pd[ARITH]["lines"].items():
        lines.append(f"| {ARITH}, {m} lines only | {v['teacher']:.4f} | {v['ce']:.4f} | {v['kd']:.4f} | "
                     f"{v['ce'] - v['teacher']:.4f} | {_pct(v['gap_closed'])} | (diagnostic) |")
    lines += ["", "| step time (1 thread, interleaved, %d pairs) | CE median [min, max] ms | KD median [min, max] ms "
              "| KD/CE median of pair ratios [min, max] | target |" % t["pairs"], "|---|---|---|---|---|"]
    for clock in ("cpu", "wall"):
        c, k, r = t["ce"][clock], t["kd"][clock], t[f"ratio_{clock}"]
        ok = "meets" if r["median"] <= TARGET_RATIO else "MISSES"
        lines.append(f"| {clock} time | {c['median'] * 1e3:.1f} [{c['min'] * 1e3:.1f}, {c['max'] * 1e3:.1f}] | "
                     f"{k['median'] * 1e3:.1f} [{k['min'] * 1e3:.1f}, {k['max'] * 1e3:.1f}] | {r['median']:.3f}x "
                     f"[{r['min']:.2f}, {r['max']:.2f}] | <= 1.10x ({ok}) |")
    if s.get("sweep"):
        lines += ["", "| domain | best CE of all runs | default KD: gap closed vs best CE | best KD of all runs | "
                  "best KD vs best CE | best KD - teacher (nats) |", "|---|---|---|---|---|---|"]
        for d, v in pd.items():
            lines.append(f"| {d} | {v['best_ce']:.4f} | {_pct(v['default_kd_vs_best_ce'])} | {v['best_kd']:.4f} | "
                         f"{_pct(v['best_kd_vs_best_ce'])} | {v['best_kd'] - v['teacher']:.4f} |")
        lines += ["", "Settings (each KD run vs a CE run at the same lr and steps; held-out loss CE -> KD, teacher in the "
                  "header):", "",
                  "| alpha | T | lr | steps | " + " | ".join(f"{d} (teacher {s['per_domain'][d]['teacher']:.3f}): CE -> KD, "
                                                         "gap closed" for d in DATASETS) + " |",
                  "|---|---|---|---|" + "---|" * len(DATASETS)]
        for r in s["sweep"]:
            lines.append(f"| {r['alpha']} | {r['temperature']} | {r['lr']} | {r['max_steps']} | " + " | ".join(
                f"{r['ce'][d]:.4f} -> {r['kd'][d]:.4f}, {_pct(r[f'gap_{d}'])}" for d in DATASETS) + " |")
    lines.append(f"\n{s['command']}: {s['total_s']} s (setup {s['setup']['setup_s']} s, cached={s['setup']['cached']})")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
