"""The pieces of bench/gpu_check.sh (see there): SLI vs full load on CUDA, KD step time in bf16 autocast, an NVML
temperature read, and the report that gathers them into one JSON and a BENCHMARKS.md section.

    python bench/gpu_check.py sli  --device cuda --json OUT    [--dry-run]
    python bench/gpu_check.py kd   --device cuda --json OUT    [--dry-run]
    python bench/gpu_check.py nvml --json OUT
    python bench/gpu_check.py report --dir bench/out/gpu_check --output BENCHMARKS.md [--dry-run]

--dry-run: the same code on the CPU with tiny sizes, so the script cannot rot on machines without a GPU
(tests/test_gpu_check.py runs it); its figures are not measurements.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TITLE = "GPU check (bench/gpu_check.sh)"


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


# --- SLI vs full load ------------------------------------------------------------------------------------

def sli(device: str, dry: bool) -> dict:
    """bench_sli's teacher (1.18 GiB fp32, 16 layers) in bf16 on `device`: SLI (pinned host buffers, copy stream)
    against a full load, per tokens per pass: tok/s, ratio, top-32 agreement, logits bit-identical or not."""
    import torch
    from bench_offload import _small_llama
    from transformers import AutoModelForCausalLM

    from nexus_core.teachers.sli import StreamingRunner

    if dry:
        d, passes, dtype = _small_llama(ROOT / "bench" / "out" / "offload" / "quick-teacher"), [(1, 64)], torch.float32
    else:
        from bench_sli import make_teacher

        d, passes, dtype = make_teacher(Path("/tmp/nexus-bench-sli") / "teacher"), [(1, 512), (4, 512), (16, 512),
                                                                                    (64, 512)], torch.bfloat16
    from nexus_core.storage.safetensors_meta import scan

    meta = scan(d)
    runner = StreamingRunner(d, device=device, dtype=dtype)
    vocab = runner.head_vocab
    pinned: list[bool] = []
    to_device = runner._to_device

    def spy(tensors, lazy):  # records whether the host buffers handed to the copy stream are pinned
        pinned.extend(bool(t.is_pinned()) for t in tensors.values())
        return to_device(tensors, lazy)
    runner._to_device = spy
    model = AutoModelForCausalLM.from_pretrained(d, dtype=dtype).to(device).eval()
    g = torch.Generator().manual_seed(0)
    rows = []
    with torch.no_grad():
        for n, T in [(1, 16)] + passes:
            ids = torch.randint(0, vocab, (n, T), generator=g)
            mask = torch.ones(n, T, dtype=torch.long)
            _sync(device)
            t0 = time.perf_counter()
            out = runner.forward(ids, mask)
            s_logits = runner.logits(out.final_hidden)
            _sync(device)
            t_sli = time.perf_counter() - t0
            t0 = time.perf_counter()
            f_logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits.float()
            _sync(device)
            t_full = time.perf_counter() - t0
            if (n, T) == (1, 16):
                continue  # warm-up
            si, fi = s_logits.topk(32, -1).indices, f_logits.topk(32, -1).indices
            rows.append({"tokens": n * T, "sli_s": t_sli, "full_s": t_full, "sli_tok_s": n * T / t_sli,
                         "full_tok_s": n * T / t_full, "ratio": t_full / t_sli,
                         "top32_identical": float((si == fi).all(-1).float().mean()),
                         "logits_bit_identical": bool(torch.equal(s_logits, f_logits))})
            del out, s_logits, f_logits
    runner.close()
    return {"device": device, "dtype": str(dtype).replace("torch.", ""), "teacher": str(d), "bytes": meta.bytes,
            "params": meta.params, "copy_stream": runner._copy_stream is not None,
            "pinned_share": (sum(pinned) / len(pinned)) if pinned else None, "rows": rows}


# --- KD step in bf16 autocast ----------------------------------------------------------------------------

def kd(device: str, dry: bool, pairs: int = 20) -> dict:
    """A llama student's KD step (top-32 + tail targets, nexus_core.kd.loss) and CE step under bf16 autocast,
    interleaved: ms per step, tokens/s, KD/CE; and the fp32 loss of the same batch for the autocast error."""
    import torch

    from nexus_core.demo import model_factory as mf
    from nexus_core.kd import loss as kd_loss

    V, H, L, b, T, k = (512, 64, 2, 2, 32, 8) if dry else (32768, 1024, 8, 8, 1024, 32)
    dt = torch.bfloat16
    torch.manual_seed(0)
    cfg = mf.make_config("llama", vocab_size=V, hidden=H, intermediate=4 * H, layers=L, heads=max(2, H // 128),
                         kv_heads=max(1, H // 512), max_pos=2 * T)
    model = mf.build_model(cfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.startswith("cuda"))
    ids = torch.randint(0, V, (b, T), device=device)
    mask = torch.ones(b, T, dtype=torch.long, device=device)
    t_logits = torch.randn(b, T, V, device=device) * 3
    lp = torch.log_softmax(t_logits, -1)
    top_v, top_i = lp.topk(k, -1)
    tail = kd_loss.log1mexp(torch.logsumexp(top_v, -1))
    targets = [kd_loss.TeacherTargets(1.0, top_i, top_v.half(), tail)]
    kd_m, ce_m = kd_loss.masks(mask)

    def step(alpha: float, autocast: bool = True) -> tuple[float, float]:
        _sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=dt, enabled=autocast):
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        sums = kd_loss.loss_sums(logits, ids, mask, targets if alpha else [], 1.0, alpha, V)
        loss = kd_loss.combine(sums, int(kd_m.sum()), int(ce_m.sum()), alpha, 1.0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        return time.perf_counter() - t0, float(loss)

    with torch.no_grad():  # the same batch's loss in fp32 and in autocast, before any step
        losses = {}
        for name, ac in (("fp32", False), ("bf16_autocast", True)):
            with torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=dt, enabled=ac):
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            s = kd_loss.loss_sums(logits, ids, mask, targets, 1.0, 0.9, V)
            losses[name] = float(kd_loss.combine(s, int(kd_m.sum()), int(ce_m.sum()), 0.9, 1.0))
    times: dict[str, list[float]] = {"kd": [], "ce": []}
    for i in range(2 if dry else pairs + 3):
        for mode in (("kd", "ce") if i % 2 else ("ce", "kd")):
            t, loss = step(0.9 if mode == "kd" else 0.0)
            if i >= (0 if dry else 3):
                times[mode].append(t)
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = None
    med = {m: statistics.median(x) for m, x in times.items()}
    return {"device": device, "student": {"vocab": V, "hidden": H, "layers": L,
                                          "params": sum(p.numel() for p in model.parameters())},
            "batch": [b, T], "top_k": k, "ms_per_step": {m: v * 1e3 for m, v in med.items()},
            "tokens_per_s": {m: b * T / v for m, v in med.items()}, "kd_over_ce": med["kd"] / med["ce"],
            "loss_fp32": losses["fp32"], "loss_bf16_autocast": losses["bf16_autocast"],
            "loss_finite": all(x == x and abs(x) != float("inf") for x in losses.values()), "cuda_peak_bytes": peak}


# --- NVML ------------------------------------------------------------------------------------------------

def nvml() -> dict:
    """One temperature read through the thermal monitor's own sensor (workers/gpu.NvmlSensor)."""
    from workers.gpu import NvmlSensor, SensorError

    try:
        s = NvmlSensor()
    except SensorError as exc:
        return {"ok": False, "why": str(exc)}
    try:
        return {"ok": True, "sensor": s.name, "temp_c": s.read(), "throttle_reasons": s.throttle_reasons()}
    except SensorError as exc:
        return {"ok": False, "why": str(exc)}
    finally:
        s.close()


# --- report ----------------------------------------------------------------------------------------------

def _gpu_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            return f"{p.name}, {p.total_memory / 2**30:.0f} GiB"
    except Exception:  # noqa: BLE001 - the report still gets written
        pass
    return "no CUDA device"


def _load(d: Path, name: str):
    f = d / name
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except ValueError:
        return None


def report(d: Path, output: Path, dry: bool) -> dict:
    steps = _load(d, "steps.json") or {}
    res = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "dry_run": dry,
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "gpu": _gpu_name(),
                       "load": [round(x, 2) for x in os.getloadavg()]},
           "steps": steps, "pytest": (_load(d, "pytest.json") or {}), "sli": _load(d, "sli.json"),
           "offload": _load(d, "offload.json"), "kd": _load(d, "kd.json"), "nvml": _load(d, "nvml.json")}
    (d / "gpu_check.json").write_text(json.dumps(res, indent=2))
    sys.path.insert(0, str(ROOT / "bench"))
    from run_all import write_sections

    write_sections(output, {"gpu": render(res)}, ["gpu"])
    return res


def render(r: dict) -> str:
    m = r["machine"]
    head = [f"## {TITLE}" + (" (--dry-run: CPU, tiny sizes, not a measurement)" if r["dry_run"] else ""), "",
            f"`bash bench/gpu_check.sh{' --dry-run' if r['dry_run'] else ''}` — {r['date']}", "",
            f"Machine: {m['platform']}, {m['cpus']} CPUs, {m['gpu']}; load average {m['load']}.", ""]
    lines = ["| step | exit | seconds |", "|---|---|---|"]
    for name, s in r["steps"].items():
        lines.append(f"| {name} | {s.get('rc')} | {s.get('seconds')} |")
    p = r["pytest"]
    if p:
        lines += ["", f"CUDA-marked tests (`pytest -m gpu`): {p.get('summary', 'no summary')}"]
    s = r["sli"]
    if s:
        pin = "n/a" if s["pinned_share"] is None else f"{s['pinned_share']:.0%}"
        lines += ["", f"SLI vs full load on {s['device']} ({s['dtype']}; copy stream: {s['copy_stream']}; pinned host "
                  f"buffers: {pin}; {s['params'] / 1e6:.0f}M params):", "",
                  "| tokens/pass | full tok/s | SLI tok/s | SLI/full | top-32 identical | logits bit-identical |",
                  "|---|---|---|---|---|---|"]
        for x in s["rows"]:
            lines.append(f"| {x['tokens']:,} | {x['full_tok_s']:,.0f} | {x['sli_tok_s']:,.0f} | {x['ratio']:.2f} | "
                         f"{x['top32_identical']:.2%} | {x['logits_bit_identical']} |")
    o = r["offload"]
    if o:
        from bench_offload import render as offload_render

        lines += ["", "Offload comparison (bench/bench_offload.py):", "", offload_render(o)]
    k = r["kd"]
    if k:
        lines += ["", f"KD step in bf16 autocast on {k['device']} (student {k['student']['params'] / 1e6:.0f}M params, "
                  f"vocab {k['student']['vocab']:,}, batch {k['batch'][0]} x {k['batch'][1]}, top-{k['top_k']} + tail): "
                  f"KD {k['ms_per_step']['kd']:.1f} ms/step ({k['tokens_per_s']['kd']:,.0f} tok/s), CE "
                  f"{k['ms_per_step']['ce']:.1f} ms/step, KD/CE {k['kd_over_ce']:.2f}x; loss of one batch fp32 "
                  f"{k['loss_fp32']:.4f} vs autocast {k['loss_bf16_autocast']:.4f}."]
    n = r["nvml"]
    if n:
        lines += ["", "NVML: " + (f"{n['temp_c']:.0f} °C ({n['sensor']}; clock-event reasons "
                                  f"{n['throttle_reasons'] or 'none'})" if n.get("ok") else f"no reading ({n.get('why')})")]
    return "\n".join(head + lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["sli", "kd", "nvml", "report"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--dir", type=Path, default=ROOT / "bench" / "out" / "gpu_check")
    ap.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    a = ap.parse_args()
    if a.what == "report":
        report(a.dir, a.output, a.dry_run)
        print(f"wrote {a.dir / 'gpu_check.json'} and the gpu section of {a.output}")
        return 0
    res = {"sli": lambda: sli(a.device, a.dry_run), "kd": lambda: kd(a.device, a.dry_run), "nvml": nvml}[a.what]()
    text = json.dumps(res, indent=2)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
