"""Extraction benchmark: tokens/s on a small teacher with a >= 32k vocabulary, and shard bytes per
token against storing the full-vocabulary logits in fp16.

    python bench/bench_extract.py [--device cpu|cuda] [--sequences 64] [--seq-len 256] [--k 32]

Builds a byte-level BPE tokenizer (trained on the running interpreter's standard library)
and a Llama teacher locally, profiles it, extracts one dataset, prints a markdown table and
writes bench/out/bench_extract.json. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nexus_core.config import load_settings  # noqa: E402
from nexus_core.data import DatasetRef  # noqa: E402
from nexus_core.demo import model_factory as mf
from nexus_core.paths import Paths  # noqa: E402
from nexus_core.records.registry import parse_teacher
from nexus_core.stages.extract import run_extract  # noqa: E402
from nexus_core.stages.profile import run_profile  # noqa: E402


def stdlib_texts(max_bytes: int) -> list[str]:
    """Python source from the running interpreter's standard library (never copied from elsewhere)."""
    texts, total = [], 0
    for p in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            t = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        texts.append(t)
        total += len(t)
        if total >= max_bytes:
            break
    return texts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--sequences", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--sli", default="never", choices=("never", "always"))
    args = ap.parse_args()

    texts = stdlib_texts(6_000_000)
    work = Path(tempfile.mkdtemp(prefix="nexus-bench-"))
    t0 = time.perf_counter()
    tok = mf.train_tokenizer(texts, vocab_size=args.vocab)
    cfg_model = mf.make_config("llama", vocab_size=max(args.vocab, len(tok)), tokenizer=tok, hidden=args.hidden,
                               layers=args.layers, heads=max(4, args.hidden // 64), kv_heads=max(2, args.hidden // 128),
                               max_pos=max(512, args.seq_len))
    model_dir = mf.save_model(mf.build_model(cfg_model), tok, work / "teacher")
    build_s = time.perf_counter() - t0

    ds = work / "home" / "datasets" / "code" / "stdlib"
    ds.mkdir(parents=True)
    (ds / "data.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    home = work / "home"
    cfg = load_settings(home=home, environ={}, run={"device": args.device, "sli": args.sli},
                        profile={"calibration_samples": 8},
                        extract={"seq_len": args.seq_len, "top_k": args.k, "batch_size": args.batch_size,
                                 "max_samples": args.sequences, "shard_size": 32})
    teacher = parse_teacher({"teacher_id": "bench", "path": str(model_dir), "status": "ready"}, "bench", home)
    ref, paths = DatasetRef("code", "stdlib"), Paths(home)
    prof = run_profile(cfg, teacher, paths, [ref]).data
    t1 = time.perf_counter()
    res = run_extract(cfg, teacher, ref, paths)
    wall = time.perf_counter() - t1

    shard_files = [p for p in res.artifacts if p.suffix == ".safetensors"]
    shard_bytes = sum(p.stat().st_size for p in shard_files)
    positions = res.data["sequences"] * args.seq_len
    V = prof["head_vocab"]
    full_fp16 = positions * V * 2
    row = {"device": args.device, "mode": prof["mode"], "params": prof["params"], "head_vocab": V,
           "tokenizer_vocab": prof["tokenizer_vocab"], "hidden": args.hidden, "layers": args.layers,
           "k": args.k, "seq_len": args.seq_len, "batch_size": args.batch_size,
           "sequences": res.data["sequences"], "tokens": res.data["tokens"], "extract_wall_s": round(wall, 3),
           "tokens_per_s": res.data["tokens_per_s"], "tokens_per_s_wall": round(res.data["tokens"] / wall, 1),
           "shard_bytes": shard_bytes, "bytes_per_position": round(shard_bytes / positions, 2),
           "full_fp16_bytes_per_position": V * 2, "ratio_vs_full_fp16": shard_bytes / full_fp16,
           "kept_mass_mean": res.data["kept_mass_mean"], "build_s": round(build_s, 1),
           "torch_threads": __import__("torch").get_num_threads()}
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_extract.json").write_text(json.dumps(row, indent=2) + "\n")

    print("| device | mode | params | vocab (head/tok) | k | T | seqs | tokens/s | shard B/pos | fp16 logits B/pos | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {row['device']} | {row['mode']} | {row['params'] / 1e6:.1f}M | {V}/{row['tokenizer_vocab']} | {args.k} "
          f"| {args.seq_len} | {row['sequences']} | {row['tokens_per_s']:,.0f} | {row['bytes_per_position']} "
          f"| {V * 2} | {100 * row['ratio_vs_full_fp16']:.3f}% |")


if __name__ == "__main__":
    main()
