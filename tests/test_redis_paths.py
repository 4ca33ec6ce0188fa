"""Both Redis paths: the server at REDIS_URL, and the embedded one under .nexus/redis/."""

from __future__ import annotations

import os

import pytest
import redis

from nexus_core.errors import NexusError
from nexus_core.paths import Paths
from nexus_core.redis_conn import EmbeddedRedis, connect, resolve_url


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


def test_long_workdir_paths_fall_back_to_loopback_tcp(tmp_path, monkeypatch):
    monkeypatch.delenv("REDIS_URL", raising=False)
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    server = EmbeddedRedis(Paths(deep).ensure())
    url = server.start()
    try:
        assert url.startswith("redis://127.0.0.1:")
        cfg = connect(url).config_get("bind")["bind"]
        assert "127.0.0.1" in cfg
    finally:
        server.stop()


def test_redis_url_is_used_when_set(tmp_path, monkeypatch, redis_url):
    monkeypatch.setenv("REDIS_URL", redis_url)
    url, server = resolve_url(Paths(tmp_path))
    assert url == redis_url and server is None
    assert not (tmp_path / ".nexus" / "redis").exists()


def test_unreachable_redis_url_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    with pytest.raises(NexusError, match="does not answer"):
        resolve_url(Paths(tmp_path))
