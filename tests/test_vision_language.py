"""Vision-language teachers: their language model distils on text; the vision tower is never loaded or streamed.

A tiny Gemma 3 multimodal model (SigLIP tower + projector + Gemma 3 text model) is saved as transformers
saves it; streamed and full loads of the folder must give exactly the logits the whole multimodal model
gives for text, while reading none of the vision tensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors import safe_open

from nexus_core.demo import model_factory as mf
from nexus_core.errors import BadInputError
from nexus_core.kd.student import build_student
from nexus_core.records.plan import DistillPlan
from nexus_core.storage.profiles import read_profile
from nexus_core.teachers.loading import TeacherLoadError, config_from
from nexus_core.teachers.runner import FullRunner
from nexus_core.teachers.sli import StreamingRunner
from tests.helpers import DOCS, setup_home

VISION = ("vision_tower.", "multi_modal_projector.")


@pytest.fixture(scope="module")
def gemma3_vl(tmp_path_factory):
    tok = mf.train_tokenizer(DOCS, vocab_size=300)
    V = len(tok)
    cfg = tf.Gemma3Config(
        text_config=dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4,
                         max_position_embeddings=64,
                         layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14),
        mm_tokens_per_image=1, image_token_index=V - 1, boi_token_index=V - 2, eoi_token_index=V - 3)
    torch.manual_seed(0)
    model = tf.Gemma3ForConditionalGeneration(cfg).eval()
    d = mf.save_model(model, tok, tmp_path_factory.mktemp("vl") / "gemma3-vl")
    return d, model


def _vision_bytes(d) -> int:
    return _tensor_bytes(d, VISION)


def _tensor_bytes(d, prefixes=("",)) -> int:
    total = 0
    with safe_open(str(d / "model.safetensors"), "pt") as fh:
        for k in fh.keys():
            if k.startswith(prefixes):
                t = fh.get_slice(k)
                total += torch.Size(t.get_shape()).numel() * 4
    return total


@pytest.mark.parametrize("runner", [StreamingRunner, FullRunner])
def test_language_model_alone_gives_the_multimodal_models_text_logits(gemma3_vl, runner):
    d, model = gemma3_vl
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 290, (3, 12), generator=g)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, :4] = 0
    mask[2, 9:] = 0
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    r = runner(d)
    assert r.config.model_type == "gemma3_text"
    logits = r.logits(r.forward(ids, mask).final_hidden)
    assert torch.equal(logits, ref)  # bit for bit on CPU fp32
    if runner is StreamingRunner:  # every tensor read is the language model's
        assert not any(k.startswith(VISION) for k in r.store.stored_name.values())
        text_bytes = _tensor_bytes(d) - _vision_bytes(d)
        embed = 4 * r.head_vocab * r.config.hidden_size  # the tied head reads the embedding a second time
        assert _vision_bytes(d) > 0 and r.stats["bytes_read"] == text_bytes + embed
    else:
        assert not any(n.startswith(("model.vision", "vision")) for n, _ in r.model.named_parameters())
    r.close()


def test_profile_says_so_and_the_student_is_the_language_model(tmp_path, gemma3_vl):
    d, _ = gemma3_vl
    cfg, teacher, ref, paths = setup_home(tmp_path / "home", d)
    profile = read_profile(paths, "tiny")
    assert profile["model_type"] == "gemma3_text" and "never loaded" in profile["vision_tower"]
    assert not any(k.startswith(VISION) for k in json.dumps(profile["dtypes"]))
    plan = DistillPlan(teachers=(teacher,), primary="tiny", datasets=(ref.key,))
    student, info = build_student(cfg, plan, paths, "cpu", profile)
    assert type(student).__name__ == "Gemma3ForCausalLM" and info["source"] == "pruned"


def test_a_language_model_transformers_cannot_build_alone_is_refused_by_name(tmp_path):
    tf.Glm4vConfig().save_pretrained(tmp_path)  # GLM-4V: its glm4v_text language model has no causal LM class
    with pytest.raises(TeacherLoadError, match="vision-language model .*glm4v_text.*text-only"):
        config_from(tmp_path)


@pytest.fixture(scope="module")
def qwen3_vl(tmp_path_factory):
    tok = mf.train_tokenizer(DOCS, vocab_size=300)
    V = len(tok)
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1], "mrope_interleaved": True}
    cfg = tf.Qwen3VLConfig(
        text_config=dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                         rope_parameters=rope),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                           patch_size=14, deepstack_visual_indexes=[0]),
        image_token_id=V - 1, video_token_id=V - 2, vision_start_token_id=V - 3, vision_end_token_id=V - 4,
        tie_word_embeddings=False)
    torch.manual_seed(0)
    model = tf.Qwen3VLForConditionalGeneration(cfg).eval()
    return mf.save_model(model, tok, tmp_path_factory.mktemp("qvl") / "qwen3-vl"), model, ("model.visual.",)


_QWEN_VISION = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, patch_size=14)
_QWEN_TEXT = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)


def _qwen_vl_ids(V) -> dict:
    return dict(image_token_id=V - 1, video_token_id=V - 2, vision_start_token_id=V - 3, vision_end_token_id=V - 4)


@pytest.fixture(scope="module")
def qwen2_5_vl(tmp_path_factory):
    """Qwen2.5-VL: saved as transformers saves it, `model.layers.*` (text names already) beside `visual.*`;
    its multimodal RoPE splits the rotary dims 2/1/1 over (t, h, w), not interleaved."""
    tok = mf.train_tokenizer(DOCS, vocab_size=300)
    V = len(tok)
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]}
    cfg = tf.Qwen2_5_VLConfig(text_config=dict(vocab_size=V, rope_parameters=rope, bos_token_id=1, eos_token_id=2,
                                               **_QWEN_TEXT),
                              vision_config=dict(fullatt_block_indexes=[0], **_QWEN_VISION),
                              tie_word_embeddings=False, **_qwen_vl_ids(V))
    torch.manual_seed(0)
    model = tf.Qwen2_5_VLForConditionalGeneration(cfg).eval()
    d = mf.save_model(model, tok, tmp_path_factory.mktemp("q25vl") / "qwen2_5-vl")
    return d, model, ("visual.",)


@pytest.fixture(scope="module")
def qwen3_vl_moe(tmp_path_factory):
    """Qwen3-VL-MoE: 4 experts, top 2, layer 0 sparse and layer 1 dense; moe_intermediate_size 8 so that a transposed expert
    tensor could not pass for the module's layout (2I=16 != H=32); head_dim 16, not hidden // heads (Qwen3-MoE's
    fallback when a config drops it)."""
    tok = mf.train_tokenizer(DOCS, vocab_size=300)
    V = len(tok)
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1], "mrope_interleaved": True}
    cfg = tf.Qwen3VLMoeConfig(
        text_config=dict(vocab_size=V, head_dim=16, rope_parameters=rope, moe_intermediate_size=8, num_experts=4,
                         num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[1], **_QWEN_TEXT),
        vision_config=dict(deepstack_visual_indexes=[0], **_QWEN_VISION), tie_word_embeddings=False,
        **_qwen_vl_ids(V))
    torch.manual_seed(0)
    model = tf.Qwen3VLMoeForConditionalGeneration(cfg).eval()
    d = mf.save_model(model, tok, tmp_path_factory.mktemp("q3vlmoe") / "qwen3-vl-moe")
    return d, model, ("model.visual.",)


@pytest.fixture(scope="module")
def qwen3_vl_moe_release(qwen3_vl_moe, tmp_path_factory):
    """The same model as Qwen's release stores it: fused experts (E, H, 2I) and (E, I, H), the transpose of
    transformers' modules (its conversion_mapping transposes them on load)."""
    import shutil

    from safetensors.torch import load_file, save_file

    d, model, vision = qwen3_vl_moe
    out = Path(shutil.copytree(d, tmp_path_factory.mktemp("q3vlmoe-release") / "qwen3-vl-moe"))
    state = load_file(str(d / "model.safetensors"))
    experts = [k for k in state if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    assert experts
    for k in experts:
        state[k] = state[k].transpose(1, 2).contiguous()
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out, model, vision


@pytest.fixture(scope="module")
def step3_vl(tmp_path_factory):
    """Step3-VL (`step3p7`): a dense layer, then two MoE layers (4 experts, top 2, a shared expert), a sliding
    layer with fewer heads, clamped SwiGLU; saved as transformers saves it (the release layout: `model.layers.*`
    with moe.{gate,up,down}_proj stacked per layer, beside vision_model.* and vit_large_projector.*). Every
    parameter and the router bias are random: their init (zero norms and bias) would hide a mix-up."""
    tok = mf.train_tokenizer(DOCS, vocab_size=300)
    V = len(tok)
    cfg = tf.Step3p7Config(
        text_config=dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                         moe_intermediate_size=8, n_routed_experts=4, num_experts_per_tok=2, share_expert_dim=16,
                         mlp_layer_types=["dense", "sparse", "sparse"], sliding_window=4,
                         layer_types=["full_attention", "sliding_attention", "full_attention"],
                         num_sliding_attention_heads=2, swiglu_limits=[0, 0, 0.5], swiglu_limits_shared=[0, 0, 0.5],
                         pad_token_id=0),
        vision_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14,
                           max_position_embeddings=4),
        image_token_id=V - 1)
    torch.manual_seed(0)
    model = tf.Step3p7ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.2)
    d = mf.save_model(model, tok, tmp_path_factory.mktemp("step3vl") / "step3-vl")
    return d, model, ("vision_model.", "vit_large_projector.")


# family fixture -> the text model its language model runs as (loading.TEXT_AS; Step3-VL: text_models.py)
RUNS_AS = {"qwen3_vl": "qwen3", "qwen2_5_vl": "qwen2", "qwen3_vl_moe": "qwen3_moe", "qwen3_vl_moe_release": "qwen3_moe",
           "step3_vl": "step3p5"}


@pytest.mark.parametrize("runner", [StreamingRunner, FullRunner])
@pytest.mark.parametrize("family", sorted(RUNS_AS))
def test_vl_language_model_runs_as_its_text_model(request, family, runner):
    """Qwen3-VL's, Qwen2.5-VL's and Qwen3-VL-MoE's text models have no causal LM class; on text (three equal
    position components) their multimodal RoPE is plain RoPE, so they run as Qwen3, Qwen2 and Qwen3-MoE;
    Step3-VL's runs as Nexus's causal LM around it. The multimodal model's text logits, bit for bit (CPU fp32,
    the same kernels), with no vision tensor read."""
    d, model, *vision = request.getfixturevalue(family)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 290, (3, 12), generator=g)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, :4] = 0
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    r = runner(d)
    assert r.config.model_type == RUNS_AS[family]
    assert torch.equal(r.logits(r.forward(ids, mask).final_hidden), ref)
    if runner is StreamingRunner and vision:
        assert not any(k.startswith(vision[0]) for k in r.store.stored_name.values())
        assert r.stats["bytes_read"] == _tensor_bytes(d) - _tensor_bytes(d, vision[0])
    r.close()


@pytest.mark.parametrize("sli", ["never", "always"])
@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl_moe", "step3_vl"])
def test_profile_names_the_mode_and_the_text_model(request, tmp_path, family, sli):
    d, *_ = request.getfixturevalue(family)
    _, _, _, paths = setup_home(tmp_path / "home", d, run={"sli": sli})
    profile = read_profile(paths, "tiny")
    assert profile["model_type"] == RUNS_AS[family] and "never loaded" in profile["vision_tower"]
    assert profile["mode"] == {"never": "full", "always": "sli"}[sli]
    assert profile["mode_reason"].startswith(f"--sli {sli}") and profile["sli_supported"]
    assert len(profile["layer_importance"]) == profile["layers"]


@pytest.mark.slow
def test_nexus_run_with_a_vision_language_primary_teacher(tmp_path, redis_conn, redis_url):
    from tests.helpers import ARITH, CODE, ENV, completed_once, make_workdir, nexus

    tok = mf.train_tokenizer(ARITH + CODE, vocab_size=384)
    V = len(tok)
    cfg = tf.Gemma3Config(
        text_config=dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4,
                         max_position_embeddings=64),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14),
        mm_tokens_per_image=1, image_token_index=V - 1, boi_token_index=V - 2, eoi_token_index=V - 3)
    d = mf.save_model(tf.Gemma3ForConditionalGeneration(cfg), tok, tmp_path / "teachers" / "gemma3-vl")
    paths = make_workdir(tmp_path, d)
    result = nexus(paths, "run", redis_url=redis_url, env_extra={**ENV, "NEXUS_RUN_SLI": "always"})
    assert result.returncode == 0, result.stderr[-3000:]
    completed_once(paths)
    assert json.loads((paths.release / "config.json").read_text())["model_type"] == "gemma3_text"


@pytest.mark.slow
def test_nexus_run_with_a_qwen3_vl_moe_primary_teacher_streamed(tmp_path, redis_conn, redis_url):
    """Qwen3-VL-MoE as released by transformers, `--sli always`: profiled and extracted streamed as Qwen3-MoE
    (the vision tower never read), and its language model seeds the dense student (Qwen3)."""
    from tests.helpers import ARITH, CODE, ENV, completed_once, make_workdir, nexus

    tok = mf.train_tokenizer(ARITH + CODE, vocab_size=384)
    V = len(tok)
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1], "mrope_interleaved": True}
    cfg = tf.Qwen3VLMoeConfig(
        text_config=dict(vocab_size=V, head_dim=16, rope_parameters=rope, moe_intermediate_size=16, num_experts=4,
                         num_experts_per_tok=2, **{**_QWEN_TEXT, "num_hidden_layers": 4}),
        vision_config=dict(deepstack_visual_indexes=[0], **_QWEN_VISION), tie_word_embeddings=False,
        **_qwen_vl_ids(V))
    d = mf.save_model(tf.Qwen3VLMoeForConditionalGeneration(cfg), tok, tmp_path / "teachers" / "qwen3-vl-moe")
    paths = make_workdir(tmp_path, d)
    result = nexus(paths, "run", redis_url=redis_url, env_extra={**ENV, "NEXUS_RUN_SLI": "always"})
    assert result.returncode == 0, result.stderr[-3000:]
    completed_once(paths)
    profile = read_profile(paths, "tiny")
    assert profile["mode"] == "sli" and profile["model_type"] == "qwen3_moe" and profile["expert_load"]
    assert json.loads((paths.release / "config.json").read_text())["model_type"] == "qwen3"


def test_step3_vl_teaches_but_seeds_no_student(tmp_path, step3_vl):
    """A student of Step3-VL's architecture could not be loaded outside Nexus (no causal LM class in
    transformers): as the primary teacher it is refused with what to do instead."""
    d, *_ = step3_vl
    cfg, teacher, ref, paths = setup_home(tmp_path / "home", d)
    plan = DistillPlan(teachers=(teacher,), primary="tiny", datasets=(ref.key,))
    with pytest.raises(BadInputError, match="cannot be the primary teacher: .*step3p5.*--student-config"):
        build_student(cfg, plan, paths, "cpu", read_profile(paths, "tiny"))
