"""Crash-safe writes: temp file in the same folder, fsync, rename, fsync the folder."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from nexus_core.errors import DiskFullError


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temp path beside `target`; on success it is fsync'd and renamed onto `target`.

    On any error (ENOSPC included) the temp file is removed, so no half-written file is left.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, target)
        _fsync_dir(target.parent)
    except OSError as exc:
        tmp_path.unlink(missing_ok=True)
        if exc.errno == errno.ENOSPC:
            raise DiskFullError(f"disk full while writing {target}: free some space and rerun") from exc
        raise
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_bytes(target: Path, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_text(target: Path, text: str) -> None:
    write_bytes(target, text.encode("utf-8"))


def write_json(target: Path, obj) -> None:
    write_text(target, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def artifact_record(path: Path, home: Path) -> dict:
    """The {path, size, sha256} entry StageCompleted.data.artifacts holds; path relative to home."""
    path = Path(path)
    return {
        "path": str(path.resolve().relative_to(home.resolve())),
        "size": path.stat().st_size,
        "sha256": sha256_file(path),
    }


def sweep_stale_temps(folders) -> list[Path]:
    """Remove temp files atomic_path left behind when its process was killed (kill -9, power
    loss). Call only when no other writer can be running (e.g. under `nexus run`'s lock with
    no live worker): a live writer's temp file looks the same."""
    removed = []
    for folder in folders:
        folder = Path(folder)
        if not folder.exists():
            continue
        for p in folder.rglob(".*.tmp"):
            if p.is_file():
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize
