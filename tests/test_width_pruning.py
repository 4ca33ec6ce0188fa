"""Width pruning (kd/width.py): a student of the size --student-params asks for, seeded from the teacher's busiest channels."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from nexus_core import data
from nexus_core.config import load_settings
from nexus_core.demo.model_factory import build_model, make_config, save_model, train_tokenizer
from nexus_core.errors import ConfigError
from nexus_core.kd import width
from nexus_core.kd.student import build_student, count_params
from nexus_core.paths import Paths
from nexus_core.records.plan import DistillPlan
from nexus_core.records.registry import Teacher, _weight_files
from tests.helpers import settings, write_datasets, write_profile, write_shards

DATASET = "reasoning/arithmetic"


def _train(model, ids, mask, steps: int = 40):
    """A few seconds of training, so that the teacher knows its text (a random one knows nothing)."""
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        rows = torch.randint(0, ids.shape[0], (16,))
        loss = model(input_ids=ids[rows], attention_mask=mask[rows], labels=ids[rows].masked_fill(mask[rows] == 0, -100)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A workdir whose primary teacher (llama, hidden 64, 4 layers, MLP 128, 4 heads in 2 KV groups) is trained."""
    home = tmp_path_factory.mktemp("width")
    paths = Paths(home).ensure()
    texts = write_datasets(paths, 300, (DATASET,))[DATASET]
    tok = train_tokenizer(texts, vocab_size=300)
    cfg = settings(home)
    ids, mask = data.pack(tok, texts, 32)
    config = make_config("llama", vocab_size=len(tok), hidden=64, layers=4, heads=4, kv_heads=2, intermediate=128,
                         tokenizer=tok, max_pos=64)
    folder = home / "models" / "t1"
    save_model(_train(build_model(config, seed=0), ids.long(), mask.long()), tok, folder)
    teacher = Teacher(teacher_id="t1", path=str(folder.resolve()), status="ready", source="registry/t1.json",
                      weight_files=_weight_files(folder))
    write_profile(paths, teacher, tok, importance=[0.9, 0.1, 0.5, 0.3], critical=[0, 2], hidden=64)
    write_shards(cfg, paths, teacher, DATASET, tok)
    plan = DistillPlan(teachers=(teacher,), primary="t1", datasets=(DATASET,))
    return cfg, plan, paths, ids.long(), mask.long()


def _with(cfg, **student):
    return dataclasses.replace(cfg, student=dataclasses.replace(cfg.student, **student))


def _profile(paths):
    from nexus_core.storage.profiles import read_profile

    return read_profile(paths, "t1") or {}


def test_student_params_gives_a_student_at_or_just_under_the_target(trained, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg, plan, paths, ids, mask = trained
    model, info = build_student(_with(cfg, params="90K"), plan, paths, "cpu", _profile(paths))
    n = sum(p.numel() for p in model.parameters())
    assert n == info["params"] <= 90_000
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (2, 64, 4, 2)
    assert c.intermediate_size < 128 and c.intermediate_size % 8 == 0  # only the MLP narrowed, in steps of 8
    wider = width.shaped_config(c, width.Shape(c.intermediate_size + 8, 2, 64))
    assert count_params(wider) > 90_000  # just under: one more step would not fit
    assert info["width"]["intermediate"] == c.intermediate_size and "calibration rows" in info["width"]["ranked_on"]
    model.save_pretrained(tmp_path / "s")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "s").eval()
    with torch.no_grad():
        assert torch.allclose(again(input_ids=ids[:2]).logits, model.eval()(input_ids=ids[:2]).logits, atol=1e-5)


def test_a_small_target_narrows_mlp_then_kv_groups_then_hidden(trained, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg, plan, paths, ids, _ = trained
    model, info = build_student(_with(cfg, params="0.2"), plan, paths, "cpu", _profile(paths))
    c, teacher_params = model.config, count_params(AutoModelForCausalLM.from_pretrained(plan.primary_teacher.path).config)
    assert info["params"] <= 0.2 * teacher_params
    assert (c.intermediate_size, c.num_key_value_heads, c.num_attention_heads, c.head_dim) == (32, 1, 2, 16)
    assert c.hidden_size < 64 and model.model.embed_tokens.weight.shape[1] == c.hidden_size
    model.save_pretrained(tmp_path / "s")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    assert again.config.hidden_size == c.hidden_size and again(input_ids=ids[:1]).logits.shape[-1] == c.vocab_size


def test_tied_embeddings_stay_tied():
    config = make_config("llama", vocab_size=50, hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64,
                         tie_word_embeddings=True)
    seed = build_model(config, seed=1).float()
    imp = width.measure(seed, torch.randint(0, 50, (2, 8)), None)
    model, _ = width.narrow(seed, width.Shape(32, 2, 16), imp)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.model.embed_tokens.weight.shape == (50, 16)


def _cross_entropy(model, ids, mask) -> float:
    with torch.no_grad():
        logits = model.eval()(input_ids=ids, attention_mask=mask).logits[:, :-1]
    labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100))


def test_a_pruned_student_starts_far_below_a_random_one(trained):
    cfg, plan, paths, ids, mask = trained
    model, _ = build_student(_with(cfg, params="0.6", layer_ratio=0.75), plan, paths, "cpu", _profile(paths))
    torch.manual_seed(3)
    random = build_model(model.config, seed=3).float()
    pruned, fresh = _cross_entropy(model, ids[:32], mask[:32]), _cross_entropy(random, ids[:32], mask[:32])
    print(f"first-step cross-entropy: pruned {pruned:.2f}, random {fresh:.2f}")
    assert pruned < 0.8 * fresh, (pruned, fresh)


def test_importance_keeps_the_busy_channels_and_dropping_dead_ones_changes_nothing():
    config = make_config("llama", vocab_size=60, hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64)
    seed = build_model(config, seed=2).float().eval()
    dead_mlp = torch.arange(0, 64, 2)  # even channels never fire: up_proj rows zero
    with torch.no_grad():
        for layer in seed.model.layers:
            layer.mlp.up_proj.weight[dead_mlp] = 0
            layer.self_attn.v_proj.weight[:8] = 0  # KV group 0 (head_dim 8) reads zeros: heads 0, 1 output nothing
        seed.model.embed_tokens.weight[:, 5] *= 50  # hidden channel 5 is the loudest
    rows = torch.randint(0, 60, (4, 12))
    imp = width.measure(seed, rows, torch.ones_like(rows))
    model, kept = width.narrow(seed, width.Shape(32, 1, 32), imp)
    assert all(k == list(range(1, 64, 2)) for k in kept["mlp"]) and kept["kv_groups"] == [[1], [1]]
    with torch.no_grad():  # what was dropped never contributed: the narrowed student computes the same function
        assert torch.allclose(model.eval()(input_ids=rows).logits, seed(input_ids=rows).logits, atol=1e-5)
    _, kept = width.narrow(seed, width.Shape(64, 2, 8), imp)
    assert 5 in kept["hidden"]


def test_student_params_setting_is_checked(tmp_path):
    assert load_settings(tmp_path, environ={"NEXUS_STUDENT_PARAMS": "1.2B"}).student.params == "1.2B"
    with pytest.raises(ConfigError, match="--student-params"):
        load_settings(tmp_path, environ={}, student={"params": "lots"})
    assert width.target_params("60M", 10**9) == 60_000_000 and width.target_params("0.5", 1000) == 500
    assert width.target_params("", 1000) is None


@pytest.mark.slow
def test_nexus_run_with_student_params_releases_the_narrow_student(tmp_path, redis_conn, redis_url):
    import json

    from nexus_core.demo import model_factory as mf
    from tests.helpers import ARITH, CODE, ENV, completed_once, make_workdir, nexus

    d = mf.make_teacher(tmp_path / "teachers" / "llama", ARITH + CODE, arch="llama", vocab_size=300, hidden=32,
                        layers=4, heads=4, kv_heads=2, intermediate=64, max_pos=64)
    paths = make_workdir(tmp_path, d)
    result = nexus(paths, "run", "--student-params", "0.3", "--student-layer-ratio", "1", redis_url=redis_url,
                   env_extra=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    completed_once(paths)
    released = json.loads((paths.release / "config.json").read_text())
    teacher = json.loads((d / "config.json").read_text())
    assert released["num_hidden_layers"] == 4 and released["intermediate_size"] == 16  # the MLP floor
    assert released["hidden_size"] < teacher["hidden_size"]


def test_a_moe_teachers_dense_student_is_width_pruned_too(tmp_path):
    from nexus_core.demo import model_factory as mf
    from nexus_core.errors import BadInputError
    from nexus_core.storage.profiles import read_profile
    from tests.helpers import DOCS, setup_home

    sizes = dict(hidden=32, layers=4, heads=4, kv_heads=2, intermediate=16, max_pos=64, experts=4, experts_per_tok=2)
    d = mf.make_teacher(tmp_path / "qwen3_moe", DOCS, arch="qwen3_moe", vocab_size=300, **sizes)
    cfg, teacher, ref, paths = setup_home(tmp_path / "home", d)
    profile, plan = read_profile(paths, "tiny"), DistillPlan(teachers=(teacher,), primary="tiny", datasets=(ref.key,))
    seed, dense = build_student(cfg, plan, paths, "cpu", profile)
    target = int(dense["params"] * 0.9)
    student, info = build_student(_with(cfg, params=str(target)), plan, paths, "cpu", profile)
    assert student.config.model_type == "qwen3" and info["params"] <= target
    assert student.config.intermediate_size < seed.config.intermediate_size
    assert "no shards" in info["width"]["ranked_on"]
    assert info["mlp_from_experts"]  # seeded from the busiest experts first, then narrowed

    d = mf.make_teacher(tmp_path / "deepseek_v3", DOCS, arch="deepseek_v3", vocab_size=300, **sizes)
    cfg, teacher, ref, paths = setup_home(tmp_path / "home2", d)
    plan = DistillPlan(teachers=(teacher,), primary="tiny", datasets=(ref.key,))
    with pytest.raises(BadInputError, match="llama-style"):
        build_student(_with(cfg, params="0.1"), plan, paths, "cpu", read_profile(paths, "tiny"))

