"""Teacher shards as training data: check them against the plan, read them lazily, in a seeded order.

A *stream* is one dataset's rows as packed by the primary tokenizer, with the targets of
every teacher that shares that tokenizer and has identical rows (same packing), plus the
*aligned* teachers: those with another tokenizer, whose positions are mapped onto the
stream's by character spans and whose ids onto the student's by token text (align.py).
Each teacher's weight on a dataset is its registry weight times its held-out quality there
(align.quality_weights). Shards are opened with safetensors.safe_open (memory-mapped) and
read one row slice at a time.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import structlog
import torch
from safetensors import safe_open

from nexus_core.config import Settings
from nexus_core.data import DatasetRef
from nexus_core.errors import CorruptArtifactError, PlanMismatchError
from nexus_core.kd import align, augment
from nexus_core.kd.domain_quality import loss_per_char
from nexus_core.paths import Paths
from nexus_core.records.plan import DistillPlan
from nexus_core.records.registry import Teacher
from nexus_core.storage import shards
from nexus_core.storage.atomic import sha256_file

log = structlog.get_logger("nexus.distill")


@dataclass
class Source:
    """One teacher's complete, verified shards for one dataset."""

    teacher_id: str
    weight: float
    folder: Path
    manifest: dict
    files: list[Path]
    rows: list[int]  # sequences per shard file

    @property
    def n(self) -> int:
        return sum(self.rows)

    def locate(self, row: int) -> tuple[Path, int]:
        for f, r in zip(self.files, self.rows):
            if row < r:
                return f, row
            row -= r
        raise IndexError(row)


@dataclass
class AlignedSource:
    """A teacher with another tokenizer, laid onto one stream's rows."""

    source: Source
    table: torch.Tensor  # (n_stream_rows, T) int64: the teacher's flat position (row * T + t) or -1
    id_map: torch.Tensor  # (V_teacher,) int64: student id of each teacher id, or -1


@dataclass
class Stream:
    dataset: str
    sources: list[Source]  # sources[0] supplies input_ids / attention_mask
    aligned: list[AlignedSource] = field(default_factory=list)

    @property
    def n(self) -> int:
        return self.sources[0].n


def verify_source(cfg: Settings, paths: Paths, teacher: Teacher, dataset: str, tokenizer_fp: str | None,
                  augmented: bool = False) -> Source:
    """Check one teacher's shards for one dataset (or their augmented rows, augment.py) against the
    plan; raise naming the bad shard."""
    folder = paths.shard_dir(teacher.teacher_id, DatasetRef.parse(dataset).slug)
    folder = augment.folder(folder) if augmented else folder
    m = shards.read_manifest(folder)  # CorruptArtifactError naming the folder when missing or malformed
    where = f"shards {folder}"
    redo = f"; delete {folder} (or `nexus reset`) and rerun extract"
    if not m.get("complete"):
        raise PlanMismatchError(f"{where}: extraction is not complete; rerun extract to finish it")
    expect = {"teacher_id": teacher.teacher_id, "teacher_fp": teacher.fingerprint(), "dataset": dataset,
              "k": cfg.extract.top_k, "seq_len": cfg.extract.seq_len}
    if augmented:
        expect["augment"] = augment.settings(cfg.extract)
    if tokenizer_fp:
        expect["tokenizer_fp"] = tokenizer_fp
    for key, want in expect.items():
        if m.get(key) != want:
            raise PlanMismatchError(f"{where}/manifest.json: {key} is {m.get(key)!r} but the plan expects {want!r}{redo}")
    k, T = cfg.extract.top_k, cfg.extract.seq_len
    files, rows = [], []
    for entry in m["shards"]:
        f = folder / entry["file"]
        if not f.is_file():
            raise CorruptArtifactError(f"shard {f}: listed in the manifest but missing{redo}")
        if sha256_file(f) != entry["sha256"]:
            raise CorruptArtifactError(f"shard {f}: sha256 does not match the manifest (corrupt or changed){redo}")
        n = int(entry["sequences"])
        with safe_open(str(f), "pt") as h:
            shapes = {name: list(h.get_slice(name).get_shape()) for name in h.keys()}
        want_shapes = {"input_ids": [n, T], "attention_mask": [n, T], "topk_ids": [n, T, k],
                       "topk_logprobs": [n, T, k], "tail_logmass": [n, T]}
        for name, shape in want_shapes.items():
            if shapes.get(name) != shape:
                raise PlanMismatchError(f"shard {f}: tensor {name} has shape {shapes.get(name)}, expected {shape} "
                                        f"(k={k}, seq_len={T}){redo}")
        files.append(f)
        rows.append(n)
    if not files:
        raise CorruptArtifactError(f"{where}: the manifest lists no shards{redo}")
    return Source(teacher.teacher_id, teacher.weight, folder, m, files, rows)


def _rows_digest(src: Source) -> str:
    h = hashlib.sha256()
    for f in src.files:
        with safe_open(str(f), "pt") as fh:
            h.update(fh.get_tensor("input_ids").numpy().tobytes())
    return h.hexdigest()


def open_streams(cfg: Settings, plan: DistillPlan, paths: Paths, profiles: dict[str, dict]) -> tuple[list[Stream], dict]:
    """Verify every shard the plan needs; group teachers with identical rows into streams and
    align the teachers whose tokenizer differs from the primary's onto those streams.

    Returns (streams, info): info names the primary tokenizer fp and vocab, the teachers left
    out entirely (with reasons), and teacher_usage: per teacher how its signal was used
    (shared-token coverage %, aligned positions %, per-domain weight).
    """
    fps = {t.teacher_id: (profiles.get(t.teacher_id) or {}).get("tokenizer_fp") for t in plan.teachers}
    sources: dict[str, list[Source]] = {}
    for teacher, dataset in plan.extractions():
        src = verify_source(cfg, paths, teacher, dataset, fps.get(teacher.teacher_id))
        sources.setdefault(dataset, []).append(src)
    primary_fp = fps.get(plan.primary)
    if primary_fp is None:  # no profile: the primary's own manifests define the tokenizer
        primary_fp = next((s.manifest.get("tokenizer_fp") for ss in sources.values() for s in ss
                           if s.teacher_id == plan.primary), None)
    registry = {t.teacher_id: t.weight for t in plan.teachers}
    usage: dict[str, dict] = {t.teacher_id: {"tokenizer": "primary" if fps.get(t.teacher_id) in (None, primary_fp)
                                             else "aligned", "domains": {}} for t in plan.teachers}
    xtok = _CrossTokenizer(cfg, plan, primary_fp)
    streams: list[Stream] = []
    vocab = None
    for dataset in sorted(sources):
        _weigh(cfg, sources[dataset], registry, usage, dataset)
        groups: dict[str, list[Source]] = {}
        ordered = sorted(sources[dataset], key=lambda s: (s.teacher_id != plan.primary, s.teacher_id))
        others = [s for s in ordered if s.manifest.get("tokenizer_fp") != primary_fp]
        for src in ordered:
            if src not in others:
                groups.setdefault(_rows_digest(src), []).append(src)
                vocab = vocab or src.manifest.get("tokenizer_vocab")
        made = [Stream(dataset, group) for group in groups.values()]
        for src in others:
            dom = usage[src.teacher_id]["domains"][dataset]
            if not made:
                dom.update(used=False, reason="no teacher with the primary tokenizer has shards for this dataset")
                continue
            xtok.attach(made[0], src, dom)  # made[0] holds the primary's rows when it has this dataset
        streams.extend(made)
    # Each teacher's new rows (augment.py): a stream of its own (their rows differ per teacher), where the
    # automatic rule, on the real rows' manifest (the inputs extract decided on), or the settings ask for them.
    for teacher, dataset in plan.extractions():
        if fps.get(teacher.teacher_id) in (None, primary_fp):  # no text spans: no cross-tokenizer alignment
            real = next(s for s in sources[dataset] if s.teacher_id == teacher.teacher_id)
            a_ex, _ = augment.resolve(cfg.extract, int(real.manifest.get("planned_sequences", real.n)),
                                      real.manifest.get("mode", "full"), real.manifest.get("heldout_quality"))
            if augment.wanted(a_ex):
                a_cfg = dataclasses.replace(cfg, extract=a_ex)
                src = verify_source(a_cfg, paths, teacher, dataset, fps.get(teacher.teacher_id), augmented=True)
                streams.append(Stream(dataset, [src]))
                usage[teacher.teacher_id]["domains"][dataset]["augmented_sequences"] = src.n
    for tid, u in usage.items():
        for d, dom in u["domains"].items():
            dom.setdefault("used", True)
            if not dom["used"]:
                log.warning("distill.teacher_left_out", teacher=tid, dataset=d, reason=dom.get("reason"))
    left_out = sorted(t for t, u in usage.items() if u["domains"] and not any(d["used"] for d in u["domains"].values()))
    if not streams:
        raise PlanMismatchError("no teacher shards share the primary teacher's tokenizer; nothing to distill")
    return streams, {"tokenizer_fp": primary_fp, "vocab": vocab, "left_out": left_out, "teacher_usage": usage}


def _heldout_loss(src: Source) -> float | None:
    return loss_per_char(src.manifest)  # the router ranks teachers by the same numbers (domain_quality.py)


def _weigh(cfg: Settings, srcs: list[Source], registry: dict[str, float], usage: dict, dataset: str) -> None:
    """Per-domain weights: registry weight x softmax(-held-out nats per char / tau) (equal when unknown)."""
    losses = {s.teacher_id: _heldout_loss(s) for s in srcs}
    w = align.quality_weights(losses, {s.teacher_id: registry[s.teacher_id] for s in srcs},
                              cfg.distill.teacher_quality_tau)
    for s in srcs:
        s.weight = w[s.teacher_id]
        usage[s.teacher_id]["domains"][dataset] = {
            "weight": round(s.weight, 4), "heldout_loss_per_char": losses[s.teacher_id],
            "weight_from": "heldout quality x registry weight" if None not in losses.values() else "registry weight"}


class _CrossTokenizer:
    """Builds AlignedSources: position tables per (stream, teacher), one id table per teacher."""

    def __init__(self, cfg: Settings, plan: DistillPlan, primary_fp: str | None):
        self.cfg, self.plan, self.primary_fp = cfg, plan, primary_fp
        self._student_tok = None
        self._maps: dict[str, tuple[torch.Tensor, dict]] = {}

    def _id_map(self, teacher_id: str) -> tuple[torch.Tensor, dict]:
        from nexus_core.teachers.loading import tokenizer_from

        if teacher_id not in self._maps:
            if self._student_tok is None:
                p = self.plan.primary_teacher
                self._student_tok = tokenizer_from(p.path, p.trust_remote_code)
            t = next(t for t in self.plan.teachers if t.teacher_id == teacher_id)
            tok = tokenizer_from(t.path, t.trust_remote_code)
            self._maps[teacher_id] = align.vocab_map(tok, self._student_tok)
        return self._maps[teacher_id]

    def attach(self, stream: Stream, src: Source, dom: dict) -> None:
        lead = stream.sources[0]
        why = None
        if not (lead.manifest.get("offsets") and src.manifest.get("offsets")):
            why = "shards carry no character offsets (extracted by an older Nexus or a slow tokenizer); rerun extract"
        elif lead.manifest.get("text_fp") != src.manifest.get("text_fp"):
            why = "the two extractions saw different training text (other held-out fraction?); rerun extract"
        if why:
            dom.update(used=False, reason=why)
            return
        cross = not (lead.manifest.get("skipped_sequences") or src.manifest.get("skipped_sequences"))
        exact = self.cfg.distill.xtok_align == "token"
        s_next = align.next_token_starts(*_spans(lead), cross_rows=cross, exact_span=exact)  # (n_s, T)
        t_next = align.next_token_starts(*_spans(src), cross_rows=cross, exact_span=exact)  # (n_t, T)
        table = align.align_positions(s_next, t_next)  # (n_s, T)
        id_map, vinfo = self._id_map(src.teacher_id)
        real = int(_spans(lead)[2].sum())
        aligned = int((table >= 0).sum())
        dom.update(aligned_positions_pct=round(100.0 * aligned / max(real, 1), 2),
                   shared_token_coverage_pct=_shared_coverage(src, table, id_map),
                   shared_vocab_pct=vinfo["shared_vocab_pct"], used=aligned > 0)
        if not aligned:
            dom["reason"] = "no position aligned by character with the student's rows"
            return
        stream.aligned.append(AlignedSource(src, table, id_map))


def _spans(src: Source) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(char_start, char_end, attention_mask) of all of a source's rows, each (n, T)."""
    parts = {"char_start": [], "char_end": [], "attention_mask": []}
    for f in src.files:
        with safe_open(str(f), "pt") as h:
            for name in parts:
                parts[name].append(h.get_tensor(name))
    return tuple(torch.cat(parts[n]) for n in ("char_start", "char_end", "attention_mask"))


def _shared_coverage(src: Source, table: torch.Tensor, id_map: torch.Tensor) -> float:
    """% of the teacher's top-k probability mass, at the positions used, on tokens the student shares."""
    used = torch.zeros(src.n * table.shape[1], dtype=torch.bool)
    used[table[table >= 0]] = True
    mass = shared = 0.0
    row0 = 0
    for f, n in zip(src.files, src.rows):
        with safe_open(str(f), "pt") as h:
            ids, lp = h.get_tensor("topk_ids").long(), h.get_tensor("topk_logprobs").float()  # (n, T, k)
        u = used[row0 * table.shape[1]:(row0 + n) * table.shape[1]].view(n, -1)
        p = lp.exp()[u]  # (m, k)
        mass += float(p.sum())
        shared += float((p * (id_map[ids[u]] >= 0)).sum())
        row0 += n
    return round(100.0 * shared / max(mass, 1e-30), 2)


