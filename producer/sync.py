"""One producer pass: registry scan -> events -> plan -> enqueue. Idempotent; safe to repeat."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from nexus_core import data as datasets_mod
from nexus_core.config import Settings
from nexus_core.paths import Paths
from nexus_core.records.events import EventLog, load_state
from nexus_core.records.plan import DistillPlan
from producer.enqueue import enqueue_specs
from producer.planner import JobSpec, plan_jobs
from producer.scan import ScanResult, scan_registry

_lock = threading.Lock()  # the observer thread and the main loop of `nexus run` both sync


@dataclass
class SyncResult:
    scan: ScanResult
    specs: list[JobSpec] = field(default_factory=list)
    plan: DistillPlan | None = None
    created: list[str] = field(default_factory=list)


def sync_once(paths: Paths, cfg: Settings, conn, events: EventLog, failed_since_seq: int | None = None,
              wait_for_writes: bool = True) -> SyncResult:
    with _lock:
        state = load_state(paths)
        scan = scan_registry(paths, events, state, wait=wait_for_writes)
        if scan.events:  # the log grew (and other processes may have appended between): read it again
            state = load_state(paths)
        refs = datasets_mod.select(paths, cfg.run.datasets)
        specs, plan = plan_jobs(state, cfg, [r.key for r in refs], str(paths.home), failed_since_seq)
        created = enqueue_specs(specs, conn, events, state, paths.home, cfg.run.job_timeout_s)
        return SyncResult(scan, specs, plan, created)
