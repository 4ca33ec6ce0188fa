"""Held-out scoring (teachers/quality.lm_loss, which kd/evaluate reports): the chunked, fused cross-entropy
gives the loss of the plain full log-softmax."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from nexus_core.kd.evaluate import lm_loss
from nexus_core.teachers.runner import FullRunner

HEAD, VOCAB = 320, 300  # a head padded past the tokenizer, as Gemma 3's is


def _tiny_lm() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=HEAD, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def _rows(n: int = 5, T: int = 12):
    """Right-padded rows of different lengths, with the characters each token covers."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (n, T), generator=g)
    mask = torch.ones(n, T, dtype=torch.long)
    for row, length in enumerate([12, 7, 1, 10, 4][:n]):
        mask[row, length:] = 0
    chars = torch.randint(1, 6, (n, T), generator=g) * mask
    return ids, mask, chars


def _naive(model, ids, mask, chars, vocab: int) -> tuple[float, float]:
    """The reference: the whole (n, T, V) log-softmax of a plain forward, target log-probs gathered."""
    with torch.no_grad():
        logp = model(input_ids=ids, attention_mask=mask).logits[..., :vocab].float().log_softmax(-1)  # (n, T, V)
    nll = -logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)  # (n, T-1)
    real = (mask[:, :-1] * mask[:, 1:]).bool()
    total = nll[real].double().sum().item()
    return total / int(real.sum()), total / int(chars[:, 1:][real].sum())


def _narrow_slices(monkeypatch, rows: int = 7) -> None:
    """Vocabulary slices of `rows` head rows for 20 positions (fewer positions: wider): many slices, the last
    one ragged, the targets spread over all of them."""
    from nexus_core.teachers import logits

    monkeypatch.setattr(logits, "LOGIT_CHUNK_BYTES", 4 * 20 * rows)
    monkeypatch.setattr(logits, "MIN_VOCAB_SLICE", 1)


@pytest.mark.parametrize("narrow", [False, True])  # one slice of the whole vocabulary, or many
def test_sliced_loss_equals_the_full_log_softmax(narrow, monkeypatch):
    if narrow:
        _narrow_slices(monkeypatch)
    model = _tiny_lm()
    ids, mask, chars = _rows()
    loss, per_char = _naive(model, ids, mask, chars, VOCAB)
    got = lm_loss(FullRunner.of(model, "cpu"), ids, mask, chars, VOCAB, "cpu", batch_size=2)
    assert got["tokens"] == int((mask[:, :-1] * mask[:, 1:]).sum())
    assert got["loss"] == pytest.approx(loss, rel=1e-6, abs=1e-6)
    assert got["loss_per_char"] == pytest.approx(per_char, rel=1e-6, abs=1e-6)


def test_full_head_width_matches_transformers_own_loss(monkeypatch):
    """Independent of any reference written here: the model's own labels loss over the real targets."""
    _narrow_slices(monkeypatch, rows=13)
    model = _tiny_lm()
    ids, mask, _ = _rows()
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        expect = float(model(input_ids=ids, attention_mask=mask, labels=labels).loss)
    got = lm_loss(FullRunner.of(model, "cpu"), ids, mask, None, HEAD, "cpu", batch_size=3)
    assert got["loss"] == pytest.approx(expect, rel=1e-6, abs=1e-6) and "loss_per_char" not in got


def test_wrapping_a_model_leaves_its_mode_and_place_alone():
    model = _tiny_lm().train()
    runner = FullRunner.of(model, "cpu")
    assert model.training and runner.head_vocab == HEAD and runner.model is model
