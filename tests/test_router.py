"""Router: trains on the released student's frozen features and routes distinct domains."""

import json

import pytest

from nexus_core.stages.distill import run_distill
from nexus_core.stages.router import route, run_router
from tests.helpers import build_workdir


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    home = tmp_path_factory.mktemp("router")
    cfg, plan, paths, tok = build_workdir(home, datasets=("code/python", "reasoning/arithmetic"), n_docs=400,
                                          distill={"max_steps": 4})
    run_distill(cfg, plan, paths)
    result = run_router(cfg, plan, paths)
    return result, paths


def test_router_reaches_high_heldout_accuracy_and_writes_its_files(trained):
    result, paths = trained
    spec = json.loads((paths.router_dir / "router.json").read_text())
    assert spec["labels"] == ["code/python", "reasoning/arithmetic"]
    assert spec["heldout_accuracy"] >= 0.95 and spec["samples"]["heldout"] >= 10
    assert spec["teacher_per_label"] == {"code/python": "t1", "reasoning/arithmetic": "t1"}
    # these shards carry no held-out quality: the per-token rule of results/eval.json decides, and says so
    assert "per token" in spec["teacher_choice"]["code/python"]["reason"]
    assert (paths.router_dir / "router.safetensors").exists()
    assert {p.name for p in result.artifacts} == {"router.json", "router.safetensors"}


@pytest.mark.parametrize("text,label", [
    ("37 * 12 = 444", "reasoning/arithmetic"),
    ("5 + 9 =", "reasoning/arithmetic"),
    ("def items_3(key, node):\n    if key is None:\n        return node", "code/python"),
    ("return [path for data in path.value()]", "code/python"),
])
def test_route_picks_the_domain(trained, text, label):
    out = route(trained[1], text)
    assert out["label"] == label and out["teacher"] == "t1"
    assert abs(sum(out["probabilities"].values()) - 1) < 1e-3 and out["probabilities"][label] > 0.5
