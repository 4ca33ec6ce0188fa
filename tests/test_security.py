"""Security: ids never escape their folders; no pickle loads; Redis on loopback or a socket."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from nexus_core.errors import UnsafePathError
from nexus_core.paths import Paths, safe_join

ROOT = Path(__file__).resolve().parent.parent
CODE_DIRS = ("nexus", "nexus_core", "producer", "workers", "bench")


def _sources():
    for d in CODE_DIRS:
        yield from (ROOT / d).rglob("*.py")


def test_no_pickle_and_every_torch_load_is_weights_only():
    offenders = []
    for f in _sources():
        text = f.read_text()
        for m in re.finditer(r"torch\.load\((?P<args>[^)]*)\)", text):
            if "weights_only=True" not in m.group("args"):
                offenders.append(f"{f.relative_to(ROOT)}: torch.load without weights_only=True")
        if re.search(r"pickle\.(loads?|Unpickler)\b|^\s*(import dill|import cloudpickle|from pickle import load)", text, re.M):
            offenders.append(f"{f.relative_to(ROOT)}: unpickles data")
        if re.search(r"trust_remote_code\s*=\s*True", text):
            offenders.append(f"{f.relative_to(ROOT)}: hard-codes trust_remote_code=True")
    assert not offenders, "\n".join(offenders)


@pytest.mark.parametrize("bad", ["../x", "a/b", "..", ".", "", "a\x00b", "/etc", "x" * 65, "-lead"])
def test_teacher_id_never_escapes(tmp_path, bad):
    paths = Paths(tmp_path)
    with pytest.raises(UnsafePathError):
        paths.teacher_memory(bad)
    with pytest.raises(UnsafePathError):
        paths.profile(bad)


def test_symlink_escape_is_refused(tmp_path):
    base = tmp_path / "memory"
    base.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (base / "evil").symlink_to(outside)
    with pytest.raises(UnsafePathError, match="outside"):
        safe_join(base, "evil")
    assert safe_join(base, "fine") == base / "fine"


def test_dataset_names_never_escape(tmp_path):
    from nexus_core.data import DatasetRef, select
    from nexus_core.errors import DatasetError

    for bad in ("../etc/passwd", "a/../../b", "a/b/c", "/abs/x"):
        with pytest.raises(DatasetError):
            select(Paths(tmp_path), bad)
    with pytest.raises(DatasetError):
        DatasetRef.parse("..//x")


def test_embedded_redis_is_not_on_the_network(tmp_path, monkeypatch):
    from nexus_core.redis_conn import EmbeddedRedis, connect

    monkeypatch.delenv("REDIS_URL", raising=False)
    server = EmbeddedRedis(Paths(tmp_path).ensure())
    url = server.start()
    try:
        cfg = connect(url).config_get("*")
        if url.startswith("unix://"):
            assert cfg["port"] == "0" and cfg["unixsocketperm"] == "700"
        else:
            assert cfg["bind"].split() == ["127.0.0.1"]
    finally:
        server.stop()
