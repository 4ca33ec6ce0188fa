"""`nexus` command line. Settings flags are generated from nexus_core.config (one source)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
from datetime import datetime, timezone

import redis

from nexus_core.config import add_cli_flags, keep_settings, load_settings
from nexus_core.errors import NexusError
from nexus_core.paths import Paths, check_lockable


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nexus", description="Self-driving knowledge distillation: registry/ in, student out.")
    p.add_argument("--log-json", action="store_true", help="structured logs as JSON lines")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="the whole pipeline in the foreground; skips what is done, resumes what is partial")
    run.add_argument("--reset", action="store_true", help="archive the log and delete artefacts first")
    run.add_argument("--demo", action="store_true", help="generate demo data and teachers, then run (and "
                     "--baseline); the workdir's nexus.toml keeps the demo's settings")
    run.add_argument("--baseline", action="store_true", help="after the run, train the plain fine-tune baseline "
                     "(cross-entropy only, best of a small lr sweep, same student, rows and steps) for the report")
    add_cli_flags(run)

    for name, help_ in (("watch", "the producer: watch registry/, record events, enqueue chains"),
                        ("worker", "the single GPU worker on queue `nexus`"),
                        ("monitor", "poll GPU temperature, publish pause/resume on nexus:control")):
        sp = sub.add_parser(name, help=help_)
        if name == "worker":
            sp.add_argument("--burst", action="store_true", help="exit when the queue is empty")
        if name == "monitor":
            sp.add_argument("--quiet-if-off", action="store_true", help=argparse.SUPPRESS)
        add_cli_flags(sp)

    st = sub.add_parser("status", help="state rebuilt from the event log")
    st.add_argument("--json", action="store_true")
    st.add_argument("--watch", action="store_true", help="refresh every 2 s")
    rp = sub.add_parser("replay", help="replay the log; --requeue re-enqueues unfinished stages")
    rp.add_argument("--requeue", action="store_true")
    rp.add_argument("--json", action="store_true")
    rs = sub.add_parser("reset", help="archive the log; delete memory/, checkpoints/, nexus-release-v1/, results/")
    rs.add_argument("--yes", action="store_true", help="do not ask")
    ro = sub.add_parser("route", help="the router's intent for a prompt")
    ro.add_argument("text")
    ro.add_argument("--json", action="store_true")
    sub.add_parser("report", help="rebuild results/report.md and report.json from the log and artefacts")
    return p


# The demo distils from a small slice of its data for many steps: the data-limited regime
# where a teacher's soft targets matter (a plain fine-tune overfits). Any flag, variable or
# nexus.toml key still wins over these.
DEMO_DEFAULTS = {"extract": {"max_samples": 256}, "distill": {"max_steps": 400, "epochs": 1000}}


def cmd_run(args, paths: Paths) -> int:
    from nexus.run import run_pipeline

    cfg = load_settings(paths.home, args, defaults=DEMO_DEFAULTS if args.demo else None)
    if args.reset:
        reset_workdir(paths)
    if args.demo:
        from nexus_core.demo.prepare import DemoSpec, prepare_demo

        paths.ensure()
        # the workdir keeps the demo's settings: a later plain `nexus run` here resolves the same ones
        kept = keep_settings(paths.home, args, DEMO_DEFAULTS, why="kept by `nexus run --demo`")
        if kept is not None:
            print(f"nexus run: the demo's settings are kept in {kept}", file=sys.stderr)
        small = os.environ.get("NEXUS_TEST_DEMO_SMALL") == "1"  # test hook: tiny demo teachers (seconds)
        prepare_demo(paths, cfg, spec=DemoSpec.small() if small else None)
    code = run_pipeline(paths, cfg)
    if code == 0 and (args.demo or args.baseline):
        from nexus.demo_summary import baseline_and_summary

        baseline_and_summary(paths, cfg, demo=args.demo)
    return code


def cmd_watch(args, paths: Paths) -> int:
    from nexus_core.broker.server import connect, display_url, resolve_url
    from nexus_core.records.events import EventLog
    from producer.watch import watch

    cfg = load_settings(paths.home, args)
    paths.ensure()
    check_lockable(paths)
    url, _server = resolve_url(paths)  # an embedded server started here outlives this process on purpose
    conn = connect(url)
    stop = threading.Event()
    _stop_on_signals(stop)
    print(f"nexus watch: watching {paths.registry} (Redis {display_url(url)})", file=sys.stderr, flush=True)
    watch(paths, cfg, conn, EventLog(paths.log, redis=conn), stop)
    return 0


def cmd_worker(args, paths: Paths) -> int:
    from nexus_core.broker.server import connect, display_url, resolve_url
    from nexus_core.records.events import EventLog
    from workers.worker import run_worker

    load_settings(paths.home, args)  # validates nexus.toml / flags early; jobs carry their own settings
    paths.ensure()
    url, _server = resolve_url(paths)
    conn = connect(url)
    print(f"nexus worker: pid {os.getpid()} on queue nexus (Redis {display_url(url)})", file=sys.stderr, flush=True)
    check_lockable(paths)
    run_worker(conn, EventLog(paths.log, redis=conn), paths, burst=args.burst, device=args.cfg__run__device)
    return 0


def cmd_monitor(args, paths: Paths) -> int:
    from nexus_core.broker.server import connect, resolve_url
    from workers.monitor import main as monitor_main

    cfg = load_settings(paths.home, args)
    url, _server = resolve_url(paths)
    return monitor_main(cfg, paths, connect(url), quiet_if_off=args.quiet_if_off)


def _stop_on_signals(stop: threading.Event) -> None:
    import signal

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, lambda *_: stop.set())


def _state(paths: Paths):
    from nexus_core.records.events import load_state

    return load_state(paths)


def cmd_status(args, paths: Paths) -> int:
    from rich.console import Console

    from nexus.summary import live_info, print_status, status_dict

    while True:
        state = _state(paths)
        live = live_info(paths)
        if args.json:
            print(json.dumps(status_dict(state, live), indent=2, default=str))
        else:
            console = Console()
            if args.watch:
                console.clear()
            print_status(state, console, live)
        if not args.watch:
            return 0
        time.sleep(2)


def cmd_replay(args, paths: Paths) -> int:
    from nexus.summary import status_dict
    from nexus_core.records.events import read_events, replay

    t0 = time.perf_counter()
    events = read_events(paths.log)
    state = replay(events)
    dt = time.perf_counter() - t0
    if args.requeue:
        requeued = requeue_from_log(paths, state)
        print(f"requeued {len(requeued)} stage(s): {', '.join(requeued) or '-'}", file=sys.stderr)
    if args.json:
        print(json.dumps(status_dict(state), indent=2, default=str))
    else:
        rate = len(events) / dt if dt > 0 else float("inf")
        print(f"replayed {len(events)} events in {dt:.3f}s ({rate:,.0f} events/s); last seq {state.last_seq}")
    return 0


def requeue_from_log(paths: Paths, state) -> list[str]:
    """Rebuild the queue from the log alone: every stage not done (with intact artefacts)."""
    from nexus_core.broker.server import connect, resolve_url
    from nexus_core.config import load_settings as _ls
    from nexus_core.records.events import EventLog
    from nexus_core.records.job import JobPayload
    from producer.enqueue import enqueue_specs
    from producer.planner import JobSpec

    url, _server = resolve_url(paths)
    conn = connect(url)
    specs = []
    for st in state.stages.values():
        if st.spec is None:
            continue
        specs.append(JobSpec(st.job_id, st.stage, st.description, st.teacher_id, st.dataset, st.plan,
                             tuple(st.depends_on), JobPayload.from_dict(st.spec)))
    order = {"profile": 0, "extract": 1, "distill": 2, "router": 3}
    specs.sort(key=lambda s: order.get(s.stage, 9))
    timeout = _ls(paths.home).run.job_timeout_s
    return enqueue_specs(specs, conn, EventLog(paths.log, redis=conn), state, paths.home, timeout, reason="requeue")


def reset_workdir(paths: Paths) -> None:
    """Archive the log (history is kept) and delete every artefact; registry/ and datasets/ stay."""
    from nexus_core.records.events import EventLog

    paths.ensure()
    if paths.log.exists() and paths.log.stat().st_size:
        paths.archive.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        paths.log.rename(paths.archive / f"log-{stamp}.jsonl")
    for folder in (paths.memory, paths.checkpoints, paths.release, paths.results):
        if folder.exists():
            for child in folder.iterdir():
                if child.name == "README.md" and folder != paths.release:
                    continue  # the folder's own README; the release's README is its model card
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    _clear_queue(paths)
    EventLog(paths.log).append("PipelineReset", data={"archived": True})


def _clear_queue(paths: Paths) -> None:

    from nexus_core.broker import keys
    from nexus_core.broker.server import EmbeddedRedis, _ping, connect, redis_url_from_env

    url = redis_url_from_env() or EmbeddedRedis(paths).running_url()
    if not url or not _ping(url):
        return
    from rq import Queue

    from nexus_core.records.job import JobSerializer

    conn = connect(url)
    q = Queue(keys.QUEUE, connection=conn, serializer=JobSerializer)
    for reg in (q.finished_job_registry, q.failed_job_registry, q.deferred_job_registry,
                q.canceled_job_registry, q.started_job_registry):
        for jid in reg.get_job_ids(cleanup=False):
            try:
                reg.remove(jid, delete_job=True)
            except Exception:
                pass
    q.empty()


def cmd_reset(args, paths: Paths) -> int:
    if not args.yes:
        if not sys.stdin.isatty():
            print("nexus reset: pass --yes to confirm (it deletes memory/, checkpoints/, nexus-release-v1/, results/)",
                  file=sys.stderr)
            return 2
        answer = input(f"Archive the log and delete all artefacts under {paths.home}? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            return 1
    reset_workdir(paths)
    print(f"reset: log archived under {paths.archive}, artefacts deleted", file=sys.stderr)
    return 0


def cmd_route(args, paths: Paths) -> int:
    from nexus_core.stages.router import route

    out = route(paths, args.text)
    out = {"intent": out["label"], **out}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        probs = ", ".join(f"{k} {v:.2f}" for k, v in sorted(out.get("probabilities", {}).items(), key=lambda kv: -kv[1]))
        print(f"{out['intent']}  (teacher: {out.get('teacher')})  [{probs}]")
    return 0


def cmd_report(args, paths: Paths) -> int:
    from nexus_core.records.report import build_report

    out = build_report(paths)
    print(f"report: {out}")
    return 0


COMMANDS = {"run": cmd_run, "watch": cmd_watch, "worker": cmd_worker, "monitor": cmd_monitor, "status": cmd_status,
            "replay": cmd_replay, "reset": cmd_reset, "route": cmd_route, "report": cmd_report}


def main(argv: list[str] | None = None) -> int:
    from nexus.logs import setup_logging

    args = _parser().parse_args(argv)
    setup_logging(json_lines=args.log_json)
    paths = Paths.from_env()
    try:
        return COMMANDS[args.command](args, paths)
    except NexusError as exc:
        print(f"nexus {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except (redis.ConnectionError, redis.TimeoutError) as exc:  # a Redis that went away outside a run's loop
        print(f"nexus {args.command}: Redis went away ({str(exc).splitlines()[0][:160]}); partial work is saved: "
              f"rerun to resume", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"nexus {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
