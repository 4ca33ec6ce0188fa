"""Held-out evaluation: loss and perplexity of the student and of each teacher, per dataset.

The held-out split is the fixed hash split of data.py, which extraction never sees. The student
(and a teacher sharing the primary's tokenizer) is scored on it packed with the primary's tokenizer;
a teacher with another tokenizer on the same texts packed with its own. Every entry has nats per
token and, where the tokenizer gives character offsets, nats per character: the scale on which
teachers with different tokenizers, the student and the baseline compare (the report uses it).
"""

from __future__ import annotations

import structlog
import torch

from nexus_core import data, progress
from nexus_core.config import Settings
from nexus_core.errors import DatasetError
from nexus_core.paths import Paths
from nexus_core.records.plan import DistillPlan
from nexus_core.teachers.loading import tokenizer_from
from nexus_core.teachers.mode import open_runner
from nexus_core.teachers.quality import lm_loss
from nexus_core.teachers.runner import FullRunner

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


def _open_teacher(profile: dict, teacher, device: str):
    """A teacher's runner for scoring: streamed layer by layer when its profile chose SLI, else loaded whole
    (safetensors or GGUF; float32 on CPU, bfloat16 on an accelerator)."""
    mode = profile.get("mode", "full")
    dtype = None if mode == "sli" else (torch.float32 if device == "cpu" else torch.bfloat16)
    return open_runner(teacher, mode, device, dtype)


def evaluate(cfg: Settings, plan: DistillPlan, paths: Paths, student, tokenizer, device: str,
             profiles: dict[str, dict], teachers: bool = True) -> dict:
    """{dataset: {"student": {loss, perplexity, tokens}, "teachers": {id: {...}}}} on held-out splits."""
    vocab = len(tokenizer)
    sets = {d: heldout(cfg, paths, tokenizer, d) for d in plan.datasets}
    out: dict = {}
    progress.expect(sum(b[0].shape[0] for b in sets.values() if b is not None) * (1 + len(plan.teachers) * teachers))
    was_training = student.training
    student.eval()
    scorer = FullRunner.of(student, device)
    for d, batch in sets.items():
        if batch is None:
            log.warning("distill.eval_skipped", dataset=d, reason="no held-out documents")
            continue
        out[d] = {"student": lm_loss(scorer, *batch, vocab, device), "teachers": {}}
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
        runner = _open_teacher(profiles.get(t.teacher_id) or {}, t, device)
        try:
            for d in out:
                if d in plan.teacher_datasets(t) and batches.get(d) is not None:
                    entry = lm_loss(runner, *batches[d], t_vocab, device)
                    entry["tokenizer"] = "primary" if batches is sets else "own"
                    out[d]["teachers"][t.teacher_id] = entry
        finally:
            runner.close()
    return out
