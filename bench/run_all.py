"""Run every benchmark and rewrite its section of BENCHMARKS.md.

    python bench/run_all.py [--quick] [--only replay,queue] [--output BENCHMARKS.md]

Each benchmark runs as its own subprocess and leaves its JSON in bench/out/; this script
turns that JSON into a table. A benchmark that is missing, fails or times out gets a
section that says so (with the tail of its output); the others still run. Only the
sections of the benchmarks that ran are rewritten, each with its command, the machine
(platform, CPUs, load, torch version) and the date. `--quick` makes everything small.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"
sys.path.insert(0, str(ROOT / "bench"))


def _args(quick: bool) -> dict[str, tuple[list[str], str, str]]:
    """name -> (script + args, its JSON in bench/out, title)."""
    q = quick
    return {
        "replay": (["bench_replay.py", "--events", "2000" if q else "100000", "--repeats", "3" if q else "5"],
                   "replay.json", "Event-log replay speed"),
        "queue": (["bench_queue.py", *(["--quick"] if q else ["--drops", "9"])], "bench_queue.json",
                  "Queue latency: registry drop -> StageStarted profile"),
        "resume": (["bench_resume.py", *(["--quick"] if q else ["--repeats", "3"])], "bench_resume.json",
                   "Resume cost after kill -9 mid-distill"),
        "extract": (["bench_extract.py", *(["--vocab", "2048", "--hidden", "64", "--layers", "2", "--sequences", "8",
                                            "--seq-len", "64", "--batch-size", "4"] if q else [])],
                    "bench_extract.json", "Extraction: storage and throughput"),
        "kd": (["bench_kd.py", *(["--quick"] if q else [])], "bench_kd.json",
               "KD vs cross-entropy"),
        "kd_augment": (["bench_kd.py", "--augment", "2" if q else "16", "--augment-samples", "1" if q else "8",
                        "--steps", "40" if q else "800", "--no-sweep", "--json", "bench/out/bench_kd_augment.json",
                        *(["--quick"] if q else [])], "bench_kd_augment.json",
                       "KD with teacher-guided augmentation vs cross-entropy"),
        "sli": (["bench_sli.py", "--json", str(OUT / "bench_sli.json")], "bench_sli.json",
                "SLI vs full load"),
        "xtok": (["bench_xtok.py", *(["--quick"] if q else [])], "xtok.json",
                 "Two teachers with different tokenizers"),
        "scale": (["bench_scale.py", *(["--quick"] if q else [])], "bench_scale.json",
                  "Scale-out: extraction with 1 vs 2 workers (extract.ranges)"),
        "offload": (["bench_offload.py", *(["--quick"] if q else [])], "bench_offload.json",
                    "Streaming a teacher larger than memory: Nexus SLI vs accelerate's disk offload vs AirLLM"),
        "kd_online": (["bench_kd.py", "--online", *(["--quick"] if q else [])], "bench_kd_online.json",
                      "Offline stored top-k vs online KD (teacher forward every step)"),
        "limit": (["bench_limit.py", *(["--quick"] if q else [])], "bench_limit.json",
                  "Extraction against the compute bound, 49k and 262k vocabularies"),
        "projection": (["projection.py"], "projection.json",
                       "Projection: a 671B MoE and a 70B dense teacher from NVMe on a 16 GB GPU (on paper)"),
    }


# Tables per benchmark, from its JSON ---------------------------------------------------------

def _replay(r):
    ok = "meets" if r["events_per_s_median"] >= 200_000 else "MISSES"
    return (f"| events | log MB | median s | best s | events/s (median) | target |\n|---|---|---|---|---|---|\n"
            f"| {r['events']:,} | {r['bytes'] / 1e6:.1f} | {r['median_s']:.3f} | {r['best_s']:.3f} | "
            f"{r['events_per_s_median']:,.0f} | >= 200,000 ({ok}) |")


def _queue(r):
    from bench_queue import table

    ok = "meets" if r["p95_s"] <= 2.0 else "MISSES"
    return table(r) + f"\n\np95 over the warm drops {ok} the 2 s target. Per drop: " + \
        ", ".join(f"{x['latency_s']:.2f}" for x in r["rows"]) + " s."


def _resume(r):
    from bench_resume import table

    return table(r)


def _extract(r):
    return ("| teacher | tokens | tokens/s | shard bytes/token | fp16 logits bytes/token | ratio | kept mass |\n"
            "|---|---|---|---|---|---|---|\n"
            f"| {r['params'] / 1e6:.1f}M params, vocab {r['head_vocab']:,}, {r['mode']}, {r['device']} | {r['tokens']:,} | "
            f"{r['tokens_per_s']:,.0f} | {r['bytes_per_position']:.1f} | {r['full_fp16_bytes_per_position']:,} | "
            f"{r['ratio_vs_full_fp16']:.4f} ({1 / r['ratio_vs_full_fp16']:.0f}x smaller) | {r['kept_mass_mean']:.3f} |"
            f"\n\ntop-k = {r['k']}, seq_len {r['seq_len']}, batch {r['batch_size']}.")


def _gap(g) -> str:
    if not isinstance(g, (int, float)) or g != g:
        return "n/a (the CE student is not worse than the teacher at this size, so there is no gap)"
    return f"{g * 100:.0f}%"


def _kd(r):
    from bench_kd import table

    return table(r)


def _sli(r):
    full, lim = {x["tokens"]: x for x in r["full"]["rows"]}, r["limits"]
    t_read = lim["bytes"] / lim["read_bytes_per_s"]  # one pass must read every weight once
    lines = ["| tokens/pass | full tok/s | SLI tok/s | ratio | read-bound s | compute-bound s | SLI s |",
             "|---|---|---|---|---|---|---|"]
    for s in r["sli"]["rows"]:
        f = full.get(s["tokens"], r["full"]["rows"][0])
        t_comp = 2 * lim["params"] * s["tokens"] / lim["flops"]
        lines.append(f"| {s['tokens']} | {f['tok_s']:.0f} | {s['tok_s']:.0f} | {s['tok_s'] / f['tok_s']:.2f} | "
                     f"{t_read:.2f} | {t_comp:.2f} | {s['seconds']:.2f} |")
    return "\n".join(lines) + (
        f"\n\nPhysical limits measured in the same run: weights {lim['bytes'] / 2**30:.2f} GiB read at "
        f"{lim['read_bytes_per_s'] / 1e9:.2f} GB/s (read-bound: bytes / bandwidth per pass), fp32 matmul "
        f"{lim['flops'] / 1e9:.0f} GFLOP/s (compute-bound: 2 · params · tokens / FLOP/s); streaming stops being "
        f"bandwidth-bound above ~{lim['crossover_tokens']:.0f} tokens per pass. Full tok/s is measured at 512 and "
        f"8,192 tokens per pass (a full load's rate does not depend on the pass size); other rows reuse the first."
        f"\n\nThroughput SLI/full at the largest pass: {r['throughput_ratio']:.2f} (target >= 0.90); peak RSS above "
        f"baseline SLI/full: {r['rss_ratio']:.2f} (target <= 0.25) — SLI {r['sli']['rss_above_base'] / 2**20:.0f} MiB, "
        f"full {r['full']['rss_above_base'] / 2**20:.0f} MiB.")


def _xtok(r):
    from bench_xtok import render

    return render(r)


def _scale(r):
    from bench_scale import render

    return render(r)


def _render_of(module: str):
    def table(r):
        return __import__(module).render(r)
    return table


TABLES = {"replay": _replay, "queue": _queue, "resume": _resume, "extract": _extract, "kd": _kd, "kd_augment": _kd,
          "sli": _sli, "xtok": _xtok, "scale": _scale, "offload": _render_of("bench_offload"),
          "kd_online": _render_of("online_kd"), "limit": _render_of("bench_limit"),
          "projection": _render_of("projection")}


# Running and writing ---------------------------------------------------------------------

def machine() -> dict:
    try:
        torch = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch = "not installed"
    load = os.getloadavg()
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch, "load": [round(x, 2) for x in load],
            "shared": load[0] > (os.cpu_count() or 1) * 0.75}


def _machine_line(m: dict) -> str:
    line = (f"{m['platform']}, {m['cpus']} CPUs, Python {m['python']}, torch {m['torch']}; "
            f"load average {m['load'][0]:.2f} / {m['load'][1]:.2f} / {m['load'][2]:.2f} at the start")
    return line + (" (shared and busy: expect noisy timings)" if m["shared"] else "")


def run_one(name: str, argv: list[str], json_name: str, timeout: float) -> dict:
    target = OUT / json_name
    target.unlink(missing_ok=True)  # never report a previous run's numbers as this one's
    cmd = [sys.executable, str(ROOT / "bench" / argv[0]), *argv[1:]]
    m, t0 = machine(), time.time()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        rc, tail = p.returncode, (p.stdout + p.stderr)[-1500:]
    except subprocess.TimeoutExpired as exc:
        rc, tail = "timeout", f"timed out after {timeout:.0f} s\n" + str(exc.stdout or "")[-1000:]
    result = {"name": name, "command": "python bench/" + " ".join(argv).replace(str(ROOT) + "/", ""),
              "rc": rc, "seconds": round(time.time() - t0, 1), "machine": m,
              "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "tail": tail}
    if rc == 0 and target.exists():
        result["data"] = json.loads(target.read_text())
    return result


def section(title: str, r: dict) -> str:
    head = [f"## {title}", "", f"`{r['command']}` — {r['date']}, {r['seconds']:.0f} s", "",
            f"Machine: {_machine_line(r['machine'])}.", ""]
    if "data" in r:
        try:
            return "\n".join(head) + "\n" + TABLES[r["name"]](r["data"]) + "\n"
        except (KeyError, TypeError, ZeroDivisionError) as exc:
            body = f"(table failed: {exc!r}; raw JSON)\n\n```json\n{json.dumps(r['data'], indent=1)[:3000]}\n```"
            return "\n".join(head) + "\n" + body + "\n"
    if r["rc"] == "skipped":
        return "\n".join(head) + f"\n**Not measured**: {r['tail']}.\n"
    why = "timed out" if r["rc"] == "timeout" else f"exited with {r['rc']}" if r["rc"] != 0 else "wrote no JSON"
    return "\n".join(head) + f"\n**Not measured**: the benchmark {why}. Tail of its output:\n\n```\n{r['tail'].strip()}\n```\n"


HEADER = """# Benchmarks

Rewritten by `python bench/run_all.py` (each section by its own benchmark; `--only` rewrites
just those). Raw numbers: `bench/out/*.json`. All numbers are from the machine named in each
section; timings on a shared machine are noisy.
"""


def write_sections(path: Path, sections: dict[str, str], order: list[str]) -> None:
    text = path.read_text() if path.exists() else HEADER
    for name in order:
        block = f"<!-- bench:{name} -->\n{sections[name]}<!-- /bench:{name} -->"
        pat = re.compile(rf"<!-- bench:{name} -->.*?<!-- /bench:{name} -->", re.S)
        text = pat.sub(lambda _: block, text) if pat.search(text) else text.rstrip() + "\n\n" + block + "\n"
    from nexus_core.storage.atomic import write_text

    write_text(path, text if text.endswith("\n") else text + "\n")


def main() -> int:
    sys.path.insert(0, str(ROOT))
    specs = _args(False)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (the smoke test uses this)")
    ap.add_argument("--only", default="", help=f"comma-separated subset of {','.join(specs)}")
    ap.add_argument("--output", default=str(ROOT / "BENCHMARKS.md"))
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per benchmark")
    ap.add_argument("--from-json", action="store_true", help="run nothing: rewrite the sections from the JSON the "
                    "benchmarks left in bench/out (for runs made by hand, e.g. side by side; each JSON names its command)")
    a = ap.parse_args()
    specs = _args(a.quick)
    names = [n.strip() for n in a.only.split(",") if n.strip()] or list(specs)
    unknown = [n for n in names if n not in specs]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; choose from {list(specs)}", file=sys.stderr)
        return 2
    OUT.mkdir(parents=True, exist_ok=True)
    results, sections = {}, {}
    for name in names:
        argv, json_name, title = specs[name]
        if a.from_json:
            data = json.loads((OUT / json_name).read_text())
            relative = " ".join(x.replace(f"{ROOT}/", "") for x in argv)
            results[name] = {"name": name, "command": data.get("command", "python bench/" + relative), "rc": 0,
                             "seconds": data.get("total_s", 0), "data": data, "tail": "",
                             "machine": {**machine(), **({"load": data["load_before"], "shared": data["load_before"][0]
                                                         > (os.cpu_count() or 1) * 0.75} if "load_before" in data else {})},
                             "date": datetime.fromtimestamp((OUT / json_name).stat().st_mtime, timezone.utc)
                             .strftime("%Y-%m-%d %H:%M UTC") + " (written from its JSON by `run_all.py --from-json`)"}
        elif a.quick and name == "sli":
            argv = []  # its teacher is >= 1 GB by design: no small version
            results[name] = {"name": name, "command": "python bench/bench_sli.py", "rc": "skipped", "seconds": 0,
                             "machine": machine(), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                             "tail": "skipped under --quick (its teacher is >= 1 GB by design)"}
        else:
            print(f"[run_all] {name}: python bench/{' '.join(argv)}", file=sys.stderr, flush=True)
            results[name] = run_one(name, argv, json_name, a.timeout)
        r = results[name]
        print(f"[run_all] {name}: rc={r['rc']} in {r['seconds']} s", file=sys.stderr, flush=True)
        sections[name] = section(title + (" (--quick)" if a.quick else ""), r)
    write_sections(Path(a.output), sections, names)
    # beside the default BENCHMARKS.md: bench/out/run_all.json; beside any other output: <output>.json
    out = Path(a.output)
    summary = OUT / "run_all.json" if out.resolve() == (ROOT / "BENCHMARKS.md").resolve() else out.with_suffix(".json")
    summary.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"wrote {a.output}")
    return 0 if all(r["rc"] == 0 for r in results.values() if r["rc"] != "skipped") else 1


if __name__ == "__main__":
    sys.exit(main())
