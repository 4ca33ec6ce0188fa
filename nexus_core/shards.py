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
Manifest additions: "offsets" (bool), "text_fp" (align.text_fingerprint of the train split: two
teachers' spans are comparable only when equal), "heldout_quality" ({loss, loss_per_char, tokens,
chars} of the teacher on the held-out split, or null) for per-domain teacher weights.

Test hook: the environment variable NEXUS_TEST_DISK_LIMIT_BYTES, when set, makes the
shard folder behave as if its disk held only that many bytes of shard files: a write
that would pass the limit writes up to it and then fails with ENOSPC, and
`free_bytes_for()` reports at most the room left under it.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import torch

from nexus_core import data
from nexus_core.atomic import atomic_path, sha256_file, write_json
from nexus_core.errors import CorruptArtifactError

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
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
    free = data.free_bytes(probe)
    limit = _disk_limit()
    if limit is not None:
        free = min(free, max(0, limit - _shard_bytes_in(shard_dir)))
    return free


class ShardWriter:
    """Writes shard files and keeps manifest.json in step with them (rewritten after each shard)."""

    def __init__(self, shard_dir: Path, manifest: dict):
        self.dir = Path(shard_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.manifest = dict(manifest)
        self.manifest.setdefault("version", MANIFEST_VERSION)
        self.manifest.setdefault("shards", [])
        self.manifest["complete"] = False

    @property
    def manifest_path(self) -> Path:
        return self.dir / MANIFEST

    @property
    def shard_paths(self) -> list[Path]:
        return [self.dir / s["file"] for s in self.manifest["shards"]]

    def add(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str], **record) -> Path:
        """Write the next shard atomically, record it (plus `record` fields), rewrite the manifest."""
        index = len(self.manifest["shards"])
        target = self.dir / shard_name(index)
        blob = serialize(tensors, metadata)
        with atomic_path(target) as tmp:
            self._write_limited(tmp, blob)
        mask = tensors["attention_mask"]
        self.manifest["shards"].append({"file": target.name, "sequences": int(mask.shape[0]),
                                        "tokens": int(mask.sum()), "sha256": sha256_file(target), **record})
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


def read_manifest(shard_dir: Path) -> dict:
    """The shard folder's manifest; CorruptArtifactError when it is missing or not a valid manifest."""
    path = Path(shard_dir) / MANIFEST
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
