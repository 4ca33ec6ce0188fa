"""Shared fixtures: a throwaway workdir, a real Redis (REDIS_URL's spare database or the
embedded server), and tiny teachers built from a config (nothing is downloaded)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from nexus_core.demo import model_factory as mf  # noqa: E402
from nexus_core.paths import Paths  # noqa: E402
from tests.helpers import (
    ARITH,
    CODE,
    DOCS,
    ENV,
    FAST_SETTINGS,
    PADDED_VOCAB,
    completed_once,
    make_workdir,
    nexus,
    outputs,
    register,
    write_dataset,
)

TEST_DB_MARK = "nexus:test-database"  # set in the databases the tests own, so that a rerun may flush them


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """REDIS_URL when set: a spare database (never 0) that is empty or was left by these tests, else the
    session stops before flushing anything; without REDIS_URL, an embedded server of its own."""
    url = os.environ.get("REDIS_URL")
    if url:
        import redis

        conn = redis.Redis.from_url(url)
        db = int(conn.connection_pool.connection_kwargs.get("db", 0))
        if db == 0:
            pytest.exit("REDIS_URL must name a spare database (e.g. redis://127.0.0.1:6379/13), never 0", 2)
        keys = conn.dbsize()
        if keys and not conn.exists(TEST_DB_MARK):
            pytest.exit(f"REDIS_URL database {db} holds {keys} keys the tests did not write; refusing to flush it. "
                        f"Name an empty spare database.", 2)
        conn.set(TEST_DB_MARK, "1")
        conn.close()
        yield url
        return
    from nexus_core.broker.server import EmbeddedRedis

    server = EmbeddedRedis(Paths(tmp_path_factory.mktemp("redis-home")))
    yield server.start()
    server.stop()


@pytest.fixture
def redis_conn(redis_url):
    import redis

    conn = redis.Redis.from_url(redis_url)
    conn.flushdb()  # only this test database (checked above)
    conn.set(TEST_DB_MARK, "1")
    yield conn
    conn.flushdb()
    conn.set(TEST_DB_MARK, "1")
    conn.close()


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Paths:
    home = tmp_path / "home"
    paths = Paths(home).ensure()
    monkeypatch.setenv("NEXUS_HOME", str(home))
    for name in list(os.environ):
        if name.startswith("NEXUS_") and name not in ("NEXUS_HOME", "NEXUS_TORCH"):
            monkeypatch.delenv(name)
    return paths


@pytest.fixture
def fake_model(tmp_path):
    """A model folder that passes the registry's checks but holds no real weights (planning tests)."""
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"\0" * 64)
    (d / "tokenizer.json").write_text("{}")
    return d


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory) -> Path:
    """A 4-layer Llama teacher with a tokenizer trained on the test texts (built once)."""
    from nexus_core.demo.model_factory import make_teacher

    out = tmp_path_factory.mktemp("teachers") / "tiny-llama"
    make_teacher(out, ARITH + CODE, arch="llama", vocab_size=384, hidden=64, layers=4, heads=4, kv_heads=2)
    return out


@pytest.fixture
def fast_env(monkeypatch):
    for k, v in FAST_SETTINGS.items():
        monkeypatch.setenv(k, v)
    return FAST_SETTINGS


@pytest.fixture
def demo_workdir(workdir, tiny_teacher_dir, fast_env) -> Paths:
    """A workdir with two datasets and one registered tiny teacher."""
    write_dataset(workdir, "reasoning/arith", [{"question": q.split("\n")[0], "answer": q.split("\n")[1]} for q in ARITH])
    write_dataset(workdir, "code/snippets", [{"text": t} for t in CODE])
    register(workdir, "tiny", tiny_teacher_dir)
    return workdir


# --- shared by several test modules ------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer():
    return mf.train_tokenizer(DOCS, vocab_size=300)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("teachers")
    out = {}
    for arch in ("llama", "qwen2"):
        model = mf.build_model(mf.make_config(arch, vocab_size=PADDED_VOCAB, tokenizer=tokenizer), seed=2)
        out[arch] = (mf.save_model(model, tokenizer, root / arch), model)
    return out


@pytest.fixture(scope="session")
def reference(tmp_path_factory, tiny_teacher_dir, redis_url) -> dict[str, bytes]:
    """An undisturbed run with the fast settings: the bytes every faulted run must reproduce."""
    import redis

    conn = redis.Redis.from_url(redis_url)
    conn.flushdb()
    conn.set(TEST_DB_MARK, "1")
    paths = make_workdir(tmp_path_factory.mktemp("reference"), tiny_teacher_dir)
    result = nexus(paths, "run", redis_url=redis_url, env_extra=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    completed_once(paths)
    out = outputs(paths)
    assert any("shard-" in k for k in out) and any(k.startswith("nexus-release-v1/") for k in out)
    return out
