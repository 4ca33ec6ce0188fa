"""Extract stage: run a teacher over a dataset's training split and keep its top-k targets on disk.

Per packed sequence and position t (the teacher's distribution for token t+1) a shard
stores the top-k token ids and log-probabilities over the real vocabulary, and the exact
log of the probability mass outside the top-k. Shards are deterministic (fixed order,
per-row computation), so an interrupted run resumes at the first missing or corrupt shard
and ends with files bit-for-bit identical to an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open

from nexus_core import align, data, shards
from nexus_core.config import Settings
from nexus_core.data import DatasetRef
from nexus_core.errors import ConfigError, DatasetError, DiskFullError, NexusError, StageInterrupted
from nexus_core.paths import Paths
from nexus_core.registry import Teacher
from nexus_core.stages.context import Control, StageContext, StageResult
from nexus_core.teacher import load_tokenizer, open_runner, tokenizer_fingerprint, tokenizer_vocab

LOG_EPS = math.log(1e-30)  # tail_logmass floor when the top-k holds (numerically) all the mass


def run_extract(cfg: Settings, teacher: Teacher, dataset: DatasetRef, paths: Paths,
                ctx: StageContext = StageContext()) -> StageResult:
    ex = cfg.extract
    # 1. Inputs: the profile (mode, critical layers), the tokenizer, the packed training split.
    profile = _load_profile(paths, teacher)
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
        ids, mask, cs, ce = align.pack_with_offsets(tok, train, ex.seq_len, ex.max_samples)  # (n, T) each
    except NotImplementedError:
        ids, mask = data.pack(tok, train, ex.seq_len, ex.max_samples)  # (n, T) int32 / uint8
        cs = ce = None
    hidden_layers = sorted(profile["critical_layers"]) if ex.save_hidden else []
    n, S = ids.shape[0], ex.shard_size
    n_shards = (n + S - 1) // S

    # 2. Resume: keep the verified prefix of a matching manifest.
    out_dir = paths.shard_dir(teacher.teacher_id, dataset.slug)
    base = {"version": shards.MANIFEST_VERSION, "teacher_id": teacher.teacher_id,
            "teacher_fp": profile["teacher_fp"], "dataset": dataset.key, "tokenizer_fp": tok_fp,
            "mode": profile["mode"], "k": ex.top_k, "seq_len": ex.seq_len, "hidden_layers": hidden_layers,
            "tokenizer_vocab": real_vocab, "settings_fp": _settings_fp(cfg, hidden_layers),
            "offsets": cs is not None, "text_fp": align.text_fingerprint(train),
            "data_fp": hashlib.sha256(ids.numpy().tobytes() + mask.numpy().tobytes()).hexdigest()[:16],
            "shard_size": S, "planned_shards": n_shards, "planned_sequences": n,
            "documents": {"train": len(train), "heldout": len(heldout)}}
    kept = _resumable(out_dir, base)
    start = len(kept)
    ctx.started(resume_shard=start)
    writer = shards.ShardWriter(out_dir, {**base, "shards": kept})
    if start == n_shards:
        return _finish(writer, out_dir, start, 0, 0.0, _old_quality(out_dir))

    # 3. Disk: refuse to start when the remaining shards cannot fit.
    H = int(profile["hidden"])
    per_seq = ex.seq_len * (4 + 1 + 6 * ex.top_k + 4 + 2 * H * len(hidden_layers) + (16 if cs is not None else 0))
    need = (n - start * S) * per_seq + (n_shards - start) * 8192 + (1 << 16)
    free = shards.free_bytes_for(out_dir)
    if free < need:
        raise DiskFullError(f"extract {teacher.teacher_id} on {dataset}: needs about {need} bytes ({need / 1e6:.1f} MB) "
                            f"free in {out_dir} for {n_shards - start} shard(s), only {free} bytes free; free some space "
                            f"or lower --extract-max-samples")
    out_dir.mkdir(parents=True, exist_ok=True)
    writer.save()

    # 4. Extract shard by shard; batches never cross a shard boundary (resume-exact).
    device = cfg.resolved_device()
    budget = _budget(cfg)
    dtype = getattr(torch, profile["dtype"]) if profile.get("device") == device else None  # as profiled
    runner = open_runner(teacher, profile["mode"], device, dtype, memory_budget_bytes=budget)
    oom_batches = _oom_batches(cfg.faults.oom_at_batches)
    per_shard = (S + ex.batch_size - 1) // ex.batch_size
    t0, tokens_done = time.perf_counter(), 0
    try:
        with _deterministic(), _progress_bar(n_shards, start) as bar:
            for s in range(start, n_shards):
                parts, shard_skipped = [], []
                for j, b0 in enumerate(range(s * S, min(n, (s + 1) * S), ex.batch_size)):
                    _obey(ctx, ctx.poll(), s, n_shards, out_dir)
                    b1 = min(b0 + ex.batch_size, (s + 1) * S, n)
                    batch_no = s * per_shard + j
                    part, skipped, ooms = _batch_with_oom(runner, ids, mask, b0, b1, batch_no, oom_batches, ex,
                                                          real_vocab, hidden_layers, device)
                    if ooms:
                        shard_skipped.extend(skipped)
                        ctx.oom_recovered(batch=batch_no, skipped=skipped, splits=ooms, stage="extract")
                    if part:
                        parts.append(part)
                    tokens_done += int(mask[b0:b1].sum())
                if not parts:
                    raise NexusError(f"extract {teacher.teacher_id} on {dataset}: every sequence of shard {s} ran out of "
                                     f"memory; lower --extract-seq-len or use --sli always")
                tensors = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
                if cs is not None:  # spans of the rows kept (OOM-skipped rows are not in the shard)
                    kept_rows = [r for r in range(s * S, min(n, (s + 1) * S)) if r not in set(shard_skipped)]
                    tensors["char_start"], tensors["char_end"] = cs[kept_rows], ce[kept_rows]
                writer.add(tensors, {"format": "pt", "teacher_id": teacher.teacher_id, "dataset": dataset.key,
                                     "shard": s, "k": ex.top_k, "seq_len": ex.seq_len, "tokenizer_fp": tok_fp},
                           skipped=shard_skipped)
                rate = tokens_done / max(time.perf_counter() - t0, 1e-9)
                bar(s + 1, rate)
                ctx.progress(shard=s + 1, shards=n_shards, tokens=tokens_done, tokens_per_s=round(rate, 1))
            quality = heldout_quality(runner, tok, heldout, ex, real_vocab)
    finally:
        runner.close()
    return _finish(writer, out_dir, start, tokens_done, time.perf_counter() - t0, quality)


# --- one batch ---------------------------------------------------------------------------------

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
    flat = h.reshape(b * T, H)
    top_ids = torch.empty(b * T, k, dtype=torch.int32)
    top_lp = torch.empty(b * T, k, dtype=torch.float16)
    tail = torch.empty(b * T, dtype=torch.float32)
    for p0 in range(0, b * T, ex.logit_chunk):
        p1 = min(p0 + ex.logit_chunk, b * T)
        z = runner.logits(flat[p0:p1].unsqueeze(0)).squeeze(0)  # (P, V) float32, at most one chunk alive
        if z.shape[-1] > real_vocab:
            z[:, real_vocab:] = float("-inf")  # padded head rows are not tokens
        lse = torch.logsumexp(z, dim=-1)  # (P,)
        v, i = z.topk(k, dim=-1)  # (P, k)
        top_ids[p0:p1] = i.to("cpu", torch.int32)
        top_lp[p0:p1] = (v - lse[:, None]).to("cpu", torch.float16)
        z.scatter_(-1, i, float("-inf"))  # what is left is the tail
        tail[p0:p1] = (torch.logsumexp(z, dim=-1) - lse).clamp_min(LOG_EPS).cpu()  # log(1 - sum p_topk), exact
        del z
    res = {"input_ids": ids.to(torch.int32).cpu(), "attention_mask": mask.to(torch.uint8).cpu(),
           "topk_ids": top_ids.view(b, T, k), "topk_logprobs": top_lp.view(b, T, k),
           "tail_logmass": tail.view(b, T)}
    for layer in hidden_layers:
        res[f"hidden.{layer}"] = out.hidden[layer].to("cpu", torch.float16)  # (b, T, H)
    return res


# --- control, resume, results ----------------------------------------------------------------

def _obey(ctx: StageContext, control: Control, shard: int, n_shards: int, out_dir: Path) -> None:
    """Between batches: completed shards are the checkpoint; a partial shard is abandoned on stop."""
    if control == Control.CHECKPOINT:
        ctx.checkpoint_saved(step=shard, reason="sigusr2", path=out_dir / shards.MANIFEST)
    elif control == Control.PAUSE:
        ctx.checkpoint_saved(step=shard, reason="pause", path=out_dir / shards.MANIFEST)
        ctx.wait_while_paused()
    elif control.stops:
        ctx.checkpoint_saved(step=shard, reason=control.value, path=out_dir / shards.MANIFEST)
        raise StageInterrupted(control.value, f"{shard} of {n_shards} shards kept in {out_dir}; rerun to resume")


def _resumable(out_dir: Path, base: dict) -> list[dict]:
    """Shard records of an earlier run with the same inputs, up to the first missing/corrupt one."""
    try:
        old = shards.read_manifest(out_dir)
    except Exception:
        old = None
    keys = ("teacher_fp", "tokenizer_fp", "settings_fp", "data_fp", "dataset", "k", "seq_len", "hidden_layers",
            "offsets", "text_fp")
    if old is None or any(old.get(k) != base[k] for k in keys):
        for stale in out_dir.glob("shard-*.safetensors") if out_dir.exists() else ():
            stale.unlink()  # another run's shards: never mixed with this one's
        return []
    kept = []
    for i, rec in enumerate(old["shards"]):
        if rec["file"] != shards.shard_name(i) or shards.shard_problem(out_dir, rec):
            break
        kept.append(rec)
    return kept


def _finish(writer: shards.ShardWriter, out_dir: Path, start: int, tokens: int, seconds: float,
            quality: dict | None) -> StageResult:
    kept_mass = _kept_mass(writer.shard_paths)
    recs = writer.manifest["shards"]
    m = writer.finish(total_sequences=sum(s["sequences"] for s in recs), kept_mass=kept_mass,
                      skipped_sequences=[i for s in recs for i in s.get("skipped", [])], heldout_quality=quality)
    return StageResult(artifacts=[*writer.shard_paths, writer.manifest_path], data={
        "shards": len(m["shards"]), "sequences": m["total_sequences"],
        "tokens": sum(s["tokens"] for s in m["shards"]),
        "tokens_per_s": round(tokens / seconds, 1) if seconds > 0 else None,
        "kept_mass_mean": kept_mass["mean"], "resume_shard": start,
        "heldout_loss_per_char": (quality or {}).get("loss_per_char"),
        "skipped_sequences": len(m["skipped_sequences"])})


HELDOUT_QUALITY_SEQUENCES = 16


@torch.no_grad()
def heldout_quality(runner, tok, heldout: list[str], ex, real_vocab: int) -> dict | None:
    """The teacher's next-token loss on the dataset's held-out split, per token and per character.

    Per character (nats/char) is what distill compares across teachers with different tokenizers
    (a coarser tokenizer has a higher per-token loss for the same knowledge); it sets each
    teacher's per-domain weight. None when there is no held-out text or no offset mapping.
    """
    if not heldout:
        return None
    try:
        ids, mask, cs, ce = align.pack_with_offsets(tok, heldout, ex.seq_len, HELDOUT_QUALITY_SEQUENCES)
    except (NotImplementedError, DatasetError):
        return None
    nll, tokens, chars = 0.0, 0, 0
    for b0 in range(0, ids.shape[0], ex.batch_size):
        x, m = ids[b0:b0 + ex.batch_size], mask[b0:b0 + ex.batch_size]
        h = runner.forward(x, m).final_hidden  # (b, T, H)
        b, T, H = h.shape
        tgt = torch.zeros(b, T, dtype=torch.long)
        tgt[:, :-1] = x[:, 1:].long()  # position t predicts token t+1 (row-local)
        real = torch.zeros(b, T, dtype=torch.bool)
        real[:, :-1] = (m[:, :-1] * m[:, 1:]).bool()
        width = torch.zeros(b, T, dtype=torch.long)
        width[:, :-1] = (ce[b0:b0 + b, 1:] - cs[b0:b0 + b, 1:]).clamp(min=0)  # chars the target token covers
        flat, tf, rf = h.reshape(b * T, H), tgt.view(-1), real.view(-1)
        for p0 in range(0, b * T, ex.logit_chunk):
            z = runner.logits(flat[p0:p0 + ex.logit_chunk].unsqueeze(0)).squeeze(0)[:, :real_vocab].float()
            lp = z.log_softmax(-1).gather(-1, tf[p0:p0 + ex.logit_chunk, None].to(z.device)).squeeze(-1).cpu()
            nll -= float(lp[rf[p0:p0 + ex.logit_chunk]].double().sum())
        tokens += int(real.sum())
        chars += int(width[real].sum())
    if tokens == 0 or chars == 0:
        return None
    return {"loss": round(nll / tokens, 6), "loss_per_char": round(nll / chars, 6), "tokens": tokens, "chars": chars}


def _old_quality(out_dir: Path) -> dict | None:
    """The held-out figures of a complete earlier run with the same inputs (nothing to recompute)."""
    try:
        return shards.read_manifest(out_dir).get("heldout_quality")
    except Exception:
        return None


def _kept_mass(files: list[Path]) -> dict:
    """Mean and 5th percentile over real tokens of the probability mass the top-k keeps."""
    vals = []
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            m = st.get_tensor("attention_mask").bool()
            vals.append(-torch.expm1(st.get_tensor("tail_logmass")[m].double()))  # 1 - exp(tail)
    if not vals:
        return {"mean": None, "p5": None}
    v = torch.cat(vals)
    return {"mean": round(float(v.mean()), 6), "p5": round(float(torch.quantile(v.float(), 0.05)), 6)}


def _load_profile(paths: Paths, teacher: Teacher) -> dict:
    path = paths.profile(teacher.teacher_id)
    if not path.is_file():
        raise NexusError(f"teacher {teacher.teacher_id!r} has no profile ({path}); run the profile stage first")
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise NexusError(f"{path}: unreadable profile ({exc}); delete it and rerun the profile stage") from None


def _settings_fp(cfg: Settings, hidden_layers: list[int]) -> str:
    """What the shard contents depend on (logit_chunk only bounds memory, so it is left out)."""
    ex = {k: v for k, v in cfg.to_dict()["extract"].items() if k != "logit_chunk"}
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


@contextmanager
def _progress_bar(total: int, done: int):
    """A rich progress bar on stderr when it is a terminal; yields update(shards_done, tokens_per_s)."""
    if not sys.stderr.isatty():
        yield lambda *_: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("extract"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                  TimeRemainingColumn(), console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("extract", total=total, completed=done, rate="")
        yield lambda n, rate: bar.update(task, completed=n, rate=f"{rate:,.0f} tok/s")
