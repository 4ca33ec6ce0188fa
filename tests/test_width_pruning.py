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
    model, info = build_student(_with(cfg, params="90K", layer_ratio=0.5), plan, paths, "cpu", _profile(paths))
    assert "depth_search" not in info  # the depth was set: no search
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
    model, info = build_student(_with(cfg, params="0.2", layer_ratio=0.5), plan, paths, "cpu", _profile(paths))
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
    assert load_settings(tmp_path, environ={}).student.layer_ratio == 0  # auto
    with pytest.raises(ConfigError, match="--student-layer-ratio"):
        load_settings(tmp_path, environ={}, student={"layer_ratio": 1.5})


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
    assert "no calibration rows" in info["depth_search"]["skipped"]  # nothing to score depths on: half the layers
    assert student.config.num_hidden_layers == 2
    assert info["mlp_from_experts"]  # seeded from the busiest experts first, then narrowed

    d = mf.make_teacher(tmp_path / "deepseek_v3", DOCS, arch="deepseek_v3", vocab_size=300, **sizes)
    cfg, teacher, ref, paths = setup_home(tmp_path / "home2", d)
    plan = DistillPlan(teachers=(teacher,), primary="tiny", datasets=(ref.key,))
    with pytest.raises(BadInputError, match="llama-style"):
        build_student(_with(cfg, params="0.1"), plan, paths, "cpu", read_profile(paths, "tiny"))



# --- depth and width chosen together (kd/depth_search.py) -------------------------------------------

def test_student_params_without_a_depth_searches_the_depths_and_keeps_the_best(trained):
    from nexus_core.kd import depth_search
    from nexus_core.kd.student import calibration_rows

    cfg, plan, paths, ids, mask = trained
    model, info = build_student(_with(cfg, params="90K"), plan, paths, "cpu", _profile(paths))
    search = info["depth_search"]
    assert [c["layers"] for c in search["candidates"]] == [4, 3, 2]  # all, 3/4 and 1/2 of the layers
    best = min(search["candidates"], key=lambda c: c["score"])
    assert search["chosen"] == best["layers"] == model.config.num_hidden_layers == len(info["kept_layers"])
    assert all(c["params"] <= 90_000 for c in search["candidates"]) and info["params"] == best["params"] <= 90_000
    assert "calibration rows" in search["scored_on"]
    rows, rmask = calibration_rows(plan, paths, cfg.profile.calibration_samples)
    assert depth_search.lm_loss(model, rows, rmask) == pytest.approx(best["score"], abs=1e-4)  # the one scored
    again, info2 = build_student(_with(cfg, params="90K"), plan, paths, "cpu", _profile(paths))
    assert info2["depth_search"]["candidates"] == search["candidates"]  # deterministic: same inputs, same choice
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_student_layers_set_skips_the_search(trained):
    cfg, plan, paths, _, _ = trained
    model, info = build_student(_with(cfg, params="90K", layers=3), plan, paths, "cpu", _profile(paths))
    assert "depth_search" not in info and model.config.num_hidden_layers == 3 and info["params"] <= 90_000


def test_when_no_depth_can_be_built_the_fixed_depth_path_says_why(trained):
    from nexus_core.errors import BadInputError

    cfg, plan, paths, _, _ = trained
    with pytest.raises(BadInputError, match="even the narrowest"):  # no depth reaches the target
        build_student(_with(cfg, params="1K"), plan, paths, "cpu", _profile(paths))
    small = dataclasses.replace(_with(cfg, params="90K"), memory=dataclasses.replace(cfg.memory, budget="1MB"))
    with pytest.raises(BadInputError, match="does not fit the memory budget"):  # none fits: --student-config helps
        build_student(small, plan, paths, "cpu", _profile(paths))


@pytest.fixture(scope="module")
def base(trained):
    """A small teacher that uses all of its width and depth (a narrow MLP, trained long enough for its heads and
    layers to matter): cutting any of it costs measurable cross-entropy."""
    from nexus_core.teachers.loading import tokenizer_from

    cfg, plan, paths, ids, mask = trained
    tok = tokenizer_from(plan.primary_teacher.path)
    config = make_config("llama", vocab_size=len(tok), hidden=64, layers=4, heads=4, kv_heads=2, intermediate=32,
                         tokenizer=tok, max_pos=64)
    return _train(build_model(config, seed=0), ids, mask, steps=150), tok


def _planted(trained, base, name: str, **sizes):
    """A teacher computing exactly `base`'s function with room to spare: more `num_hidden_layers` (base's layers at
    even positions, identity layers, o/down projections zero, between them) or a wider `intermediate_size` (the
    MLP channels base lacks never fire)."""
    cfg, _, paths, _, _ = trained
    small, tok = base
    config = small.config.__class__.from_dict({**small.config.to_dict(), **sizes})
    model = build_model(config, seed=5).float()
    every = config.num_hidden_layers // small.config.num_hidden_layers  # 2: every other layer is base's
    small_state = small.state_dict()
    with torch.no_grad():
        for key, t in model.state_dict().items():
            if "layers." in key:
                j = int(key.split("layers.")[1].split(".")[0])
                if j % every:  # an identity layer adds nothing to the residual stream
                    if key.endswith(("o_proj.weight", "down_proj.weight")):
                        t.zero_()
                    continue
                key = key.replace(f"layers.{j}.", f"layers.{j // every}.")
            src = small_state[key]
            t.zero_()  # channels base lacks stay dead
            t[tuple(slice(0, n) for n in src.shape)] = src
    folder = paths.home / "models" / name
    save_model(model, tok, folder)
    teacher = Teacher(teacher_id=name, path=str(folder.resolve()), status="ready", source=f"registry/{name}.json",
                      weight_files=_weight_files(folder))
    importance = [0.0 if j % every else 1.0 - j / (2 * config.num_hidden_layers)
                  for j in range(config.num_hidden_layers)]  # block influence: 0 for an identity layer
    write_profile(paths, teacher, tok, importance=importance, critical=[0], hidden=64)
    write_shards(cfg, paths, teacher, DATASET, tok)
    return DistillPlan(teachers=(teacher,), primary=name, datasets=(DATASET,))


@pytest.mark.parametrize("spare", ["num_hidden_layers", "intermediate_size"])
def test_the_search_cuts_what_the_teacher_can_spare(trained, base, spare):
    """Cut to base's size, a teacher with spare identity layers must lose depth and one with spare MLP channels
    width: the chosen student is then base itself (its cross-entropy), and every other candidate scores worse."""
    from nexus_core.kd import depth_search
    from nexus_core.kd.student import calibration_rows
    from nexus_core.storage.profiles import read_profile

    cfg, _, paths, _, _ = trained
    small = base[0]
    plan = _planted(trained, base, f"spare-{spare}", **{spare: 2 * getattr(small.config, spare)})
    target = sum(p.numel() for p in small.parameters())
    model, info = build_student(_with(cfg, params=str(target)), plan, paths, "cpu", read_profile(paths, plan.primary))
    search = info["depth_search"]
    scored = [c for c in search["candidates"] if "score" in c]
    assert search["chosen"] == 4 and len(scored) >= 2, search["candidates"]
    rows, rmask = calibration_rows(plan, paths, cfg.profile.calibration_samples)
    exact = depth_search.lm_loss(small, rows, rmask)
    best = next(c for c in scored if c["layers"] == 4)
    assert best["score"] == pytest.approx(exact, abs=1e-3) and best["params"] == target
    assert all(c["score"] > exact + 0.02 for c in scored if c is not best), (exact, search["candidates"])
