"""SLI's glibc mmap threshold, A/B: throughput and peak RSS of one SLI pass per threshold, side by side.

    python bench/bench_malloc.py [--thresholds 1,16] [--seqs 2,8] [--reps 5] [--teacher hf|gguf]

`sli_arch.return_freed_memory` fixes glibc's M_MMAP_THRESHOLD (and M_TRIM_THRESHOLD at twice it) when an
SLI runner opens. Too low and every activation tensor is a fresh mapping whose pages fault in on first write;
too high and freed layer copies and logits chunks stay in the heap. Each (threshold, sequences) is a fresh
process on SmolLM2-135M-Instruct (bench/smollm2.py: `hf`, the fp32 safetensors folder, whose layers are views of
the mapping; `gguf`, the package's Q4_1 file, whose layers SLI dequantises into fp32 host copies of ~14 MiB each,
freed layer by layer; the offload bench's budget, 144 MiB): forward +
top-32 head as extraction computes it, best of 3 passes after a warm-up, VmHWM; thresholds interleaved rep by
rep so they share the machine's load. Prints medians; writes bench/out/bench_malloc.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
OUT = ROOT / "bench" / "out"
BUDGET = 144 << 20


def child(threshold_mib: int, n: int, teacher: str) -> dict:
    import torch

    from bench_offload import token_batch
    from bench_sli import rss_peak
    from smollm2 import gguf_file, hf_folder

    import nexus_core.teachers.sli_arch as sli_arch
    from nexus_core.config import ExtractSettings
    from nexus_core.records.registry import Teacher
    from nexus_core.teachers.logits import logit_positions, topk_targets
    from nexus_core.teachers.mode import open_runner

    sli_arch.MMAP_THRESHOLD = threshold_mib << 20  # read by return_freed_memory when the runner opens
    model_dir = hf_folder()
    ids, mask = token_batch("smollm2", model_dir, n, 512)
    path = gguf_file() if teacher == "gguf" else model_dir
    r = open_runner(Teacher("bench", str(path), "ready", ""), "sli", "cpu", torch.float32,
                    memory_budget_bytes=BUDGET)
    vocab, chunk = r.head_vocab, logit_positions(ExtractSettings(), r.head_vocab)
    best = float("inf")
    with torch.no_grad():
        r.forward(ids[:1, :16], mask[:1, :16])
        for _ in range(3):
            t = time.perf_counter()
            out = r.forward(ids, mask)
            h = out.final_hidden
            topk_targets(r.logits, h.reshape(-1, h.shape[-1]), 32, vocab, chunk)
            del out, h
            best = min(best, time.perf_counter() - t)
    return {"teacher": teacher, "threshold_mib": threshold_mib, "seqs": n, "tok_s": n * 512 / best,
            "rss_peak": rss_peak(), "micro_batch": r.stats["micro_batch"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--thresholds", default="1,16", help="MiB, comma-separated (glibc caps it at 32)")
    ap.add_argument("--seqs", default="2,8", help="sequences of 512 tokens per pass, comma-separated")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--teacher", choices=["hf", "gguf"], default="hf")
    ap.add_argument("--json", type=Path, default=OUT / "bench_malloc.json")
    ap.add_argument("--child", nargs=2, type=int, help=argparse.SUPPRESS)  # threshold MiB, sequences
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(*a.child, a.teacher)))
        return 0
    from smollm2 import hf_folder

    hf_folder()  # built (dequantised) once here, so that no child's peak RSS or time includes it
    thresholds = [int(x) for x in a.thresholds.split(",")]
    seqs = [int(x) for x in a.seqs.split(",")]
    load_before, t0 = os.getloadavg(), time.time()
    runs: dict[tuple[int, int], list[dict]] = {}
    for rep in range(a.reps):
        for n in seqs:
            for th in thresholds[rep % len(thresholds):] + thresholds[:rep % len(thresholds)]:
                p = subprocess.run([sys.executable, __file__, "--child", str(th), str(n), "--teacher", a.teacher],
                                   capture_output=True, text=True, check=True)
                res = json.loads(p.stdout.strip().splitlines()[-1])
                runs.setdefault((th, n), []).append(res)
                print(f"rep {rep} {n} seqs, {th} MiB: {res['tok_s']:.1f} tok/s, peak RSS "
                      f"{res['rss_peak'] / 2**20:.0f} MiB", file=sys.stderr, flush=True)
    rows = [{"threshold_mib": th, "seqs": n, "tok_s": statistics.median(x["tok_s"] for x in xs),
             "tok_s_runs": [x["tok_s"] for x in xs], "rss_peak_median": statistics.median(x["rss_peak"] for x in xs),
             "rss_peak_max": max(x["rss_peak"] for x in xs), "micro_batch": xs[0]["micro_batch"]}
            for (th, n), xs in sorted(runs.items(), key=lambda kv: (kv[0][1], kv[0][0]))]
    print(f"teacher {a.teacher}; load {load_before} before, {os.getloadavg()} after; {a.reps} reps; "
          "median tok/s, peak RSS median/max")
    print("| sequences x 512 | mmap threshold | tok/s | peak RSS MiB (median / max) | micro-batch |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['seqs']} | {r['threshold_mib']} MiB | {r['tok_s']:.1f} | {r['rss_peak_median'] / 2**20:.0f} / "
              f"{r['rss_peak_max'] / 2**20:.0f} | {r['micro_batch']} |")
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps({"command": "python bench/" + " ".join([Path(__file__).name, *sys.argv[1:]]),
                                  "teacher": a.teacher,
                                  "load_before": load_before, "load_after": os.getloadavg(),
                                  "total_s": time.time() - t0, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
