"""Smoke test of the benchmark suite: `bench/run_all.py --quick` on replay (2k events) and the
queue latency (2 drops through real `nexus watch` + `nexus worker`), into a scratch BENCHMARKS.md.
The full suite is slow and not part of the CI test run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_run_all_quick_writes_sections_with_real_numbers(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\nkept text\n\n<!-- bench:replay -->\nold numbers\n<!-- /bench:replay -->\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_")}  # embedded Redis of its own
    p = subprocess.run([sys.executable, "bench/run_all.py", "--quick", "--only", "replay,queue", "--output", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    text = out.read_text()
    assert "kept text" in text and "old numbers" not in text  # only the sections that ran are rewritten
    assert text.count("<!-- bench:replay -->") == 1 and "<!-- bench:queue -->" in text
    assert "python bench/bench_replay.py --events 2000" in text and "torch" in text and "CPUs" in text
    results = json.loads((tmp_path / "BENCHMARKS.json").read_text())  # run_all's record beside its output
    replay, queue = results["replay"]["data"], results["queue"]["data"]
    assert replay["events"] == 2000 and replay["events_per_s_median"] > 0
    assert queue["drops"] == 2 and len(queue["rows"]) == 2
    assert all(0 < r["latency_s"] < 60 for r in queue["rows"])
    assert f"{queue['p95_s']:.3f}" in text


def test_run_all_records_a_failing_benchmark_instead_of_crashing():
    sys.path.insert(0, str(ROOT / "bench"))
    import run_all

    r = run_all.run_one("replay", ["bench_replay.py", "--events", "not-a-number"], "replay.json", timeout=60)
    assert r["rc"] != 0 and "data" not in r
    text = run_all.section("Replay", r)
    assert "Not measured" in text and "invalid int value" in text


@pytest.mark.slow  # two rounds of real workers: ~90 s on a busy 2-core machine
def test_scale_quick_runs_real_workers_and_projects(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_")}  # embedded Redis of its own
    p = subprocess.run([sys.executable, "bench/run_all.py", "--quick", "--only", "scale", "--output", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    r = json.loads((tmp_path / "BENCHMARKS.json").read_text())["scale"]["data"]
    assert r["identical"] and r["one"]["tokens"] == r["many"]["tokens"] > 0
    assert len(r["one"]["jobs"]) == 1 and len(r["many"]["jobs"]) == 2
    assert sorted(j["merged"] for j in r["many"]["jobs"]) == [False, True]
    assert [x["workers"] for x in r["projection"]["rows"]] == [1, 2, 4, 8]
    text = out.read_text()
    assert "<!-- bench:scale -->" in text and "byte-identical: **yes**" in text and "Projection" in text


def test_bench_kd_quick_compares_kd_with_the_best_plain_fine_tune(tmp_path):
    """bench_kd --quick through the real stages: the baseline is the plain fine-tune at its best lr per
    domain, and the share of the gap follows from the losses it reports."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_")}
    out = tmp_path / "bench_kd.json"
    p = subprocess.run([sys.executable, "bench/bench_kd.py", "--quick", "--timing-pairs", "3", "--json", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    r = json.loads(out.read_text())
    assert r["ce_lrs"] == [1e-4, 3e-4, 1e-3] and r["steps"] == 20
    for d, v in r["per_domain"].items():
        assert v["ce_lr"] in r["ce_lrs"] and v["ce"] <= v["ce_same_lr"]  # the best lr is at least as good
        gap = v["ce"] - v["teacher"]
        assert v["gap_closed"] == (None if gap <= 0 else pytest.approx((v["ce"] - v["kd"]) / gap))
        assert d in p.stdout
    assert r["timing"]["pairs"] == 3 and r["kd_over_ce_step_time"] > 0
