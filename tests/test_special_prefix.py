"""Teacher inputs as the teacher was trained: each row starts with its tokenizer's special prefix.

A Gemma-style tokenizer (a post-processor that puts <bos> before every text) gets <bos> at the start
of every packed row, once; a SmolLM2-style one (no post-processor) packs exactly as before. Prefix
tokens cover no text, so cross-tokenizer alignment never aligns them to characters.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from nexus_core import data
from nexus_core.demo.model_factory import make_teacher, train_tokenizer
from nexus_core.kd import align
from nexus_core.stages.extract import run_extract
from nexus_core.stages.router import prompt_ids
from nexus_core.storage import shards
from nexus_core.teachers.loading import tokenizer_from
from tests.helpers import DOCS, setup_home

TEXTS = [f"def add_{i}(x, y):\n    return x + y  # {i * 7}" for i in range(40)] + \
        [f"{a} + {b} = {a + b}" for a in range(20) for b in range(0, 40, 7)]


@pytest.fixture(scope="module")
def toks():
    """gemma: adds <s> (BOS) like Gemma; smol: adds nothing like SmolLM2; both the same vocabulary."""
    return {"gemma": train_tokenizer(TEXTS, 300, "bpe", add_bos=True), "smol": train_tokenizer(TEXTS, 300, "bpe")}


def _old_pack(tok, texts, seq_len):
    """data.pack as it was before special prefixes: documents + EOS, cut into rows, nothing added."""
    stream = [i for t in texts for i in tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    n = -(-len(stream) // seq_len)
    ids = torch.full((n * seq_len,), tok.pad_token_id, dtype=torch.int32)
    ids[:len(stream)] = torch.tensor(stream)
    mask = torch.zeros(n * seq_len, dtype=torch.uint8)
    mask[:len(stream)] = 1
    return ids.view(n, seq_len), mask.view(n, seq_len)


def test_special_prefix_is_what_the_post_processor_adds(toks):
    assert data.special_prefix(toks["gemma"]) == [toks["gemma"].bos_token_id]
    assert data.special_prefix(toks["smol"]) == []


def test_every_row_starts_with_bos_exactly_once(toks):
    tok = toks["gemma"]
    bos = tok.bos_token_id
    ids, mask = data.pack(tok, TEXTS, 16)
    assert (ids[:, 0] == bos).all() and (mask[:, 0] == 1).all()
    assert not (ids[:, 1:] == bos).any()  # never a double BOS
    # behind the BOS, the rows hold the same token stream a tokenizer without BOS packs
    old_ids, old_mask = _old_pack(toks["smol"], TEXTS, 15)
    assert torch.equal(ids[:, 1:], old_ids) and torch.equal(mask[:, 1:], old_mask)
    # max_sequences still counts rows
    assert data.pack(tok, TEXTS, 16, 3)[0].shape == (3, 16)


def test_a_tokenizer_without_bos_packs_as_before(toks):
    ids, mask = data.pack(toks["smol"], TEXTS, 16)
    old_ids, old_mask = _old_pack(toks["smol"], TEXTS, 16)
    assert torch.equal(ids, old_ids) and torch.equal(mask, old_mask)
    ids2, mask2, cs, ce = data.pack_with_offsets(toks["smol"], TEXTS, 16)
    assert torch.equal(ids2, old_ids) and torch.equal(mask2, old_mask) and (cs[mask2.bool()] >= 0).all()


def test_bos_positions_cover_no_text(toks):
    ids, mask, cs, ce = data.pack_with_offsets(toks["gemma"], TEXTS, 16)
    assert torch.equal((ids, mask)[0], data.pack(toks["gemma"], TEXTS, 16)[0])
    assert (cs[:, 0] == data.NO_TEXT_SPAN).all() and (ce[:, 0] == data.NO_TEXT_SPAN).all()
    smol = data.pack_with_offsets(toks["smol"], TEXTS, 15)
    assert torch.equal(cs[:, 1:], smol[2]) and torch.equal(ce[:, 1:], smol[3])  # the text keeps its spans


@pytest.mark.parametrize("cross_rows", [True, False])
def test_alignment_skips_bos_and_aligns_every_text_position(toks, cross_rows):
    """Student with BOS, teacher without (same vocabulary, other row cuts): every position that predicts
    text finds the teacher position predicting the same token; nothing predicts a BOS."""
    s = data.pack_with_offsets(toks["gemma"], TEXTS, 16)
    t = data.pack_with_offsets(toks["smol"], TEXTS, 16)
    s_next = align.next_token_starts(s[2], s[3], s[1], cross_rows)
    t_next = align.next_token_starts(t[2], t[3], t[1], cross_rows)
    table = align.align_positions(s_next, t_next)
    # each BOS position predicts its row's first text token (BOS itself is never a next token)
    assert torch.equal(s_next[:, 0], s[2][:, 1])
    if cross_rows:  # the last position of a row predicts the next row's first text token, behind its BOS
        assert torch.equal(s_next[:-1, -1], s[2][1:, 1])
    else:
        assert (s_next[:, -1] == -1).all()
    got = table >= 0
    assert torch.equal(s_next[got], t_next.view(-1)[table[got]])
    # with the same vocabulary, every position whose next token starts a token boundary aligns (without
    # cross_rows the teacher's row ends predict nothing, so the tokens that start its rows are lost)
    if cross_rows:  # all but the first BOS: nothing in a teacher without BOS predicts the text's first token
        want = s_next >= 0
        want[0, 0] = False
        assert torch.equal(got, want) and int(got.sum()) > 0.9 * int(s[1].sum())
    else:
        assert int(got.sum()) > 0.8 * int(s[1].sum())
    s_ids, t_ids = s[0].view(-1), t[0].view(-1)
    flat = table[got]
    # the aligned teacher position is followed (in its stream) by the same token as the student's
    s_pos = got.view(-1).nonzero().squeeze(-1)
    s_tok = s_ids[_next_text(s, s_pos)]
    t_tok = t_ids[_next_text(t, flat)]
    assert torch.equal(s_tok, t_tok)


def _next_text(packed, pos):
    """Flat index of the next position that covers text (skips the BOS of the next row)."""
    cs, mask = packed[2].view(-1), packed[1].view(-1).bool()
    out = []
    for p in pos.tolist():
        q = p + 1
        while mask[q] and cs[q] < 0:
            q += 1
        out.append(q)
    return torch.tensor(out)


def test_router_prompts_start_as_the_student_tokenizer_starts_them(toks):
    gemma, smol = toks["gemma"], toks["smol"]
    assert prompt_ids(gemma, "1 + 2 = 3", 64) == gemma("1 + 2 = 3")["input_ids"]
    assert prompt_ids(smol, "1 + 2 = 3", 64) == smol("1 + 2 = 3")["input_ids"]
    assert len(prompt_ids(gemma, "x" * 500, 8)) == 8 and prompt_ids(gemma, "x" * 500, 8)[0] == gemma.bos_token_id
    assert prompt_ids(gemma, "", 8) == [gemma.bos_token_id]


def test_extraction_feeds_a_bos_teacher_its_bos_and_says_so(tmp_path):
    tok = train_tokenizer(DOCS, 300, "bpe", add_bos=True)
    teacher_dir = make_teacher(tmp_path / "gemma-style", DOCS, arch="llama", tokenizer=tok, hidden=32, layers=2,
                               heads=4, kv_heads=2)
    cfg, teacher, ref, paths = setup_home(tmp_path / "home", teacher_dir, extract={"max_samples": 8})
    run_extract(cfg, teacher, ref, paths)
    out = paths.shard_dir("tiny", "reasoning__arith")
    man = shards.read_manifest(out)
    bos = tokenizer_from(teacher_dir).bos_token_id
    assert man["special_prefix"] == [bos] and man["bos"] is True
    rows = torch.cat([load_file(out / r["file"])["input_ids"] for r in man["shards"]])
    assert (rows[:, 0] == bos).all() and not (rows[:, 1:] == bos).any()
    cs = torch.cat([load_file(out / r["file"])["char_start"] for r in man["shards"]])
    assert (cs[:, 0] == data.NO_TEXT_SPAN).all()
    assert man["heldout_quality"]["loss_per_char"] > 0


def test_a_teacher_is_scored_on_the_primarys_rows_only_if_they_start_as_its_own(toks, tmp_path):
    from nexus_core.kd.evaluate import _same_tokenizer
    from nexus_core.records.plan import DistillPlan
    from nexus_core.records.registry import Teacher

    made = {}
    for name, tok in (("smol", toks["smol"]), ("smol2", toks["smol"]), ("gemma", toks["gemma"])):
        tok.save_pretrained(tmp_path / name)
        made[name] = Teacher(teacher_id=name, path=str(tmp_path / name), status="ready", source="test")
    plan = DistillPlan(teachers=tuple(made.values()), primary="smol", datasets=("a/b",))
    same_fp = {t: {"tokenizer_fp": "same vocabulary"} for t in made}
    from nexus_core.teachers.loading import tokenizer_from

    def own(name):  # the teacher's tokenizer as evaluate loads it
        return tokenizer_from(made[name].path, False)

    assert _same_tokenizer(same_fp, plan, made["smol2"], own("smol2"), toks["smol"])
    assert not _same_tokenizer(same_fp, plan, made["gemma"], own("gemma"), toks["smol"])  # same ids, but it expects <bos>
