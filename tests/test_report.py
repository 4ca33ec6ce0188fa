"""The run report: rebuilt from the event log and artefacts, and honest about what is missing."""

from __future__ import annotations

import json

from nexus_core.records.events import EventLog
from nexus_core.records.report import build_report
from nexus_core.storage.atomic import write_json
from tests.helpers import nexus

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STAGES = ("profile", "extract", "distill", "router")


def _valid_png(path) -> bool:
    import matplotlib.image as mpimg

    return path.read_bytes()[:8] == PNG_MAGIC and mpimg.imread(path).shape[0] > 10


def test_report_after_a_full_run_matches_the_artefacts(demo_workdir, redis_conn, redis_url):
    paths = demo_workdir
    run = nexus(paths, "run", redis_url=redis_url)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (paths.results / "report.md").exists()  # the end of `nexus run` writes it
    for f in paths.results.glob("report*"):
        f.unlink()
    out = nexus(paths, "report")
    assert out.returncode == 0, out.stderr[-3000:]
    md, rep = paths.results / "report.md", json.loads((paths.results / "report.json").read_text())
    assert md.exists()

    ev = json.loads((paths.results / "eval.json").read_text())
    assert set(rep["domains"]) == set(ev["datasets"]) == {"reasoning/arith", "code/snippets"}
    for d, m in ev["datasets"].items():
        # per character: the scale on which teachers of any tokenizer, the student and the baseline compare
        assert rep["domains"][d]["unit"] == "nats/char"
        assert rep["domains"][d]["student"] == m["student"]["loss_per_char"]
        assert rep["domains"][d]["teachers"] == {t: v["loss_per_char"] for t, v in m["teachers"].items()}
        assert rep["domains"][d]["teachers"]["tiny"] > 0
    router = json.loads((paths.router_dir / "router.json").read_text())
    assert rep["router"]["heldout_accuracy"] == router["heldout_accuracy"]
    assert set(rep["wall_time_s"]) >= set(STAGES)
    assert all(rep["wall_time_s"][s] > 0 for s in STAGES), rep["wall_time_s"]
    assert rep["complete"] and rep["teachers"][0]["teacher_id"] == "tiny"
    assert rep["datasets"] == ["code/snippets", "reasoning/arith"]
    assert rep["skipped"]["oom_recoveries"] == 0
    assert [p["step"] for p in rep["loss_curve"]][-1] == ev["steps"]
    assert len(rep["layer_importance"]["tiny"]) == 4
    for name in ("loss", "domains", "layers"):
        png = paths.results / rep["plots"][name]
        assert _valid_png(png), png
        assert f"]({png.name})" in md.read_text()
    text = md.read_text()
    assert f"{ev['datasets']['reasoning/arith']['student']['loss_per_char']:.4f}" in text
    assert "CE baseline" in text  # said to be absent, not silently dropped


def _synthetic_run_without_router(paths):
    log = EventLog(paths.log)
    log.append("TeacherAdded", teacher_id="t1", data={"teacher": {"teacher_id": "t1", "path": "/m", "status": "ready",
                                                                  "source": "registry/t1.json"}})
    for stage, job, ds in (("profile", "profile-a", None), ("extract", "extract-b", "reasoning/arith"),
                           ("distill", "distill-c", None)):
        log.append("StageQueued", teacher_id="t1", stage=stage, job_id=job, data={"dataset": ds} if ds else {})
        log.append("StageStarted", teacher_id="t1", stage=stage, job_id=job, data={})
        if stage == "distill":
            for step, loss in ((1, 3.0), (2, 2.5), (2, 2.4), (3, 2.0)):  # step 2 redone after a crash
                log.append("StageProgress", stage=stage, job_id=job, data={"step": step, "loss": loss, "kd": loss,
                                                                           "ce": loss + 1})
            log.append("OOMRecovered", stage=stage, job_id=job, data={"step": 3, "skipped": 1})
            log.append("ThermalPause", data={"temp_c": 86.0})
            log.append("ThermalResume", data={"temp_c": 70.0})
        log.append("StageCompleted", teacher_id="t1", stage=stage, job_id=job,
                   data={"artifacts": [], "seconds": 1.5, **({"skipped_sequences": 1} if stage == "distill" else {})})
    write_json(paths.profile("t1"), {"teacher_id": "t1", "layer_importance": [0.1, 0.3], "params": 1000,
                                     "layers": 2, "mode": "full", "critical_layers": [1]})
    write_json(paths.results / "eval.json", {"steps": 3, "datasets": {"reasoning/arith": {
        "student": {"loss": 2.1, "perplexity": 8.2, "tokens": 10}, "teachers": {"t1": {"loss": 1.9}},
        "ce_baseline": {"loss": 2.3}}}})


def test_report_builds_when_the_router_never_ran(workdir):
    paths = workdir
    _synthetic_run_without_router(paths)
    build_report(paths)
    rep = json.loads((paths.results / "report.json").read_text())
    text = (paths.results / "report.md").read_text()
    assert rep["router"] is None and not rep["complete"]
    assert "router has not been trained" in text and any("router" in m for m in rep["missing"])
    assert rep["wall_time_s"] == {"profile": 1.5, "extract": 1.5, "distill": 1.5, "router": 0.0}
    assert [(p["step"], p["loss"]) for p in rep["loss_curve"]] == [(1, 3.0), (2, 2.4), (3, 2.0)]
    assert rep["skipped"] == {"oom_recoveries": 1, "sequences_skipped_on_oom": 1, "distill_skipped_sequences": 1}
    assert rep["domains"]["reasoning/arith"] == {"student": 2.1, "student_perplexity": 8.2, "tokens": 10,
                                                 "teachers": {"t1": 1.9}, "ce_baseline": 2.3, "kd_gap_closed": 0.5,
                                                 "unit": "nats/token", "baseline_lr": None, "teacher_usage": {}}
    assert "| 2.3000 | 50% |" in text
    assert [p["temp_c"] for p in rep["temperature"]] == [86.0, 70.0]
    for name in ("loss", "domains", "layers", "temperature"):
        assert _valid_png(paths.results / rep["plots"][name])


def test_report_takes_the_ce_baseline_from_baseline_json_unless_stale(workdir):
    paths = workdir
    _synthetic_run_without_router(paths)
    write_json(paths.results / "baseline.json", {"steps": 3, "datasets": {"reasoning/arith": {"loss": 2.5}}})
    build_report(paths)
    rep = json.loads((paths.results / "report.json").read_text())
    assert rep["domains"]["reasoning/arith"]["ce_baseline"] == 2.5
    assert rep["domains"]["reasoning/arith"]["kd_gap_closed"] == round(0.4 / 0.6, 4)
    write_json(paths.results / "baseline.json", {"steps": 99, "datasets": {"reasoning/arith": {"loss": 2.5}}})
    build_report(paths)
    rep = json.loads((paths.results / "report.json").read_text())
    assert rep["domains"]["reasoning/arith"]["ce_baseline"] == 2.3  # eval.json's own key, the stale file ignored
    assert any("stale" in m for m in rep["missing"])


def test_report_on_an_empty_workdir_says_what_is_missing(workdir):
    out = build_report(workdir)
    rep = json.loads((workdir.results / "report.json").read_text())
    assert out.exists() and rep["plots"] == {} and rep["domains"] == {}
    assert any("event log" in m for m in rep["missing"]) and any("eval.json" in m for m in rep["missing"])
    assert "No held-out evaluation yet" in out.read_text()


def test_report_shows_every_teacher_per_char_the_tuned_baseline_and_each_teachers_signal(workdir):
    """Two teachers (one with another tokenizer), per-character losses, the swept baseline: all in one table."""
    paths = workdir
    log = EventLog(paths.log)
    usage = {"t1": {"tokenizer": "primary", "domains": {"code/x": {"weight": 0.8, "used": True}}},
             "t2": {"tokenizer": "aligned", "domains": {"code/x": {"weight": 0.2, "used": True,
                                                                   "aligned_positions_pct": 87.5}}}}
    log.append("StageQueued", stage="distill", job_id="distill-a", data={"plan": "fp1"})
    log.append("StageStarted", stage="distill", job_id="distill-a", data={})
    log.append("StageCompleted", stage="distill", job_id="distill-a",
               data={"artifacts": [], "teacher_usage": usage, "skipped_sequences": 0})
    write_json(paths.results / "eval.json", {"steps": 5, "plan_fp": "fp1", "datasets": {"code/x": {
        "student": {"loss": 2.0, "loss_per_char": 0.6, "tokens": 50, "extra": "tolerated"},
        "teachers": {"t1": {"loss": 1.5, "loss_per_char": 0.4}, "t2": {"loss_per_char": 0.5, "new_field": 1}}}}})
    write_json(paths.results / "baseline.json", {"steps": 5, "lr": 3e-3, "datasets": {
        "code/x": {"loss": 2.4, "loss_per_char": 0.8}}})
    build_report(paths)
    dom = json.loads((paths.results / "report.json").read_text())["domains"]["code/x"]
    assert dom["unit"] == "nats/char" and dom["teachers"] == {"t1": 0.4, "t2": 0.5}
    assert (dom["student"], dom["ce_baseline"], dom["baseline_lr"]) == (0.6, 0.8, 3e-3)
    assert dom["kd_gap_closed"] == 0.5  # (0.8 - 0.6) / (0.8 - 0.4)
    assert dom["teacher_usage"]["t1"]["aligned_positions_pct"] == 100.0
    assert dom["teacher_usage"]["t2"] == {"weight": 0.2, "used": True, "aligned_positions_pct": 87.5,
                                          "tokenizer": "aligned"}
    text = (paths.results / "report.md").read_text()
    assert "| code/x | 0.4000 | 0.5000 | 0.6000 | 0.8000 | 50% |" in text
    assert "| code/x | t2 | 0.200 | 87.5% | 0.5000 |" in text
    assert "best learning rate of a sweep (lr 0.003" in text and "nats/char" in text


def test_report_falls_back_to_nats_per_token_when_the_baseline_has_no_per_char_loss(workdir):
    paths = workdir
    write_json(paths.results / "eval.json", {"steps": 5, "datasets": {"code/x": {
        "student": {"loss": 2.0, "loss_per_char": 0.6}, "teachers": {"t1": {"loss": 1.5}, "t2": {"loss_per_char": 0.5}}}}})
    write_json(paths.results / "baseline.json", {"steps": 5, "datasets": {"code/x": {"loss": 2.5}}})
    build_report(paths)
    dom = json.loads((paths.results / "report.json").read_text())["domains"]["code/x"]
    assert dom["unit"] == "nats/token" and dom["teachers"] == {"t1": 1.5, "t2": None}
    assert dom["kd_gap_closed"] == 0.5 and dom["baseline_lr"] is None
