"""Extraction throughput against the machine's compute bound, with real vocabularies (49k and 262k).

    python bench/bench_limit.py                 # SmolLM2 (49,152) and a generated Gemma-3-vocabulary model (262,144)
    python bench/bench_limit.py --eval-only     # only step 3, the evaluation (minutes, not an hour)
    python bench/bench_limit.py --quick         # a smoke run of the harness, not a measurement

Per model, in one process and one run:
1. The bound, measured here: fp32 matmul FLOP/s (the best of 2048x2048 products, this many torch threads),
   and the rate of the full-vocabulary arithmetic extraction adds per position (logsumexp, top-k, scatter,
   the tail's logsumexp on a (positions, V) float32 chunk, as teachers/logits.topk_targets does it).
   Compute bound per token = 2 x (parameters outside the input embedding, the LM head included) / FLOP/s
   + the measured full-vocabulary seconds per position.
2. Extraction as the extract stage runs it per batch (stages/extract._targets: runner.forward, then
   topk_targets over logits chunks of extract.logit_chunk's auto size), with the full-load runner and with
   SLI, on extract.batch_size x seq_len token batches; split into the decoder (forward) and the
   vocabulary part (head + log-softmax + top-k) so the gap to the bound has a place.
3. Evaluation's loss function (kd/evaluate.lm_loss, as run_distill calls it) on the same model and tokens,
   beside its own bound (2 x (decoder + head params) / FLOP/s + the measured time of a float32 log-softmax
   per position), and beside the evaluation as it was before issue 20 §3 (a plain forward: the whole
   (b, T, V) logits and their log-softmax), alternated, best of two each, the two losses compared.
Models: SmolLM2-135M-Instruct (bench/smollm2.py) and `gemma3-vocab`: a generated llama with Gemma-3's
vocabulary (262,144) and Gemma-3-270M's widths (hidden 640, intermediate 2048, 4 heads, 1 KV head),
4 layers, tied embeddings: its head dominates, as in small Gemma-3 models.
Writes bench/out/bench_limit.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import sysconfig
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

OUT = ROOT / "bench" / "out"
GEMMA3_VOCAB = 262_144  # Gemma 3's tokenizer (Gemma Team, "Gemma 3 Technical Report", 2025: 262k entries)


def gemma3_vocab_model(quick: bool) -> Path:
    from nexus_core.demo import model_factory as mf

    d = OUT / "limit" / ("gemma3-vocab-quick" if quick else "gemma3-vocab")
    if not (d / "config.json").is_file():
        vocab = 16_384 if quick else GEMMA3_VOCAB
        cfg = mf.make_config("llama", vocab_size=vocab, hidden=640, intermediate=2048, layers=2 if quick else 4,
                             heads=4, kv_heads=1, max_pos=2048)
        cfg.tie_word_embeddings = True
        torch.manual_seed(0)
        mf.build_model(cfg).save_pretrained(d)
    return d


def tokens_for(name: str, model_dir: Path, n: int, T: int, vocab: int):
    if name == "smollm2":
        from nexus_core import data
        from nexus_core.teachers.loading import tokenizer_from

        tok = tokenizer_from(model_dir)
        files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
        ids, mask = data.pack(tok, [f.read_text(errors="replace") for f in files[:100]], T, n)
        return ids[:n].long(), mask[:n].long()
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (n, T), generator=g), torch.ones(n, T, dtype=torch.long)


def matmul_flops(seconds: float = 3.0) -> float:
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best, end = 0.0, time.monotonic() + seconds
    while time.monotonic() < end:
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * n ** 3 / (time.perf_counter() - t))
    return best


def vocab_seconds_per_position(vocab: int, chunk: int, k: int = 32, reps: int = 5) -> float:
    """The best time per position of topk_targets' full-vocabulary arithmetic on a (chunk, V) float32 chunk."""
    z0 = torch.randn(chunk, vocab)
    best = float("inf")
    for _ in range(reps):
        z = z0.clone()
        t = time.perf_counter()
        lse = torch.logsumexp(z, dim=-1)
        v, i = z.topk(k, dim=-1)
        z.scatter_(-1, i, float("-inf"))
        (torch.logsumexp(z, dim=-1) - lse).clamp_min(-69.0)
        best = min(best, time.perf_counter() - t)
    return best / chunk


def log_softmax_seconds_per_position(vocab: int, positions: int, reps: int = 3) -> float:
    """The best time per position of a float32 log-softmax over the vocabulary (evaluation's extra per-token work)."""
    z = torch.randn(positions, vocab)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.log_softmax(z, dim=-1)
        best = min(best, time.perf_counter() - t)
    return best / positions


@torch.no_grad()
def lm_loss_before(model, ids, mask, vocab: int, batch_size: int = 8) -> float:
    """The evaluation before issue 20 §3, kept as the reference: a plain forward, then the whole (b, T, V)
    float32 logits and a log-softmax beside them, target log-probs gathered."""
    total, count = 0.0, 0
    for i in range(0, ids.shape[0], batch_size):
        x, m = ids[i:i + batch_size], mask[i:i + batch_size]
        logp = torch.log_softmax(model(input_ids=x, attention_mask=m).logits[..., :vocab].float(), dim=-1)
        nll = -logp[:, :-1].gather(-1, x[:, 1:].unsqueeze(-1)).squeeze(-1)  # (b, T-1)
        real = (m[:, :-1] * m[:, 1:]).bool()
        total, count = total + nll[real].double().sum().item(), count + int(real.sum())
    return total / max(count, 1)


def measure_evaluation(runner, ids, mask, V: int, bound_s: float, log, name: str) -> dict:
    """lm_loss against the evaluation before it, alternated (the load changes under both alike)."""
    from nexus_core.kd.evaluate import lm_loss
    from nexus_core.teachers.runner import FullRunner

    runs = {"before": lambda: lm_loss_before(runner.model, ids, mask, V),
            "after": lambda: lm_loss(FullRunner.of(runner.model, "cpu"), ids, mask, None, V, "cpu")["loss"]}
    best, loss = {k: float("inf") for k in runs}, {}
    for _ in range(2):
        for k, run in runs.items():
            t0 = time.perf_counter()
            loss[k] = run()
            best[k] = min(best[k], time.perf_counter() - t0)
    tokens = int(mask.numel())
    out = {"tokens": tokens, "bound_s_per_token": bound_s, "loss_before": loss["before"], "loss_after": loss["after"],
           "loss_rel_diff": abs(loss["after"] - loss["before"]) / abs(loss["before"])}
    for k in runs:
        out[k] = {"seconds": best[k], "tok_s": tokens / best[k], "over_bound": (best[k] / tokens) / bound_s}
    log(f"{name} evaluation: before {out['before']['over_bound']:.2f}x its bound, after (lm_loss) "
        f"{out['after']['over_bound']:.2f}x; loss {loss['before']:.6f} / {loss['after']:.6f}")
    return out


def measure(name: str, model_dir: Path, batches: int, batch_size: int, T: int, log, eval_only: bool = False) -> dict:
    from nexus_core.config import ExtractSettings
    from nexus_core.storage.safetensors_meta import scan
    from nexus_core.teachers.logits import logit_positions, topk_targets
    from nexus_core.teachers.runner import FullRunner
    from nexus_core.teachers.sli import StreamingRunner

    meta = scan(model_dir)
    runner = FullRunner(model_dir)
    cfg = runner.config.get_text_config()
    V, H = int(cfg.vocab_size), int(cfg.hidden_size)
    embed = V * H
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    body = meta.params - embed - (0 if tied else V * H)  # decoder layers + final norm
    head = V * H
    ex = ExtractSettings(seq_len=T, batch_size=batch_size)
    chunk = logit_positions(ex, V)
    flops = matmul_flops()
    vocab_s = vocab_seconds_per_position(V, chunk)
    bound = {"matmul_flops": flops, "body_params": body, "head_params": head, "vocab_s_per_position": vocab_s,
             "s_per_token_body": 2 * body / flops, "s_per_token_head": 2 * head / flops}
    bound["s_per_token"] = bound["s_per_token_body"] + bound["s_per_token_head"] + vocab_s
    ids, mask = tokens_for(name, model_dir, batches * batch_size, T, V)
    rows = {}
    for mode in () if eval_only else ("full", "sli"):
        r = runner if mode == "full" else StreamingRunner(model_dir, dtype=torch.float32)
        with torch.no_grad():
            r.forward(ids[:1, :16], mask[:1, :16])  # warm-up
            t_fwd = t_voc = 0.0
            tokens = 0
            for b in range(batches):
                x, m = ids[b * batch_size:(b + 1) * batch_size], mask[b * batch_size:(b + 1) * batch_size]
                t0 = time.perf_counter()
                out = r.forward(x, m)
                t1 = time.perf_counter()
                h = out.final_hidden
                topk_targets(r.logits, h.reshape(-1, H), 32, V, chunk)
                t_fwd, t_voc = t_fwd + t1 - t0, t_voc + time.perf_counter() - t1
                tokens += int(m.numel())
                del out, h
        total = t_fwd + t_voc
        rows[mode] = {"tokens": tokens, "seconds": total, "tok_s": tokens / total,
                      "forward_s_per_token": t_fwd / tokens, "vocab_s_per_token": t_voc / tokens,
                      "over_bound": (total / tokens) / bound["s_per_token"],
                      "forward_over_bound": (t_fwd / tokens) / bound["s_per_token_body"],
                      "vocab_over_bound": (t_voc / tokens) / (bound["s_per_token_head"] + vocab_s)}
        log(f"{name} {mode}: {rows[mode]['tok_s']:.1f} tok/s = {rows[mode]['over_bound']:.2f}x the bound "
            f"(forward {rows[mode]['forward_over_bound']:.2f}x, vocabulary {rows[mode]['vocab_over_bound']:.2f}x)")
        if mode == "sli":
            r.close()
    # Evaluation's loss function on the same tokens (the full model; run_distill evaluates the student this way).
    ev_bound = 2 * (body + head) / flops + log_softmax_seconds_per_position(V, chunk)
    evaluation = measure_evaluation(runner, ids, mask, V, ev_bound, log, name)
    runner.close()
    return {"model": name, "model_dir": str(model_dir), "params": meta.params, "vocab": V, "hidden": H, "tied": tied,
            "layers": int(cfg.num_hidden_layers), "batch_size": batch_size, "seq_len": T, "logit_chunk": chunk,
            "bound": bound, "extract": rows, "evaluation": evaluation}


def render(r: dict) -> str:
    lines = [f"Load average {r['load_before']} before, {r['load_after']} after; torch threads {r['threads']}; CPU, fp32."]
    if any(m["extract"] for m in r["models"]):
        lines += _extraction_table(r)
    return "\n".join(lines + _evaluation_table(r))


def _extraction_table(r: dict) -> list[str]:
    lines = ["", "| model | vocab | params | runner | tokens | extraction tok/s | compute bound tok/s | x bound "
             "| decoder s/token: measured / bound | vocabulary s/token: measured / bound |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for m in r["models"]:
        b = m["bound"]
        for mode, x in m["extract"].items():
            lines.append(f"| {m['model']} | {m['vocab']:,} | {m['params'] / 1e6:.0f}M | {mode} | {x['tokens']:,} | "
                         f"{x['tok_s']:.1f} | {1 / b['s_per_token']:.1f} | {x['over_bound']:.2f}x | "
                         f"{x['forward_s_per_token'] * 1e3:.2f} ms / {b['s_per_token_body'] * 1e3:.2f} ms | "
                         f"{x['vocab_s_per_token'] * 1e3:.2f} ms / {(b['s_per_token_head'] + b['vocab_s_per_position']) * 1e3:.2f} ms |")
    lines += ["", "Bound per token = 2 x (decoder + head parameters) / matmul FLOP/s + the measured seconds per position "
              "of the full-vocabulary logsumexp / top-k / tail on one logits chunk. Measured in the same run: " + "; ".join(
                  f"{m['model']}: matmul {m['bound']['matmul_flops'] / 1e9:.0f} GFLOP/s, full-vocabulary arithmetic "
                  f"{m['bound']['vocab_s_per_position'] * 1e6:.0f} µs per position (chunk {m['logit_chunk']})"
                  for m in r["models"]) + "."]
    return lines


def _evaluation_table(r: dict) -> list[str]:
    lines = ["", "| model | tokens | its bound tok/s | before: full logits + log-softmax tok/s (x bound) "
             "| after: kd/evaluate.lm_loss tok/s (x bound) | loss before / after (relative difference) |",
             "|---|---|---|---|---|---|"]
    for m in r["models"]:
        e = m["evaluation"]
        b, a = e["before"], e["after"]
        lines.append(f"| {m['model']} | {e['tokens']:,} | {1 / e['bound_s_per_token']:.1f} | {b['tok_s']:.1f} "
                     f"({b['over_bound']:.2f}x) | {a['tok_s']:.1f} ({a['over_bound']:.2f}x) | {e['loss_before']:.6f} / "
                     f"{e['loss_after']:.6f} ({e['loss_rel_diff']:.1e}) |")
    lines += ["", "Evaluation's bound per token = 2 x (decoder + head parameters) / matmul FLOP/s + the measured "
              "seconds per position of a float32 log-softmax over the vocabulary; " + "; ".join(
                  f"{m['model']}: matmul {m['bound']['matmul_flops'] / 1e9:.0f} GFLOP/s" for m in r["models"]) + "."]
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2,gemma3-vocab")
    ap.add_argument("--batches", type=int, default=4, help="batches per runner")
    ap.add_argument("--eval-only", action="store_true", help="only the evaluation (step 3) and its bound")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", type=Path, help="default: bench/out/bench_limit.json (bench_limit_eval.json with --eval-only)")
    a = ap.parse_args()
    a.json = a.json or OUT / ("bench_limit_eval.json" if a.eval_only else "bench_limit.json")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    t_start = time.perf_counter()
    log = lambda m: print(f"[bench_limit {time.perf_counter() - t_start:6.1f}s] {m}", file=sys.stderr, flush=True)  # noqa: E731
    res = {"command": "python bench/bench_limit.py " + " ".join(sys.argv[1:]), "threads": torch.get_num_threads(),
           "load_before": [round(x, 2) for x in os.getloadavg()], "models": []}
    for name in ["gemma3-vocab"] if a.quick else [m.strip() for m in a.models.split(",") if m.strip()]:
        if name == "smollm2":
            from smollm2 import hf_folder

            d, bs, T = hf_folder(), 8, 128
        else:
            d, bs, T = gemma3_vocab_model(a.quick), 8, 128
        res["models"].append(measure(name, d, 1 if a.quick else a.batches, 2 if a.quick else bs, 32 if a.quick else T,
                                     log, a.eval_only))
    res["load_after"] = [round(x, 2) for x in os.getloadavg()]
    res["total_s"] = round(time.perf_counter() - t_start, 1)
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(res, indent=2))
    print(render(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
