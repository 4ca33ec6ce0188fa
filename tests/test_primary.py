"""Which teacher seeds the student: a decision with a logged reason, never an accident of sorting.

The teacher marked primary; else the smallest ready teacher (parameters from the weights' headers,
safetensors or GGUF, else the registry hint) among those covering every dataset; ties by id.
"""

from __future__ import annotations

import json

import pytest

from nexus_core.config import load_settings
from nexus_core.demo.model_factory import make_teacher, train_tokenizer
from nexus_core.records.events import EventLog, replay
from nexus_core.records.plan import DistillPlan, primary_choice
from nexus_core.records.registry import Teacher
from nexus_core.teachers.size import param_count
from producer.planner import plan_jobs
from producer.scan import scan_registry
from tests.helpers import ARITH, write_dataset

TEXTS = ARITH[:200]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """'alpha' (sorts first) is the larger teacher, 'zeta' the smaller one."""
    root = tmp_path_factory.mktemp("sizes")
    tok = train_tokenizer(TEXTS, 200)
    big = make_teacher(root / "big", TEXTS, tokenizer=tok, hidden=64, layers=4, heads=4, kv_heads=2)
    small = make_teacher(root / "small", TEXTS, tokenizer=tok, hidden=32, layers=2, heads=4, kv_heads=2)
    return {"alpha": big, "zeta": small}


def _plan(workdir, teachers: dict[str, dict]) -> DistillPlan:
    write_dataset(workdir, "reasoning/x", [{"text": t} for t in TEXTS[:20]])
    for tid, body in teachers.items():
        (workdir.registry / f"{tid}.json").write_text(json.dumps({"teacher_id": tid, "status": "ready", **body}))
    log = EventLog(workdir.log)
    scan_registry(workdir, log, replay(log.read()))
    cfg = load_settings(workdir.home, environ={})
    specs, plan = plan_jobs(replay(log.read()), cfg, ["reasoning/x"], str(workdir.home))
    again = plan_jobs(replay(log.read()), cfg, ["reasoning/x"], str(workdir.home))[1]
    assert again.fingerprint() == plan.fingerprint() and again.primary_reason == plan.primary_reason  # stable
    distill = next(s for s in specs if s.stage == "distill")
    assert f"seeded from {plan.primary}: {plan.primary_reason}" in distill.description
    assert distill.payload.to_dict()["plan"]["primary_reason"] == plan.primary_reason  # on record (StageQueued)
    return plan


def test_the_smallest_ready_teacher_seeds_the_student_not_the_first_by_id(workdir, models):
    plan = _plan(workdir, {"alpha": {"path": str(models["alpha"])}, "zeta": {"path": str(models["zeta"])}})
    assert plan.primary == "zeta"
    assert plan.primary_reason.startswith("smallest of 2 ready teachers: ") and "alpha" in plan.primary_reason
    back = DistillPlan.from_dict(plan.to_dict())
    assert back.primary_reason == plan.primary_reason and back.fingerprint() == plan.fingerprint()


def test_a_teacher_marked_primary_wins_over_size(workdir, models):
    plan = _plan(workdir, {"alpha": {"path": str(models["alpha"]), "primary": True},
                           "zeta": {"path": str(models["zeta"])}})
    assert plan.primary == "alpha" and plan.primary_reason == "marked primary"


def test_parameter_counts_come_from_headers_then_the_hint(models, tmp_path):
    from transformers import AutoModelForCausalLM

    from tests.gguf_files import write_gguf

    n, source = param_count(_teacher("zeta", models["zeta"]))
    model = AutoModelForCausalLM.from_pretrained(models["zeta"])
    assert (n, source) == (sum(p.numel() for p in model.parameters()), "safetensors headers")
    gguf = write_gguf(model, train_tokenizer(TEXTS, 200), tmp_path / "zeta.gguf")
    assert param_count(_teacher("g", gguf)) == (n, "GGUF header")
    assert param_count(_teacher("h", tmp_path / "missing", params="1.5B")) == (1_500_000_000, "registry hint")
    assert param_count(_teacher("u", tmp_path / "missing")) == (None, "unknown")


def _teacher(tid, path, **kw) -> Teacher:
    return Teacher(teacher_id=tid, path=str(path), status="ready", source="test", **kw)


def test_the_primary_covers_every_dataset_and_unknown_sizes_fall_back_to_id():
    a, b, c = (_teacher(t, f"/nowhere/{t}") for t in ("a", "b", "c"))
    covered = {"a": {"x", "y"}, "b": {"x"}, "c": {"x", "y"}}
    got = primary_choice([c, b, a], {"a": 300, "b": 100, "c": 200}, covered)
    assert got.teacher_id == "c" and got.reason.startswith("smallest of 2 of 3 ready teachers covering every dataset")
    got = primary_choice([c, b, a], {"a": 200, "b": None, "c": 200})
    assert got.teacher_id == "a"  # a tie in size goes to the first id
    got = primary_choice([c, b], {})
    assert got.teacher_id == "b" and got.reason == "first by id of 2 ready teachers: no parameter count known"
