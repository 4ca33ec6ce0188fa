"""Teacher-guided augmentation: new distillation rows near a dataset's own, labelled by the teacher.

Why: on a small domain dataset the student soon fits the teacher's distributions on those few rows
and stops taking in what the teacher knows (bench/bench_kd.py: with 96 sequences per domain the KD
student is best near 200 steps and then gets worse). More inputs near the data let the teacher teach
more. Two kinds, both then labelled by the extract stage like any rows:
- perturbed copies (extract.augment): each token after the first is replaced, with probability p,
  by a draw from the teacher's own stored top-k distribution at that position, so the replacement
  is plausible there (another operand, another identifier). Cheap: no extra teacher pass to make.
- samples (extract.augment_samples): the row's first tokens, continued by the teacher at a
  temperature. More varied inputs (what helps code most in bench_kd), at one teacher pass per new
  token (no KV cache, so that the SLI runner can do it too).
The new rows are KD data only: they have no text, so teachers with another tokenizer cannot be
aligned onto them, and the plain fine-tune baseline (baseline.py) never reads them.

The automatic rule (resolve(); the settings' default -1 means "auto", an explicit 0 or number wins):
- copies when a dataset packs to fewer than AUTO_BELOW (512) training sequences: AUTO_COPIES (16) each
  when **the teacher has seen those rows**; when it has not, UNSEEN_COPIES (2) each below
  AUTO_SAMPLES_BELOW (128) sequences and none from there on. Seen: its loss on the first training rows
  is at most SEEN_RATIO (0.95) of its held-out loss (extract measures both; manifest
  heldout_quality.train_loss): a teacher that never saw them scores them about as it scores held-out
  text of the same data (the demo's teachers 1.03-1.04x on arithmetic, 1.26-1.30x on code; SmolLM2 on
  stdlib code and license texts 1.04x / 0.99x), one trained on them clearly better (bench_kd's teacher:
  0.92x on arithmetic, 0.71x on code). Where the sample of rows is too small to tell, an unseen teacher
  may land under it and get 16 copies: the size rule's old behaviour.
  Why: a teacher trained on the rows labels them with their own tokens, so KD on them is a plain
  fine-tune, and copies draw its knowledge out on inputs it has not memorised (bench_kd: 88 % / 92 % of
  the gap to a tuned fine-tune closed with them). A teacher that never saw them already labels the real
  rows with what it knows, and copies move the inputs off the data: with 256 rows per domain the demo's
  KD student loses code to the tuned fine-tune with 16 or 2 copies (1.349 / 1.352 vs 1.331 nats/char)
  and leads on both domains without (1.312 / 0.864 vs 1.331 / 0.920). With a few dozen rows more inputs
  still pay: SmolLM2 on 32 rows per dataset, 60 steps, closes 22 % / 28 % of the gap with 2 copies and
  17 % / 25 % without (BENCHMARKS.md "The demo", "Real model"). When there is nothing to compare (no
  held-out text, or a manifest from before the measure) the size rule alone decides, as it did before.
  Why 512: below it the default distill (max_steps 800 x batch 8 = 6400 sequences) would pass
  over the real rows more than a dozen times, which is where bench_kd's KD student overfits; the copies cost
  16 more labelling passes over at most 511 rows (8k sequences: about 4x the extraction of a dataset
  at the default max_samples 2000), cheap beside what they buy (BENCHMARKS.md kd_augment).
- samples when a dataset packs to fewer than AUTO_SAMPLES_BELOW (128) training sequences and the
  teacher is loaded whole (profile mode "full"): AUTO_SAMPLES (8) each. Samples cost one teacher pass
  per new token (8 x n x ~7/8 T passes), so they are kept to tiny datasets, and an SLI-streamed
  teacher, which reads every layer from disk per pass, never gets them automatically.
Distill applies the same rule to the same inputs (the real rows' manifest: planned_sequences, mode,
heldout_quality), so both stages agree without extra state; the extract stage records the decision and
its reason.

Deterministic: the draws are seeded by the real rows' fingerprint and the settings, so the same
inputs give the same shards bit for bit.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file

from nexus_core.errors import CorruptArtifactError
from nexus_core.storage import shards

FOLDER = "augment"  # memory/<teacher>/<dataset>/augment/: a shard folder of its own
KEYS = ("augment", "augment_p", "augment_samples", "augment_temperature")  # the [extract] settings of this module


AUTO = -1  # the settings' value for "let the rule decide"
AUTO_BELOW = 512  # training sequences under which copies turn on by themselves
AUTO_COPIES = 16
UNSEEN_COPIES = 2  # ... for a teacher that has not seen the rows, on a dataset under AUTO_SAMPLES_BELOW
SEEN_RATIO = 0.95  # train-row loss / held-out loss at or under which the teacher has seen the rows (module docstring)
AUTO_SAMPLES_BELOW = 128  # ... and samples, for a teacher loaded whole
AUTO_SAMPLES = 8


def has_seen(quality: dict | None) -> bool | None:
    """Whether the teacher has seen the training rows (module docstring), from the real rows' manifest
    heldout_quality {loss, train_loss, ...}; None when there is nothing to compare."""
    if not quality or not quality.get("train_loss") or not quality.get("loss"):
        return None
    return quality["train_loss"] <= SEEN_RATIO * quality["loss"]


def _copies(sequences: int, quality: dict | None) -> tuple[int, str]:
    if sequences >= AUTO_BELOW:
        return 0, f"{sequences} training sequences >= {AUTO_BELOW}: no perturbed copies"
    size = f"{sequences} training sequences < {AUTO_BELOW}"
    seen = has_seen(quality)
    if seen is None:
        return AUTO_COPIES, f"{size}: {AUTO_COPIES} perturbed copies"
    fit = (f"teacher loss {quality['train_loss']:.3f} on training rows vs {quality['loss']:.3f} held out "
           f"({'<=' if seen else '>'} {SEEN_RATIO:g}x)")
    if seen:
        return AUTO_COPIES, f"{size} and the teacher has seen them, {fit}: {AUTO_COPIES} perturbed copies"
    if sequences < AUTO_SAMPLES_BELOW:
        return UNSEEN_COPIES, (f"{size}, the teacher has not seen them, {fit}, and they are few (< "
                               f"{AUTO_SAMPLES_BELOW}): {UNSEEN_COPIES} perturbed copies")
    return 0, f"{size}, but the teacher has not seen them, {fit}: no perturbed copies"


def resolve(ex, sequences: int, mode: str, quality: dict | None = None):
    """The augmentation one dataset gets: (extract settings with augment / augment_samples >= 0, the
    decision as recorded: copies, samples, auto, reason). `sequences`: the dataset's packed training
    rows; `mode`: the teacher profile's mode (full, or sli when streamed); `quality`: the real rows'
    manifest heldout_quality (with train_loss when extract measured it)."""
    copies, samples, why = ex.augment, ex.augment_samples, []
    if copies == AUTO:
        copies, reason = _copies(sequences, quality)
        why.append(reason)
    if samples == AUTO:
        if mode != "full":
            samples = 0
            why.append(f"teacher mode {mode} (streamed: a full pass per sampled token): no samples")
        else:
            samples = AUTO_SAMPLES if sequences < AUTO_SAMPLES_BELOW else 0
            why.append(f"{sequences} training sequences {'<' if samples else '>='} {AUTO_SAMPLES_BELOW}: "
                       f"{samples or 'no'} samples")
    auto = bool(why)
    if ex.augment != AUTO or ex.augment_samples != AUTO:
        why.append("set explicitly: " + ", ".join(f"{k} {v}" for k, v in (("augment", ex.augment),
                                                                          ("augment_samples", ex.augment_samples))
                                                  if v != AUTO))
    eff = dataclasses.replace(ex, augment=copies, augment_samples=samples)
    return eff, {"copies": copies, "samples": samples, "auto": auto, "reason": "; ".join(why)}


def folder(shard_dir: Path) -> Path:
    return Path(shard_dir) / FOLDER


def perturb(ids: torch.Tensor, mask: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
            copies: int, p: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`copies` perturbed copies of the rows, copy after copy: (n, T), (n, T), (n, T, k), (n, T, k) ->
    (copies * n, T) ids and mask. Position t of a shard describes the token at t + 1."""
    g = torch.Generator().manual_seed(seed)
    probs = topk_logprobs.float().exp().flatten(0, 1)  # (n*T, k); the tail is left out: draws stay in the top-k
    out = []
    for _ in range(copies):
        pick = torch.multinomial(probs, 1, generator=g).view(ids.shape)  # (n, T)
        draw = topk_ids.long().gather(-1, pick.unsqueeze(-1)).squeeze(-1)  # (n, T): a token for position t + 1
        flip = (torch.rand(ids.shape, generator=g) < p) & mask.bool()
        flip[:, 0] = False
        new = ids.clone()
        new[:, 1:] = torch.where(flip[:, 1:], draw[:, :-1].to(ids.dtype), ids[:, 1:])
        out.append(new)
    return torch.cat(out), mask.repeat(copies, 1)


def sample_prefix(seq_len: int) -> int:
    """Tokens of a row kept as the prompt of its samples."""
    return max(1, min(seq_len - 1, max(8, seq_len // 8)))


@torch.no_grad()
def sampled(runner, ids: torch.Tensor, mask: torch.Tensor, per_row: int, temperature: float, seed: int,
            batch_size: int, real_vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`per_row` continuations of each row's first sample_prefix tokens, drawn from the teacher at
    `temperature` up to the row length: (n, T) -> (per_row * m, T) ids and mask (all real), m = the
    rows whose prompt is all real tokens."""
    T = ids.shape[1]
    prefix = sample_prefix(T)
    prompts = ids[mask[:, :prefix].bool().all(-1), :prefix]
    out = torch.zeros(per_row * prompts.shape[0], T, dtype=ids.dtype)
    out[:, :prefix] = prompts.repeat(per_row, 1)
    g = torch.Generator().manual_seed(seed)
    for b0 in range(0, out.shape[0], batch_size):
        rows = out[b0:b0 + batch_size]  # a view: filled in place
        for t in range(prefix, T):
            x = rows[:, :t]
            h = runner.forward(x, torch.ones_like(x)).final_hidden[:, -1]  # (b, H)
            z = runner.logits(h.unsqueeze(0)).squeeze(0)[:, :real_vocab].float().cpu()  # (b, V)
            rows[:, t] = torch.multinomial((z / temperature).softmax(-1), 1, generator=g).squeeze(-1).to(ids.dtype)
    return out, torch.ones(out.shape, dtype=mask.dtype)


def new_rows(shard_dir: Path, manifest: dict, base: dict, ex, runner, real_vocab: int):
    """Perturbed copies and samples of a complete shard folder's rows, and the base of their manifest."""
    tensors = []
    for rec in manifest["shards"]:
        problem = shards.shard_problem(shard_dir, rec)
        if problem:
            raise CorruptArtifactError(f"{problem}; delete {shard_dir} and rerun extract")
        tensors.append(load_file(str(Path(shard_dir) / rec["file"])))
    cat = {k: torch.cat([t[k] for t in tensors]) for k in ("input_ids", "attention_mask", "topk_ids", "topk_logprobs")}
    spec = settings(ex)
    seed = int(hashlib.sha256(f"{manifest['data_fp']}|{manifest['teacher_fp']}|{spec}".encode()).hexdigest()[:15], 16)
    parts = []
    if ex.augment:
        parts.append(perturb(cat["input_ids"], cat["attention_mask"], cat["topk_ids"], cat["topk_logprobs"],
                             ex.augment, ex.augment_p, seed))
    if ex.augment_samples:
        parts.append(sampled(runner(), cat["input_ids"], cat["attention_mask"], ex.augment_samples,
                             ex.augment_temperature, seed + 1, ex.batch_size, real_vocab))
    ids, mask = torch.cat([x[0] for x in parts]), torch.cat([x[1] for x in parts])
    return ids, mask, {**base, "offsets": False, "augment": spec, "augment_of": manifest["data_fp"]}


def settings(ex) -> dict:
    """The augment settings as the manifest records them (distill checks them against its own)."""
    out = {"copies": ex.augment, "p": ex.augment_p} if ex.augment else {}
    if ex.augment_samples:
        out.update(samples=ex.augment_samples, temperature=ex.augment_temperature)
    return out


def wanted(ex) -> bool:
    """Resolved settings (resolve()) ask for new rows."""
    assert ex.augment >= 0 and ex.augment_samples >= 0, "resolve() the automatic rule first"
    return bool(ex.augment or ex.augment_samples)
