"""bench/gpu_check.sh --dry-run on the CPU: every step of the GPU check runs (tiny sizes), so the script cannot rot
while no GPU is lent; it writes one JSON and a BENCHMARKS section to a scratch file, never BENCHMARKS.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # 80-160 s on 2 cores: the slow suite (`pytest -m slow`) keeps it from rotting
def test_gpu_check_dry_run_writes_json_and_section(tmp_path):
    out = tmp_path / "BENCH.md"
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_")}
    p = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run", "--output", str(out), "--python", sys.executable],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    r = json.loads((ROOT / "bench" / "out" / "gpu_check" / "gpu_check.json").read_text())
    assert r["dry_run"] and set(r["steps"]) == {"pytest", "sli", "offload", "kd", "nvml"}
    assert all(s["rc"] == 0 for s in r["steps"].values())
    assert "skipped" in r["pytest"]["summary"]  # collected, and skipped without CUDA
    assert r["sli"]["rows"] and r["sli"]["rows"][0]["top32_identical"] == 1.0
    assert {x for x in r["offload"]["teachers"][0]["rows"][0]["runners"]} == {"full", "nexus", "accelerate"}
    assert r["kd"]["loss_finite"] and r["nvml"] is not None
    text = out.read_text()
    assert "<!-- bench:gpu -->" in text and "--dry-run" in text and "SLI vs full load" in text
