"""Resume cost: `nexus run` after a kill -9 mid-distill -> the first new training step.

    python bench/bench_resume.py [--repeats 3] [--quick]

A tiny teacher and one tiny dataset in a temporary workdir (embedded Redis, as a user gets
with no REDIS_URL). `nexus run` is started and killed with SIGKILL (its whole process group,
the embedded Redis included) once distill has checkpointed; then, `repeats` times: start
`nexus run` again, time from just before the process is spawned to the first distill
StageProgress or CheckpointSaved after that run's RunStarted, and kill -9 it again.
The time is split into process start (-> RunStarted), job start (-> distill StageStarted, which
carries resume_step: orphan requeue, the job's imports, shard checks and checkpoint load, since the
stage reports itself started once set up) and the first step after it. A rerun that exits without
resuming (e.g. while the killed worker still counts as alive) is recorded and retried every 5 s;
`kill_to_first_step_s` is then the cost a user sees. Writes bench/out/bench_resume.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_queue import OUT, epoch, make_workdir, percentile, spawn_logged, stop, wait_until  # noqa: E402
from conftest import FAST_SETTINGS, register  # noqa: E402

from nexus_core.records.events import read_events

# Enough steps that each rerun is killed long before distill ends; a checkpoint every 2 steps.
ENV = {**FAST_SETTINGS, "NEXUS_DISTILL_MAX_STEPS": "2000", "NEXUS_DISTILL_CHECKPOINT_EVERY": "2"}


def _after(paths, seq: int, pred):
    return [e for e in read_events(paths.log) if e.seq > seq and pred(e)]


def _first_step(paths, run_seq: int):
    hits = _after(paths, run_seq, lambda e: e.stage == "distill" and e.type in ("StageProgress", "CheckpointSaved"))
    return hits[0] if hits else None


def _last_seq(paths) -> int:
    events = read_events(paths.log)
    return events[-1].seq if events else 0


def run(repeats: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="nexus-bench-resume-") as d:
        paths, model = make_workdir(Path(d))
        register(paths, "tiny", model)
        try:
            return _measure(paths, repeats)
        finally:  # a killed `nexus run` leaves its embedded Redis (own session) running: stop it
            _stop_embedded_redis(paths)


def _stop_embedded_redis(paths) -> None:
    import redis

    from nexus_core.broker.server import EmbeddedRedis

    url = EmbeddedRedis(paths).running_url()
    if url:
        try:
            redis.Redis.from_url(url).shutdown(nosave=True)
        except (redis.RedisError, OSError):
            pass  # a shutdown drops the connection: expected


def _measure(paths, repeats: int) -> dict:
    # 1. First run: until distill has checkpointed, then kill -9.
    proc = spawn_logged(paths, None, ENV, "run")
    wait_until(lambda: _after(paths, 0, lambda e: e.type == "CheckpointSaved" and e.stage == "distill"), 600,
               "the first distill checkpoint", [proc])
    stop(proc[0], 9)
    killed_at = time.time()
    rows = []
    for _ in range(repeats):
        # 2. Rerun, timed from just before the spawn; kill -9 again at its first step. A rerun that
        #    exits without resuming (the dead worker still counts as alive) is recorded and retried.
        failed = []
        while True:
            seq0 = _last_seq(paths)
            t0 = time.time()
            proc = spawn_logged(paths, None, ENV, "run")
            try:
                run_ev = wait_until(lambda: next(iter(_after(paths, seq0, lambda e: e.type == "RunStarted")), None),
                                    300, "RunStarted", [proc])
                first = wait_until(lambda: _first_step(paths, run_ev.seq), 300, "the first resumed step", [proc])
                break
            except RuntimeError:  # exited early
                failed.append({"rc": proc[0].returncode, "seconds_after_kill": round(t0 - killed_at, 1)})
                print(f"resume: rerun exited {proc[0].returncode} without resuming; retrying in 5 s",
                      file=sys.stderr, flush=True)
                if len(failed) > 20:
                    raise
                time.sleep(5)
        stop(proc[0], 9)
        started = _after(paths, run_ev.seq, lambda e: e.type == "StageStarted" and e.stage == "distill")[0]
        rows.append({"total_s": round(epoch(first.ts) - t0, 3),
                     "process_start_s": round(epoch(run_ev.ts) - t0, 3),
                     "job_start_s": round(epoch(started.ts) - epoch(run_ev.ts), 3),
                     "first_step_s": round(epoch(first.ts) - epoch(started.ts), 3),
                     "resume_step": started.data.get("resume_step"), "first_event": first.type,
                     "first_event_step": first.data.get("step"),
                     "failed_reruns": failed, "kill_to_first_step_s": round(epoch(first.ts) - killed_at, 3),
                     # where the time between RunStarted and the first step goes (for diagnosis)
                     "timeline": [[round(epoch(e.ts) - epoch(run_ev.ts), 3), e.type, e.stage, e.job_id]
                                  for e in _after(paths, run_ev.seq - 1, lambda e: e.seq <= first.seq)]})
        killed_at = time.time()
        print(f"resume: {({k: v for k, v in rows[-1].items() if k != 'timeline'})}", file=sys.stderr, flush=True)
    totals = [r["total_s"] for r in rows]
    return {"repeats": repeats, "p50_s": percentile(totals, 50), "max_s": max(totals), "min_s": min(totals),
            "rows": rows}


def table(r: dict) -> str:
    lines = ["| rerun | total s | process start s | job start (requeue, imports, checkpoint load) s | first step s | "
             "resume step | reruns that exited without resuming | kill -> first step s |", "|---|---|---|---|---|---|---|---|"]
    for i, x in enumerate(r["rows"], 1):
        failed = x.get("failed_reruns") or []
        lines.append(f"| {i} | {x['total_s']:.2f} | {x['process_start_s']:.2f} | {x['job_start_s']:.2f} | "
                     f"{x['first_step_s']:.2f} | {x['resume_step']} | {len(failed)}"
                     f"{' (rc ' + ', '.join(str(f['rc']) for f in failed) + ')' if failed else ''} | "
                     f"{x.get('kill_to_first_step_s', float('nan')):.1f} |")
    lines.append(f"\nTotal = the successful rerun's spawn -> its first step: median {r['p50_s']:.2f} s, min "
                 f"{r['min_s']:.2f} s, max {r['max_s']:.2f} s over {r['repeats']} reruns. A rerun that exits without "
                 "resuming is retried every 5 s (a user would rerun by hand).")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="one rerun")
    a = ap.parse_args()
    result = run(1 if a.quick else a.repeats)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "bench_resume.json").write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
