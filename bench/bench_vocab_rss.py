"""Peak RSS of extraction with a 262k-vocabulary teacher (Gemma 3's), full load and SLI.

    python bench/bench_vocab_rss.py [--sequences 16] [--seq-len 64]

The teacher is a generated `gemma3_text` model (interleaved sliding/global layers, tied head) with Gemma 3's
vocabulary size (262,144) and small widths (hidden 64, 2 layers), so the vocabulary dominates its memory:
the embedding/head alone is 67 MB in float32, one full-vocabulary logits row 1 MiB. Each mode runs the profile
and extract stages in a fresh process; reported: the process's peak RSS (VmHWM) after the imports (base),
and at the end, the teacher's weight bytes and the auto-sized logits chunk. Full-vocabulary logits stay
chunked (extract.logit_chunk = 0: 32 MiB of float32 logits per chunk), so the peak should be the base +
the weights + a few chunks, not + sequences x positions x vocabulary.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
from bench_sli import rss_peak  # noqa: E402 (after the path)

VOCAB = 262_144


def build_teacher(out: Path) -> Path:
    import transformers as tf

    from nexus_core.demo import model_factory as mf

    texts = [f"{a} plus {b} is {a + b}. the cat sat on mat {a % 7}." for a in range(200) for b in range(3)]
    tok = mf.train_tokenizer(texts, vocab_size=400)
    cfg = tf.Gemma3TextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=16,
                              layer_types=["sliding_attention", "full_attention"], max_position_embeddings=256,
                              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id)
    mf.save_model(mf.build_model(cfg), tok, out)
    data = out.parent / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return out


def child(teacher: str, sli: str, sequences: int, T: int) -> dict:
    import shutil

    from nexus_core.config import load_settings
    from nexus_core.data import DatasetRef
    from nexus_core.paths import Paths
    from nexus_core.records.registry import parse_teacher
    from nexus_core.stages.extract import run_extract
    from nexus_core.stages.profile import run_profile
    from nexus_core.storage.profiles import read_profile

    home = Path(tempfile.mkdtemp(prefix="nexus-vocab-rss-"))
    folder = home / "datasets" / "reasoning" / "arith"
    folder.mkdir(parents=True)
    shutil.copy(Path(teacher).parent / "data.jsonl", folder / "data.jsonl")
    cfg = load_settings(home=home, environ={}, run={"device": "cpu", "sli": sli},
                        profile={"calibration_samples": 4},
                        extract={"seq_len": T, "top_k": 32, "batch_size": 8, "max_samples": sequences})
    t = parse_teacher({"teacher_id": "g3", "path": teacher, "status": "ready"}, "bench", home)
    ref = DatasetRef("reasoning", "arith")
    base = rss_peak()
    run_profile(cfg, t, Paths(home), [ref])
    run_extract(cfg, t, ref, Paths(home))
    prof = read_profile(Paths(home), "g3")
    shutil.rmtree(home)
    return {"sli": sli, "mode": prof["mode"], "rss_base": base, "rss_peak": rss_peak(),
            "weights_bytes": prof["bytes"], "tokens": sequences * T}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sequences", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--child", nargs=2, metavar=("TEACHER", "SLI"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child[0], a.child[1], a.sequences, a.seq_len)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        teacher = build_teacher(Path(tmp) / "gemma3-262k")
        rows = []
        for sli in ("never", "always"):
            out = subprocess.run([sys.executable, __file__, "--child", str(teacher), sli, "--sequences",
                                  str(a.sequences), "--seq-len", str(a.seq_len)], capture_output=True, text=True,
                                 cwd=ROOT)
            if out.returncode:
                raise SystemExit(f"--sli {sli} failed:\n{out.stderr[-3000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print("| mode | tokens | teacher weights | peak RSS | base (after imports) | peak - base |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        mb = lambda n: f"{n / 2**20:,.0f} MiB"  # noqa: E731
        print(f"| {r['mode']} (--sli {r['sli']}) | {r['tokens']:,} | {mb(r['weights_bytes'])} | {mb(r['rss_peak'])} "
              f"| {mb(r['rss_base'])} | {mb(r['rss_peak'] - r['rss_base'])} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
