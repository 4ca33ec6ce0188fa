"""Queue latency: registry drop -> `StageStarted profile`, with real `nexus watch` + `nexus worker`.

    python bench/bench_queue.py [--drops 8] [--quick]

A tiny Llama teacher and one tiny dataset in a temporary workdir, fast settings (as the
tests use). Teachers are dropped one at a time (each a new teacher_id pointing at the same
model folder); latency is measured from just before the registry file is written to the
`ts` of the StageStarted event of that teacher's profile job (the first drop, which also pays the
worker's first imports, is reported apart from the percentiles). Before the next drop the
worker is left to go idle (no stage queued or running in the log, RQ queue and registries
empty). Target: p95 <= 2 s. Writes bench/out/bench_queue.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from nexus_core.broker.keys import StageStatus
from nexus_core.paths import Paths  # noqa: E402
from nexus_core.records.events import load_state, read_events
from tests.helpers import ARITH, FAST_SETTINGS, nexus_env, register, write_dataset  # noqa: E402

OUT = ROOT / "bench" / "out"
QUICK_ENV = {"NEXUS_DISTILL_MAX_STEPS": "2", "NEXUS_ROUTER_EPOCHS": "1", "NEXUS_ROUTER_MAX_SAMPLES": "20",
             "NEXUS_EXTRACT_MAX_SAMPLES": "8", "NEXUS_PROFILE_CALIBRATION_SAMPLES": "2"}


def epoch(ts: str) -> float:
    return datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp()


def percentile(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation: with few samples p95 is the max)."""
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, int(-(-q * len(s) // 100)) - 1))]


def make_workdir(root: Path) -> tuple[Paths, Path]:
    """A workdir with one tiny dataset, and a tiny 2-layer Llama teacher folder (not yet registered)."""
    from nexus_core.demo.model_factory import make_teacher

    paths = Paths(root / "home").ensure()
    write_dataset(paths, "reasoning/arith", [{"question": q.split("\n")[0], "answer": q.split("\n")[1]} for q in ARITH])
    model = make_teacher(root / "teacher", ARITH, arch="llama", vocab_size=256, hidden=32, layers=2, heads=2, kv_heads=1)
    return paths, model


def start_redis(root: Path):
    """An embedded server under root; NEXUS_BENCH_REDIS_URL instead when set (a spare database: it is flushed)."""
    if os.environ.get("NEXUS_BENCH_REDIS_URL"):
        return os.environ["NEXUS_BENCH_REDIS_URL"], None
    from nexus_core.broker.server import EmbeddedRedis

    server = EmbeddedRedis(Paths(root / "redis-home"))
    return server.start(), server


def spawn_logged(paths: Paths, url: str, env: dict, *args) -> tuple[subprocess.Popen, Path]:
    """`nexus <args>` with its output in a file (a pipe nobody reads would fill and block it)."""
    log = paths.home.parent / f"{args[0]}.log"
    fh = open(log, "ab")
    proc = subprocess.Popen([sys.executable, "-m", "nexus", *args], env=nexus_env(paths, url, env), cwd=paths.home,
                            stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    fh.close()
    return proc, log


def stop(proc: subprocess.Popen, sig: int = 15) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, 9)
            proc.wait(timeout=20)


def wait_until(pred, timeout: float, what: str, procs=(), poll: float = 0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = pred()
        if value:
            return value
        for p, log in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{log.stem} exited with {p.returncode} while waiting for {what}:\n"
                                   f"{log.read_text()[-8000:]}")
        time.sleep(poll)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def _idle(paths: Paths, conn) -> bool:
    from rq import Queue
    from rq.registry import DeferredJobRegistry, StartedJobRegistry

    state = load_state(paths)
    busy = [s for s in state.stages.values() if s.status in (StageStatus.QUEUED, StageStatus.RUNNING)]
    q = Queue("nexus", connection=conn)
    return not busy and q.count == 0 and StartedJobRegistry(queue=q).count == 0 and DeferredJobRegistry(queue=q).count == 0


def wait_idle(paths: Paths, conn, procs, settle: float = 2.5, timeout: float = 600) -> None:
    """Idle and still idle `settle` s later (the producer re-plans a few seconds after the log grows)."""
    since = None

    def settled():
        nonlocal since
        if not _idle(paths, conn):
            since = None
            return False
        since = since or time.time()
        return time.time() - since >= settle

    wait_until(settled, timeout, "the worker to go idle", procs, poll=0.25)


def _profile_started(paths: Paths, tid: str):
    for e in read_events(paths.log):
        if e.type == "StageStarted" and e.stage == "profile" and e.teacher_id == tid:
            return e
    return None


def run(drops: int, quick: bool) -> dict:
    import redis

    with tempfile.TemporaryDirectory(prefix="nexus-bench-queue-") as d:
        root = Path(d)
        paths, model = make_workdir(root)
        url, server = start_redis(root)
        conn = redis.Redis.from_url(url)
        if server is None:
            conn.flushdb()
        env = {**FAST_SETTINGS, **(QUICK_ENV if quick else {})}
        procs = []
        try:
            procs = [spawn_logged(paths, url, env, "watch"), spawn_logged(paths, url, env, "worker")]
            for _, log in procs:  # both print one line once they are listening
                wait_until(lambda: log.exists() and b"nexus " in log.read_bytes(), 120, f"{log.stem} to start", procs)
            rows = []
            for i in range(drops):
                tid = f"drop{i:02d}"
                t0 = time.time()
                register(paths, tid, model)  # the measured drop: one file write
                ev = wait_until(lambda: _profile_started(paths, tid), 300, f"StageStarted profile {tid}", procs)
                rows.append({"teacher_id": tid, "latency_s": round(epoch(ev.ts) - t0, 4)})
                print(f"drop {i}: {rows[-1]['latency_s']:.3f} s", file=sys.stderr, flush=True)
                if i + 1 < drops:  # the last drop's chain need not finish
                    wait_idle(paths, conn, procs)
        finally:
            for p, _ in procs:
                stop(p)
            if server is not None:
                server.stop()
            else:
                conn.flushdb()
    # The first drop after the worker starts also pays its first job's imports (torch, transformers):
    # reported on its own; the percentiles are over the drops that follow it.
    lat = [r["latency_s"] for r in rows[1:]] or [rows[0]["latency_s"]]
    return {"drops": drops, "quick": quick, "first_drop_s": rows[0]["latency_s"], "samples": len(lat),
            "p50_s": percentile(lat, 50), "p95_s": percentile(lat, 95),
            "max_s": max(lat), "mean_s": sum(lat) / len(lat), "rows": rows, "target_p95_s": 2.0,
            "redis": "NEXUS_BENCH_REDIS_URL" if server is None else "embedded"}


def table(r: dict) -> str:
    return (f"| drops (warm) | first drop s | p50 s | p95 s | max s | target p95 |\n|---|---|---|---|---|---|\n"
            f"| {r['drops']} ({r['samples']}) | {r['first_drop_s']:.3f} | {r['p50_s']:.3f} | {r['p95_s']:.3f} | "
            f"{r['max_s']:.3f} | <= 2 s |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--drops", type=int, default=9, help="drops in all, the first one cold")
    ap.add_argument("--quick", action="store_true", help="2 drops, minimal downstream work")
    a = ap.parse_args()
    result = run(2 if a.quick else a.drops, a.quick)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "bench_queue.json").write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
