"""Both Redis paths: the server at REDIS_URL, and the embedded one under .nexus/redis/."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis

from nexus_core.broker.server import EmbeddedRedis, connect, display_url, redis_url_from_env, resolve_url
from nexus_core.errors import NexusError
from nexus_core.paths import Paths


def test_embedded_server_persists_with_aof_and_is_reused(tmp_path, monkeypatch):
    monkeypatch.delenv("REDIS_URL", raising=False)
    paths = Paths(tmp_path).ensure()
    url, server = resolve_url(paths)
    try:
        assert server is not None and (url.startswith("unix://") or "127.0.0.1" in url)
        conn = connect(url)
        conn.set("k", "v")
        again, second = resolve_url(paths)  # another process of this workdir finds the same server
        assert again == url and second is None
        conn.bgrewriteaof()
    finally:
        server.stop()
    assert (paths.redis_dir / "redis.log").exists()
    assert any(p.name.startswith("appendonly") for p in paths.redis_dir.iterdir())
    url2, server2 = resolve_url(paths)  # restart: the AOF brings the data back
    try:
        assert connect(url2).get("k") == b"v"
    finally:
        server2.stop()


def _stranger_connects(sock: Path) -> str:
    """Connect to `sock` as another local user (nobody), from a forked child: 'ok' or the error's name."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: become a stranger, try the socket, report, exit
        try:
            os.setgid(65534)
            os.setuid(65534)
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(sock))
            os.write(w, b"ok")
        except OSError as exc:
            os.write(w, type(exc).__name__.encode())
        finally:
            os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    with os.fdopen(r) as fh:
        return fh.read()


def test_long_workdir_gets_a_private_socket_no_stranger_can_use(tmp_path, monkeypatch):
    monkeypatch.delenv("REDIS_URL", raising=False)
    home = tmp_path / ("d" * 70) / ("e" * 70)
    assert len(str(home)) >= 150
    server = EmbeddedRedis(Paths(home).ensure())
    url = server.start()
    try:
        assert url.startswith("unix://"), url  # never TCP without a password
        sock = Path(url.removeprefix("unix://"))
        folder = sock.parent
        assert len(str(sock)) < 100 and folder != server.dir
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700 and folder.stat().st_uid == os.getuid()
        assert stat.S_IMODE(server.dir.stat().st_mode) == 0o700
        assert stat.S_IMODE((server.dir / "url").stat().st_mode) == 0o600
        assert connect(url).config_get("unixsocketperm")["unixsocketperm"] == "700"
        if os.getuid() == 0:  # root can become a stranger: prove the socket keeps one out
            assert _stranger_connects(sock) == "PermissionError"
    finally:
        server.stop()
    assert not folder.exists()  # the private folder goes with the server


def test_tcp_embedded_redis_requires_its_random_password(tmp_path, monkeypatch):
    monkeypatch.delenv("REDIS_URL", raising=False)
    server = EmbeddedRedis(Paths(tmp_path).ensure(), transport="tcp")
    url = server.start()
    try:
        host = urlsplit(url)
        assert host.hostname == "127.0.0.1" and host.password and len(host.password) >= 32
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=host.port).ping()  # no secret: no access
        assert connect(url).ping()
        assert host.password not in " ".join(Path(f"/proc/{server.proc.pid}/cmdline").read_text().split("\0"))
        assert stat.S_IMODE(server.conf_file.stat().st_mode) == 0o600
        assert display_url(url) == f"redis://***@127.0.0.1:{host.port}/0"
    finally:
        server.stop()


def test_redis_password_file_completes_redis_url(tmp_path, monkeypatch):
    secret = tmp_path / "password"
    secret.write_text("s3cret/with:odd@chars\n")
    monkeypatch.setenv("REDIS_URL", "redis://redis:6379/0")
    monkeypatch.setenv("REDIS_PASSWORD_FILE", str(secret))
    url = redis_url_from_env()
    assert urlsplit(url).password == "s3cret%2Fwith%3Aodd%40chars" and urlsplit(url).hostname == "redis"
    assert redis.connection.parse_url(url)["password"] == "s3cret/with:odd@chars"


def test_redis_url_is_used_when_set(tmp_path, monkeypatch, redis_url):
    monkeypatch.setenv("REDIS_URL", redis_url)
    url, server = resolve_url(Paths(tmp_path))
    assert url == redis_url and server is None
    assert not (tmp_path / ".nexus" / "redis").exists()


def test_unreachable_redis_url_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    with pytest.raises(NexusError, match="does not answer"):
        resolve_url(Paths(tmp_path))
