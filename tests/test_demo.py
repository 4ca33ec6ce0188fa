"""The demo's generated data, teacher training, cache and registry entries (tiny sizes)."""

from __future__ import annotations

import json
import os
import time

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from nexus_core.config import Settings
from nexus_core.data import DatasetRef, load_texts
from nexus_core.demo.demo_data import (
    DataSpec,
    arithmetic_rows,
    dataset_texts,
    ensure_datasets,
    stdlib_files,
    teacher_pool,
)
from nexus_core.demo.prepare import DemoSpec, format_params, prepare_demo
from nexus_core.kd.trainer import eval_causal_lm, train_causal_lm
from nexus_core.paths import Paths
from nexus_core.records.registry import parse_registry_file, registry_files
from nexus_core.storage.atomic import sha256_file

SMALL = DemoSpec.small()


def _files(root):
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One small prepare_demo run, then a second one on the same workdir."""
    paths = Paths(tmp_path_factory.mktemp("home")).ensure()
    first = prepare_demo(paths, Settings(), spec=SMALL)
    snap = _files(paths.state_dir / "demo-cache"), _files(paths.datasets), _files(paths.registry)
    mtimes = {p: p.stat().st_mtime_ns for p in paths.registry.glob("*.json")}
    t0 = time.monotonic()
    second = prepare_demo(paths, Settings(), spec=SMALL)
    return paths, first, second, time.monotonic() - t0, snap, mtimes


def test_arithmetic_rows_are_correct_and_seeded():
    rows = arithmetic_rows(300, seed=7)
    assert rows == arithmetic_rows(300, seed=7) and rows != arithmetic_rows(300, seed=8)
    ops = set()
    for r in rows:
        expr, result = r["answer"].split(" = ")
        a, op, b = expr.split(" ")
        ops.add(op)
        assert int(result) == eval(f"{int(a)} {op} {int(b)}")
        assert expr in r["question"]
    assert ops == {"+", "-", "*"}


def test_stdlib_subset_is_capped_and_deterministic():
    files = stdlib_files(50_000, 20_000)
    assert files == stdlib_files(50_000, 20_000)
    assert files and sum(len(t.encode()) for _, t in files) <= 50_000
    assert [p for p, _ in files] == sorted(p for p, _ in files)
    assert all(p.endswith(".py") and "site-packages" not in p for p, _ in files)


def test_teacher_pool_is_new_to_the_datasets(tmp_path):
    """The teachers learn from a pool that holds none of the user's documents, train or held-out
    (a teacher trained on the rows would hand the student memorised labels)."""
    spec = SMALL.data
    paths = Paths(tmp_path).ensure()
    ensure_datasets(paths, spec)
    texts = dataset_texts(paths)
    pool = teacher_pool(spec, texts)
    assert pool == teacher_pool(spec, texts)  # deterministic
    for name, docs in texts.items():
        assert len(pool[name]) > 0 and not set(pool[name]) & set(docs), name
    assert sum(len(t.encode()) for t in pool["code/python-stdlib"]) <= spec.pool_stdlib_bytes
    assert len(pool["reasoning/arithmetic"]) > 0.8 * spec.pool_arithmetic_rows


def test_datasets_have_expected_columns_and_same_bytes(tmp_path):
    spec = DataSpec(arithmetic_rows=200, stdlib_bytes=30_000)
    a, b = Paths(tmp_path / "a"), Paths(tmp_path / "b")
    info = ensure_datasets(a, spec)
    assert [d["generated"] for d in info] == [True, True]
    ensure_datasets(b, spec)
    assert _files(a.datasets) == _files(b.datasets)  # two runs, same bytes
    arith = [json.loads(x) for x in (a.datasets / "reasoning/arithmetic/arithmetic.jsonl").read_text().splitlines()]
    code = [json.loads(x) for x in (a.datasets / "code/python-stdlib/stdlib.jsonl").read_text().splitlines()]
    assert len(arith) == 200 and all(set(r) == {"question", "answer"} for r in arith)
    assert code and all(set(r) == {"text"} for r in code)
    # The generic loader reads them (and not the marker).
    assert len(load_texts(a, DatasetRef("reasoning", "arithmetic"))) == 200
    assert len(load_texts(a, DatasetRef("code", "python-stdlib"))) == len(code)
    # Present and complete: left alone. Tampered: regenerated.
    assert [d["generated"] for d in ensure_datasets(a, spec)] == [False, False]
    (a.datasets / "reasoning/arithmetic/arithmetic.jsonl").write_text("broken\n")
    assert [d["generated"] for d in ensure_datasets(a, spec)] == [True, False]
    assert _files(a.datasets) == _files(b.datasets)


def test_train_causal_lm_lowers_loss():
    import torch

    from nexus_core.demo.model_factory import build_model, make_config

    torch.manual_seed(0)
    ids = torch.arange(32).repeat(16, 2)[:, :48] % 32  # (16, 48) a learnable periodic pattern
    mask = torch.ones_like(ids)
    model = build_model(make_config("llama", vocab_size=40, hidden=32, layers=1, heads=2, kv_heads=1), seed=0)
    before = eval_causal_lm(model, ids, mask)
    losses = train_causal_lm(model, ids, mask, steps=30, lr=1e-2, batch_size=4, seed=0)
    assert len(losses) == 30 and not model.training
    assert eval_causal_lm(model, ids, mask) < 0.5 * before


def test_teachers_train_below_untrained_loss(demo):
    paths, first, *_ = demo
    assert set(first["teachers"]) == {"demo-llama", "demo-qwen2"}
    for tid, t in first["teachers"].items():
        assert t["heldout_loss"] < t["untrained_loss"] - 0.5, (tid, t)
        assert (paths.state_dir / "demo-cache" / tid / "model.safetensors").is_file()
        assert t["cached"] is False
    archs = {json.loads((paths.state_dir / "demo-cache" / tid / "config.json").read_text())["model_type"]
             for tid in first["teachers"]}
    assert archs == {"llama", "qwen2"}
    tok = [sha256_file(paths.state_dir / "demo-cache" / tid / "tokenizer.json") for tid in first["teachers"]]
    assert tok[0] == tok[1]  # one shared tokenizer


def test_registry_entries_parse_cleanly(demo):
    paths, first, *_ = demo
    teachers = {}
    for f in registry_files(paths.registry):
        got, rejected = parse_registry_file(f, paths.home)
        assert rejected == []
        teachers.update({t.teacher_id: t for t in got})
    assert set(teachers) == {"demo-llama", "demo-qwen2"}
    llama, qwen = teachers["demo-llama"], teachers["demo-qwen2"]
    assert llama.ready and llama.primary and llama.sli is None
    assert qwen.ready and not qwen.primary and qwen.sli == "always"
    assert llama.path == str((paths.state_dir / "demo-cache" / "demo-llama").resolve())
    assert llama.params == format_params(first["teachers"]["demo-llama"]["params"]) and llama.params.endswith("K")


def test_second_run_uses_cache(demo):
    paths, first, second, seconds, snap, mtimes = demo
    assert all(t["cached"] for t in second["teachers"].values())
    assert seconds < 10
    assert (_files(paths.state_dir / "demo-cache"), _files(paths.datasets), _files(paths.registry)) == snap
    assert {p: p.stat().st_mtime_ns for p in paths.registry.glob("*.json")} == mtimes  # no rewrite
    for tid in first["teachers"]:
        for key in ("params", "heldout_loss", "untrained_loss"):
            assert first["teachers"][tid][key] == second["teachers"][tid][key]
