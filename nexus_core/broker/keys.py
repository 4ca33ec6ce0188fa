"""Every Redis name Nexus uses, and the status enums, in one place (cf. rq's job.py)."""

from __future__ import annotations

import json
from enum import Enum

QUEUE = "nexus"  # the one RQ queue
EVENTS_STREAM = "nexus:events"  # mirror of events/log.jsonl for live views
EVENTS_STREAM_MAXLEN = 100_000
PAUSE_KEY = "nexus:pause"  # JSON reason, TTL = pause length
CONTROL_CHANNEL = "nexus:control"  # pub/sub: {"cmd": "pause"|"resume", ...}
MONITOR_TEMP_KEY = "nexus:gpu:temp"  # last temperature the monitor read (JSON)
ALIVE_KEY = "nexus:alive:{}"  # per worker name; refreshed while it lives, even mid-job
GPU_CLAIM_KEY = "nexus:gpu-claim:{}"  # GPU index -> worker name; one worker per GPU (compose --scale)
FAILED_TTL_S = 30 * 86400  # how long RQ keeps a failed (or refused) job for `rq info`
ALIVE_TTL_S = 30  # the dead-worker timeout: a started job whose worker is silent this long is an orphan


class StageStatus(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"
    PAUSED = "paused"


class Stage(str, Enum):
    PROFILE = "profile"
    EXTRACT = "extract"
    DISTILL = "distill"
    ROUTER = "router"


def pause_message(seconds: float, reason: str, **extra) -> str:
    return json.dumps({"cmd": "pause", "seconds": seconds, "reason": reason, **extra})


def resume_message() -> str:
    return json.dumps({"cmd": "resume"})


def set_pause(conn, seconds: float, reason: str, pipeline=None, **extra) -> None:
    """Pause key first (so a listener that missed the publish still sees it), then publish."""
    msg = pause_message(seconds, reason, **extra)
    p = pipeline or conn.pipeline()
    p.set(PAUSE_KEY, msg, px=max(1, int(seconds * 1000)))
    p.publish(CONTROL_CHANNEL, msg)
    if pipeline is None:
        p.execute()


def clear_pause(conn, pipeline=None) -> None:
    p = pipeline or conn.pipeline()
    p.delete(PAUSE_KEY)
    p.publish(CONTROL_CHANNEL, resume_message())
    if pipeline is None:
        p.execute()


def read_pause(conn) -> dict | None:
    raw = conn.get(PAUSE_KEY)
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return {"cmd": "pause", "reason": "unknown"}
