"""Held-out evaluation: loss and perplexity of the student and of each teacher, per dataset.

The held-out split is the fixed hash split of data.py, which extraction never sees. The student
(and a teacher sharing the primary's tokenizer) is scored on it packed with the primary's tokenizer;
a teacher with another tokenizer on the same texts packed with its own. Every entry has nats per
token and, where the tokenizer gives character offsets, nats per character: the scale on which
teachers with different tokenizers, the student and the baseline compare (the report uses it).
"""

from __future__ import annotations

import math

import structlog
import torch
import torch.nn.functional as F

from nexus_core import data, progress
from nexus_core.config import Settings
from nexus_core.errors import DatasetError
from nexus_core.paths import Paths
from nexus_core.records.plan import DistillPlan
from nexus_core.teachers.loading import tokenizer_from

log = structlog.get_logger("nexus.distill")
MAX_HELDOUT_SEQUENCES = 64


def heldout(cfg: Settings, paths: Paths, tokenizer, dataset: str):
    """(input_ids int32 [n, T], attention_mask uint8 [n, T], chars int64 [n, T] or None) of a dataset's
    held-out split, or None; chars[i, t] is how many characters token t covers (the per-character scale)."""
    texts = data.load_texts(paths, data.DatasetRef.parse(dataset), cfg.extract.text_field)
    _, held = data.split(texts, cfg.extract.heldout_fraction)
    if not held:
        return None
    try:
        try:
            ids, mask, cs, ce = data.pack_with_offsets(tokenizer, held, cfg.extract.seq_len, MAX_HELDOUT_SEQUENCES)
            return ids, mask, (ce - cs).clamp(min=0)  # the special prefix and padding cover no text
        except NotImplementedError:  # a slow tokenizer has no offsets: per token only
            return (*data.pack(tokenizer, held, cfg.extract.seq_len, MAX_HELDOUT_SEQUENCES), None)
    except DatasetError:
        return None


@torch.no_grad()
def lm_loss(logits_fn, ids: torch.Tensor, mask: torch.Tensor, chars: torch.Tensor | None, vocab: int, device: str,
            batch_size: int = 8) -> dict:
    """Mean next-token cross-entropy over real positions, per token and (with `chars`) per character of
    the target tokens; logits_fn(ids, mask) -> (b, T, V)."""
    total, count, n_chars = 0.0, 0, 0
    for i in range(0, ids.shape[0], batch_size):
        x = ids[i:i + batch_size].long().to(device)
        m = mask[i:i + batch_size].long().to(device)
        logp = F.log_softmax(logits_fn(x, m)[..., :vocab].float(), dim=-1)  # (b, T, V)
        nll = -logp[:, :-1].gather(-1, x[:, 1:].unsqueeze(-1)).squeeze(-1)  # (b, T-1)
        real = (m[:, :-1] * m[:, 1:]).bool()
        progress.advance(x.shape[0], tokens=int(m.sum()))  # the caller's bar, if it opened one
        total += nll[real].double().sum().item()
        count += int(real.sum())
        if chars is not None:
            n_chars += int(chars[i:i + batch_size, 1:].to(device)[real].sum())
    loss = total / max(count, 1)
    out = {"loss": round(loss, 6), "perplexity": round(math.exp(min(loss, 50.0)), 4), "tokens": count}
    if n_chars:
        out.update(loss_per_char=round(total / n_chars, 6), chars=n_chars)
    return out


def model_logits(model):
    def fn(x, m):
        return model(input_ids=x, attention_mask=m).logits

    return fn


def _same_tokenizer(profiles: dict, plan: DistillPlan, teacher, tok, primary_tok) -> bool:
    """The teacher (its tokenizer `tok`) reads the primary's held-out rows as its own: same vocabulary
    and the same special prefix (a teacher that expects <bos> must not be scored on rows without it, data.py)."""
    fp_t = (profiles.get(teacher.teacher_id) or {}).get("tokenizer_fp")
    fp_p = (profiles.get(plan.primary) or {}).get("tokenizer_fp")
    if fp_t and fp_p and fp_t != fp_p:
        return False
    if not (fp_t and fp_p) and tok.get_vocab() != primary_tok.get_vocab():
        return False
    return data.special_prefix(tok) == data.special_prefix(primary_tok)


def _teacher_logits_fn(profile: dict, teacher, device: str):
    """A teacher's logits function and a closer: full load, or the streaming runner for SLI teachers."""
    mode = profile.get("mode", "full")
    if mode == "sli":
        from nexus_core.teachers.mode import open_runner

        runner = open_runner(teacher, "sli", device)
        return (lambda x, m: runner.logits(runner.forward(x, m).final_hidden)), runner.close
    from nexus_core.teachers.loading import load_model

    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    model = load_model(teacher, dtype).to(device)  # safetensors or GGUF
    return model_logits(model), (lambda: None)


def evaluate(cfg: Settings, plan: DistillPlan, paths: Paths, student, tokenizer, device: str,
             profiles: dict[str, dict], teachers: bool = True) -> dict:
    """{dataset: {"student": {loss, perplexity, tokens}, "teachers": {id: {...}}}} on held-out splits."""
    vocab = len(tokenizer)
    sets = {d: heldout(cfg, paths, tokenizer, d) for d in plan.datasets}
    out: dict = {}
    progress.expect(sum(b[0].shape[0] for b in sets.values() if b is not None) * (1 + len(plan.teachers) * teachers))
    was_training = student.training
    student.eval()
    for d, batch in sets.items():
        if batch is None:
            log.warning("distill.eval_skipped", dataset=d, reason="no held-out documents")
            continue
        out[d] = {"student": lm_loss(model_logits(student), *batch, vocab, device), "teachers": {}}
    student.train(was_training)
    if not teachers:
        return out
    for t in plan.teachers:
        batches, t_vocab = sets, vocab
        t_tok = None if t.teacher_id == plan.primary else tokenizer_from(t.path, t.trust_remote_code)
        if t_tok is not None and not _same_tokenizer(profiles, plan, t, t_tok, tokenizer):
            # Another tokenizer: the same texts packed with its own, compared per character.
            batches = {d: heldout(cfg, paths, t_tok, d) for d in out if d in plan.teacher_datasets(t)}
            batches = {d: b for d, b in batches.items() if b is not None and b[2] is not None}
            t_vocab = len(t_tok)
            if not batches:
                log.info("distill.eval_teacher_skipped", teacher=t.teacher_id,
                         reason="different tokenizer without character offsets")
                continue
        fn, close = _teacher_logits_fn(profiles.get(t.teacher_id) or {}, t, device)
        try:
            for d in out:
                if d in plan.teacher_datasets(t) and batches.get(d) is not None:
                    entry = lm_loss(fn, *batches[d], t_vocab, device)
                    entry["tokenizer"] = "primary" if batches is sets else "own"
                    out[d]["teachers"][t.teacher_id] = entry
        finally:
            close()
    return out
