"""On paper: extracting with a teacher far larger than the GPU, from NVMe, layer by layer (SLI).

    python bench/projection.py [--file WEIGHTS] [--json out.json]

Every number comes from a measured or a published figure, named in SOURCES:
- measured here: the disk's read bandwidth with the page cache bypassed (`dd iflag=direct` of a weights file),
  and, for comparison, the same file read through the page cache;
- published: the teachers' configs (DeepSeek-V3's config.json and technical report; Llama-3.1-70B's
  config.json), a 16 GB GPU's dense bf16 tensor throughput and PCIe generation (NVIDIA's datasheets), and a
  PCIe 4.0 NVMe drive's sequential read (its maker's datasheet).
Model per layer pass of N tokens (weights streamed once per pass, compute overlapped with the reads):
  bytes(N) = non-expert bytes + experts hit(N) x bytes per expert, experts hit per MoE layer =
             E x (1 - (1 - k/E)^N) (tokens routed independently and evenly: the routed experts' share);
  read s(N) = bytes(N) / bandwidth;  compute s(N) = N x 2 x active params / FLOP/s;
  s per token = max(read, compute) / N; compute-bound from N* = the smallest N with compute >= read.
Peak FLOP/s is a ceiling: real kernels reach a share of it, so real tokens/s is lower and N* smaller.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SOURCES = {
    "dsv3": "DeepSeek-V3 config.json (deepseek-ai/DeepSeek-V3) and technical report (arXiv 2412.19437): 61 layers, "
            "first 3 dense, hidden 7168, dense intermediate 18432, 256 routed experts + 1 shared per MoE layer, "
            "8 routed per token, expert intermediate 2048, MLA (q_lora 1536, kv_lora 512, 128 heads, qk 128+64, v 128), "
            "vocabulary 129,280; FP8 (e4m3) weights with 128x128 block scales, embeddings and head in BF16; "
            "671B parameters, 37B active per token",
    "llama70b": "Llama-3.1-70B config.json (meta-llama): 80 layers, hidden 8192, intermediate 28672, 64 heads, "
                "8 KV heads, vocabulary 128,256, untied head; bf16",
    "gpu": "NVIDIA GeForce RTX 4080 (16 GB): 97.5 TFLOPS dense FP16/BF16 tensor with FP32 accumulate (NVIDIA Ada "
           "Lovelace architecture whitepaper, appendix table); PCIe 4.0 x16",
    "pcie": "PCIe 4.0 x16: 16 GT/s x 16 lanes, 128b/130b = 31.5 GB/s per direction (PCI-SIG)",
    "nvme": "Samsung 990 PRO (PCIe 4.0 x4 NVMe): 7,450 MB/s sequential read (Samsung datasheet)",
}
GPU_FLOPS = 97.5e12
GPU_MEM = 16e9
PCIE = 31.5e9
NVME_PUBLISHED = 7.45e9


def deepseek_v3() -> dict:
    H, L, dense_layers, I_dense, I_exp, E, k, V = 7168, 61, 3, 18432, 2048, 256, 8, 129_280
    attn = H * 1536 + 1536 * 128 * (128 + 64) + H * (512 + 64) + 512 * 128 * (128 + 128) + 128 * 128 * H  # MLA
    expert = 3 * H * I_exp
    moe_layers = L - dense_layers
    embed_head = 2 * V * H
    non_expert_params = dense_layers * (attn + 3 * H * I_dense) + moe_layers * (attn + expert + E * H) + embed_head
    total = non_expert_params + moe_layers * E * expert
    active = dense_layers * (attn + 3 * H * I_dense) + moe_layers * (attn + expert * (1 + k)) + V * H  # head, not embed
    return {"name": "DeepSeek-V3 671B, FP8", "total_params": total, "active_params": active,
            # FP8 = 1 byte per weight; embeddings/head BF16 (2 bytes); scales 4 bytes per 128x128 block (~0.02%)
            "non_expert_bytes": (non_expert_params - embed_head) * (1 + 4 / 16384) + embed_head * 2,
            "expert_bytes": expert * (1 + 4 / 16384), "experts": E, "top_k": k, "moe_layers": moe_layers,
            "largest_layer_bytes": (attn + expert * (E + 1) + E * H) * (1 + 4 / 16384), "hidden": H, "layers": L,
            "source": "dsv3"}


def llama_70b() -> dict:
    H, L, I, heads, kv, V = 8192, 80, 28672, 64, 8, 128_256
    layer = 2 * H * H + 2 * H * (H // heads * kv) + 3 * H * I
    total = L * layer + 2 * V * H
    return {"name": "Llama-3.1-70B, bf16", "total_params": total, "active_params": L * layer + V * H,
            "non_expert_bytes": total * 2, "expert_bytes": 0, "experts": 0, "top_k": 0, "moe_layers": 0,
            "largest_layer_bytes": layer * 2, "hidden": H, "layers": L, "source": "llama70b"}


def pass_bytes(m: dict, n: int) -> float:
    if not m["experts"]:
        return m["non_expert_bytes"]
    hit = m["experts"] * (1 - (1 - m["top_k"] / m["experts"]) ** n)
    return m["non_expert_bytes"] + m["moe_layers"] * hit * m["expert_bytes"]


def crossover(m: dict, bw: float, flops: float) -> int:
    """Smallest N (tokens per pass) with compute >= read."""
    c = 2 * m["active_params"] / flops
    lo, hi = 1, 1 << 30
    while lo < hi:
        mid = (lo + hi) // 2
        if mid * c >= pass_bytes(m, mid) / bw:
            hi = mid
        else:
            lo = mid + 1
    return lo


def measure_disk(path: Path) -> dict:
    """Read bandwidth of `path` with the page cache bypassed (dd iflag=direct; best of 3) and through it."""
    out = {}
    for name, flags in (("direct", ["iflag=direct"]), ("page_cache", [])):
        best = 0.0
        for _ in range(3):
            t = time.perf_counter()
            subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=16M", *flags], check=True, capture_output=True)
            best = max(best, path.stat().st_size / (time.perf_counter() - t))
        out[name] = best
    return {"file": str(path), "bytes": path.stat().st_size, **out}


def table(disk: dict) -> dict:
    bws = {"NVMe, published (7.45 GB/s)": NVME_PUBLISHED,
           f"this machine's disk, measured ({disk['direct'] / 1e9:.2f} GB/s, O_DIRECT)": disk["direct"]}
    rows = []
    for m in (deepseek_v3(), llama_70b()):
        c = 2 * m["active_params"] / GPU_FLOPS
        for bw_name, bw in bws.items():
            n_star = crossover(m, bw, GPU_FLOPS)
            per = []
            for n in sorted({1, 1024, 16384, n_star}):
                b = pass_bytes(m, n)
                s_tok = max(b / bw, n * c) / n
                per.append({"tokens": n, "bytes": b, "s_per_token": s_tok, "hours_per_million": s_tok * 1e6 / 3600})
            hidden = n_star * m["hidden"] * 2  # bf16 hidden states of one pass
            rows.append({"model": m["name"], "bandwidth": bw_name, "bw": bw, "total_params": m["total_params"],
                         "active_params": m["active_params"], "full_pass_bytes": pass_bytes(m, 1 << 30),
                         "largest_layer_bytes": m["largest_layer_bytes"], "compute_s_per_token": c,
                         "tokens_compute_bound": n_star, "hidden_bytes_at_crossover": hidden, "passes": per,
                         "fits_16gb": 2 * m["largest_layer_bytes"] + hidden <= GPU_MEM})
    return {"disk": disk, "gpu_flops": GPU_FLOPS, "pcie": PCIE, "rows": rows, "sources": SOURCES}


def render(r: dict) -> str:
    lines = ["| teacher | read from | bytes per pass (1 tok / 1k / 16k / all) | largest layer | compute per token "
             "| tokens per pass to be compute-bound | hours per 1M tokens at 16k / at that pass | 2 layers + hidden "
             "states at that pass vs 16 GB |", "|---|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        by = {p["tokens"]: p for p in x["passes"]}
        n = x["tokens_compute_bound"]
        gb = lambda v: f"{v / 1e9:,.0f} GB" if v >= 1e10 else f"{v / 1e9:,.1f} GB"  # noqa: E731
        lines.append(
            f"| {x['model']} ({x['total_params'] / 1e9:.0f}B, {x['active_params'] / 1e9:.1f}B active) | {x['bandwidth']} | "
            f"{gb(by[1]['bytes'])} / {gb(by[1024]['bytes'])} / {gb(by[16384]['bytes'])} / {gb(x['full_pass_bytes'])} | "
            f"{gb(x['largest_layer_bytes'])} | {x['compute_s_per_token'] * 1e3:.2f} ms | {n:,} | "
            f"{by[16384]['hours_per_million']:.1f} h / {by[n]['hours_per_million']:.2f} h | "
            f"{gb(2 * x['largest_layer_bytes'] + x['hidden_bytes_at_crossover'])} "
            f"({'fits' if x['fits_16gb'] else 'does not fit'}) |")
    d = r["disk"]
    lines += ["", f"Measured on this machine: {d['file'].split('/')[-1]} ({d['bytes'] / 1e6:.0f} MB) read at "
              f"{d['direct'] / 1e9:.2f} GB/s with O_DIRECT (the disk) and {d['page_cache'] / 1e9:.2f} GB/s through the "
              f"page cache. Compute: {r['gpu_flops'] / 1e12:.1f} TFLOPS peak bf16 (a ceiling, not a measurement). "
              f"Host to GPU: PCIe {r['pcie'] / 1e9:.1f} GB/s, above either disk rate, so the disk bounds the reads.",
              "", "Sources:"] + [f"- {k}: {v}" for k, v in r["sources"].items()]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--file", type=Path, default=ROOT / "bench" / "out" / "cache" / "smollm2-hf" / "model.safetensors",
                    help="a large file on the disk to measure (default: SmolLM2's weights from bench/smollm2.py)")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "out" / "projection.json")
    a = ap.parse_args()
    if not a.file.is_file():
        sys.path.insert(0, str(ROOT / "bench"))
        from smollm2 import hf_folder

        a.file = hf_folder() / "model.safetensors"
    r = table(measure_disk(a.file))
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(r, indent=2))
    print(render(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
