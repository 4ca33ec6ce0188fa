"""`nexus watch`: a watchdog observer on registry/ that keeps the queue in line with it.

Events are debounced (a file written in two parts produces one TeacherAdded), a full
rescan runs at start (drops made while the producer was down are not lost), and the
plan is refreshed whenever the log grows (a failed or finished stage can change it).
"""

from __future__ import annotations

import threading
import time

import structlog
from watchdog.events import FileSystemEventHandler
from watchdog.observers import Observer

from nexus_core.config import Settings
from nexus_core.errors import NexusError
from nexus_core.paths import Paths
from nexus_core.records.events import EventLog, load_state
from producer.sync import sync_once

log = structlog.get_logger("nexus.producer")
DEBOUNCE_S = 0.3
REPLAN_EVERY_S = 2.0  # a growing log (progress events) re-plans at most this often


_CHANGES = {"created", "modified", "moved", "deleted", "closed"}


class _Dirty(FileSystemEventHandler):
    def __init__(self):
        self.changed_at = 0.0
        self.event = threading.Event()

    def on_any_event(self, event):
        # reads of registry files (our own scans) raise opened/closed_no_write: not changes
        if event.is_directory or event.event_type not in _CHANGES:
            return
        self.changed_at = time.monotonic()
        self.event.set()


def start_observer(paths: Paths) -> tuple[Observer, _Dirty]:
    handler = _Dirty()
    observer = Observer(timeout=0.2)
    paths.registry.mkdir(parents=True, exist_ok=True)
    observer.schedule(handler, str(paths.registry), recursive=False)
    observer.daemon = True
    observer.start()
    return observer, handler


def watch(paths: Paths, cfg: Settings, conn, events: EventLog, stop: threading.Event,
          failed_since_seq: int | None = None, on_sync=None) -> None:
    """Run until `stop` is set. `on_sync(result)` is called after each pass (the first one: the rescan at start).

    The planning rule is `nexus run`'s: a stage that fails while this producer runs (after
    `failed_since_seq`, by default the log's end at start) is not retried and the plan goes on
    without it (a bad teacher is left out, the good ones are distilled). A changed teacher file
    gives new jobs; a restart of `nexus watch` retries what failed."""
    if failed_since_seq is None:
        failed_since_seq = load_state(paths).last_seq
    observer, dirty = start_observer(paths)
    last_log_size = -1
    last_pass = 0.0
    pending = False

    def one_pass():
        nonlocal pending, last_log_size, last_pass
        try:
            result = sync_once(paths, cfg, conn, events, failed_since_seq, wait_for_writes=False)
        except NexusError as exc:
            log.error("producer pass failed", error=str(exc))
            return
        pending = bool(result.scan.pending)
        for e in result.scan.events:
            log.info(e.type, teacher=e.teacher_id, **({"reason": e.data["reason"]} if "reason" in e.data else {}))
        if result.created:
            log.info("enqueued", jobs=result.created)
        if on_sync:
            on_sync(result)
        last_log_size = paths.log.stat().st_size if paths.log.exists() else 0
        last_pass = time.monotonic()

    try:
        one_pass()  # full rescan at start
        while not stop.is_set():
            fired = dirty.event.wait(timeout=0.2)
            if fired or pending:
                # debounce: wait until the folder has been quiet for DEBOUNCE_S
                while not stop.is_set() and time.monotonic() - dirty.changed_at < DEBOUNCE_S:
                    time.sleep(0.05)
                dirty.event.clear()
                if pending and not fired:
                    time.sleep(DEBOUNCE_S)
                one_pass()
                continue
            size = paths.log.stat().st_size if paths.log.exists() else 0
            if size != last_log_size and time.monotonic() - last_pass >= REPLAN_EVERY_S:
                one_pass()
    finally:
        observer.stop()
        observer.join(timeout=2)
