"""The families users arrive with, through the real profile and extract stages: `--sli always` and
`--sli never` write byte-identical shards (top-k ids, log-probs, tail mass; CPU fp32), and the profile names
the mode and why. Tiny random configs from the model factory (nexus_core/demo/model_factory.FAMILIES)."""

from __future__ import annotations

import json

import pytest

from nexus_core.demo import model_factory as mf
from nexus_core.stages.extract import run_extract
from nexus_core.storage import shards
from tests.helpers import DOCS, setup_home, shard_files

SIZES = dict(hidden=32, layers=3, heads=4, kv_heads=2, intermediate=16, max_pos=64, experts=4, experts_per_tok=2)
NAMES = {"qwen3_moe": "Qwen3-MoE", "deepseek_v3": "DeepSeek-V3", "gemma3_text": "Gemma 3", "phi3": "Phi-3",
         "gpt_oss": "gpt-oss"}


@pytest.fixture(scope="module")
def tok():
    return mf.train_tokenizer(DOCS, vocab_size=300)


@pytest.mark.parametrize("arch", mf.FAMILIES)
def test_streamed_and_full_extraction_write_the_same_shards(tmp_path, tok, arch):
    d = mf.make_teacher(tmp_path / arch, DOCS, arch=arch, tokenizer=tok, **SIZES)
    made = {}
    for sli in ("never", "always"):
        cfg, teacher, ref, paths = setup_home(tmp_path / sli, d, run={"sli": sli}, extract={"max_samples": 8})
        profile = json.loads(paths.profile("tiny").read_text())
        run_extract(cfg, teacher, ref, paths)
        manifest = shards.read_manifest(paths.shard_dir("tiny", "reasoning__arith"))
        made[sli] = (profile, manifest, shard_files(paths))
    (full, full_manifest, full_shards), (sli, sli_manifest, sli_shards) = made["never"], made["always"]
    assert (full["mode"], sli["mode"]) == ("full", "sli") == (full_manifest["mode"], sli_manifest["mode"])
    assert full["mode_reason"].startswith("--sli never")
    assert sli["mode_reason"].startswith("--sli always; " + NAMES[arch]) and "stream one at a time" in sli["mode_reason"]
    assert full_shards and sli_shards == full_shards  # bit-identical shards
