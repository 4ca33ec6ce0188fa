"""GGUF teachers: the registry's path forms, GGUFStore against transformers' own GGUF load, full and
SLI runners, the profile and extract stages, the student's seeding, and the real-model bugs
(tokenizer's stray <|endoftext|>, digits-first pre-tokenizers, tied heads, RoPE scaling) on tiny files
written by tests/gguf_files.py."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import AutoModelForCausalLM  # noqa: E402

from nexus_core.demo import model_factory as mf  # noqa: E402
from nexus_core.records.registry import parse_teacher  # noqa: E402
from nexus_core.stages.extract import run_extract  # noqa: E402
from nexus_core.storage import shards  # noqa: E402
from nexus_core.teachers import gguf as G  # noqa: E402
from nexus_core.teachers.loading import config_from, tokenizer_from  # noqa: E402
from nexus_core.teachers.runner import FullRunner  # noqa: E402
from nexus_core.teachers.sli import StreamingRunner  # noqa: E402
from nexus_core.teachers.weights import open_weights  # noqa: E402
from tests.gguf_files import write_gguf  # noqa: E402
from tests.helpers import DOCS, setup_home, shard_files  # noqa: E402

TEXTS = DOCS + [f"def f_{i}(x):\n    return x + {i}\n        y = {i * 7}\n" for i in range(80)]
# Every type the issue names, one matrix each in layer 0; the rest Q4_K (K-quants need rows of 256).
TYPES = {"blk.0.attn_q.weight": "Q4_K", "blk.0.attn_k.weight": "Q6_K", "blk.0.attn_v.weight": "Q4_0",
         "blk.0.attn_output.weight": "Q4_1", "blk.0.ffn_gate.weight": "BF16", "blk.0.ffn_up.weight": "F16",
         "blk.0.ffn_down.weight": "Q6_K", "token_embd.weight": "Q8_0", "output.weight": "Q6_K",
         "blk.1.ffn_down.weight": "F32"}
SIZES = dict(hidden=256, layers=2, heads=4, kv_heads=2, intermediate=512, max_pos=64)


@pytest.fixture(scope="module")
def tok():
    return mf.train_tokenizer(TEXTS, vocab_size=320)


@pytest.fixture(scope="module")
def quantised(tmp_path_factory, tok):
    """(gguf file, the HF model it was written from) with every tensor type of TYPES."""
    model = mf.build_model(mf.make_config("llama", vocab_size=len(tok), tokenizer=tok, **SIZES), seed=1)
    d = tmp_path_factory.mktemp("gguf")
    return write_gguf(model, tok, d / "tiny-q.gguf", qtype="Q4_K", types=TYPES), model


@pytest.fixture(scope="module")
def tied(tmp_path_factory, tok):
    """A tied-embedding teacher (no output.weight, as SmolLM2 and most small GGUFs) stored in F32."""
    model = mf.build_model(mf.make_config("llama", vocab_size=len(tok), tokenizer=tok, tie_word_embeddings=True,
                                          **dict(SIZES, hidden=64, intermediate=128)), seed=2)
    model.tie_weights()
    d = tmp_path_factory.mktemp("gguf-tied")
    return write_gguf(model, tok, d / "tiny-tied.gguf", qtype="F32", add_bos=True,
                      chat_template="{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"), model


def _chunk(vocab: int, n: int = 3, T: int = 12):
    ids = torch.randint(4, vocab, (n, T), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(n, T, dtype=torch.long)
    mask[1, :4] = 0
    mask[2, T - 3:] = 0
    return ids, mask


def _transformers_load(file):
    return AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name).eval()


# --- GGUFStore -------------------------------------------------------------------------------------

def test_store_reads_every_type_as_transformers_dequantises_it(quantised):
    file, original = quantised
    store = open_weights(file)
    assert isinstance(store, G.GGUFStore)
    # meta: HF names with shape and stored type from the header alone
    meta = store.meta.tensors
    assert meta["model.layers.0.self_attn.q_proj.weight"].dtype == "Q4_K"
    assert meta["model.layers.0.mlp.gate_proj.weight"].dtype == "BF16"
    assert meta["model.embed_tokens.weight"].dtype == "Q8_0"
    assert meta["model.layers.0.input_layernorm.weight"].dtype == "F32"
    assert {t.dtype for t in meta.values()} == set(TYPES.values()) | {"F32"}
    assert set(meta) == set(original.state_dict())
    assert all(meta[n].shape == tuple(p.shape) for n, p in original.state_dict().items())
    assert store.meta.params == sum(p.numel() for p in original.parameters())
    assert store.meta.bytes == sum(t.nbytes for t in G.read_header(file).tensors.values())
    assert store.meta.bytes < store.meta.params * 2  # mostly 4-bit blocks
    reference = _transformers_load(file).state_dict()
    with store.reading() as read:
        for name in meta:
            got = read(name)
            assert got.dtype == torch.float32
            assert torch.equal(got, reference[name]), name  # same dequantisation, same Q/K un-permutation
            # and close to the weights it was quantised from (a wrong block layout or permutation is not)
            want = original.state_dict()[name]
            assert (got - want).abs().max() <= 0.15 * want.abs().max() + 1e-6, name
    assert store.bytes_read == store.meta.bytes


def test_full_and_streamed_runs_match_transformers_gguf_load(quantised, tok):
    file, _ = quantised
    ids, mask = _chunk(len(tok))
    with torch.no_grad():
        want = _transformers_load(file)(input_ids=ids, attention_mask=mask).logits
    full = FullRunner(file)
    out = full.forward(ids, mask, keep_layers=[0], influence=True)
    logits = full.logits(out.final_hidden)
    assert torch.equal(logits, want)
    sli = StreamingRunner(file)
    s_out = sli.forward(ids, mask, keep_layers=[0], influence=True)
    assert torch.equal(sli.logits(s_out.final_hidden), logits)  # bit-identical on CPU fp32
    assert torch.equal(s_out.hidden[0], out.hidden[0]) and torch.equal(s_out.influence, out.influence)
    assert sli.stats["bytes_read"] > 0
    sli.close()


def test_tied_head_full_sli_and_original_agree(tied, tok):
    file, original = tied
    assert "output.weight" not in G.read_header(file).tensors
    ids, mask = _chunk(len(tok))
    full, sli = FullRunner(file), StreamingRunner(file)
    assert full.model.lm_head.weight is full.model.model.embed_tokens.weight
    logits = full.logits(full.forward(ids, mask).final_hidden)
    assert torch.equal(sli.logits(sli.forward(ids, mask).final_hidden), logits)
    with torch.no_grad():  # F32 file: the original model's own numbers
        torch.testing.assert_close(logits, original(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=1e-5)


# --- registry ----------------------------------------------------------------------------------------

def test_registry_accepts_a_gguf_file_or_a_folder_with_one(tmp_path, tied):
    file, _ = tied
    t = parse_teacher({"teacher_id": "g", "path": str(file), "status": "ready"}, "t.json", tmp_path)
    assert t.path == str(file) and t.weight_files == ((file.name, file.stat().st_size),)
    t2 = parse_teacher({"teacher_id": "g", "path": str(file.parent), "status": "ready"}, "t.json", tmp_path)
    assert t2.path == str(file)  # the folder's one file
    assert t2.fingerprint() == t.fingerprint()


@pytest.mark.parametrize("case, words", [
    ("missing", "does not exist"), ("not-gguf", "not a GGUF file"), ("several", "holds 2 .gguf files"),
    ("split", "split GGUF"), ("text", "not a folder or a .gguf file"),
])
def test_registry_rejects_bad_gguf_paths(tmp_path, tied, case, words):
    from nexus_core.errors import RegistryError

    file, _ = tied
    d = tmp_path / case
    d.mkdir()
    path = {"missing": d / "gone.gguf", "not-gguf": d / "x.gguf", "several": d, "split": d / "m-00001-of-00002.gguf",
            "text": d / "notes.txt"}[case]
    if case in ("not-gguf", "text"):
        path.write_bytes(b"PK\x03\x04 not a gguf")
    if case == "several":
        for name in ("a.gguf", "b.gguf"):
            (d / name).write_bytes(file.read_bytes())
    if case == "split":
        path.write_bytes(file.read_bytes())
    with pytest.raises(RegistryError) as err:
        parse_teacher({"teacher_id": "g", "path": str(path), "status": "ready"}, "t.json", tmp_path)
    assert words in str(err.value) and "\n" not in str(err.value)


# --- stages on a GGUF teacher ------------------------------------------------------------------------

def test_profile_and_extract_full_and_sli_give_the_same_shards(tmp_path, quantised):
    file, _ = quantised
    cfg, teacher, ref, full = setup_home(tmp_path / "full", file, extract={"max_samples": 8})
    prof = json.loads(full.profile("tiny").read_text())
    assert prof["mode"] == "full" and prof["dtypes"]["Q4_K"] > 0 and prof["weight_files"] == [file.name]
    assert prof["params"] == open_weights(file).meta.params and prof["tokenizer_vocab"] == prof["head_vocab"]
    run_extract(cfg, teacher, ref, full)
    cfg, teacher, ref, sli = setup_home(tmp_path / "sli", file, run={"sli": "always"}, extract={"max_samples": 8})
    assert json.loads(sli.profile("tiny").read_text())["mode"] == "sli"
    run_extract(cfg, teacher, ref, sli)
    assert shards.read_manifest(sli.shard_dir("tiny", "reasoning__arith"))["mode"] == "sli"
    assert shard_files(sli) == shard_files(full)


def test_student_is_seeded_from_a_tied_gguf_without_loading_the_teacher(tied):
    from nexus_core.kd.student import _copy_from_weights, pruned_config

    file, _ = tied
    config = config_from(file)
    student = mf.build_model(pruned_config(config, [1]), seed=3)
    assert _copy_from_weights(student, file, [1]) == []  # the tied head counts as filled
    ref = G.load_model(file, torch.float32)
    assert torch.equal(student.model.layers[0].mlp.down_proj.weight, ref.model.layers[1].mlp.down_proj.weight)
    assert torch.equal(student.lm_head.weight, ref.model.embed_tokens.weight)


# --- real-model bugs ---------------------------------------------------------------------------------

def test_tokenizer_has_the_files_ids_only_and_keeps_bos_and_chat_template(tied, tok):
    """transformers' GGUF conversion adds GPT-2's default <|endoftext|> when the vocabulary lacks it: one
    id past the embedding, which the profile rejects (Llama 3 GGUFs spell it <|end_of_text|>)."""
    file, _ = tied
    from transformers import AutoTokenizer

    raw = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
    assert len(raw) == len(tok) + 1  # the bug, as transformers has it
    fixed = tokenizer_from(file)
    assert len(fixed) == len(tok) == G.read_header(file).token_count
    assert fixed.get_vocab() == tok.get_vocab()
    for text in TEXTS[:20] + ["a <s> b </s> c"]:
        assert fixed(text).input_ids == [tok.bos_token_id] + tok(text).input_ids  # add_bos_token is set
    assert fixed.eos_token == "</s>" and fixed.pad_token == "<pad>" and fixed.unk_token == "<unk>"
    assert fixed.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "<s>hi</s>"


def test_digits_first_pre_tokenizer_follows_llama_cpp(tmp_path, tok):
    """SmolLM's tokenizer splits digits off before GPT-2's regex ("smollm" in GGUF); transformers drops that,
    so whitespace before a number tokenises as the model never saw it."""
    from tokenizers import pre_tokenizers

    source = mf.train_tokenizer(TEXTS, vocab_size=320)
    source.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    model = mf.build_model(mf.make_config("llama", vocab_size=len(source), tokenizer=source, hidden=32, layers=1,
                                          heads=4, kv_heads=2, intermediate=64, max_pos=64), seed=0)
    file = write_gguf(model, source, tmp_path / "smol.gguf", pre="smollm")
    got = tokenizer_from(file)
    texts = ["x =  12", "    return x + 345", "a\n  7 b"]
    assert [got(t).input_ids for t in texts] == [source(t).input_ids for t in texts]


def _rope_model(tok, rope: dict):
    cfg = mf.make_config("llama", vocab_size=len(tok), tokenizer=tok, hidden=256, layers=1, heads=4, kv_heads=2,
                         intermediate=64, max_pos=64)
    cfg.rope_parameters = {"rope_theta": 10000.0, **rope}
    return mf.build_model(cfg, seed=4)


@pytest.mark.parametrize("kind", ["linear", "llama3"])
def test_rope_scaling_survives_the_gguf_round_trip(tmp_path, tok, kind):
    """transformers' GGUF config drops `llama.rope.scaling.*` and llama 3.1's rope_freqs tensor, so every
    position rotates at the wrong frequencies; Nexus puts the scaling back."""
    if kind == "linear":
        model = _rope_model(tok, {"rope_type": "linear", "factor": 4.0})
        file = write_gguf(model, tok, tmp_path / "r.gguf", rope_scaling={"type": "linear", "factor": 4.0})
    else:
        rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
        model = _rope_model(tok, rope)
        file = write_gguf(model, tok, tmp_path / "r.gguf", rope_freqs=_llama_cpp_rope_freqs(64, 10000.0, rope))
    want_freq = model.model.rotary_emb.inv_freq
    theirs = _transformers_load(file).model.rotary_emb.inv_freq
    assert not torch.allclose(theirs, want_freq, rtol=1e-3)  # the bug: scaling lost
    assert config_from(file).rope_parameters["rope_type"] == kind
    full = FullRunner(file)
    torch.testing.assert_close(full.model.model.rotary_emb.inv_freq, want_freq, rtol=1e-5, atol=0)
    ids, mask = _chunk(len(tok), T=48)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(full.logits(full.forward(ids, mask).final_hidden), want, rtol=0, atol=2e-5)


def _llama_cpp_rope_freqs(head_dim: int, base: float, rope: dict) -> np.ndarray:
    """rope_freqs.weight as convert_hf_to_gguf.py computes it for a llama3-scaled model."""
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2) / head_dim))
    ctx, lo, hi, factor = (rope["original_max_position_embeddings"], rope["low_freq_factor"],
                           rope["high_freq_factor"], rope["factor"])
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < ctx / hi:
            out.append(1.0)
        elif wavelen > ctx / lo:
            out.append(factor)
        else:
            smooth = (ctx / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def test_an_architecture_transformers_cannot_build_is_a_one_line_error(tmp_path):
    import gguf

    from nexus_core.records.registry import Teacher
    from nexus_core.teachers.loading import TeacherLoadError, load_config

    w = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "rwkv6")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(TeacherLoadError) as err:
        load_config(Teacher("x", str(tmp_path / "x.gguf"), "ready", ""))
    assert "GGUF metadata" in str(err.value) and "rwkv6" in str(err.value) and "\n" not in str(err.value)
