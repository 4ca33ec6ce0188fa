"""Extract stage: run a teacher over a dataset's training split and keep its top-k targets on disk.

Per packed sequence and position t (the teacher's distribution for token t+1) a shard
stores the top-k token ids and log-probabilities over the real vocabulary, and the exact
log of the probability mass outside the top-k. Shards are deterministic (fixed order,
per-row computation), so an interrupted run resumes at the first missing or corrupt shard
and ends with files bit-for-bit identical to an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from nexus_core import data, progress
from nexus_core.config import UNFINGERPRINTED, Settings
from nexus_core.context import Control, StageContext, StageResult
from nexus_core.data import DatasetRef
from nexus_core.errors import ConfigError, DatasetError, DiskFullError, NexusError, StageInterrupted
from nexus_core.kd import augment
from nexus_core.paths import Paths
from nexus_core.records.registry import Teacher
from nexus_core.storage import shards
from nexus_core.storage.profiles import load_profile
from nexus_core.teachers.loading import load_tokenizer, tokenizer_fingerprint, tokenizer_vocab
from nexus_core.teachers.logits import logit_positions, topk_targets
from nexus_core.teachers.mode import open_runner
from nexus_core.teachers.quality import heldout_quality, train_loss


def run_extract(cfg: Settings, teacher: Teacher, dataset: DatasetRef, paths: Paths,
                ctx: StageContext = StageContext(), part: tuple[int, int] = (0, 1)) -> StageResult:
    """Extract one dataset's shards; `part` = (r, R): only block r of R of them (extract.ranges), so
    that R workers share the dataset. The last of the R jobs to finish writes manifest.json, byte for
    byte what one job (the default (0, 1)) writes, and measures the teacher's held-out quality."""
    ex = cfg.extract
    # 1. Inputs: the profile (mode, critical layers), the tokenizer, the packed training split.
    profile = load_profile(paths, teacher.teacher_id)
    tok = load_tokenizer(teacher)
    tok_fp, real_vocab = tokenizer_fingerprint(tok), tokenizer_vocab(tok)
    if profile.get("teacher_fp") != teacher.fingerprint():
        raise NexusError(f"teacher {teacher.teacher_id!r} changed since it was profiled; rerun the profile stage")
    if profile.get("tokenizer_fp") != tok_fp:
        raise NexusError(f"teacher {teacher.teacher_id!r}: its tokenizer changed since it was profiled; rerun the profile stage")
    if ex.top_k > real_vocab:
        raise ConfigError(f"--extract-top-k {ex.top_k} exceeds the tokenizer's {real_vocab} tokens; lower it")
    texts = data.load_texts(paths, dataset, ex.text_field)
    train, heldout = data.split(texts, ex.heldout_fraction)
    if not train:
        raise DatasetError(f"dataset {dataset}: all {len(texts)} documents fall in the held-out split; add documents")
    # Character spans of every token (align.py's text coordinate) let distill align this teacher's
    # positions with a student that tokenizes differently; a slow tokenizer has no offset mapping.
    try:
        ids, mask, cs, ce = data.pack_with_offsets(tok, train, ex.seq_len, ex.max_samples)  # (n, T) each
    except NotImplementedError:
        ids, mask = data.pack(tok, train, ex.seq_len, ex.max_samples)  # (n, T) int32 / uint8
        cs = ce = None
    prefix = data.special_prefix(tok)  # every row starts with it (data.py): the teacher's inputs as trained
    hidden_layers = sorted(profile["critical_layers"]) if ex.save_hidden else []
    out_dir = paths.shard_dir(teacher.teacher_id, dataset.slug)
    base = {"version": shards.MANIFEST_VERSION, "teacher_id": teacher.teacher_id,
            "teacher_fp": profile["teacher_fp"], "dataset": dataset.key, "tokenizer_fp": tok_fp,
            "mode": profile["mode"], "k": ex.top_k, "seq_len": ex.seq_len, "hidden_layers": hidden_layers,
            "tokenizer_vocab": real_vocab, "settings_fp": _settings_fp(cfg, hidden_layers),
            "offsets": cs is not None, "text_fp": data.text_fingerprint(train), "special_prefix": prefix,
            "bos": tok.bos_token_id is not None and tok.bos_token_id in prefix,
            "data_fp": _data_fp(ids, mask), "shard_size": ex.shard_size, "documents": {"train": len(train),
                                                                                  "heldout": len(heldout)}}
    # The teacher is opened on first use: a finished block needs it only when this job measures quality.
    device = cfg.resolved_device()
    dtype = getattr(torch, profile["dtype"]) if profile.get("device") == device else None  # as profiled
    opened = []

    def runner():
        if not opened:
            opened.append(open_runner(teacher, profile["mode"], device, dtype, memory_budget_bytes=_budget(cfg)))
        return opened[0]

    def quality():
        with _deterministic():
            q = heldout_quality(runner(), tok, heldout, ex, real_vocab)
            if q is not None:  # beside it, the loss on training rows: has the teacher seen them? (augment.has_seen)
                q["train_loss"] = round(train_loss(runner(), ids, mask, real_vocab, ex.batch_size), 6)
            return q

    rows = _Rows(ids, mask, cs, ce, hidden_layers, real_vocab, tok_fp, int(profile["hidden"]))
    try:
        result = _extract_rows(cfg, teacher, dataset, ctx, runner, rows, out_dir, base, part, quality)
        # The automatic augmentation rule (augment.resolve) decides on this dataset's size, the teacher's mode
        # and whether it has seen the rows (the merged manifest's heldout_quality).
        real = shards.read_manifest(out_dir) if (out_dir / shards.MANIFEST).exists() else {}
        a_ex, decision = augment.resolve(ex, int(ids.shape[0]), profile["mode"], real.get("heldout_quality"))
        result.data["augment"] = decision
        a_cfg = dataclasses.replace(cfg, extract=a_ex)
        a_fp, a_dir = _settings_fp(a_cfg, hidden_layers, augmented=True), augment.folder(out_dir)
        if augment.wanted(a_ex) and real.get("complete") and not _finished(a_dir, a_fp, real):
            # The job that completes the dataset adds the new rows (made again on a resume: deterministic).
            with _deterministic():
                a_ids, a_mask, a_base = augment.new_rows(out_dir, real, base, a_ex, runner, real_vocab)
            a_rows = _Rows(a_ids, a_mask, None, None, hidden_layers, real_vocab, tok_fp, rows.hidden_size)
            a_base.update(data_fp=_data_fp(a_ids, a_mask), settings_fp=a_fp,
                          augment_rule={k: decision[k] for k in ("auto", "reason")})
            a_res = _extract_rows(a_cfg, teacher, dataset, ctx, runner, a_rows, a_dir, a_base, (0, 1),
                                  lambda: real.get("heldout_quality"), announce=False)
            result.artifacts.extend(a_res.artifacts)
            result.data["augmented"] = {k: a_res.data[k] for k in ("sequences", "tokens", "resume_shard")}
    finally:
        for opened_runner in opened:
            opened_runner.close()
    return result


def _finished(a_dir: Path, settings_fp: str, real: dict) -> bool:
    """The new rows of these settings and these real rows are all extracted and intact."""
    try:
        m = shards.read_manifest(a_dir)
    except NexusError:
        return False
    return (bool(m.get("complete")) and m.get("settings_fp") == settings_fp and m.get("augment_of") == real["data_fp"]
            and m.get("teacher_fp") == real["teacher_fp"] and shards.verify_shards(a_dir) == [])


def _data_fp(ids: torch.Tensor, mask: torch.Tensor) -> str:
    return hashlib.sha256(ids.numpy().tobytes() + mask.numpy().tobytes()).hexdigest()[:16]


@dataclass
class _Rows:
    """The packed rows one pass extracts (the dataset's, or augment.py's new ones) and what their shards record."""

    ids: torch.Tensor  # (n, T) int32
    mask: torch.Tensor  # (n, T) uint8
    cs: torch.Tensor | None  # (n, T) character spans of the tokens; None without text
    ce: torch.Tensor | None
    hidden_layers: list[int]
    real_vocab: int
    tok_fp: str
    hidden_size: int


def _extract_rows(cfg: Settings, teacher: Teacher, dataset: DatasetRef, ctx: StageContext, runner, rows: _Rows,
                  out_dir: Path, base: dict, part: tuple[int, int], quality, announce: bool = True) -> StageResult:
    """Targets for `rows` into `out_dir`: this job's block of shards, resumed from the verified ones,
    and manifest.json when this job completes the folder."""
    ex = cfg.extract
    ids, mask, cs, ce, hidden_layers, real_vocab = rows.ids, rows.mask, rows.cs, rows.ce, rows.hidden_layers, rows.real_vocab
    n, S = ids.shape[0], ex.shard_size
    n_shards = (n + S - 1) // S
    base = {**base, "planned_shards": n_shards, "planned_sequences": n}
    r, R = part

    # 2. Resume: keep every verified shard of this job's block (an earlier run's, whatever its R).
    shard_set = shards.ShardSet(out_dir, base, n_shards, part)
    lo, hi, todo, resume = shard_set.lo, shard_set.hi, shard_set.todo, shard_set.resume
    if announce:
        ctx.started(resume_shard=resume, **({"part": [r, R], "shard_range": [lo, hi]} if R > 1 else {}))
    else:
        ctx.progress(augment_shards=hi - lo, resume_shard=resume)

    # 3. Disk: refuse to start when the remaining shards cannot fit.
    H = rows.hidden_size
    per_seq = ex.seq_len * (4 + 1 + 6 * ex.top_k + 4 + 2 * H * len(hidden_layers) + (16 if cs is not None else 0))
    need = _rows_in(todo, S, n) * per_seq + len(todo) * 8192 + (1 << 16)
    free = shards.free_bytes_for(out_dir)
    if todo and free < need:
        raise DiskFullError(f"extract {teacher.teacher_id} on {dataset}: needs about {need} bytes ({need / 1e6:.1f} MB) "
                            f"free in {out_dir} for {len(todo)} shard(s), only {free} bytes free; free some space "
                            f"or lower --extract-max-samples")

    # 4. Extract shard by shard; batches never cross a shard boundary (resume-exact).
    device = cfg.resolved_device()
    writer = shard_set.writer
    oom_batches = _oom_batches(cfg.faults.oom_at_batches)
    per_shard = (S + ex.batch_size - 1) // ex.batch_size
    if todo:
        runner()  # loaded before the clock starts: tokens_per_s is the shard loop's rate
    t0, tokens_done = time.perf_counter(), 0
    block_rows = min(n, hi * S) - lo * S  # this job's sequences; those of verified shards are done
    label = f"extract {teacher.teacher_id} {dataset.key}"
    with _deterministic(), progress.Bar(label, block_rows, block_rows - _rows_in(todo, S, n), "sequences") as bar:
        for done, s in enumerate(todo, start=hi - lo - len(todo) + 1):
            parts, shard_skipped = [], []
            for j, b0 in enumerate(range(s * S, min(n, (s + 1) * S), ex.batch_size)):
                _obey(ctx, ctx.poll(), done - 1, hi - lo, writer.manifest_path)
                b1 = min(b0 + ex.batch_size, (s + 1) * S, n)
                batch_no = s * per_shard + j
                part_, skipped, ooms = _batch_with_oom(runner(), ids, mask, b0, b1, batch_no, oom_batches, ex,
                                                       real_vocab, hidden_layers, device)
                if ooms:
                    shard_skipped.extend(skipped)
                    ctx.oom_recovered(batch=batch_no, skipped=skipped, splits=ooms, stage="extract")
                if part_:
                    parts.append(part_)
                batch_tokens = int(mask[b0:b1].sum())
                tokens_done += batch_tokens
                bar.advance(b1 - b0, tokens=batch_tokens)
            if not parts:
                raise NexusError(f"extract {teacher.teacher_id} on {dataset}: every sequence of shard {s} ran out of "
                                 f"memory; lower --extract-seq-len or use --sli always")
            tensors = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
            if cs is not None:  # spans of the rows kept (OOM-skipped rows are not in the shard)
                kept_rows = [i for i in range(s * S, min(n, (s + 1) * S)) if i not in set(shard_skipped)]
                tensors["char_start"], tensors["char_end"] = cs[kept_rows], ce[kept_rows]
            writer.add(tensors, {"format": "pt", "teacher_id": teacher.teacher_id, "dataset": dataset.key,
                                 "shard": s, "k": ex.top_k, "seq_len": ex.seq_len, "tokenizer_fp": rows.tok_fp},
                       index=s, skipped=shard_skipped)
            rate = tokens_done / max(time.perf_counter() - t0, 1e-9)
            ctx.progress(shard=done, shards=hi - lo, sequences=bar.done, sequences_total=block_rows, tokens=tokens_done,
                         tokens_per_s=round(rate, 1))
    loop_s = time.perf_counter() - t0

    # 5. The block is done; the last job of the dataset writes manifest.json (one job: always).
    merged = shard_set.merge(quality)
    return _result(out_dir, shard_set.own(), merged, part, (lo, hi), resume, tokens_done, loop_s)


# --- one batch ---------------------------------------------------------------------------------

def _rows_in(shard_ids, S: int, n: int) -> int:
    return sum(min(n, (s + 1) * S) - s * S for s in shard_ids)


def _batch_with_oom(runner, ids, mask, b0, b1, batch_no, oom_batches, ex, real_vocab, hidden_layers, device):
    """Targets for rows [b0, b1); on out-of-memory split in halves, skip a single row that still fails.

    Returns (tensors for the kept rows or None, skipped global row indices, OOMs caught).
    Rows are computed independently of their neighbours, so a split does not change stored values.
    """
    try:
        if batch_no in oom_batches and b0 == _batch_start(batch_no, ex):  # test hook: first row always "OOMs"
            raise torch.OutOfMemoryError(f"injected out-of-memory at batch {batch_no} (--faults-oom-at-batches)")
        return _targets(runner, ids[b0:b1], mask[b0:b1], ex, real_vocab, hidden_layers), [], 0
    except torch.OutOfMemoryError:
        pass  # leave the except block first so the exception's frames (and their tensors) are freed
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()
    if b1 - b0 == 1:
        return None, [b0], 1
    mid = (b0 + b1) // 2
    args = (batch_no, oom_batches, ex, real_vocab, hidden_layers, device)
    left, skip_l, n_l = _batch_with_oom(runner, ids, mask, b0, mid, *args)
    right, skip_r, n_r = _batch_with_oom(runner, ids, mask, mid, b1, *args)
    got = [p for p in (left, right) if p]
    merged = {k: torch.cat([p[k] for p in got]) for k in got[0]} if got else None
    return merged, skip_l + skip_r, 1 + n_l + n_r


def _oom_batches(spec: str) -> set[int]:
    """--faults-oom-at-batches "3,7": batch numbers (from 0, in extraction order) that raise out-of-memory."""
    try:
        return {int(b) for b in spec.replace(" ", "").split(",") if b}
    except ValueError:
        raise ConfigError(f"--faults-oom-at-batches {spec!r}: use batch numbers such as 3,7") from None


def _batch_start(batch_no: int, ex) -> int:
    per_shard = (ex.shard_size + ex.batch_size - 1) // ex.batch_size
    s, j = divmod(batch_no, per_shard)
    return s * ex.shard_size + j * ex.batch_size


def _targets(runner, ids, mask, ex, real_vocab, hidden_layers) -> dict[str, torch.Tensor]:
    """Teacher targets for one batch: ids/mask (b, T) -> shard tensors for those b rows."""
    out = runner.forward(ids, mask, keep_layers=hidden_layers)
    h = out.final_hidden  # (b, T, H)
    b, T, H = h.shape
    k = ex.top_k
    # chunk by the head's width (the logits' row), not the tokenizer's: a head padded to 262k rows beside a
    # small tokenizer would otherwise get chunks sized for the small vocabulary (GBs of logits at once)
    top_ids, top_lp, tail = topk_targets(runner.logits, h.reshape(b * T, H), k, real_vocab,
                                         logit_positions(ex, max(real_vocab, runner.head_vocab)))
    res = {"input_ids": ids.to(torch.int32).cpu(), "attention_mask": mask.to(torch.uint8).cpu(),
           "topk_ids": top_ids.view(b, T, k), "topk_logprobs": top_lp.view(b, T, k),
           "tail_logmass": tail.view(b, T)}
    for layer in hidden_layers:
        res[f"hidden.{layer}"] = out.hidden[layer].to("cpu", torch.float16)  # (b, T, H)
    return res


# --- control, resume, results ----------------------------------------------------------------

def _obey(ctx: StageContext, control: Control, kept: int, total: int, manifest: Path) -> None:
    """Between batches: completed shards are the checkpoint; a partial shard is abandoned on stop."""
    if control == Control.CHECKPOINT:
        ctx.checkpoint_saved(step=kept, reason="sigusr2", path=manifest)
    elif control == Control.PAUSE:
        ctx.checkpoint_saved(step=kept, reason="pause", path=manifest)
        ctx.wait_while_paused()
    elif control.stops:
        ctx.checkpoint_saved(step=kept, reason=control.value, path=manifest)
        raise StageInterrupted(control.value, f"{kept} of {total} shards kept in {manifest.parent}; rerun to resume")


def _result(out_dir: Path, own: list[dict], merged: dict | None, part: tuple[int, int], block: tuple[int, int],
            resume: int, tokens: int, seconds: float) -> StageResult:
    """This job's shards (and manifest.json when it wrote it) and figures; one job: the whole dataset."""
    data = {"shards": len(own), "sequences": sum(rec["sequences"] for rec in own),
            "tokens": sum(rec["tokens"] for rec in own),
            "tokens_per_s": round(tokens / seconds, 1) if seconds > 0 else None,
            "kept_mass_mean": merged["kept_mass"]["mean"] if merged else None, "resume_shard": resume,
            "heldout_loss_per_char": ((merged or {}).get("heldout_quality") or {}).get("loss_per_char"),
            "skipped_sequences": sum(len(rec.get("skipped", [])) for rec in own)}
    if part[1] > 1:
        data.update(part=list(part), shard_range=list(block), merged=merged is not None)
    artifacts = [out_dir / rec["file"] for rec in own] + ([out_dir / shards.MANIFEST] if merged else [])
    return StageResult(artifacts=artifacts, data=data)


def _settings_fp(cfg: Settings, hidden_layers: list[int], augmented: bool = False) -> str:
    """What the shard contents depend on (logit_chunk only bounds memory and ranges only splits the
    work, so both are left out: any R writes the same manifest). The augment settings count for the
    perturbed copies only: changing them keeps the real rows' shards."""
    skip = UNFINGERPRINTED | (set() if augmented else {("extract", k) for k in augment.KEYS})
    ex = {k: v for k, v in cfg.to_dict()["extract"].items() if ("extract", k) not in skip}
    payload = {"extract": ex, "hidden_layers": hidden_layers, "oom_at_batches": cfg.faults.oom_at_batches}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _budget(cfg: Settings) -> int | None:
    from nexus_core.config import parse_bytes

    return parse_bytes(cfg.memory.budget) if cfg.memory.budget else None


@contextmanager
def _deterministic():
    """Deterministic kernels while extracting (warn-only: never fail on an op without one)."""
    before, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn)
