"""A mixture-of-experts primary teacher seeds a dense student (nexus_core/kd/dense_student.py).

The profile counts each expert's routed load on the calibration data; the student is the teacher's
dense sibling whose MLPs start as the shared experts + the busiest routed experts; `nexus run`
completes end to end with a MoE primary teacher.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from nexus_core.demo import model_factory as mf
from nexus_core.kd.dense_student import DENSE_SIBLING, rank_experts
from nexus_core.kd.student import build_student
from nexus_core.records.plan import DistillPlan
from nexus_core.storage.profiles import read_profile
from tests.helpers import ARITH, CODE, DOCS, ENV, completed_once, make_workdir, nexus, setup_home
from tests.quantised_files import write_fp8_teacher

MOE = ("mixtral", "qwen3_moe", "deepseek_v3")
SIZES = dict(hidden=32, layers=4, heads=4, kv_heads=2, intermediate=16, max_pos=64, experts=4, experts_per_tok=2)


def _teacher(root, arch, texts, vocab=300):
    return mf.make_teacher(root / arch, texts, arch=arch, vocab_size=vocab, **SIZES)


def _experts_out(mlp, x, experts: list[int], scale: float) -> torch.Tensor:
    """What the seeded dense MLP must compute: shared experts + scale * sum of the taken routed experts."""
    moe = getattr(mlp, "experts", None)
    out = mlp.shared_experts(x) if hasattr(mlp, "shared_experts") else torch.zeros_like(x)
    for e in experts:
        gate, up = torch.nn.functional.linear(x, moe.gate_up_proj[e]).chunk(2, dim=-1)
        out = out + scale * torch.nn.functional.linear(moe.act_fn(gate) * up, moe.down_proj[e])
    return out


@pytest.mark.parametrize("arch", MOE)
def test_dense_student_starts_from_the_busiest_experts(tmp_path, arch):
    d = _teacher(tmp_path, arch, DOCS)
    cfg, teacher, ref, paths = setup_home(tmp_path / "home", d)
    profile = read_profile(paths, "tiny")
    load = profile["expert_load"]
    tcfg = AutoModelForCausalLM.from_pretrained(d).config
    moe_layers = [i for i in range(4) if not (arch == "deepseek_v3" and i < tcfg.first_k_dense_replace)]
    assert sorted(map(int, load)) == moe_layers
    tokens = profile["calibration"]["sequences"] * cfg.extract.seq_len
    assert all(sum(c) == tokens * 2 for c in load.values())  # every token routes to experts_per_tok experts

    plan = DistillPlan(teachers=(teacher,), primary="tiny", datasets=(ref.key,))
    student, info = build_student(cfg, plan, paths, "cpu", profile)
    assert student.config.model_type == DENSE_SIBLING[arch] and info["source"].startswith("pruned, dense")
    assert not any("experts" in n for n, _ in student.named_parameters())
    kept = info["kept_layers"]
    assert len(kept) == 2 and info["teacher_layers"] == 4

    model = AutoModelForCausalLM.from_pretrained(d).eval()
    t_layers, s_layers = model.model.layers, student.model.layers
    x = torch.randn(5, 32)
    for j, k in enumerate(kept):
        s_mlp, t_mlp = s_layers[j].mlp, t_layers[k].mlp
        s_attn, t_attn = s_layers[j].self_attn, t_layers[k].self_attn
        for name, p in t_attn.named_parameters():  # attention copied from the kept teacher layer
            assert torch.equal(dict(s_attn.named_parameters())[name], p), name
        if str(k) not in load:  # a dense teacher layer (DeepSeek-V3's first) is copied as is
            assert torch.equal(s_mlp.gate_proj.weight, t_mlp.gate_proj.weight)
            continue
        used = info["mlp_from_experts"][str(j)]
        per_expert = 16
        shared = 16 if arch == "deepseek_v3" else 0
        n_taken = (student.config.intermediate_size - shared) // per_expert
        assert used["experts"] == rank_experts(load[str(k)], 4)[:n_taken]  # busiest first
        scale = getattr(tcfg, "routed_scaling_factor", 1.0) / n_taken
        with torch.no_grad():
            want = _experts_out(t_mlp, x, used["experts"], scale)
            assert torch.allclose(s_mlp(x), want, atol=1e-5), (arch, j)


@pytest.mark.slow
@pytest.mark.parametrize("arch", MOE)
def test_nexus_run_with_a_moe_primary_teacher(tmp_path, redis_conn, redis_url, arch):
    d = _teacher(tmp_path / "teachers", arch, ARITH + CODE, vocab=384)
    paths = make_workdir(tmp_path, d)
    result = nexus(paths, "run", redis_url=redis_url, env_extra=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    completed_once(paths)
    released = json.loads((paths.release / "config.json").read_text())
    assert released["model_type"] == DENSE_SIBLING[arch]
    profile = json.loads(paths.profile("tiny").read_text())
    assert profile["moe"] and profile["expert_load"]


@pytest.mark.slow
def test_nexus_run_with_deepseek_v3_in_its_fp8_release_format_streamed(tmp_path, redis_conn, redis_url):
    """The manual's first teacher as released (FP8 + block scales), `--sli always`: profiled and extracted
    streamed (never a silent full load), and it seeds the dense student."""
    tok = mf.train_tokenizer(ARITH + CODE, vocab_size=384)
    fp8, _ = write_fp8_teacher(tmp_path / "teachers", tok, ARITH + CODE)
    paths = make_workdir(tmp_path, fp8)
    result = nexus(paths, "run", redis_url=redis_url, env_extra={**ENV, "NEXUS_RUN_SLI": "always"})
    assert result.returncode == 0, result.stderr[-3000:]
    completed_once(paths)
    profile = json.loads(paths.profile("tiny").read_text())
    assert profile["mode"] == "sli" and "FP8" in profile["mode_reason"] and profile["expert_load"]
    for manifest in paths.memory.glob("tiny/*/manifest.json"):
        assert json.loads(manifest.read_text())["mode"] == "sli"
    released = json.loads((paths.release / "config.json").read_text())
    assert released["model_type"] == "deepseek_v3" and "quantization_config" not in released  # ships in full precision
    AutoModelForCausalLM.from_pretrained(paths.release)  # and loads as it is
