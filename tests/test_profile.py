"""Profile stage: measured values against independent computations, mode choice, load errors."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from nexus_core.config import load_settings  # noqa: E402
from nexus_core.data import DatasetRef  # noqa: E402
from nexus_core.demo import model_factory as mf
from nexus_core.errors import NexusError  # noqa: E402
from nexus_core.paths import Paths  # noqa: E402
from nexus_core.records.registry import parse_teacher
from nexus_core.stages.profile import run_profile  # noqa: E402
from nexus_core.teachers import mode as mode_module
from nexus_core.teachers.loading import TeacherLoadError, tokenizer_fingerprint
from tests.helpers import DOCS, PADDED_VOCAB


@pytest.fixture(scope="module")
def teachers(tmp_path_factory, tokenizer):
    """arch -> (model folder, model): tiny llama (padded vocab), qwen2, mixtral (MoE), sharded llama."""
    root = tmp_path_factory.mktemp("teachers")
    out = {}
    for name, arch, kw in [("llama", "llama", {}), ("qwen2", "qwen2", {}), ("mixtral", "mixtral", {"layers": 2}),
                           ("llama-sharded", "llama", {})]:
        cfg = mf.make_config(arch, vocab_size=PADDED_VOCAB, tokenizer=tokenizer, **kw)
        model = mf.build_model(cfg, seed=1)
        mf.save_model(model, tokenizer, root / name, max_shard_size="100KB" if name.endswith("sharded") else None)
        out[name] = (root / name, model)
    return out


def write_dataset(home: Path, cat="reasoning", name="arith", docs=DOCS) -> DatasetRef:
    folder = home / "datasets" / cat / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return DatasetRef(cat, name)


def settings(home: Path, **sections):
    base = {"run": {"device": "cpu"}, "extract": {"seq_len": 32, "top_k": 8, "batch_size": 4, "shard_size": 8},
            "profile": {"calibration_samples": 8}}
    for sec, kv in sections.items():
        base.setdefault(sec, {}).update(kv)
    return load_settings(home=home, environ={}, **base)


def teacher_for(path: Path, home: Path, tid="tiny", **fields):
    return parse_teacher({"teacher_id": tid, "path": str(path), "status": "ready", **fields}, "test", home)


def reference_influence(model, ids, mask) -> list[float]:
    """Block influence straight from the model: hidden_states for inputs, a hook for the last layer's raw output."""
    layers = model.model.layers
    last = {}
    h = layers[-1].register_forward_hook(lambda m, a, o: last.__setitem__("out", o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        hs = model(input_ids=ids.long(), attention_mask=mask.long(), output_hidden_states=True).hidden_states
    h.remove()
    outs = list(hs[1:len(layers)]) + [last["out"]]
    m = mask.double()
    res = []
    for i in range(len(layers)):
        cos = torch.nn.functional.cosine_similarity(hs[i].double(), outs[i].double(), dim=-1)
        res.append(float(((1 - cos) * m).sum() / m.sum()))
    return res


def test_profile_measures_llama(tmp_path, teachers, tokenizer):
    path, model = teachers["llama"]
    ref = write_dataset(tmp_path)
    cfg = settings(tmp_path)
    res = run_profile(cfg, teacher_for(path, tmp_path, params="7B"), Paths(tmp_path), [ref])
    prof = json.loads(Paths(tmp_path).profile("tiny").read_text())
    assert res.artifacts == [Paths(tmp_path).profile("tiny")] and res.data["cached"] is False
    n_params = sum(p.numel() for p in model.parameters())
    assert prof["params"] == prof["active_params"] == n_params  # measured, not the "7B" hint
    assert prof["bytes"] == n_params * 4 and prof["dtypes"] == {"F32": n_params}
    assert (prof["layers"], prof["hidden"], prof["model_type"]) == (4, 64, "llama")
    assert prof["architecture"] == "LlamaForCausalLM"
    assert prof["head_vocab"] == PADDED_VOCAB and prof["tokenizer_vocab"] == len(tokenizer) < PADDED_VOCAB
    assert prof["vocab_padded"] is True and prof["moe"] is None
    assert prof["tokenizer_fp"] == tokenizer_fingerprint(tokenizer)
    assert prof["mode"] == "full" and "fits" in prof["mode_reason"]
    # Layer importance equals block influence computed independently on the same calibration sample.
    from nexus_core import data
    ids, mask = data.pack(tokenizer, data.split(DOCS, cfg.extract.heldout_fraction)[0], 32, 8)
    expect = reference_influence(model, ids, mask)
    assert prof["layer_importance"] == pytest.approx(expect, rel=1e-4, abs=1e-6)
    assert prof["critical_layers"] == [max(range(4), key=lambda i: expect[i])]  # 25% of 4 layers


def test_profile_cache_and_recompute(tmp_path, teachers):
    path, _ = teachers["qwen2"]
    ref = write_dataset(tmp_path)
    t = teacher_for(path, tmp_path)
    run_profile(settings(tmp_path), t, Paths(tmp_path), [ref])
    out = Paths(tmp_path).profile("tiny")
    before = out.stat().st_mtime_ns
    again = run_profile(settings(tmp_path), t, Paths(tmp_path), [ref])
    assert again.data["cached"] is True and out.stat().st_mtime_ns == before
    redo = run_profile(settings(tmp_path, profile={"critical_ratio": 0.5}), t, Paths(tmp_path), [ref])
    assert redo.data["cached"] is False and len(redo.data["critical_layers"]) == 2
    assert json.loads(out.read_text())["model_type"] == "qwen2"


def test_profile_moe_and_sharded_index(tmp_path, teachers):
    ref = write_dataset(tmp_path)
    path, model = teachers["mixtral"]
    res = run_profile(settings(tmp_path), teacher_for(path, tmp_path, "moe"), Paths(tmp_path), [ref])
    prof = json.loads(Paths(tmp_path).profile("moe").read_text())
    named = dict(model.named_parameters())
    expert = sum(p.numel() for n, p in named.items() if ".experts." in n)
    total = sum(p.numel() for p in named.values())
    assert prof["moe"] == {"experts": 4, "experts_per_tok": 2}
    assert prof["params"] == total and prof["active_params"] == total - expert // 2
    assert res.data["layers"] == 2
    path, model = teachers["llama-sharded"]
    assert (path / "model.safetensors.index.json").exists()
    run_profile(settings(tmp_path), teacher_for(path, tmp_path, "sharded"), Paths(tmp_path), [ref])
    prof = json.loads(Paths(tmp_path).profile("sharded").read_text())
    assert prof["params"] == sum(p.numel() for p in model.parameters()) and len(prof["weight_files"]) > 1


def test_mode_fallbacks_without_sli(tmp_path, teachers, monkeypatch):
    path, _ = teachers["llama"]
    ref = write_dataset(tmp_path)
    monkeypatch.setattr(mode_module, "_sli_support", lambda config: (False, "not streamable in this test"))
    # Over the parameter threshold but it fits: loaded whole, and the reason says why.
    run_profile(settings(tmp_path, memory={"sli_params_threshold": 1000}), teacher_for(path, tmp_path),
                Paths(tmp_path), [ref])
    prof = json.loads(Paths(tmp_path).profile("tiny").read_text())
    assert prof["mode"] == "full" and prof["sli_supported"] is False
    assert "sli_params_threshold" in prof["mode_reason"] and "not streamable" in prof["mode_reason"]
    # Does not fit and cannot stream: a clear error.
    with pytest.raises(NexusError, match="memory budget"):
        run_profile(settings(tmp_path, memory={"budget": "1KB"}), teacher_for(path, tmp_path), Paths(tmp_path), [ref])


def test_auto_picks_sli_when_over_budget(tmp_path, teachers):
    sli = pytest.importorskip("nexus_core.teachers.sli")
    path, _ = teachers["llama"]
    ref = write_dataset(tmp_path)
    if not sli.sli_support(mf.make_config("llama", vocab_size=PADDED_VOCAB))[0]:
        pytest.skip("SLI does not support llama yet")
    t = teacher_for(path, tmp_path)
    run_profile(settings(tmp_path), t, Paths(tmp_path), [ref])
    full = json.loads(Paths(tmp_path).profile("tiny").read_text())
    run_profile(settings(tmp_path, memory={"budget": "1KB"}), t, Paths(tmp_path), [ref])
    prof = json.loads(Paths(tmp_path).profile("tiny").read_text())
    assert prof["mode"] == "sli" and "exceeds the memory budget" in prof["mode_reason"]
    assert prof["layer_importance"] == pytest.approx(full["layer_importance"], rel=1e-5, abs=1e-7)


def _broken_copy(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    edit(dst)
    return dst


def test_load_errors_name_teacher_and_fix(tmp_path, teachers):
    path, _ = teachers["llama"]
    ref = write_dataset(tmp_path)

    def set_config(**kv):
        def edit(d: Path):
            c = json.loads((d / "config.json").read_text())
            c.update(kv)
            (d / "config.json").write_text(json.dumps(c))
        return edit

    bad = _broken_copy(path, tmp_path / "bad-shape", set_config(hidden_size=32))
    with pytest.raises(TeacherLoadError, match=r"'badshape'.*config.json.*hidden_size=32"):
        run_profile(settings(tmp_path), teacher_for(bad, tmp_path, "badshape"), Paths(tmp_path), [ref])
    custom = _broken_copy(path, tmp_path / "custom", set_config(
        model_type="nexus-custom", auto_map={"AutoConfig": "conf.C", "AutoModelForCausalLM": "mod.M"}))
    with pytest.raises(TeacherLoadError, match=r"'custom'.*trust_remote_code"):
        run_profile(settings(tmp_path), teacher_for(custom, tmp_path, "custom"), Paths(tmp_path), [ref])
    tok = _broken_copy(path, tmp_path / "badtok", lambda d: (d / "tokenizer.json").write_text("{not json"))
    with pytest.raises(TeacherLoadError, match=r"'badtok'.*tokenizer"):
        run_profile(settings(tmp_path), teacher_for(tok, tmp_path, "badtok"), Paths(tmp_path), [ref])
    assert not Paths(tmp_path).profile("badtok").exists()
