"""Extraction shards on disk: atomic shard writes, the manifest, and integrity checks.

Layout (DESIGN.md): memory/<teacher>/<category>__<name>/shard-NNNNN.safetensors + manifest.json.
A shard is serialised in memory and written through atomic.atomic_path, so a crash or a
full disk (ENOSPC -> DiskFullError) never leaves a half-written shard under its real name.

Optional tensors (readers that do not know them ignore them):
  char_start, char_end  int64 [n, T]  each token's character span [start, end) in the text
                        coordinate of nexus_core.align (the train split's documents, each followed
                        by one separator character that the EOS token covers); -1 for padding.
                        Written when the tokenizer has an offset mapping (manifest "offsets": true);
                        distill uses them to align a teacher whose tokenizer differs from the student's.
Manifest additions: "offsets" (bool), "text_fp" (data.text_fingerprint of the train split: two
teachers' spans are comparable only when equal), "heldout_quality" ({loss, loss_per_char, tokens,
chars} of the teacher on the held-out split, or null) for per-domain teacher weights, with "train_loss" (its loss
on the first 16 training rows) beside them: whether the teacher has seen the rows (kd/augment.has_seen).

Range jobs (extract.ranges > 1): job r of R writes the shards of its block and records them in
its own part manifest (manifest-part-<r>-of-<R>.json, same fields as manifest.json plus "part"
and "shard_range"). The job that completes last, decided under an flock on a lock file beside
the shard folder (.<folder>.lock), merges the parts into manifest.json exactly as one job would
have written it and removes the parts, so the finished folder is byte-identical for any R.

Test hook: the environment variable NEXUS_TEST_DISK_LIMIT_BYTES, when set, makes the
shard folder behave as if its disk held only that many bytes of shard files: a write
that would pass the limit writes up to it and then fails with ENOSPC, and
`free_bytes_for()` reports at most the room left under it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from nexus_core.errors import CorruptArtifactError
from nexus_core.storage.atomic import atomic_path, free_bytes, sha256_file, write_json

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
PART_GLOB = "manifest-part-*.json"
# manifest fields that fix the shards' contents: equal values, equal shard bytes
SAME_INPUTS = ("teacher_fp", "tokenizer_fp", "settings_fp", "data_fp", "dataset", "k", "seq_len", "hidden_layers",
               "offsets", "text_fp")
_SHARD_RE = re.compile(r"shard-(\d+)\.safetensors")
DISK_LIMIT_ENV = "NEXUS_TEST_DISK_LIMIT_BYTES"
_WRITE_BLOCK = 8 << 20


_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
              torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def serialize(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """safetensors bytes with a canonical header (sorted keys), so equal inputs give equal files.

    safetensors' own writer keeps metadata in a hash map whose order changes between
    processes; shards must be bit-for-bit reproducible, hence this small writer. Tensors are
    laid out widest dtype first, then by name, so every tensor starts aligned to its dtype.
    """
    names = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    header: dict = {"__metadata__": {k: str(v) for k, v in metadata.items()}}
    chunks, offset = [], 0
    for name in names:
        t = tensors[name].detach().to("cpu").contiguous()
        raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)  # the data section starts 8-byte aligned
    return len(head).to_bytes(8, "little") + head + b"".join(chunks)


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def shard_index(name: str) -> int | None:
    m = _SHARD_RE.fullmatch(name)
    return int(m.group(1)) if m else None


def part_name(r: int, ranges: int) -> str:
    """The part manifest of range job r (from 0) of `ranges`."""
    return f"manifest-part-{r:05d}-of-{ranges:05d}.json"


def _disk_limit() -> int | None:
    value = os.environ.get(DISK_LIMIT_ENV)
    return int(value) if value else None


def _shard_bytes_in(shard_dir: Path) -> int:
    return sum(p.stat().st_size for p in Path(shard_dir).glob("*.safetensors")) if Path(shard_dir).exists() else 0


def free_bytes_for(shard_dir: Path) -> int:
    """Free disk where shards go (the nearest existing parent), capped by the test hook."""
    probe = Path(shard_dir)
    while not probe.exists():
        probe = probe.parent
    free = free_bytes(probe)
    limit = _disk_limit()
    if limit is not None:
        free = min(free, max(0, limit - _shard_bytes_in(shard_dir)))
    return free


class ShardWriter:
    """Writes shard files and keeps manifest.json in step with them (rewritten after each shard)."""

    def __init__(self, shard_dir: Path, manifest: dict, name: str = MANIFEST):
        self.dir = Path(shard_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name = name  # manifest.json, or a range job's part manifest
        self.manifest = dict(manifest)
        self.manifest.setdefault("version", MANIFEST_VERSION)
        self.manifest.setdefault("shards", [])
        self.manifest["complete"] = False

    @property
    def manifest_path(self) -> Path:
        return self.dir / self.name

    @property
    def shard_paths(self) -> list[Path]:
        return [self.dir / s["file"] for s in self.manifest["shards"]]

    def add(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str], index: int | None = None,
            **record) -> Path:
        """Write shard `index` (default: the next) atomically, record it (plus `record` fields) in index
        order, rewrite the manifest."""
        index = len(self.manifest["shards"]) if index is None else index
        target = self.dir / shard_name(index)
        blob = serialize(tensors, metadata)
        with atomic_path(target) as tmp:
            self._write_limited(tmp, blob)
        mask = tensors["attention_mask"]
        self.manifest["shards"].append({"file": target.name, "sequences": int(mask.shape[0]),
                                        "tokens": int(mask.sum()), "sha256": sha256_file(target), **record})
        self.manifest["shards"].sort(key=lambda rec: shard_index(rec["file"]))
        self.save()
        return target

    def _write_limited(self, tmp: Path, blob: bytes) -> None:
        limit = _disk_limit()
        room = None if limit is None else limit - _shard_bytes_in(self.dir)
        with open(tmp, "wb") as fh:
            for start in range(0, len(blob), _WRITE_BLOCK):
                block = blob[start:start + _WRITE_BLOCK]
                if room is not None and start + len(block) > room:
                    fh.write(block[: max(0, room - start)])
                    raise OSError(errno.ENOSPC, f"No space left on device ({DISK_LIMIT_ENV})", str(tmp))
                fh.write(block)

    def save(self, **updates) -> None:
        self.manifest.update(updates)
        write_json(self.manifest_path, self.manifest)

    def finish(self, **updates) -> dict:
        self.save(complete=True, **updates)
        return self.manifest


def read_manifest(shard_dir: Path, name: str = MANIFEST) -> dict:
    """The shard folder's manifest; CorruptArtifactError when it is missing or not a valid manifest."""
    path = Path(shard_dir) / name
    if not path.is_file():
        raise CorruptArtifactError(f"{path} is missing; run the extract stage for this teacher and dataset")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CorruptArtifactError(f"{path}: not valid JSON ({exc}); delete it and rerun extract") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        raise CorruptArtifactError(f"{path}: no 'shards' list; delete it and rerun extract")
    if manifest.get("version") != MANIFEST_VERSION:
        raise CorruptArtifactError(f"{path}: manifest version {manifest.get('version')!r}, expected {MANIFEST_VERSION}; rerun extract")
    for rec in manifest["shards"]:
        if not isinstance(rec, dict) or not {"file", "sha256", "sequences", "tokens"} <= set(rec):
            raise CorruptArtifactError(f"{path}: malformed shard entry {str(rec)[:80]}; delete it and rerun extract")
        if Path(rec["file"]).name != rec["file"]:
            raise CorruptArtifactError(f"{path}: shard entry {rec['file']!r} is not a plain file name")
    return manifest


def shard_problem(shard_dir: Path, record: dict) -> str | None:
    """Why one manifest entry does not verify (missing file or sha256 mismatch), or None."""
    path = Path(shard_dir) / record["file"]
    if not path.is_file():
        return f"{path}: missing"
    digest = sha256_file(path)
    if digest != record["sha256"]:
        return f"{path}: sha256 {digest[:12]}… does not match the manifest's {record['sha256'][:12]}…"
    return None


def verify_shards(shard_dir: Path) -> list[str]:
    """Problems with a shard folder (unreadable manifest, missing files, sha256 mismatches); [] when sound."""
    try:
        manifest = read_manifest(shard_dir)
    except CorruptArtifactError as exc:
        return [str(exc)]
    return [p for rec in manifest["shards"] if (p := shard_problem(shard_dir, rec))]


# --- range jobs: several jobs fill one shard folder ------------------------------------------

def shard_block(r: int, ranges: int, n_shards: int) -> tuple[int, int]:
    """Shards [lo, hi) of range job r of `ranges`: contiguous blocks of near-equal size, in order.

    With fewer shards than ranges, a job left without a block redoes one shard of a neighbour
    (the same bytes): every job then has outputs on record, and a job with none would never
    count as done."""
    lo, hi = r * n_shards // ranges, (r + 1) * n_shards // ranges
    if lo == hi and n_shards:
        lo = min(lo, n_shards - 1)
        hi = lo + 1
    return lo, hi


@contextmanager
def dir_lock(shard_dir: Path):
    """An exclusive flock on .<folder>.lock beside the shard folder (not in it: the folder's bytes
    are the contract). Serialises the range jobs' claims and merges, across processes and across
    machines that share the workdir (paths.check_lockable refuses filesystems where it would not)."""
    shard_dir = Path(shard_dir)
    shard_dir.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(shard_dir.parent / f".{shard_dir.name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the flock


def same_inputs(manifest: dict | None, base: dict) -> bool:
    return manifest is not None and all(manifest.get(k) == base[k] for k in SAME_INPUTS)


def _manifest_or_none(shard_dir: Path, name: str) -> dict | None:
    try:
        manifest = read_manifest(shard_dir, name)
    except CorruptArtifactError:
        return None
    return manifest if all(shard_index(rec["file"]) is not None for rec in manifest["shards"]) else None


def verified_records(shard_dir: Path, base: dict, indices: range) -> dict[int, dict]:
    """Shard index -> record, for the shards in `indices` that manifest.json or a part manifest of
    the same inputs lists and whose file still has the recorded sha256: the work a rerun keeps."""
    shard_dir = Path(shard_dir)
    candidates: dict[int, list[dict]] = {}
    names = [MANIFEST, *sorted(p.name for p in shard_dir.glob(PART_GLOB))] if shard_dir.is_dir() else []
    for name in names:
        manifest = _manifest_or_none(shard_dir, name)
        if same_inputs(manifest, base):
            for rec in manifest["shards"]:
                if shard_index(rec["file"]) in indices:
                    candidates.setdefault(shard_index(rec["file"]), []).append(rec)
    out = {}
    for i, recs in sorted(candidates.items()):
        path = shard_dir / shard_name(i)
        digest = sha256_file(path) if path.is_file() else None
        match = next((rec for rec in recs if rec["sha256"] == digest), None)
        if match is not None:
            out[i] = match
    return out


@dataclass
class Claim:
    writer: ShardWriter | None  # None: merged before and intact, nothing to write
    records: dict[int, dict]  # verified shards of the job's block, by index
    finished: dict | None  # an earlier complete manifest.json of the same inputs


def claim(shard_dir: Path, base: dict, lo: int, hi: int, part: tuple[int, int] = (0, 1)) -> Claim:
    """Start or resume the shards [lo, hi) of range job `part` = (r, R), under the folder lock.

    Keeps every verified shard an earlier run wrote (whatever its R). One job (R = 1) writes
    manifest.json as it goes, as always, and removes other runs' shard files; a range job writes
    its part manifest and drops a manifest.json of other inputs (its shards are being replaced)."""
    r, ranges = part
    shard_dir = Path(shard_dir)
    with dir_lock(shard_dir):
        old = _manifest_or_none(shard_dir, MANIFEST)
        if not same_inputs(old, base):
            if ranges > 1 and (shard_dir / MANIFEST).exists():
                (shard_dir / MANIFEST).unlink()
            old = None
        finished = old if old is not None and old.get("complete") and old.get("documents") == base["documents"] else None
        records = verified_records(shard_dir, base, range(lo, hi))
        if ranges > 1 and finished is not None and len(records) == hi - lo:
            return Claim(None, records, finished)
        if ranges == 1:
            for p in shard_dir.glob("shard-*.safetensors") if shard_dir.is_dir() else ():
                if shard_index(p.name) not in records:
                    p.unlink()  # another run's shards: never mixed with this one's
        name, extra = (MANIFEST, {}) if ranges == 1 else (part_name(r, ranges), {"part": [r, ranges],
                                                                                 "shard_range": [lo, hi]})
        writer = ShardWriter(shard_dir, {**base, **extra, "shards": [records[i] for i in sorted(records)]}, name)
        writer.save()
        return Claim(writer, records, finished)


def ready_records(shard_dir: Path, base: dict, ranges: int, n_shards: int) -> list[dict] | None:
    """Every shard's record, in order, once each of the `ranges` blocks is done; else None.

    A block is done when its part manifest (same inputs) is complete, or, having no part
    manifest (merged before, and its job not rerun), when manifest.json's records of it verify.
    An incomplete part means its job is running or will be rerun: that job merges at its end."""
    shard_dir, out = Path(shard_dir), {}
    for r in range(ranges):
        lo, hi = shard_block(r, ranges, n_shards)
        part = _manifest_or_none(shard_dir, part_name(r, ranges))
        if same_inputs(part, base):
            if not part.get("complete"):
                return None
            got = {shard_index(rec["file"]): rec for rec in part["shards"]}
        else:
            got = verified_records(shard_dir, base, range(lo, hi))
        if any(i not in got for i in range(lo, hi)):
            return None
        out.update({i: got[i] for i in range(lo, hi)})
    return [out[i] for i in range(n_shards)]


def write_merged(shard_dir: Path, base: dict, records: list[dict], **totals) -> dict:
    """manifest.json as one job writes it at its end; then the part manifests and any shard file
    it does not list go (call under dir_lock, once every block is done)."""
    shard_dir = Path(shard_dir)
    manifest = ShardWriter(shard_dir, {**base, "shards": records}).finish(**totals)
    listed = {rec["file"] for rec in records}
    for p in [*shard_dir.glob("shard-*.safetensors"), *shard_dir.glob(PART_GLOB)]:
        if p.name not in listed:
            p.unlink(missing_ok=True)
    return manifest


def kept_mass(files: list[Path]) -> dict:
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


class ShardSet:
    """One extraction job's view of a (teacher, dataset) shard folder: its block [lo, hi) of the folder's
    shards, the verified ones it keeps (an earlier run's, whatever its R), a writer for the rest, and the
    merge into manifest.json. Claim, lock and merge happen here; the extract stage only computes shards."""

    def __init__(self, shard_dir: Path, base: dict, n_shards: int, part: tuple[int, int] = (0, 1)):
        self.dir, self.base, self.n_shards, self.part = Path(shard_dir), base, n_shards, part
        self.lo, self.hi = shard_block(part[0], part[1], n_shards)
        c = claim(self.dir, base, self.lo, self.hi, part)
        self.writer, self.records, self.finished = c.writer, c.records, c.finished
        self.todo = [s for s in range(self.lo, self.hi) if s not in self.records]
        self.resume = self.todo[0] if self.todo else self.hi  # the first shard this job writes

    def own(self) -> list[dict]:
        """The records of this job's block (written now or kept from before)."""
        records = self.writer.manifest["shards"] if self.writer else list(self.records.values())
        return [rec for rec in records if self.lo <= shard_index(rec["file"]) < self.hi]

    def merge(self, quality) -> dict | None:
        """manifest.json when this job completes the folder (always for one job), else None.

        A range job marks its part complete and, under the folder lock, looks whether every block is
        done: only the last one to finish sees that (the check and its own mark are one critical
        section). Kept mass and `quality()` (the teacher's held-out figures) are measured outside the
        lock, then the blocks are checked again."""
        R = self.part[1]
        if self.writer is None:
            return None  # merged before and intact
        if R == 1:
            records = self.writer.manifest["shards"]
        else:
            with dir_lock(self.dir):
                self.writer.save(complete=True)
                records = ready_records(self.dir, self.base, R, self.n_shards)
            if records is None:
                return None
        mass = kept_mass([self.dir / rec["file"] for rec in records])
        old = self.finished  # same inputs, same held-out figures: no need to load the teacher again
        heldout = old["heldout_quality"] if old is not None and "heldout_quality" in old else quality()
        with dir_lock(self.dir):
            if R > 1 and ready_records(self.dir, self.base, R, self.n_shards) != records:
                return None  # a block was restarted meanwhile: its job merges when it ends
            return write_merged(self.dir, self.base, records, total_sequences=sum(rec["sequences"] for rec in records),
                                kept_mass=mass, heldout_quality=heldout,
                                skipped_sequences=[i for rec in records for i in rec.get("skipped", [])])
