"""Helpers for end-to-end tests: run the real `nexus` CLI as a subprocess in a workdir."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nexus_core.events import read_events


def nexus_env(paths, redis_url: str | None, extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_") and k != "REDIS_URL"}
    env.update({"NEXUS_HOME": str(paths.home), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    if redis_url:
        env["REDIS_URL"] = redis_url
    env.update(extra or {})
    return env


def nexus(paths, *args, redis_url=None, env_extra=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nexus", *args], env=nexus_env(paths, redis_url, env_extra),
                          cwd=paths.home, capture_output=True, text=True, timeout=timeout)


class _Output:
    """A child's output in a temporary file, read back with .read(). Not a pipe: a pipe nobody reads
    fills (64 KiB) and blocks the child mid-write, where it can no longer act on SIGTERM."""

    def __init__(self):
        self._f = tempfile.TemporaryFile(mode="w+", errors="replace")

    def fileno(self) -> int:
        return self._f.fileno()

    def read(self) -> str:
        self._f.seek(0)
        return self._f.read()

    def close(self) -> None:
        self._f.close()


def spawn(paths, *args, redis_url=None, env_extra=None) -> subprocess.Popen:
    out = _Output()
    proc = subprocess.Popen([sys.executable, "-m", "nexus", *args], env=nexus_env(paths, redis_url, env_extra),
                            cwd=paths.home, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    proc.stdout = out
    return proc


def kill_tree(proc: subprocess.Popen, sig=signal.SIGKILL) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def wait_for(paths, predicate, timeout=240, proc: subprocess.Popen | None = None):
    """Poll the event log until predicate(events) is truthy; returns its value."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            events = read_events(paths.log)
        except Exception:
            events = []
        value = predicate(events)
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"process exited with {proc.returncode} before the condition held:\n{out[-3000:]}")
        time.sleep(0.1)
    raise AssertionError("timed out waiting for the event log")


def of_type(events, type_, stage=None):
    return [e for e in events if e.type == type_ and (stage is None or e.stage == stage)]


def artefact_bytes(paths, pattern: str) -> dict[str, bytes]:
    return {str(p.relative_to(paths.home)): p.read_bytes() for p in sorted(Path(paths.home).glob(pattern))}
