"""Shared fixtures: a throwaway workdir, a real Redis (REDIS_URL's spare database or the
embedded server), and tiny teachers built from a config (nothing is downloaded)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from nexus_core.paths import Paths  # noqa: E402

ARITH = [f"What is {a} + {b}?\n{a} + {b} = {a + b}" for a in range(3, 60, 2) for b in range(5, 40, 3)]
CODE = [f"def add_{i}(x, y):\n    return x + y + {i}\n\n\nclass Box{i}:\n    value = {i}\n" for i in range(150)]


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """REDIS_URL when set (it must name a spare database, never 0); else an embedded server."""
    url = os.environ.get("REDIS_URL")
    if url:
        import redis

        db = redis.Redis.from_url(url).connection_pool.connection_kwargs.get("db", 0)
        if int(db) == 0:
            pytest.exit("REDIS_URL must name a spare database (e.g. redis://127.0.0.1:6379/13), never 0", 2)
        yield url
        return
    from nexus_core.redis_conn import EmbeddedRedis

    server = EmbeddedRedis(Paths(tmp_path_factory.mktemp("redis-home")))
    yield server.start()
    server.stop()


@pytest.fixture
def redis_conn(redis_url):
    import redis

    conn = redis.Redis.from_url(redis_url)
    conn.flushdb()  # only this test database
    yield conn
    conn.flushdb()
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


def write_dataset(paths: Paths, key: str, rows: list[dict]) -> Path:
    cat, name = key.split("/")
    folder = paths.datasets / cat / name
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "data.jsonl", "w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    return folder


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
    from nexus_core.model_factory import make_teacher

    out = tmp_path_factory.mktemp("teachers") / "tiny-llama"
    make_teacher(out, ARITH + CODE, arch="llama", vocab_size=384, hidden=64, layers=4, heads=4, kv_heads=2)
    return out


def register(paths: Paths, teacher_id: str, model_dir: Path, **extra) -> Path:
    body = {"teacher_id": teacher_id, "path": str(model_dir), "status": "ready", **extra}
    f = paths.registry / f"{teacher_id}.json"
    f.write_text(json.dumps(body))
    return f


FAST_SETTINGS = {
    "NEXUS_EXTRACT_SEQ_LEN": "32", "NEXUS_EXTRACT_MAX_SAMPLES": "24", "NEXUS_EXTRACT_SHARD_SIZE": "8",
    "NEXUS_EXTRACT_TOP_K": "8", "NEXUS_EXTRACT_BATCH_SIZE": "4", "NEXUS_PROFILE_CALIBRATION_SAMPLES": "4",
    "NEXUS_DISTILL_MAX_STEPS": "6", "NEXUS_DISTILL_BATCH_SIZE": "4", "NEXUS_DISTILL_CHECKPOINT_EVERY": "2",
    "NEXUS_DISTILL_WARMUP_STEPS": "1", "NEXUS_ROUTER_EPOCHS": "5", "NEXUS_ROUTER_MAX_SAMPLES": "40",
}


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
