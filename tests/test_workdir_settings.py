"""A workdir keeps its settings: `nexus run --demo` writes them to nexus.toml, so a later plain `nexus run`
redoes nothing; the summary is on stdout, the logs on stderr."""

from __future__ import annotations

import json
import tomllib

import pytest

from nexus_core.records.events import read_events
from tests.helpers import nexus, of_type

# The smallest pipeline the other end-to-end tests use, given as flags (flags are what the demo keeps).
FAST_FLAGS = ["--extract-seq-len", "32", "--extract-max-samples", "24", "--extract-shard-size", "8",
              "--extract-top-k", "8", "--extract-batch-size", "4", "--profile-calibration-samples", "4",
              "--distill-max-steps", "6", "--distill-batch-size", "4", "--distill-checkpoint-every", "2",
              "--distill-warmup-steps", "1", "--router-epochs", "5", "--router-max-samples", "40"]
SMALL_DEMO = {"NEXUS_TEST_DEMO_SMALL": "1", "NEXUS_PROGRESS_EVERY_S": "0", "COLUMNS": "250"}  # tables unwrapped


@pytest.mark.slow
def test_demo_keeps_its_settings_and_a_plain_rerun_redoes_nothing(workdir, redis_conn, redis_url):
    paths = workdir
    demo = nexus(paths, "run", "--demo", *FAST_FLAGS, redis_url=redis_url, env_extra=SMALL_DEMO, timeout=900)
    assert demo.returncode == 0, demo.stderr[-3000:]
    kept = tomllib.loads((paths.home / "nexus.toml").read_text())
    assert kept["distill"]["max_steps"] == 6 and kept["distill"]["epochs"] == 1000  # a flag, a demo default
    # stdout: the result (tables, where the student and report are); stderr: what was being done
    assert "KD gap closed" in demo.stdout and "plain fine-tune (lr" in demo.stdout and "report:" in demo.stdout
    assert "nexus run: pid" in demo.stderr and "nexus run: pid" not in demo.stdout
    assert "distill: 6/6 steps (100%)" in demo.stderr and "distill:" not in demo.stdout  # the progress line
    assert "evaluate:" in demo.stderr and "sequences" in demo.stderr
    assert "baseline.lr_done" in demo.stderr and "baseline.lr_done" not in demo.stdout
    base = json.loads((paths.results / "baseline.json").read_text())
    assert 3 <= len(base["sweep"]) <= 5 and base["lr"] in base["lrs"] and base["steps"] == 6
    report = json.loads((paths.results / "report.json").read_text())
    assert all(m["ce_baseline"] is not None and m["teacher_usage"] for m in report["domains"].values())
    before = read_events(paths.log)
    baseline_mtime = (paths.results / "baseline.json").stat().st_mtime_ns

    plain = nexus(paths, "run", redis_url=redis_url, env_extra={"COLUMNS": "250"})  # no flags: nexus.toml says it all
    assert plain.returncode == 0, plain.stderr[-3000:]
    after = read_events(paths.log)[len(before):]
    assert not of_type(after, "StageStarted") and not of_type(after, "StageQueued"), [e.type for e in after]
    assert "stages" in plain.stdout and "nexus run: pid" in plain.stderr

    again = nexus(paths, "run", "--demo", redis_url=redis_url, env_extra=SMALL_DEMO)  # the demo again: cached
    assert again.returncode == 0, again.stderr[-3000:]
    assert not of_type(read_events(paths.log)[len(before):], "StageStarted")
    assert (paths.results / "baseline.json").stat().st_mtime_ns == baseline_mtime  # the sweep is not redone
