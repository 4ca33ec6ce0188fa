"""What `nexus status` and the end of `nexus run` show: the replayed state as tables."""

from __future__ import annotations

import json

from rich.console import Console
from rich.table import Table

from nexus_core.paths import Paths
from nexus_core.records.events import load_state
from nexus_core.records.state import State

_STAGE_ORDER = {"profile": 0, "extract": 1, "distill": 2, "router": 3}


def _progress_text(st) -> str:
    p = st.progress or {}
    if "step" in p and "steps" in p:
        return f"step {p['step']}/{p['steps']}" + (f" loss {p['loss']:.3f}" if isinstance(p.get("loss"), (int, float)) else "")
    rate = f" {p['tokens_per_s']:.0f} tok/s" if isinstance(p.get("tokens_per_s"), (int, float)) else ""
    if "sequences" in p and "sequences_total" in p:  # extraction, by sequences (shards are coarse)
        return f"{p['sequences']}/{p['sequences_total']} sequences{rate}"
    if "shard" in p and "shards" in p:
        return f"shard {p['shard']}/{p['shards']}" + (f" {p['tokens_per_s']:.0f} tok/s" if isinstance(p.get("tokens_per_s"), (int, float)) else "")
    if p.get("paused"):
        return f"paused ({p['paused']})"
    return ""


def _part(st) -> list | None:
    """[r, R] of an extract job that does block r of R of its dataset (extract.ranges > 1), else None."""
    return (st.spec or {}).get("range")


def _stage_name(st) -> str:
    part = _part(st)
    return f"{st.stage} {part[0] + 1}/{part[1]}" if part else st.stage


def status_dict(state: State, live: dict | None = None) -> dict:
    stages = sorted(state.stages.values(), key=lambda s: (_STAGE_ORDER.get(s.stage, 9), s.teacher_id or "", s.dataset or "",
                                                          _part(s) or []))
    return {
        "last_seq": state.last_seq,
        "teachers": [{"teacher_id": t.teacher_id, "active": t.active, "status": t.teacher.status,
                      "source": t.source, "path": t.teacher.path}
                     for t in sorted(state.teachers.values(), key=lambda t: t.teacher_id)],
        "rejections": [{"source": src, "reason": reason, **r} for src, by_reason in sorted(state.rejections.items())
                       for reason, r in by_reason.items()],
        "stages": [{"job_id": s.job_id, "stage": s.stage, "teacher_id": s.teacher_id, "dataset": s.dataset,
                    "part": _part(s), "status": s.status.value, "description": s.description, "attempts": s.attempts,
                    "progress": s.progress, "resume": s.resume, "error": s.error,
                    "last_checkpoint": s.last_checkpoint} for s in stages],
        "thermal": state.thermal,
        "oom_recovered": len(state.oom),
        "live": live or {},
    }


def live_info(paths: Paths) -> dict:
    """Temperature and pause state from Redis when one is reachable; nothing otherwise."""

    from nexus_core.broker import keys
    from nexus_core.broker.server import EmbeddedRedis, _ping, connect, redis_url_from_env

    url = redis_url_from_env() or EmbeddedRedis(paths).running_url()
    if not url or not _ping(url):
        return {}
    conn = connect(url)
    out = {"pause": keys.read_pause(conn)}
    raw = conn.get(keys.MONITOR_TEMP_KEY)
    if raw:
        try:
            out["gpu"] = json.loads(raw)
        except ValueError:
            pass
    try:
        from rq import Queue

        from nexus_core.records.job import JobSerializer

        out["queued"] = Queue(keys.QUEUE, connection=conn, serializer=JobSerializer).count
    except Exception:
        pass
    return out


def print_status(state: State, console: Console | None = None, live: dict | None = None) -> None:
    console = console or Console(stderr=False)
    d = status_dict(state, live)
    if d["teachers"]:
        t = Table(title="teachers", title_justify="left")
        for col in ("teacher", "status", "registry file"):
            t.add_column(col)
        for row in d["teachers"]:
            t.add_row(row["teacher_id"], row["status"] if row["active"] else "removed", row["source"])
        console.print(t)
    if d["rejections"]:
        for r in d["rejections"]:
            console.print(f"[red]rejected[/red] {r['source']}: {r['reason']}")
    if d["stages"]:
        t = Table(title="stages", title_justify="left")
        for col in ("stage", "teacher", "dataset", "status", "progress", "job id"):
            t.add_column(col)
        colours = {"done": "green", "failed": "red", "running": "yellow", "paused": "magenta", "queued": "cyan"}
        for s in d["stages"]:
            status = s["status"]
            text = f"[{colours.get(status, 'white')}]{status}[/]"
            if status == "failed" and s["error"]:
                text += f" {s['error'][:80]}"
            st = state.stages[s["job_id"]]
            t.add_row(_stage_name(st), s["teacher_id"] or "-", s["dataset"] or "-", text, _progress_text(st), s["job_id"])
        console.print(t)
    else:
        console.print("no stages yet: drop a teacher JSON into registry/ and run `nexus run` (or `nexus watch` + `nexus worker`)")
    th = d["thermal"]
    live = d["live"]
    gpu = live.get("gpu") or {}
    temp = gpu.get("temp_c", th.get("temp_c"))
    line = f"thermal: {'PAUSED' if (live.get('pause') or th.get('paused')) else 'ok'}"
    if temp is not None:
        line += f", GPU {temp} C"
    if d["oom_recovered"]:
        line += f"; out-of-memory recoveries: {d['oom_recovered']}"
    if "queued" in live:
        line += f"; jobs waiting in queue: {live['queued']}"
    console.print(line)


def print_summary(paths: Paths, console: Console | None = None, interrupted: bool = False) -> None:
    """The end of `nexus run`: on stdout, so `nexus run > summary.txt` keeps the result and the logs
    (stderr) stay on the terminal."""
    console = console or Console()
    state = load_state(paths)
    print_status(state, console)
    if interrupted:
        console.print("[magenta]paused[/]: progress is saved; rerun `nexus run` to resume")
        return
    if (paths.release / "config.json").exists():
        console.print(f"student: {paths.release}  (AutoModelForCausalLM.from_pretrained('{paths.release}'))")
    if (paths.router_dir / "router.json").exists():
        console.print('router:  nexus route "What is 12 + 30?"')
    report = paths.results / "report.md"
    if report.exists():
        console.print(f"report:  {report}")
