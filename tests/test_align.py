"""Cross-tokenizer alignment: spans, position alignment, the shared-token table and its losses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nexus_core import data
from nexus_core.demo.model_factory import train_tokenizer
from nexus_core.kd import align
from nexus_core.kd.loss import (
    AlignedTargets,
    TeacherTargets,
    loss_sums,
    multi_loss_sums,
    shared_buckets,
    xtok_position_loss,
)

TEXTS = [f"def add_{i}(x, y):\n    return x + y  # é {i * 7}" for i in range(40)] + \
        [f"{a} + {b} = {a + b}" for a in range(20) for b in range(0, 40, 7)]


@pytest.fixture(scope="module")
def toks():
    return {"bpe": train_tokenizer(TEXTS, 300, "bpe"), "uni": train_tokenizer(TEXTS, 150, "unigram"),
            "bpe2": train_tokenizer(TEXTS[::-1], 420, "bpe")}


def _spans(rows):
    """Hand-made rows [(start, end), ...] -> (cs, ce, mask) (1, T) with padding to T = 8."""
    T = 8
    cs = torch.full((1, T), -1, dtype=torch.long)
    ce = torch.full((1, T), -1, dtype=torch.long)
    m = torch.zeros((1, T), dtype=torch.uint8)
    for i, (a, b) in enumerate(rows):
        cs[0, i], ce[0, i], m[0, i] = a, b, 1
    return cs, ce, m


def test_positions_align_on_shared_character_boundaries():
    # text "ab cd" + separator (EOS covers char 5). Student: [ab][ cd][EOS]; teacher: [a][b][ c][d][EOS].
    s = _spans([(0, 2), (2, 5), (5, 6)])
    t = _spans([(0, 1), (1, 2), (2, 4), (4, 5), (5, 6)])
    s_next = align.next_token_starts(*s, cross_rows=False)
    t_next = align.next_token_starts(*t, cross_rows=False)
    assert s_next[0, :3].tolist() == [2, 5, -1]  # the last real position has no next token in this row
    assert t_next[0, :5].tolist() == [1, 2, 4, 5, -1]
    table = align.align_positions(s_next, t_next)
    # student pos 0 predicts ' cd' (starts at 2) <- teacher pos 1 predicts ' c' (starts at 2);
    # student pos 1 predicts EOS (5) <- teacher pos 3 predicts EOS (5); pos 2 has no target.
    assert table[0, :3].tolist() == [1, 3, -1] and (table[0, 3:] == -1).all()


def test_exact_span_alignment_needs_the_same_next_token_text():
    s = _spans([(0, 2), (2, 5), (5, 6)])  # [ab][ cd][EOS]
    t = _spans([(0, 1), (1, 2), (2, 4), (4, 5), (5, 6)])  # [a][b][ c][d][EOS]
    table = align.align_positions(align.next_token_starts(*s, cross_rows=False, exact_span=True),
                                  align.next_token_starts(*t, cross_rows=False, exact_span=True))
    assert table[0, :3].tolist() == [-1, 3, -1]  # ' cd' vs ' c' differ; both predict the EOS at 5..6


def test_continuations_and_zero_width_tokens_are_not_boundaries():
    # teacher: a character split into two byte tokens (both span 1..2), and a zero-width marker at 3.
    t = _spans([(0, 1), (1, 2), (1, 2), (2, 3), (3, 3), (3, 4)])
    nxt = align.next_token_starts(*t, cross_rows=False)
    assert nxt[0, :6].tolist() == [1, -1, 2, -1, 3, -1]
    s = _spans([(0, 1), (1, 3), (3, 4)])
    table = align.align_positions(align.next_token_starts(*s, cross_rows=False), nxt)
    assert table[0, :3].tolist() == [0, 4, -1]  # ' the first byte token; the marker's position predicts char 3


def test_rows_continue_across_row_boundaries_only_when_allowed():
    cs = torch.tensor([[0, 1], [2, 3]])
    ce = cs + 1
    m = torch.ones(2, 2, dtype=torch.uint8)
    assert align.next_token_starts(cs, ce, m, cross_rows=True).tolist() == [[1, 2], [3, -1]]
    assert align.next_token_starts(cs, ce, m, cross_rows=False).tolist() == [[1, -1], [3, -1]]


@pytest.mark.parametrize("name", ["bpe", "uni"])
def test_pack_with_offsets_matches_pack_and_spans_cover_the_text(toks, name):
    tok = toks[name]
    docs = TEXTS[:12]
    ids, mask, cs, ce = data.pack_with_offsets(tok, docs, 16, 0)
    ids0, mask0 = data.pack(tok, docs, 16, 0)
    assert torch.equal(ids, ids0) and torch.equal(mask, mask0)
    coord = "".join(d + "\x1e" for d in docs)
    real = mask.view(-1).bool()
    fs, fe, fi = cs.view(-1)[real], ce.view(-1)[real], ids.view(-1)[real]
    assert (fs[1:] >= fs[:-1]).all() and (fe >= fs).all()  # monotone spans
    for a, b, i in zip(fs.tolist(), fe.tolist(), fi.tolist()):
        if i == tok.eos_token_id:
            assert coord[a:b] == "\x1e"
        elif b > a:
            assert tok.decode([i]).replace("\u2581", " ").strip() in coord[a:b] or coord[a:b].strip() == ""
    # every character of the text is covered by some token span
    covered = torch.zeros(len(coord), dtype=torch.bool)
    for a, b in zip(fs.tolist(), fe.tolist()):
        covered[a:b] = True
    assert covered.all()


def test_two_tokenizers_of_the_same_text_align_most_positions(toks):
    docs = TEXTS[:30]
    s = data.pack_with_offsets(toks["bpe"], docs, 32)
    t = data.pack_with_offsets(toks["uni"], docs, 32)
    table = align.align_positions(align.next_token_starts(s[2], s[3], s[1], True),
                                  align.next_token_starts(t[2], t[3], t[1], True))
    got = table >= 0
    # the unigram vocabulary is finer, so nearly every student boundary is a teacher boundary too
    assert got.sum() > 0.8 * s[1].sum()
    # aligned pairs predict tokens that start at the same character
    sn = align.next_token_starts(s[2], s[3], s[1], True)
    tn = align.next_token_starts(t[2], t[3], t[1], True).view(-1)
    assert torch.equal(sn[got], tn[table[got]])


def test_vocab_map_matches_byte_level_and_metaspace_spellings(toks):
    table, info = align.vocab_map(toks["uni"], toks["bpe"])
    uni, bpe = toks["uni"], toks["bpe"]
    pairs = 0
    for tid in range(len(uni)):
        sid = int(table[tid])
        if sid >= 0 and tid not in uni.all_special_ids:
            assert uni.convert_ids_to_tokens(tid).replace("\u2581", " ") == bpe.decode([sid])
            pairs += 1
    assert pairs > 20 and info["shared_tokens"] == int((table >= 0).sum())
    assert table[uni.eos_token_id] == bpe.eos_token_id  # specials map by role
    assert len(set(table[table >= 0].tolist())) == int((table >= 0).sum())  # one-to-one
    same, _ = align.vocab_map(bpe, bpe)
    assert torch.equal(same, torch.arange(len(bpe)))


def _random_targets(b=2, T=5, k=4, V=12, mapped_share=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, T, 40, generator=g) * 2
    lp = F.log_softmax(z, -1)
    top, _ = lp.topk(k, -1)
    tail = torch.logsumexp(lp.sort(-1, descending=True).values[..., k:], -1)
    sids = torch.stack([torch.randperm(V, generator=g)[:k] for _ in range(b * T)]).view(b, T, k)
    sids = torch.where(torch.rand(b, T, k, generator=g) < mapped_share, sids, -1)
    return AlignedTargets(1.0, sids, top.half(), tail.float(), torch.ones(b, T, dtype=torch.bool))


def test_shared_token_mapping_conserves_probability_mass():
    t = _random_targets()
    top, rest, mapped = shared_buckets(t.topk_logprobs, t.tail_logmass, t.student_ids)
    total = top.exp().sum(-1) + rest.exp()
    assert torch.allclose(total, torch.ones_like(total), atol=1e-5)
    q = torch.cat([t.topk_logprobs.float(), t.tail_logmass[..., None]], -1).log_softmax(-1)[..., :-1].exp()
    assert torch.allclose(top.exp()[mapped], q[mapped], atol=1e-6)  # each mapped token keeps its own mass
    unmapped = torch.where(mapped, 0.0, q).sum(-1) + (1 - q.sum(-1))
    assert torch.allclose(rest.exp(), unmapped, atol=1e-5)  # the rest holds exactly what did not map


@pytest.mark.parametrize("mode", ["shared", "hybrid", "uld"])
def test_xtok_loss_is_zero_at_the_teacher_and_positive_elsewhere(mode):
    V, k = 12, 4
    t = _random_targets(V=V, k=k, mapped_share=1.1)  # every top-k token maps
    q = torch.cat([t.topk_logprobs.float(), t.tail_logmass[..., None]], -1).log_softmax(-1).exp()  # (b, T, k+1)
    # a student with the teacher's top-k mass on the mapped ids and the tail spread evenly over the rest
    p = torch.zeros(*t.student_ids.shape[:-1], V)
    p.scatter_(-1, t.student_ids, q[..., :-1])
    p += (q[..., -1:] / (V - k)) * (p == 0)
    at_teacher = xtok_position_loss(p.log(), t, 1.0, mode)
    uniform = xtok_position_loss(torch.full_like(p, -math.log(V)), t, 1.0, mode)
    tol = 1e-2 if mode == "uld" else 1e-3  # ULD: a spread tail value may outrank the teacher's k-th token
    assert at_teacher.abs().max() < tol and (uniform > at_teacher).all()


def test_multi_loss_sums_equals_loss_sums_without_aligned_teachers_and_trains_with_them():
    g = torch.Generator().manual_seed(1)
    b, T, V, k = 2, 5, 12, 4
    logits = torch.randn(b, T, V, generator=g, requires_grad=True)
    ids = torch.randint(0, V, (b, T), generator=g)
    mask = torch.ones(b, T, dtype=torch.long)
    lp = F.log_softmax(torch.randn(b, T, V, generator=g), -1)
    top, idx = lp.topk(k, -1)
    tt = TeacherTargets(1.0, idx, top, torch.log1p(-top.exp().sum(-1)).clamp(min=math.log(1e-30)))
    a = loss_sums(logits, ids, mask, [tt], 1.0, 0.9, V)
    m = multi_loss_sums(logits, ids, mask, [tt], [], 1.0, 0.9, V)
    assert torch.equal(a.kd, m.kd) and torch.equal(a.ce, m.ce)
    al = _random_targets(b, T, k, V, mapped_share=0.0)  # nothing maps: gradients must stay finite
    al.present[0, 2] = False
    out = multi_loss_sums(logits, ids, mask, [tt], [al], 1.0, 0.9, V, "hybrid")
    out.kd.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0 and out.kd > a.kd * 0


def test_quality_weights_favour_the_better_teacher_per_domain():
    w = align.quality_weights({"code": 0.5, "math": 1.5}, {"code": 1.0, "math": 1.0}, tau=0.25)
    assert w["code"] > 0.95 * 2 * (1 / (1 + math.exp(-4))) and w["math"] < 0.05
    assert sum(w.values()) == pytest.approx(2.0)
    assert align.quality_weights({"a": None, "b": 0.1}, {"a": 1.0, "b": 0.5}, 0.1) == {"a": 1.0, "b": 0.5}
    assert align.quality_weights({"a": 0.3}, {"a": 2.0}, 0.1) == {"a": 2.0}
