"""Two teachers with different tokenizers: does the second one teach its own domain? Through the real stages.

    python bench/bench_xtok.py            # full: ~6-10 min on 2 busy CPU cores (teachers cached afterwards)
    python bench/bench_xtok.py --quick    # smoke test, ~1-2 min

What runs:
1. The demo's data (nexus_core.demo_data): `code/python-stdlib` and `reasoning/arithmetic`.
2. Two teachers from different families, each trained (demo.train_causal_lm) mostly on its own domain:
   "coder" - llama, byte-level BPE tokenizer, 98% code rows; the primary (the student inherits its
   tokenizer and its pruned layers). "mathy" - mistral, *unigram* (Metaspace) tokenizer of another
   size, 90% arithmetic rows.
3. run_profile and run_extract for both teachers on both domains: top-k shards with character offsets
   and each teacher's held-out loss per character.
4. run_distill from identical starts (same seed, data order, steps, schedule) with the primary alone
   and with both teachers (mathy aligned by characters, its ids mapped by token text; per-domain
   weights from held-out quality). Full mode adds the xtok_loss variants and registry-only weights.
   Held-out loss per domain (nats per student token) comes from run_distill's own evaluation.

Prints a markdown table and writes bench/out/xtok.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

import structlog
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from kd_workdir import (  # noqa: E402
    ARITH,
    CODE,
    DATASETS,
    OUT,
    cached_workdir,
    demo_splits,
    distill_run,
    profile_and_extract,
    settings,
    train_teacher,
)

from nexus_core import data  # noqa: E402
from nexus_core.demo.model_factory import train_tokenizer
from nexus_core.paths import Paths  # noqa: E402
from nexus_core.records.plan import DistillPlan
from nexus_core.records.registry import Teacher


@dataclasses.dataclass(frozen=True)
class Spec:
    arith_rows: int = 3000
    stdlib_bytes: int = 500_000
    stdlib_max_file: int = 12_000
    coder_vocab: int = 768  # byte-level BPE
    mathy_vocab: int = 512  # unigram
    seq_len: int = 64
    hidden: int = 96
    layers: int = 4
    intermediate: int = 256
    teacher_steps: int = 400
    teacher_batch: int = 16
    teacher_lr: float = 3e-3
    coder_own_share: float = 0.98  # share of the coder's training rows that are code (it barely saw arithmetic)
    mathy_own_share: float = 0.9  # share of mathy's training rows that are arithmetic
    distill_sequences: int = 96  # extract.max_samples per domain
    top_k: int = 32

    def fp(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:12]


STEPS = 150  # student optimizer steps unless --steps says otherwise

QUICK = Spec(arith_rows=600, stdlib_bytes=150_000, stdlib_max_file=6_000, coder_vocab=384, mathy_vocab=256, hidden=48,
             intermediate=128, teacher_steps=120, distill_sequences=24)


def prepare(spec: Spec, log) -> tuple[Path, dict]:
    return cached_workdir("xtok_cache", spec, _build, log)


def _mix(own: tuple, other: tuple, share: float, seed: int):
    """Rows mostly from `own`: all of them, plus other-domain rows so that own makes `share` of the total."""
    n_other = min(other[0].shape[0], int(own[0].shape[0] * (1 - share) / share))
    idx = torch.randperm(other[0].shape[0], generator=torch.Generator().manual_seed(seed))[:n_other]
    return torch.cat([own[0], other[0][idx]]), torch.cat([own[1], other[1][idx]])


def _teacher(home: Path, spec: Spec, name: str, arch: str, tok, own: str, parts, seed: int, log) -> Teacher:
    rows = {d: data.pack(tok, parts[d][0], spec.seq_len) for d in DATASETS}
    other = ARITH if own == CODE else CODE
    ids, mask = _mix(rows[own], rows[other], spec.coder_own_share if own == CODE else spec.mathy_own_share, seed)
    return train_teacher(home, spec, name, arch, tok, ids, mask, seed, log, primary=name == "coder")[0]


def _build(home: Path, spec: Spec, log) -> dict:
    paths = Paths(home).ensure()
    cfg = settings(home, spec, max_steps=STEPS)
    t0 = time.perf_counter()
    parts = demo_splits(paths, spec, cfg.extract.heldout_fraction)
    train = parts[CODE][0] + parts[ARITH][0]
    random.Random(0).shuffle(train)
    bpe = train_tokenizer(train, vocab_size=spec.coder_vocab, algorithm="bpe")
    uni = train_tokenizer(train, vocab_size=spec.mathy_vocab, algorithm="unigram")
    teachers = [_teacher(home, spec, "coder", "llama", bpe, CODE, parts, 11, log),
                _teacher(home, spec, "mathy", "mistral", uni, ARITH, parts, 22, log)]
    log("profile and extract (run_profile, run_extract) for both teachers")
    quality = {t.teacher_id: {d: r["heldout_loss_per_char"] for d, r in profile_and_extract(cfg, t, paths).items()}
               for t in teachers}
    return {"teachers": [t.to_dict() for t in teachers], "heldout_loss_per_char": quality,
            "vocab": {"coder": len(bpe), "mathy": len(uni)}, "setup_s": round(time.perf_counter() - t0, 1),
            "spec": dataclasses.asdict(spec)}


# --- 4: students through run_distill ---------------------------------------------------------------

def distill(home: Path, spec: Spec, plan: DistillPlan, name: str, seed: int = 7, **knobs) -> dict:
    run, res, seconds = distill_run(home, "xtok_runs", name,
                                    lambda d: settings(d, spec, seed, **{"max_steps": STEPS, **knobs}), plan)
    ev = res.data["eval"]
    out = {"knobs": knobs, "seed": seed, "seconds": seconds,
           "student": {d: ev[d]["student"]["loss"] for d in ev}, "teacher_usage": res.data["teacher_usage"]}
    shutil.rmtree(run, ignore_errors=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    ap.add_argument("--steps", type=int, help="student optimizer steps (every student); default 150 (quick: 30)")
    ap.add_argument("--teacher-steps", type=int, help="teacher training steps (default 400; quick: 120)")
    ap.add_argument("--seeds", type=int, default=3, help="student seeds for primary-alone vs both (full mode)")
    args = ap.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))  # stdout: the table only
    torch.set_num_threads(1)
    spec = QUICK if args.quick else Spec()
    if args.teacher_steps is not None:
        spec = dataclasses.replace(spec, teacher_steps=args.teacher_steps)
    steps = args.steps or (30 if args.quick else 150)
    t_start = time.perf_counter()
    log = lambda msg: print(f"[bench_xtok {time.perf_counter() - t_start:6.1f}s] {msg}", file=sys.stderr, flush=True)  # noqa: E731

    home, setup = prepare(spec, log)
    teachers = tuple(Teacher.from_dict(t) for t in setup["teachers"])
    coder = next(t for t in teachers if t.teacher_id == "coder")
    alone = DistillPlan(teachers=(coder,), primary="coder", datasets=DATASETS)
    both = DistillPlan(teachers=teachers, primary="coder", datasets=DATASETS)
    seeds = (7,) if args.quick else tuple(range(7, 7 + args.seeds))
    variants = [("primary alone", alone, {}, seeds), ("both (hybrid)", both, {"xtok_loss": "hybrid"}, seeds)]
    if not args.quick:
        variants += [("both (shared only)", both, {"xtok_loss": "shared"}, seeds[:1]),
                     ("both (ULD only)", both, {"xtok_loss": "uld"}, seeds[:1]),
                     ("both (boundary alignment)", both, {"xtok_align": "boundary"}, seeds[:1]),
                     ("both, registry weights (tau=0)", both, {"teacher_quality_tau": 0.0}, seeds[:1])]
    runs: dict[str, list[dict]] = {}
    for label, plan, knobs, vseeds in variants:
        for seed in vseeds:
            log(f"distill: {label}, seed {seed}")
            runs.setdefault(label, []).append(distill(home, spec, plan, f"v{len(runs)}", seed, max_steps=steps, **knobs))
    rows = []
    for label, rs in runs.items():
        row = {"variant": label, "seeds": [r["seed"] for r in rs]}
        for d in DATASETS:
            # paired by seed with the primary-alone run: same data order and initialisation
            base = {r["seed"]: r["student"][d] for r in runs["primary alone"]}
            deltas = [r["student"][d] - base[r["seed"]] for r in rs]
            row[d] = round(statistics.mean(r["student"][d] for r in rs), 4)
            row[f"delta {d}"] = round(statistics.mean(deltas), 4)
            row[f"delta_sd {d}"] = round(statistics.stdev(deltas), 4) if len(deltas) > 1 else None
        rows.append(row)
    usage = runs["both (hybrid)"][0]["teacher_usage"]
    both_row = next(r for r in rows if r["variant"] == "both (hybrid)")
    result = {"spec": dataclasses.asdict(spec), "steps": steps, "seeds": list(seeds), "setup": setup, "rows": rows,
              "runs": runs, "mathy_usage": usage["mathy"], "device": "cpu", "torch_threads": 1,
              "claim": {"mathy_improves_arithmetic": both_row[f"delta {ARITH}"] < 0,
                        "arith_delta": both_row[f"delta {ARITH}"], "arith_delta_sd": both_row[f"delta_sd {ARITH}"],
                        "code_delta": both_row[f"delta {CODE}"], "code_delta_sd": both_row[f"delta_sd {CODE}"]},
              "wall_s": round(time.perf_counter() - t_start, 1)}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "xtok.json").write_text(json.dumps(result, indent=1))
    print(render(result))


def render(r: dict) -> str:
    q = r["setup"]["heldout_loss_per_char"]
    def delta(row, d):
        sd = row[f"delta_sd {d}"]
        return f"{row['delta ' + d]:+.4f}" + (f" ± {sd:.4f}" if sd is not None else "")

    lines = [f"Student held-out loss (nats per student token), {r['steps']} distill steps each, CPU, "
             f"k={r['spec']['top_k']}, seq_len={r['spec']['seq_len']}; Δ vs the primary alone, paired by seed "
             f"(mean ± sd over the seeds listed):", "",
             f"| variant | seeds | {CODE} | {ARITH} | Δ {CODE} | Δ {ARITH} |", "|---|---|---|---|---|---|"]
    for row in r["rows"]:
        lines.append(f"| {row['variant']} | {len(row['seeds'])} | {row[CODE]:.4f} | {row[ARITH]:.4f} | "
                     f"{delta(row, CODE)} | {delta(row, ARITH)} |")
    lines += ["", "Teachers' held-out loss (nats per character, own tokenizer):", "",
              f"| teacher | {CODE} | {ARITH} |", "|---|---|---|"]
    for t, v in q.items():
        lines.append(f"| {t} | {v[CODE]:.4f} | {v[ARITH]:.4f} |")
    lines += ["", "How mathy's signal was used (both, hybrid):", "",
              "| domain | aligned positions % | shared-token coverage % | shared vocab % | weight |", "|---|---|---|---|---|"]
    for d, u in r["mathy_usage"]["domains"].items():
        lines.append(f"| {d} | {u.get('aligned_positions_pct')} | {u.get('shared_token_coverage_pct')} | "
                     f"{u.get('shared_vocab_pct')} | {u.get('weight')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
