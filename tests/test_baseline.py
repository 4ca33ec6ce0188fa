"""The plain fine-tune baseline: a small lr sweep from one student init, the best one kept, cached by its inputs."""

import dataclasses
import json

import pytest

from nexus_core.kd import baseline
from tests.helpers import build_workdir


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return build_workdir(tmp_path_factory.mktemp("base"), datasets=("reasoning/arithmetic", "code/python"))


def test_sweep_keeps_the_lr_with_the_lowest_heldout_loss_and_is_cached(workdir, monkeypatch):
    cfg, plan, paths, _ = workdir
    lrs = [1e-6, 3e-3, 30.0]  # too small to move, reasonable, far too large (diverges)
    out = baseline.run_ce_baseline(cfg, plan, paths, steps=6, lrs=lrs)
    by_lr = {s["lr"]: s["mean_loss"] for s in out["sweep"]}
    assert list(by_lr) == lrs
    assert by_lr[30.0] is None and [s["diverged"] for s in out["sweep"]] == [False, False, True]
    assert by_lr[3e-3] < by_lr[1e-6] and out["lr"] == 3e-3
    assert out["datasets"] == next(s["datasets"] for s in out["sweep"] if s["lr"] == out["lr"])
    assert set(out["datasets"]) == {"reasoning/arithmetic", "code/python"}
    assert all(m["loss"] > 0 and m["tokens"] > 0 for m in out["datasets"].values())
    assert json.loads((paths.results / "baseline.json").read_text()) == out
    # the same inputs again: read back, nothing trained
    monkeypatch.setattr(baseline, "train_causal_lm", lambda *a, **k: pytest.fail("retrained a cached baseline"))
    assert baseline.run_ce_baseline(cfg, plan, paths, steps=6, lrs=lrs) == out


def test_every_lr_starts_from_the_same_student(workdir, monkeypatch):
    cfg, plan, paths, _ = workdir
    seen = []

    def record(model, *a, **k):
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        return []

    monkeypatch.setattr(baseline, "train_causal_lm", record)
    baseline.run_ce_baseline(cfg, plan, paths, steps=2, lrs=[1e-3, 2e-3])
    assert len(seen) == 2 and all((seen[0][k] == seen[1][k]).all() for k in seen[0])


def test_default_sweep_is_three_lrs_around_distillation():
    from nexus_core.config import Settings

    assert baseline.sweep_lrs(Settings()) == [3e-4, 1e-3, 3e-3]


def test_the_default_sweep_goes_on_past_an_end_that_wins(workdir, monkeypatch):
    import math

    cfg, plan, paths, _ = workdir
    cfg = dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, lr=1e-3))
    tried = []

    def fake_train(cfg, plan, paths, init, rows, tok, profiles, steps, lr, batch, device):
        tried.append(lr)
        score = abs(math.log10(lr) - math.log10(1e-5))  # best far below the default sweep
        return {"lr": lr, "mean_loss": score, "datasets": {"d": {"loss": score}}, "diverged": False}

    monkeypatch.setattr(baseline, "_train_one", fake_train)
    out = baseline.run_ce_baseline(cfg, plan, paths, steps=3)
    assert tried == [3e-4, 1e-3, 3e-3, 9.49e-5, 3e-5]  # two more lrs, each sqrt(10) further down
    assert out["lr"] == 3e-5 and [s["lr"] for s in out["sweep"]] == sorted(tried)
    tried.clear()
    baseline.run_ce_baseline(cfg, plan, paths, steps=3, lrs=[1e-3, 3e-3])  # an explicit list: as given
    assert tried == [1e-3, 3e-3]
