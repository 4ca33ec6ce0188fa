"""Replay speed: events/s folding a 100k-event log (target >= 200k events/s).

    python bench/bench_replay.py [--events 100000]

Writes a realistic log (teachers, queued/started/progress/checkpoint/completed stages)
with the real appender's line format, then times read + fold in this process.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nexus_core.records.events import Event, read_events, replay, utc_now


def write_log(path: Path, n: int) -> None:
    lines = []
    seq = 0

    def add(type_, **kw):
        nonlocal seq
        seq += 1
        lines.append(Event(seq=seq, ts=utc_now(), type=type_, **kw).to_json())

    t = 0
    while seq < n:
        tid = f"teacher-{t}"
        add("TeacherAdded", teacher_id=tid, data={"teacher": {"teacher_id": tid, "path": "/m", "status": "ready",
                                                              "source": f"registry/{tid}.json"}})
        for stage in ("profile", "extract", "distill"):
            jid = f"{stage}-{t:012d}"
            add("StageQueued", teacher_id=tid, stage=stage, job_id=jid, data={"description": f"{stage} {tid}"})
            add("StageStarted", teacher_id=tid, stage=stage, job_id=jid, data={"resume_step": 0})
            for step in range(60):
                add("StageProgress", teacher_id=tid, stage=stage, job_id=jid,
                    data={"step": step, "steps": 60, "loss": 1.0 / (step + 1), "tokens_per_s": 1234.5})
                if step % 20 == 19:
                    add("CheckpointSaved", teacher_id=tid, stage=stage, job_id=jid, data={"step": step, "reason": "periodic"})
            add("StageCompleted", teacher_id=tid, stage=stage, job_id=jid,
                data={"artifacts": [{"path": f"memory/{tid}/x.safetensors", "size": 10, "sha256": "0" * 64}]})
        t += 1
    path.write_text("\n".join(lines[:n]) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "log.jsonl"
        write_log(path, args.events)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            state = replay(read_events(path))
            times.append(time.perf_counter() - t0)
        assert state.last_seq == args.events
        best, med = min(times), sorted(times)[len(times) // 2]
        result = {"events": args.events, "bytes": path.stat().st_size, "median_s": med, "best_s": best,
                  "events_per_s_median": args.events / med, "machine": platform.platform(),
                  "python": platform.python_version()}
    out = Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    (out / "replay.json").write_text(json.dumps(result, indent=2))
    print(f"| events | log MB | median s | events/s (median) |\n|---|---|---|---|\n"
          f"| {args.events:,} | {result['bytes'] / 1e6:.1f} | {med:.3f} | {result['events_per_s_median']:,.0f} |")


if __name__ == "__main__":
    main()
