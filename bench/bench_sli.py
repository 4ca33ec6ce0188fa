"""SLI against a full load, side by side, on a generated teacher (≥ 1 GB, ≥ 16 layers).

    python bench/bench_sli.py [--workdir /tmp/nexus-bench-sli] [--json out.json]

Each runner is measured in its own fresh subprocess (so peak RSS is its own; the baseline is the RSS after importing torch, transformers and
the model's modelling code, which both paths need): throughput
(tokens/s, forward + LM head + top-k as extraction computes it, excluding the one-off full load) for several tokens
per layer pass, and peak RSS above the interpreter's baseline (RSS after imports). The full
path runs the same micro-batches the SLI path uses inside each layer pass, so both do
exactly the same arithmetic. The physical limits are measured too: bytes / read bandwidth
(streaming) against 2 · active params · tokens / matmul FLOP/s (compute).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SIZES = dict(hidden=1280, intermediate=3456, layers=16, heads=10, kv_heads=2, max_pos=1024)
VOCAB, SEQ, MICRO, K = 16384, 512, 1, 32
PASSES = [(1, 32), (1, 128), (1, 512), (4, 512), (16, 512)]  # (sequences, tokens each) per layer pass
FULL_PASSES = [(1, 512), (16, 512)]  # a full load's rate does not depend on the pass size (same micro-batches)
if os.environ.get("NEXUS_BENCH_QUICK"):  # a smoke run of the harness, not a measurement
    PASSES = FULL_PASSES = [(1, 128), (2, 512)]


def rss_peak() -> int:
    """This process's peak RSS (VmHWM: anonymous + file-backed pages, e.g. mmapped weights), in bytes.

    Not getrusage's ru_maxrss: that one is inherited from the parent across fork + exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def make_teacher(d: Path) -> Path:
    import torch

    from nexus_core.demo import model_factory as mf

    if (d / "config.json").is_file():
        return d
    cfg = mf.make_config("llama", vocab_size=VOCAB, **SIZES)
    torch.manual_seed(0)
    model = mf.build_model(cfg)
    model.save_pretrained(d, max_shard_size="400MB")
    return d


def _chunk(n: int, T: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, T), generator=g), torch.ones(n, T, dtype=torch.long)


def _head_topk(logits_fn, final_hidden):
    """Top-k targets exactly as extraction computes them (stages/extract.topk_targets, auto logits chunk)."""
    from nexus_core.config import ExtractSettings
    from nexus_core.teachers.logits import logit_positions, topk_targets

    flat = final_hidden.reshape(-1, final_hidden.shape[-1])
    topk_targets(logits_fn, flat, K, VOCAB, logit_positions(ExtractSettings(), VOCAB))


def child(mode: str, model_dir: str) -> dict:
    """One runner in this (fresh) process: throughput per pass size and peak RSS above baseline."""
    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401  (code both paths import: part of the baseline)
    from transformers import AutoModelForCausalLM

    import nexus_core.stages.extract  # noqa: F401  (the top-k code both paths run: part of the baseline)
    from nexus_core.teachers.sli import StreamingRunner

    base = rss_peak()
    t0 = time.perf_counter()
    if mode == "full":
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        head = model.get_output_embeddings()
    else:
        runner = StreamingRunner(model_dir, dtype=torch.float32, micro_batch=MICRO)
    load_s = time.perf_counter() - t0
    rows = []
    with torch.no_grad():
        for i, (n, T) in enumerate([(1, 16)] + (FULL_PASSES if mode == "full" else PASSES)):
            ids, mask = _chunk(n, T)
            t, c = time.perf_counter(), time.process_time()
            if mode == "full":  # same micro-batches the SLI pass uses inside each layer
                for s in range(0, n, MICRO):
                    h = model.model(input_ids=ids[s:s + MICRO], attention_mask=mask[s:s + MICRO],
                                    use_cache=False).last_hidden_state
                    _head_topk(lambda x: head(x).float(), h)
                    del h
            else:
                out = runner.forward(ids, mask)
                _head_topk(runner.logits, out.final_hidden)
                del out  # as in extraction, where a batch's outputs die with _targets' frame
            dt, dc = time.perf_counter() - t, time.process_time() - c
            if i > 0:  # pass 0 warms the kernels up; CPU time is less swayed by other load on the machine
                rows.append({"tokens": n * T, "seconds": dt, "tok_s": n * T / dt, "cpu_s": dc,
                             "tok_cpu_s": n * T / dc})
    return {"mode": mode, "load_s": load_s, "rss_base": base, "rss_peak": rss_peak(),
            "rss_above_base": rss_peak() - base, "rows": rows}


def limits(model_dir: Path) -> dict:
    """Measured read bandwidth of the weights (safe_open, page cache as it stands) and fp32 matmul FLOP/s."""
    import torch
    from safetensors import safe_open

    from nexus_core.storage.safetensors_meta import scan

    meta = scan(model_dir)
    t = time.perf_counter()
    for f in meta.files:
        with safe_open(str(model_dir / f), "pt") as fh:
            for k in fh.keys():
                fh.get_tensor(k).clone()  # copy every byte out, as SLI does
    bw = meta.bytes / (time.perf_counter() - t)
    x, w = torch.randn(512, SIZES["hidden"]), torch.randn(SIZES["intermediate"], SIZES["hidden"])
    torch.nn.functional.linear(x, w)
    t, reps = time.perf_counter(), 10
    for _ in range(reps):
        torch.nn.functional.linear(x, w)
    flops = 2 * 512 * SIZES["hidden"] * SIZES["intermediate"] * reps / (time.perf_counter() - t)
    params, nbytes = meta.params, meta.bytes
    return {"bytes": nbytes, "params": params, "read_bytes_per_s": bw, "flops": flops,
            "crossover_tokens": nbytes * flops / (2 * params * bw)}


def _run_child(mode: str, model_dir: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", mode, "--model", str(model_dir)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/nexus-bench-sli")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--child", choices=["full", "sli"], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.model)))
        return 0
    load_before, t0 = os.getloadavg(), time.time()
    d = make_teacher(Path(a.workdir) / "teacher")
    lim = limits(d)
    full, sli = _run_child("full", d), _run_child("sli", d)
    print(f"teacher: llama {SIZES['layers']} layers, {lim['params'] / 1e6:.0f}M params, "
          f"{lim['bytes'] / 2**30:.2f} GiB fp32; micro-batch {MICRO}×{SEQ} tokens; top-{K}")
    print(f"limits: read {lim['read_bytes_per_s'] / 1e9:.2f} GB/s, matmul {lim['flops'] / 1e9:.0f} GFLOP/s -> "
          f"streaming stops being bandwidth-bound above ~{lim['crossover_tokens']:.0f} tokens per pass "
          f"(bytes·FLOPs / (2·params·bandwidth))")
    print(f"{'tokens/pass':>12} {'full tok/s':>11} {'sli tok/s':>10} {'ratio':>6} {'cpu-time ratio':>15} "
          f"{'read-bound s':>13} {'compute-bound s':>16} {'sli s':>7}")
    by_tokens = {r["tokens"]: r for r in full["rows"]}
    for s in sli["rows"]:
        f = by_tokens.get(s["tokens"], full["rows"][0])
        t_read = lim["bytes"] / lim["read_bytes_per_s"]
        t_comp = 2 * lim["params"] * s["tokens"] / lim["flops"]
        print(f"{s['tokens']:>12} {f['tok_s']:>11.1f} {s['tok_s']:>10.1f} {s['tok_s'] / f['tok_s']:>6.2f} "
              f"{s['tok_cpu_s'] / f['tok_cpu_s']:>15.2f} {t_read:>13.2f} {t_comp:>16.2f} {s['seconds']:>7.2f}")
    print("(full tok/s is measured at 512 and 8192 tokens per pass; other rows reuse the 512 rate)")
    ratio_rss = sli["rss_above_base"] / full["rss_above_base"]
    big_f, big_s = full["rows"][-1], sli["rows"][-1]
    print(f"at {big_s['tokens']} tokens/pass: SLI throughput = {big_s['tok_s'] / big_f['tok_s']:.2f}× full "
          f"(target ≥ 0.90; {big_s['tok_cpu_s'] / big_f['tok_cpu_s']:.2f}× by CPU time); peak RSS above baseline: SLI {sli['rss_above_base'] / 2**20:.0f} MiB, "
          f"full {full['rss_above_base'] / 2**20:.0f} MiB, ratio {ratio_rss:.2f} (target ≤ 0.25); "
          f"full load took {full['load_s']:.1f} s once")
    if a.json:
        Path(a.json).write_text(json.dumps({"limits": lim, "full": full, "sli": sli, "rss_ratio": ratio_rss,
                                            "throughput_ratio": big_s["tok_s"] / big_f["tok_s"],
                                            "load_before": load_before, "load_after": os.getloadavg(),
                                            "total_s": time.time() - t0}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
