"""Extract stage: stored targets against the model itself, held-out split, resume, corruption, disk, OOM."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig

from nexus_core.teachers.loading import tokenizer_from

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from nexus_core import data
from nexus_core.context import Control
from nexus_core.data import DatasetRef  # noqa: E402
from nexus_core.errors import DatasetError, DiskFullError, NexusError, StageInterrupted  # noqa: E402
from nexus_core.stages.extract import run_extract  # noqa: E402
from nexus_core.storage import shards
from tests.helpers import DOCS, K, Recorder, setup_home, shard_files


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_topk_equals_direct_model(tmp_path, teachers, arch):
    path, model = teachers[arch]
    tokenizer = tokenizer_from(path)  # the teacher's own tokenizer, exactly as saved
    cfg, teacher, ref, paths = setup_home(tmp_path, path, extract={"max_samples": 12})
    res = run_extract(cfg, teacher, ref, paths)
    out_dir = paths.shard_dir("tiny", "reasoning__arith")
    man = shards.read_manifest(out_dir)
    assert man["complete"] and man["k"] == K and man["seq_len"] == 32 and man["tokenizer_vocab"] == len(tokenizer)
    assert [s["sequences"] for s in man["shards"]] == [8, 4] and res.data["sequences"] == 12
    assert res.artifacts == [out_dir / "shard-00000.safetensors", out_dir / "shard-00001.safetensors",
                             out_dir / "manifest.json"]
    assert shards.verify_shards(out_dir) == []
    st = {k: torch.cat([load_file(out_dir / f)[k] for f in ("shard-00000.safetensors", "shard-00001.safetensors")])
          for k in ("input_ids", "attention_mask", "topk_ids", "topk_logprobs", "tail_logmass")}
    assert st["input_ids"].dtype == torch.int32 and st["attention_mask"].dtype == torch.uint8
    assert st["topk_logprobs"].dtype == torch.float16 and st["tail_logmass"].dtype == torch.float32
    ids, mask = data.pack(tokenizer, data.split(DOCS, cfg.extract.heldout_fraction)[0], 32, 12)
    assert torch.equal(st["input_ids"], ids) and torch.equal(st["attention_mask"], mask)
    with torch.no_grad():  # in the extraction's batches: the same shapes give the same float sums
        b = cfg.extract.batch_size
        logits = torch.cat([model(input_ids=ids[i:i + b].long(), attention_mask=mask[i:i + b].long()).logits.float()
                            for i in range(0, ids.shape[0], b)])  # (n, T, 320)
    logp = torch.log_softmax(logits[..., : len(tokenizer)], dim=-1)  # padded rows are not tokens
    top_v, top_i = logp.topk(K, dim=-1)
    real = mask.bool()
    assert int(st["topk_ids"].max()) < len(tokenizer)
    # the same ids, except that exactly tied log-probabilities may come in either order
    same = st["topk_ids"] == top_i.int()
    tied = logp.gather(-1, st["topk_ids"].long()) == top_v
    assert bool((same | tied)[real].all()) and float(same[real].float().mean()) > 0.99
    torch.testing.assert_close(st["topk_logprobs"][real].float(), top_v[real], atol=2e-3, rtol=1e-3)
    tail = torch.log1p(-top_v.exp().sum(-1))  # log(1 - sum p_topk) from the full logits
    torch.testing.assert_close(st["tail_logmass"][real], tail[real], atol=1e-4, rtol=1e-4)
    assert 0 < man["kept_mass"]["p5"] <= man["kept_mass"]["mean"] < 1


def test_heldout_documents_never_extracted(tmp_path, teachers):
    tokenizer = tokenizer_from(teachers["llama"][0])
    docs = DOCS[:60]
    cfg, teacher, ref, paths = setup_home(tmp_path, teachers["llama"][0], docs, extract={"heldout_fraction": 0.2})
    run_extract(cfg, teacher, ref, paths)
    train, heldout = data.split(docs, 0.2)
    assert heldout and train
    text = ""
    for blob in shard_files(paths):
        t = load_file(paths.shard_dir("tiny", "reasoning__arith") / blob)
        text += tokenizer.decode(t["input_ids"][t["attention_mask"].bool()].tolist())
    assert all(d[:8] not in text for d in heldout)
    assert all(d[:8] in text for d in train)
    man = shards.read_manifest(paths.shard_dir("tiny", "reasoning__arith"))
    assert man["documents"] == {"train": len(train), "heldout": len(heldout)}


def test_interrupt_and_resume_is_byte_identical(tmp_path, teachers):
    path = teachers["llama"][0]
    cfg, teacher, ref, ref_paths = setup_home(tmp_path / "a", path, extract={"max_samples": 24})
    run_extract(cfg, teacher, ref, ref_paths)
    expected = shard_files(ref_paths)
    assert len(expected) == 3

    cfg, teacher, ref, paths = setup_home(tmp_path / "b", path, extract={"max_samples": 24})
    stopper = Recorder(stop_after=1)
    with pytest.raises(StageInterrupted) as exc:
        run_extract(cfg, teacher, ref, paths, stopper)
    assert exc.value.reason == "sigusr1"
    assert list(shard_files(paths)) == ["shard-00000.safetensors"]
    assert stopper.of("checkpoint") == [{"step": 1, "reason": "sigusr1"}]
    man = shards.read_manifest(paths.shard_dir("tiny", "reasoning__arith"))
    assert man["complete"] is False and len(man["shards"]) == 1

    ctx = Recorder(script={1: Control.CHECKPOINT, 3: Control.PAUSE})  # neither changes the output
    res = run_extract(cfg, teacher, ref, paths, ctx)
    assert ctx.of("started") == [{"resume_shard": 1}] and res.data["resume_shard"] == 1
    assert ctx.of("checkpoint") == [{"step": 1, "reason": "sigusr2"}, {"step": 2, "reason": "pause"}]
    assert len(ctx.of("waited")) == 1
    assert [p["shard"] for p in ctx.of("progress")] == list(range(2, len(expected) + 1))
    assert shard_files(paths) == expected
    # A finished extraction reruns as a no-op.
    ctx = Recorder()
    run_extract(cfg, teacher, ref, paths, ctx)
    assert ctx.of("started") == [{"resume_shard": len(expected)}] and ctx.of("progress") == []


def test_corrupt_shard_is_detected_and_reextracted(tmp_path, teachers):
    cfg, teacher, ref, paths = setup_home(tmp_path, teachers["qwen2"][0], extract={"max_samples": 24})
    run_extract(cfg, teacher, ref, paths)
    expected = shard_files(paths)
    out_dir = paths.shard_dir("tiny", "reasoning__arith")
    victim = out_dir / "shard-00001.safetensors"
    victim.write_bytes(victim.read_bytes()[:100])  # truncated
    problems = shards.verify_shards(out_dir)
    assert len(problems) == 1 and "shard-00001" in problems[0] and "sha256" in problems[0]
    ctx = Recorder()
    run_extract(cfg, teacher, ref, paths, ctx)
    assert ctx.of("started") == [{"resume_shard": 1}]
    assert shard_files(paths) == expected and shards.verify_shards(out_dir) == []
    # Different data under the same settings: nothing of the old run is reused.
    data_file = tmp_path / "datasets" / "reasoning" / "arith" / "data.jsonl"
    data_file.write_text(json.dumps({"text": "a brand new first document."}) + "\n" + data_file.read_text())
    ctx = Recorder()
    run_extract(cfg, teacher, ref, paths, ctx)
    assert ctx.of("started") == [{"resume_shard": 0}] and len(ctx.of("progress")) == 3
    assert shard_files(paths)["shard-00000.safetensors"] != expected["shard-00000.safetensors"]


def test_full_disk_fails_cleanly(tmp_path, teachers, monkeypatch):
    cfg, teacher, ref, paths = setup_home(tmp_path, teachers["llama"][0], extract={"max_samples": 24})
    out_dir = paths.shard_dir("tiny", "reasoning__arith")
    # 1. Not enough room to start: refused up front, with the bytes needed.
    monkeypatch.setenv(shards.DISK_LIMIT_ENV, "5000")
    with pytest.raises(DiskFullError, match=r"needs about \d+ bytes"):
        run_extract(cfg, teacher, ref, paths)
    assert shard_files(paths) == {}
    # 2. The disk fills mid-run (the estimate is bypassed): the shard being written leaves nothing behind.
    monkeypatch.setattr(shards, "free_bytes_for", lambda d: 1 << 40)
    one_shard = 8 * 32 * (4 + 1 + 6 * K + 4) + 1024
    monkeypatch.setenv(shards.DISK_LIMIT_ENV, str(int(one_shard * 1.5)))
    with pytest.raises(DiskFullError, match="disk full"):
        run_extract(cfg, teacher, ref, paths)
    assert list(shard_files(paths)) == ["shard-00000.safetensors"]
    assert [p.name for p in out_dir.iterdir() if p.name.startswith(".")] == []  # no temp files
    assert shards.verify_shards(out_dir) == []
    # 3. Space again: resumes after the intact shard.
    monkeypatch.delenv(shards.DISK_LIMIT_ENV)
    ctx = Recorder()
    run_extract(cfg, teacher, ref, paths, ctx)
    assert ctx.of("started") == [{"resume_shard": 1}] and shards.read_manifest(out_dir)["complete"]


def test_oom_injection_splits_and_skips(tmp_path, teachers):
    path = teachers["llama"][0]
    cfg, teacher, ref, ref_paths = setup_home(tmp_path / "a", path, extract={"max_samples": 24})
    run_extract(cfg, teacher, ref, ref_paths)
    cfg2, teacher, ref, paths = setup_home(tmp_path / "b", path, extract={"max_samples": 24},
                                           faults={"oom_at_batches": "1,3"})
    ctx = Recorder()
    res = run_extract(cfg2, teacher, ref, paths, ctx)
    # Batch 1 = rows 4..7, batch 3 = rows 12..15: halves are retried, the first row still fails and is skipped.
    assert [(o["batch"], o["skipped"]) for o in ctx.of("oom")] == [(1, [4]), (3, [12])]
    assert all(o["stage"] == "extract" and o["splits"] == 3 for o in ctx.of("oom"))
    man = shards.read_manifest(paths.shard_dir("tiny", "reasoning__arith"))
    assert man["skipped_sequences"] == [4, 12] and res.data["skipped_sequences"] == 2

    def rows(p):
        d = p.shard_dir("tiny", "reasoning__arith")
        parts = [load_file(f) for f in sorted(d.glob("shard-*.safetensors"))]
        return {k: torch.cat([t[k] for t in parts]) for k in parts[0]}

    full, got = rows(ref_paths), rows(paths)
    keep = [i for i in range(full["input_ids"].shape[0]) if i not in (4, 12)]
    for key in full:
        assert torch.equal(got[key], full[key][keep]), key


def test_hidden_states_of_critical_layers(tmp_path, teachers):
    path, model = teachers["llama"]
    cfg, teacher, ref, paths = setup_home(tmp_path, path, extract={"save_hidden": True, "max_samples": 4})
    run_extract(cfg, teacher, ref, paths)
    prof = json.loads(paths.profile("tiny").read_text())
    (layer,) = prof["critical_layers"]
    t = load_file(paths.shard_dir("tiny", "reasoning__arith") / "shard-00000.safetensors")
    assert shards.read_manifest(paths.shard_dir("tiny", "reasoning__arith"))["hidden_layers"] == [layer]
    with torch.no_grad():
        hs = model(input_ids=t["input_ids"].long(), attention_mask=t["attention_mask"].long(),
                   output_hidden_states=True).hidden_states
    if layer < len(hs) - 2:  # hidden_states[-1] is after the final norm
        torch.testing.assert_close(t[f"hidden.{layer}"], hs[layer + 1].half())
    assert t[f"hidden.{layer}"].shape == (4, 32, 64) and t[f"hidden.{layer}"].dtype == torch.float16


def test_dataset_and_profile_errors(tmp_path, teachers):
    cfg, teacher, ref, paths = setup_home(tmp_path, teachers["llama"][0])
    missing = DatasetRef("reasoning", "nope")
    with pytest.raises(DatasetError, match="reasoning/nope"):
        run_extract(cfg, teacher, missing, paths)
    empty = tmp_path / "datasets" / "code" / "empty"
    empty.mkdir(parents=True)
    with pytest.raises(DatasetError, match=str(empty)):
        run_extract(cfg, teacher, DatasetRef("code", "empty"), paths)
    nocol = tmp_path / "datasets" / "code" / "nocol"
    nocol.mkdir(parents=True)
    (nocol / "x.jsonl").write_text('{"foo": "bar"}\n{"foo": "baz"}\n')
    with pytest.raises(DatasetError, match=str(nocol) + r".*text"):
        run_extract(cfg, teacher, DatasetRef("code", "nocol"), paths)
    paths.profile("tiny").unlink()
    with pytest.raises(NexusError, match="run the profile stage"):
        run_extract(cfg, teacher, ref, paths)


def test_sli_mode_gives_the_same_shards(tmp_path, teachers):
    sli = pytest.importorskip("nexus_core.teachers.sli")
    path = teachers["llama"][0]
    if not sli.sli_support(AutoConfig.from_pretrained(path))[0]:
        pytest.skip("SLI does not stream llama")
    cfg, teacher, ref, full_paths = setup_home(tmp_path / "full", path, extract={"max_samples": 12})
    run_extract(cfg, teacher, ref, full_paths)
    cfg, teacher, ref, sli_paths = setup_home(tmp_path / "sli", path, run={"sli": "always"}, extract={"max_samples": 12})
    assert json.loads(sli_paths.profile("tiny").read_text())["mode"] == "sli"
    run_extract(cfg, teacher, ref, sli_paths)
    assert shards.read_manifest(sli_paths.shard_dir("tiny", "reasoning__arith"))["mode"] == "sli"
    assert shard_files(sli_paths) == shard_files(full_paths)  # bit-identical on CPU fp32


class _FakeRunner:
    """final_hidden = given logits; logits() is the identity (so the numerics can be checked exactly)."""

    num_layers, head_vocab = 1, 12

    def __init__(self, logits):
        self.z = logits

    def forward(self, ids, mask, keep_layers=(), influence=False):
        from nexus_core.teachers.runner import ForwardOutput
        return ForwardOutput(final_hidden=self.z[: ids.shape[0]])

    def logits(self, h):
        return h.float().clone()


def test_targets_numerics_padding_clamp_and_chunking():
    from nexus_core.stages.extract import _targets
    from nexus_core.teachers.logits import LOG_EPS

    torch.manual_seed(0)
    z = torch.randn(2, 5, 12) * 4  # (n, T, V=12); the tokenizer has 10 real tokens
    z[0, 0, :3] = 0.0
    z[0, 0, 3:] = -1e4  # all mass in 3 tokens -> tail is (numerically) zero -> clamped, finite
    z[1, :, 10:] = 50.0  # padded rows would dominate if they were not masked
    ids, mask = torch.zeros(2, 5, dtype=torch.int32), torch.ones(2, 5, dtype=torch.uint8)

    class Ex:
        top_k, logit_chunk = 3, 4

    a = _targets(_FakeRunner(z), ids, mask, Ex, real_vocab=10, hidden_layers=[])
    Ex.logit_chunk = 1000
    b = _targets(_FakeRunner(z), ids, mask, Ex, real_vocab=10, hidden_layers=[])
    assert all(torch.equal(a[k], b[k]) for k in a)  # chunking does not change values
    logp = torch.log_softmax(z[..., :10].double(), -1)
    v, i = logp.topk(3, -1)
    assert torch.equal(a["topk_ids"], i.int()) and int(a["topk_ids"].max()) < 10
    torch.testing.assert_close(a["topk_logprobs"].float(), v.float(), atol=2e-3, rtol=1e-3)
    assert a["tail_logmass"][0, 0] == pytest.approx(LOG_EPS) and torch.isfinite(a["tail_logmass"]).all()
    expect = torch.log1p(-v.exp().sum(-1)).float()
    torch.testing.assert_close(a["tail_logmass"][1], expect[1], atol=1e-5, rtol=1e-5)


def test_logit_chunks_are_sized_by_the_heads_width(tmp_path, teachers, monkeypatch):
    """A head padded past the tokenizer (Gemma 3: 262k rows) sizes the auto logits chunk, not the tokenizer."""
    from nexus_core.stages import extract
    from nexus_core.teachers import logits

    path, _ = teachers["llama"]  # head 320 rows, tokenizer ~300
    monkeypatch.setattr(logits, "LOGIT_CHUNK_BYTES", 4 * 320 * 15)  # 15 positions of the head (16 of the tokenizer)
    seen = []
    real = extract.topk_targets
    monkeypatch.setattr(extract, "topk_targets", lambda fn, flat, k, v, chunk: seen.append(chunk) or real(
        fn, flat, k, v, chunk))
    cfg, teacher, ref, paths = setup_home(tmp_path, path, extract={"max_samples": 4, "logit_chunk": 0})
    run_extract(cfg, teacher, ref, paths)
    assert seen and set(seen) == {15}
