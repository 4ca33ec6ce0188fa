"""`nexus run`: the whole pipeline in the foreground, top to bottom.

1. lock the workdir  2. Redis (REDIS_URL or embedded)  3. monitor  4. registry scan + plan
5. burst worker until the queue is empty, re-planning after each round  6. report, exit code.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import threading

import redis
import structlog

from nexus_core.broker.keys import StageStatus
from nexus_core.broker.server import connect, display_url, resolve_url
from nexus_core.config import Settings
from nexus_core.errors import RedisGoneError, WorkdirLockedError
from nexus_core.paths import Paths, check_lockable
from nexus_core.records.events import EventLog, load_state
from nexus_core.storage.atomic import sweep_stale_temps
from producer.enqueue import queue_for
from producer.sync import sync_once
from producer.watch import start_observer
from workers.context import Flags, install_process_handlers
from workers.worker import any_live_worker, run_worker

log = structlog.get_logger("nexus.run")
MAX_ROUNDS = 50
EXIT_INTERRUPTED = 130


class RunLock:
    """One `nexus run` per workdir: an flock on .nexus/run.lock, released by the kernel on any exit."""

    def __init__(self, paths: Paths):
        self.path = paths.run_lock
        self.fd: int | None = None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(self.fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(self.fd)
            raise WorkdirLockedError(f"another `nexus run` (pid {other}) is using {self.path.parent.parent}; "
                                     "wait for it or stop it (kill -TERM that pid)") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, str(os.getpid()).encode(), 0)
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)
        return False


def _start_monitor(paths: Paths, url: str) -> subprocess.Popen | None:
    env = {**os.environ, "REDIS_URL": url, "NEXUS_HOME": str(paths.home)}
    try:
        return subprocess.Popen([sys.executable, "-m", "nexus", "monitor", "--quiet-if-off"], env=env,
                                stdin=subprocess.DEVNULL)
    except OSError:
        return None


def _outcome(paths: Paths, run_seq: int, plan_router: str | None, rejected: bool, interrupted: bool) -> int:
    """0 the plan completed; 1 a stage failed; 2 bad input; 130 interrupted (a rerun resumes)."""
    if interrupted:
        return EXIT_INTERRUPTED
    state = load_state(paths)
    failed = [s for s in state.stages.values() if s.failed_seq and s.failed_seq > run_seq]
    if any(not s.bad_input for s in failed):
        return 1
    if failed or rejected:
        return 2
    router = state.stages.get(plan_router) if plan_router else None
    return 0 if router is not None and router.status == StageStatus.DONE else 1


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def run_pipeline(paths: Paths, cfg: Settings, console=None) -> int:
    from nexus.summary import print_summary

    paths.ensure()
    check_lockable(paths)
    # outside a job, SIGTERM stops like Ctrl+C (inside one, the job's handlers checkpoint first)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    install_process_handlers()
    with RunLock(paths):
        url, server = resolve_url(paths)
        conn = connect(url)
        events = EventLog(paths.log, redis=conn)
        if not any_live_worker(conn):  # nobody else writes here: half-written temps are litter
            for p in sweep_stale_temps((paths.memory, paths.checkpoints, paths.results, paths.release)):
                log.info("removed a temp file left by a killed writer", path=str(p))
        print(f"nexus run: pid {os.getpid()} (kill -USR1 {os.getpid()} checkpoints and pauses, "
              f"-USR2 checkpoints and carries on); Redis at {display_url(url)}", file=sys.stderr, flush=True)
        run_seq = events.append("RunStarted", data={"pid": os.getpid(), "redis": display_url(url),
                                                    "settings": cfg.to_dict()}).seq
        monitor = _start_monitor(paths, url)
        observer, dirty = start_observer(paths)
        stop_watch = threading.Event()
        last_plan = {"router": None, "rejected": False}

        def sync():
            result = sync_once(paths, cfg, conn, events, failed_since_seq=run_seq)
            if result.scan.rejected:
                last_plan["rejected"] = True
                for e in result.scan.rejected:
                    print(f"rejected: {e.data.get('message')}", file=sys.stderr)
            routers = [s.job_id for s in result.specs if s.stage == "router"]
            if result.plan is not None:
                last_plan["router"] = routers[0] if routers else None
            return result

        def watch_registry():  # a teacher dropped mid-run joins this run
            while not stop_watch.is_set():
                if dirty.event.wait(timeout=0.3):
                    dirty.event.clear()
                    try:
                        sync()
                    except Exception as exc:  # logged; the main loop syncs again after each round
                        log.error("registry sync failed", error=str(exc))

        watcher = threading.Thread(target=watch_registry, daemon=True)
        interrupted = False
        try:
            first = sync()
            if first.plan is None and not first.specs:
                print("nothing to do: no ready teacher in registry/ (see registry/README.md, or try --demo)",
                      file=sys.stderr)
                return 2
            watcher.start()
            for _ in range(MAX_ROUNDS):
                run_worker(conn, events, paths, burst=True)
                if Flags.stop_after_job:
                    interrupted = True
                    break
                result = sync()
                if not result.created and queue_for(conn).count == 0:
                    break
            code = _outcome(paths, run_seq, last_plan["router"], last_plan["rejected"], interrupted)
            if not interrupted:  # results/report.md + report.json, also after failures: they name what failed and
                # why (a failure here costs no work)
                try:
                    from nexus_core.records.report import build_report

                    build_report(paths)
                except Exception as exc:
                    log.error("report failed; rerun `nexus report`", error=str(exc))
            print_summary(paths, console=console, interrupted=interrupted)
            return code
        except KeyboardInterrupt:
            print("interrupted: partial work is saved; rerun `nexus run` to resume", file=sys.stderr)
            return EXIT_INTERRUPTED
        except (redis.ConnectionError, redis.TimeoutError, RedisGoneError) as exc:
            raise RedisGoneError(f"Redis at {display_url(url)} went away ({str(exc).splitlines()[0][:160]}); "
                                 "partial work is saved: rerun `nexus run` to resume") from None
        finally:
            stop_watch.set()
            observer.stop()
            if monitor is not None:
                monitor.terminate()
                try:
                    monitor.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    monitor.kill()
            try:
                events.append("RunFinished", data={"pid": os.getpid(), "interrupted": interrupted})
            except Exception:
                pass
            if server is not None:
                server.stop()
