"""The run report: results/report.md (+ PNG plots) and results/report.json, rebuilt from the
event log and the artefacts on disk, never from memory of a run.

`build_report(paths)` can run at any time (`nexus report`, the end of `nexus run`): whatever
is missing (no distill yet, no router, no matplotlib) is said in the report, not raised.
report.json holds the same numbers as report.md; the PNGs are drawn from report.json's data.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from nexus_core.paths import Paths
from nexus_core.records.events import read_events
from nexus_core.records.state import StageStatus, replay
from nexus_core.storage.atomic import atomic_path, write_json, write_text

STAGES = ("profile", "extract", "distill", "router")
_ENDS = ("StageCompleted", "StageFailed", "StagePaused")
# Where a CE-only baseline may be recorded: results/baseline.json (the demo's plain fine-tune,
# nexus_core.baseline), else these keys of eval.json.
_CE_KEYS = ("ce_baseline", "baseline_ce", "ce")
# Held-out loss per character in eval.json / baseline.json entries (any tokenizer, one scale), when present.
_PER_CHAR_KEYS = ("loss_per_char", "nats_per_char")


def _epoch(ts: str) -> float:
    return datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp()


def _read_json(path: Path, missing: list[str], what: str) -> dict | None:
    if not path.exists():
        missing.append(f"{what}: {path} does not exist yet")
        return None
    try:
        obj = json.loads(path.read_text())
        return obj if isinstance(obj, dict) else None
    except (OSError, ValueError) as exc:
        missing.append(f"{what}: {path} is unreadable ({exc}); rerun the stage that writes it")
        return None


# 1. Numbers ------------------------------------------------------------------------------

def _stage_times(events) -> tuple[list[dict], dict]:
    """Per job: seconds summed over its attempts (StageStarted -> its end event); and per stage."""
    open_at: dict[str, float] = {}
    jobs: dict[str, dict] = {}
    for e in events:
        if not e.job_id or e.type not in ("StageStarted", *_ENDS):
            continue
        j = jobs.setdefault(e.job_id, {"job_id": e.job_id, "stage": e.stage, "teacher_id": e.teacher_id,
                                       "seconds": 0.0, "attempts": 0, "status": "queued"})
        if e.type == "StageStarted":
            open_at[e.job_id] = _epoch(e.ts)
            j["attempts"] += 1
            j["status"] = "running"
        elif e.job_id in open_at:
            start = open_at.pop(e.job_id)
            secs = e.data.get("seconds")  # the worker's monotonic clock when it gave one
            j["seconds"] += float(secs) if isinstance(secs, (int, float)) else _epoch(e.ts) - start
            j["status"] = {"StageCompleted": "done", "StageFailed": "failed", "StagePaused": "paused"}[e.type]
    per_stage = {s: 0.0 for s in STAGES}
    for j in jobs.values():
        j["seconds"] = round(j["seconds"], 3)
        per_stage[j["stage"]] = round(per_stage.get(j["stage"], 0.0) + j["seconds"], 3)
    return list(jobs.values()), per_stage


def _loss_curve(events) -> list[dict]:
    """Distill StageProgress points; a step redone after a crash keeps its latest value."""
    points: dict[tuple, dict] = {}
    for e in events:
        if e.type == "StageProgress" and e.stage == "distill" and isinstance(e.data.get("step"), int):
            d = e.data
            points[(e.job_id, d["step"])] = {"job_id": e.job_id, "step": d["step"], "ts": e.ts,
                                             **{k: d[k] for k in ("loss", "kd", "ce", "lr") if k in d}}
    return sorted(points.values(), key=lambda p: (p["job_id"], p["step"]))


def _temperatures(events) -> list[dict]:
    out = []
    for e in events:
        t = e.data.get("temp_c") if isinstance(e.data, dict) else None
        if isinstance(t, (int, float)) and e.type in ("ThermalPause", "ThermalResume", "StageProgress"):
            out.append({"ts": e.ts, "temp_c": float(t), "event": e.type})
    return out


def _ce_entry(ev: dict, base: dict | None, domain: str) -> dict | None:
    """The plain fine-tune's held-out metrics on a domain: baseline.json's, else a key of eval.json."""
    v = ((base or {}).get("datasets") or {}).get(domain)
    if isinstance(v, dict) and isinstance(v.get("loss"), (int, float)):
        return v
    per = (ev.get("datasets") or {}).get(domain) or {}
    for key in _CE_KEYS:
        v = per.get(key)
        if v is None and isinstance(ev.get(key), dict):
            v = ev[key].get(domain)
        if isinstance(v, (int, float)):
            v = {"loss": float(v)}
        if isinstance(v, dict) and isinstance(v.get("loss"), (int, float)):
            return v
    return None


def _per_char(entry) -> float | None:
    v = next((entry.get(k) for k in _PER_CHAR_KEYS if isinstance(entry, dict) and k in entry), None)
    return float(v) if isinstance(v, (int, float)) else None


def _per_token(entry) -> float | None:
    v = entry.get("loss") if isinstance(entry, dict) else entry
    return float(v) if isinstance(v, (int, float)) else None


def _usage(state, plan_fp: str | None) -> dict:
    """teacher_usage of the distill that made eval.json (else the latest finished one): per teacher and
    domain its weight and aligned positions %."""
    done = [s for s in state.stages.values() if s.stage == "distill" and (s.result or {}).get("teacher_usage")]
    done.sort(key=lambda s: (s.plan == plan_fp, s.finished_ts or ""))
    return done[-1].result["teacher_usage"] if done else {}


def _teacher_usage(usage: dict, domain: str) -> dict:
    out = {}
    for tid, u in sorted(usage.items()):
        dom = (u.get("domains") or {}).get(domain)
        if not isinstance(dom, dict):
            continue
        same_tok = u.get("tokenizer") == "primary"
        out[tid] = {"weight": dom.get("weight"), "used": dom.get("used", True),
                    # the primary's tokenizer: every position is the student's own
                    "aligned_positions_pct": 100.0 if same_tok else dom.get("aligned_positions_pct"),
                    "tokenizer": u.get("tokenizer")}
    return out


def _domains(ev: dict | None, base: dict | None, usage: dict | None = None) -> dict:
    out = {}
    for d, m in ((ev or {}).get("datasets") or {}).items():
        student = (m.get("student") or {})
        ce_entry = _ce_entry(ev, base, d)
        # One unit per domain: nats per character when the student (and baseline) have it, which puts
        # teachers with other tokenizers on the same scale; else nats per token.
        per_char = _per_char(student) is not None and (ce_entry is None or _per_char(ce_entry) is not None)
        value = _per_char if per_char else _per_token
        teachers = {t: value(v) for t, v in (m.get("teachers") or {}).items()}
        ce, kd = value(ce_entry) if ce_entry else None, value(student)
        best = min((x for x in teachers.values() if isinstance(x, (int, float))), default=None)
        # share of the CE-baseline -> best-teacher gap that distillation closed
        gap = (ce - kd) / (ce - best) if None not in (ce, kd, best) and ce - best > 1e-9 else None
        out[d] = {"student": kd, "student_perplexity": student.get("perplexity"), "tokens": student.get("tokens"),
                  "teachers": teachers, "ce_baseline": ce, "kd_gap_closed": None if gap is None else round(gap, 4),
                  "unit": "nats/char" if per_char else "nats/token",
                  "baseline_lr": (base or {}).get("lr") if ce_entry is not None else None,
                  "teacher_usage": _teacher_usage(usage or {}, d)}
    return out


def _teachers(paths: Paths, state, missing: list[str]) -> tuple[list[dict], dict]:
    teachers, importance = [], {}
    for t in sorted(state.teachers.values(), key=lambda t: t.teacher_id):
        row = {"teacher_id": t.teacher_id, "active": t.active, "path": t.teacher.path,
               "status": t.teacher.status}
        failed = _profile_failure(state, t.teacher_id)
        if failed:  # left out of the plan: say why here too, not only on the console
            row["failed"] = failed
        prof = None if failed else _read_json(paths.profiles / f"{t.teacher_id}.json", missing,
                                              f"profile of {t.teacher_id}")
        if prof:
            row.update({k: prof.get(k) for k in ("model_type", "params", "layers", "hidden", "mode", "mode_reason",
                                                 "critical_layers")})
            if isinstance(prof.get("layer_importance"), list):
                importance[t.teacher_id] = prof["layer_importance"]
        teachers.append(row)
    return teachers, importance


def _profile_failure(state, teacher_id: str) -> str | None:
    """The error of the teacher's latest profile job when it failed (e.g. `--sli always` on a teacher SLI
    cannot stream, an architecture Nexus cannot load), else None."""
    jobs = [s for s in state.stages.values() if s.stage == "profile" and s.teacher_id == teacher_id]
    last = max(jobs, key=lambda s: s.failed_seq or 0, default=None)
    return last.error if last is not None and last.status == StageStatus.FAILED else None


def _skipped(events, state) -> dict:
    oom = [e for e in events if e.type == "OOMRecovered"]
    distill_done = [s for s in state.stages.values() if s.stage == "distill" and s.result]
    return {"oom_recoveries": len(oom),
            "sequences_skipped_on_oom": sum(int(e.data.get("skipped") or 0) for e in oom),
            "distill_skipped_sequences": sum(int(s.result.get("skipped_sequences") or 0) for s in distill_done)}


def collect(paths: Paths) -> dict:
    """Every number of the report, as plain JSON."""
    missing: list[str] = []
    events = read_events(paths.log)
    if not events:
        missing.append(f"event log: {paths.log} is empty or missing; run `nexus run` first")
    state = replay(events)
    jobs, per_stage = _stage_times(events)
    for s in STAGES:
        if not any(j["stage"] == s and j["status"] == "done" for j in jobs):
            missing.append(f"{s}: no completed {s} stage in the event log")
    teachers, importance = _teachers(paths, state, missing)
    ev = _read_json(paths.results / "eval.json", missing, "held-out evaluation (distill)")
    router = _read_json(paths.router_dir / "router.json", missing, "router")
    base_path = paths.results / "baseline.json"
    base = _read_json(base_path, [], "CE baseline") if base_path.exists() else None
    if base and ev and base.get("steps") != ev.get("steps"):
        missing.append(f"CE baseline: {base_path} was trained for {base.get('steps')} steps, the student for "
                       f"{ev.get('steps')}: left out as stale (the demo retrains it)")
        base = None
    domains = _domains(ev, base, _usage(state, (ev or {}).get("plan_fp")))
    if domains and all(v["ce_baseline"] is None for v in domains.values()):
        missing.append("CE baseline: no plain fine-tune (cross-entropy only) student in results/baseline.json "
                       "(`nexus run --baseline` trains one; the demo does too)")
    datasets = sorted({*domains, *(s.dataset for s in state.stages.values() if s.dataset),
                       *((router or {}).get("labels") or [])})
    done = all(any(j["stage"] == s and j["status"] == "done" for j in jobs) for s in STAGES)
    return {
        "version": 1, "generated": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "last_seq": state.last_seq, "complete": done,
        "teachers": teachers, "datasets": datasets,
        "domains": domains, "eval_plan_fp": (ev or {}).get("plan_fp"), "student_steps": (ev or {}).get("steps"),
        "router": None if router is None else {k: router.get(k) for k in (
            "heldout_accuracy", "train_accuracy", "heldout_source", "labels", "teacher_per_label", "samples")},
        "skipped": _skipped(events, state),
        "wall_time_s": per_stage, "stages": jobs,
        "loss_curve": _loss_curve(events), "layer_importance": importance,
        "temperature": _temperatures(events),
        "missing": missing,
    }


# 2. Plots --------------------------------------------------------------------------------

def _save(fig, target: Path) -> None:
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png", dpi=90, bbox_inches="tight")


def _plots(data: dict, out_dir: Path) -> dict[str, str]:
    """{plot name: file name} of the PNGs drawn; a plot without data is left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = {}
    if data["loss_curve"]:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for key in ("loss", "kd", "ce"):
            pts = [(p["step"], p[key]) for p in data["loss_curve"] if isinstance(p.get(key), (int, float))]
            if pts:
                ax.plot(*zip(*pts), label=key, marker="." if len(pts) < 40 else None)
        ax.set(xlabel="step", ylabel="loss", title="student training loss")
        ax.legend()
        _save(fig, out_dir / "report_loss.png")
        drawn["loss"] = "report_loss.png"
    if data["domains"]:
        names = sorted(data["domains"])
        series = {}
        for d in names:
            m = data["domains"][d]
            for t, v in m["teachers"].items():
                series.setdefault(f"teacher {t}", {})[d] = v
            series.setdefault("KD student", {})[d] = m["student"]
            if m["ce_baseline"] is not None:
                series.setdefault("CE baseline", {})[d] = m["ce_baseline"]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        width = 0.8 / max(len(series), 1)
        for i, (label, vals) in enumerate(series.items()):
            xs = [j + i * width for j, d in enumerate(names) if isinstance(vals.get(d), (int, float))]
            ax.bar(xs, [vals[d] for d in names if isinstance(vals.get(d), (int, float))], width, label=label)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names)
        unit = ", ".join(sorted({m.get("unit", "nats/token") for m in data["domains"].values()}))
        ax.set(ylabel=f"held-out loss ({unit})", title="held-out loss per domain")
        ax.legend(fontsize=8)
        _save(fig, out_dir / "report_domains.png")
        drawn["domains"] = "report_domains.png"
    if data["layer_importance"]:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for t, vals in data["layer_importance"].items():
            ax.plot(range(len(vals)), vals, marker="o", label=t)
        ax.set(xlabel="decoder layer", ylabel="block influence (1 - cos)", title="layer importance per teacher")
        ax.legend(fontsize=8)
        _save(fig, out_dir / "report_layers.png")
        drawn["layers"] = "report_layers.png"
    if data["temperature"]:
        t0 = _epoch(data["temperature"][0]["ts"])
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([_epoch(p["ts"]) - t0 for p in data["temperature"]], [p["temp_c"] for p in data["temperature"]],
                marker="o")
        ax.set(xlabel="seconds", ylabel="GPU °C", title="GPU temperature (thermal events)")
        _save(fig, out_dir / "report_temperature.png")
        drawn["temperature"] = "report_temperature.png"
    plt.close("all")
    return drawn


# 3. Markdown -----------------------------------------------------------------------------

def _f(v, nd=4) -> str:
    return f"{v:.{nd}f}" if isinstance(v, (int, float)) else "–"


def _pct(v) -> str:
    return f"{v:.0%}" if isinstance(v, (int, float)) else "–"


def _img(plots: dict, key: str, alt: str) -> list[str]:
    return [f"![{alt}]({plots[key]})", ""] if key in plots else []


def _heldout_note(domains: dict, has_ce: bool) -> str:
    units = sorted({m.get("unit", "nats/token") for m in domains.values()})
    note = (f"Held-out loss ({', '.join(units)}; per character puts teachers with other tokenizers on the "
            f"student's scale) on each dataset's held-out split, which extraction and distillation never saw.")
    if not has_ce:
        return note + (" No plain fine-tune baseline was trained in this run, so whether distillation paid off is "
                       "not shown: `nexus run --baseline` trains one (the demo does too).")
    lr = next((m.get("baseline_lr") for m in domains.values() if m.get("baseline_lr")), None)
    how = (f"at the best learning rate of a sweep (lr {lr:g}, picked by mean held-out loss)" if lr else
           "at distillation's learning rate (not tuned for it)")
    return note + (f" CE baseline: the same student init trained for the same steps on the same rows with "
                   f"cross-entropy alone, {how}; KD gap closed = (CE - KD) / (CE - best teacher): 100% matches the "
                   f"best teacher, 0% is no better than the plain fine-tune, below 0 is worse.")


def _teacher_signal(domains: dict) -> list[str]:
    """Per domain and teacher: the weight distillation gave it and the share of positions it taught."""
    rows = [(d, t, u) for d, m in sorted(domains.items()) for t, u in (m.get("teacher_usage") or {}).items()]
    if not rows:
        return []
    L = ["| domain | teacher | weight | aligned positions | held-out loss |", "|---|---|---|---|---|"]
    for d, t, u in rows:
        used = u.get("used", True)
        L.append(f"| {d} | {t} | {_f(u.get('weight'), 3) if used else 'left out'} | "
                 f"{_f(u.get('aligned_positions_pct'), 1)}% | {_f(domains[d]['teachers'].get(t))} |")
    return L + ["", "Weight: the teacher's relative weight in the distillation target on that domain (registry "
                "weight x held-out quality; higher counts more). Aligned positions: the share of the student's positions that received this "
                "teacher's distribution (100% for teachers sharing the student's tokenizer).", ""]


def render(data: dict, plots: dict, plot_error: str | None = None) -> str:
    L = ["# Nexus run report", "",
         f"Generated {data['generated']} from events/log.jsonl (last seq {data['last_seq']}) and the artefacts on "
         f"disk; the same numbers are in report.json. Plan {'completed' if data['complete'] else 'NOT completed'}.", "",
         "## Teachers", "", "| teacher | model | params | layers | mode | critical layers |", "|---|---|---|---|---|---|"]
    for t in data["teachers"]:
        params = f"{t['params'] / 1e6:.2f}M" if isinstance(t.get("params"), int) else "–"
        L.append(f"| {t['teacher_id']}{'' if t['active'] else ' (removed)'} | {t.get('model_type') or '–'} | {params} | "
                 f"{t.get('layers') or '–'} | {t.get('mode') or '–'} | {t.get('critical_layers') or '–'} |")
    failed = [t for t in data["teachers"] if t.get("failed")]
    if failed:
        L += ["", "Left out of the plan (profile failed):", ""]
        L += [f"- {t['teacher_id']}: {' '.join(str(t['failed']).split())[:500]}" for t in failed]
    L += ["", f"Datasets: {', '.join(data['datasets']) or 'none'}.", "", "## Held-out loss per domain", ""]
    if data["domains"]:
        tids = sorted({t for m in data["domains"].values() for t in m["teachers"]})
        has_ce = any(m["ce_baseline"] is not None for m in data["domains"].values())
        head = ["domain", *[f"teacher {t}" for t in tids], "KD student",
                *(["CE baseline", "KD gap closed"] if has_ce else []), "tokens"]
        L += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for d, m in sorted(data["domains"].items()):
            row = [d, *[_f(m["teachers"].get(t)) for t in tids], _f(m["student"]),
                   *([_f(m["ce_baseline"]), _pct(m.get("kd_gap_closed"))] if has_ce else []), str(m["tokens"] or "–")]
            L.append("| " + " | ".join(row) + " |")
        L += ["", _heldout_note(data["domains"], has_ce), ""]
        L += _teacher_signal(data["domains"])
        L += _img(plots, "domains", "held-out loss per domain")
    else:
        L += ["No held-out evaluation yet (results/eval.json is written by the distill stage).", ""]
    L += ["## Student training loss", ""]
    if data["loss_curve"]:
        last = data["loss_curve"][-1]
        L += [f"{len(data['loss_curve'])} logged steps; last: step {last['step']}, loss {_f(last.get('loss'))}, "
              f"KD {_f(last.get('kd'))}, CE {_f(last.get('ce'))}.", ""] + _img(plots, "loss", "student loss curve")
    else:
        L += ["No distill progress in the event log yet.", ""]
    L += ["## Router", ""]
    r = data["router"]
    if r:
        L += [f"Held-out accuracy **{_f(r.get('heldout_accuracy'))}** (train {_f(r.get('train_accuracy'))}; "
              f"{r.get('heldout_source')}; samples {r.get('samples')}).", "",
              "| label | teacher |", "|---|---|"]
        L += [f"| {k} | {v} |" for k, v in sorted((r.get("teacher_per_label") or {}).items())] + [""]
    else:
        L += ["The router has not been trained yet (no results/router_weights/router.json).", ""]
    L += ["## Layer importance", ""]
    if data["layer_importance"]:
        for t, v in data["layer_importance"].items():
            L.append(f"- {t}: " + ", ".join(_f(x, 3) for x in v))
        L += [""] + _img(plots, "layers", "layer importance per teacher")
    else:
        L += ["No profile with layer importance yet.", ""]
    L += ["## Wall time per stage", "", "| stage | seconds |", "|---|---|"]
    L += [f"| {s} | {_f(v, 1)} |" for s, v in data["wall_time_s"].items()]
    L += ["", "| job | stage | teacher | status | attempts | seconds |", "|---|---|---|---|---|---|"]
    L += [f"| {j['job_id']} | {j['stage']} | {j['teacher_id'] or '–'} | {j['status']} | {j['attempts']} | "
          f"{_f(j['seconds'], 1)} |" for j in data["stages"]]
    sk = data["skipped"]
    L += ["", "## Skipped batches", "",
          f"Out-of-memory recoveries: {sk['oom_recoveries']}; sequences skipped on out-of-memory: "
          f"{sk['sequences_skipped_on_oom']}; distill skipped sequences (StageCompleted): "
          f"{sk['distill_skipped_sequences']}.", "", "## GPU temperature", ""]
    if data["temperature"]:
        temps = [p["temp_c"] for p in data["temperature"]]
        L += [f"{len(temps)} readings in thermal events, max {max(temps):.0f} °C.", ""]
        L += _img(plots, "temperature", "GPU temperature")
    else:
        L += ["No temperature readings in the event log (no thermal pause happened, or no GPU sensor).", ""]
    if data["missing"] or plot_error:
        L += ["## Missing", ""] + [f"- {m}" for m in data["missing"]]
        L += [f"- plots: {plot_error}"] if plot_error else []
        L.append("")
    return "\n".join(L)


def build_report(paths: Paths) -> Path:
    """Write results/report.json, results/report.md and its PNGs; returns report.md's path."""
    paths.results.mkdir(parents=True, exist_ok=True)
    data = collect(paths)
    plots, plot_error = {}, None
    try:
        plots = _plots(data, paths.results)
    except Exception as exc:  # a plot must never cost the numbers
        plot_error = f"could not draw ({type(exc).__name__}: {exc})"
    data["plots"] = plots
    write_json(paths.results / "report.json", data)
    target = paths.results / "report.md"
    write_text(target, render(data, plots, plot_error))
    return target
