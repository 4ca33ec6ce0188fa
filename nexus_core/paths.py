"""Where everything lives under NEXUS_HOME. Every runtime path is built here, nowhere else."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from nexus_core.errors import UnsafePathError

TEACHER_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
DATASET_PART_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

RUNTIME_DIRS = ("registry", "datasets", "events", "memory", "checkpoints", "results", "nexus-release-v1")


def nexus_home() -> Path:
    return Path(os.environ.get("NEXUS_HOME") or os.getcwd()).resolve()


def safe_join(base: Path, *parts: str) -> Path:
    """Join `parts` under `base` and refuse anything that resolves outside it (symlinks included)."""
    for part in parts:
        if not part or "\x00" in part or "/" in part or "\\" in part or part in (".", ".."):
            raise UnsafePathError(f"unsafe path component {part!r} under {base}")
    candidate = base.joinpath(*parts)
    resolved = candidate.resolve()
    base_resolved = base.resolve()
    if resolved != base_resolved and base_resolved not in resolved.parents:
        raise UnsafePathError(f"{candidate} resolves to {resolved}, outside {base_resolved}")
    return candidate


@dataclass(frozen=True)
class Paths:
    home: Path

    @classmethod
    def from_env(cls) -> "Paths":
        return cls(nexus_home())

    # runtime folders -----------------------------------------------------
    @property
    def registry(self) -> Path:
        return self.home / "registry"

    @property
    def datasets(self) -> Path:
        return self.home / "datasets"

    @property
    def events(self) -> Path:
        return self.home / "events"

    @property
    def log(self) -> Path:
        return self.events / "log.jsonl"

    @property
    def archive(self) -> Path:
        return self.events / "archive"

    @property
    def memory(self) -> Path:
        return self.home / "memory"

    @property
    def checkpoints(self) -> Path:
        return self.home / "checkpoints"

    @property
    def results(self) -> Path:
        return self.home / "results"

    @property
    def profiles(self) -> Path:
        return self.results / "profiles"

    @property
    def router_dir(self) -> Path:
        return self.results / "router_weights"

    @property
    def release(self) -> Path:
        return self.home / "nexus-release-v1"

    @property
    def state_dir(self) -> Path:
        """Private state: embedded Redis, locks, demo cache."""
        return self.home / ".nexus"

    @property
    def redis_dir(self) -> Path:
        return self.state_dir / "redis"

    @property
    def run_lock(self) -> Path:
        return self.state_dir / "run.lock"

    @property
    def config_file(self) -> Path:
        return self.home / "nexus.toml"

    # per-teacher / per-dataset -----------------------------------------
    def profile(self, teacher_id: str) -> Path:
        return safe_join(self.profiles, f"{check_teacher_id(teacher_id)}.json")

    def teacher_memory(self, teacher_id: str) -> Path:
        return safe_join(self.memory, check_teacher_id(teacher_id))

    def shard_dir(self, teacher_id: str, dataset_slug: str) -> Path:
        return safe_join(self.teacher_memory(teacher_id), dataset_slug)

    def dataset_dir(self, category: str, name: str) -> Path:
        return safe_join(self.datasets, category, name)

    def ensure(self) -> "Paths":
        for name in RUNTIME_DIRS:
            (self.home / name).mkdir(parents=True, exist_ok=True)
        self.profiles.mkdir(parents=True, exist_ok=True)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        return self


def check_teacher_id(teacher_id: str) -> str:
    if not isinstance(teacher_id, str) or not TEACHER_ID_RE.fullmatch(teacher_id):
        raise UnsafePathError(
            f"teacher_id {teacher_id!r} must match [A-Za-z0-9][A-Za-z0-9._-]{{0,63}}"
        )
    return teacher_id


# Filesystems whose flock is not shared between machines (or not implemented): the event
# log's gapless seq relies on it, so several writers there would corrupt it.
UNTRUSTED_LOCK_FS = {"cifs", "smb3", "smbfs", "fuse.sshfs", "9p", "vboxsf", "fuse.s3fs", "fuse.gcsfuse"}


def filesystem_type(path: Path) -> str:
    """The type of the filesystem holding `path`, from /proc/mounts (longest mount prefix)."""
    target = str(Path(path).resolve())
    best, fstype = "", "unknown"
    try:
        with open("/proc/mounts") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) >= 3:
                    mnt = parts[1].replace("\\040", " ")
                    if (target == mnt or target.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                        best, fstype = mnt, parts[2]
    except OSError:
        pass
    return fstype


def check_lockable(paths: "Paths") -> None:
    """Refuse to share a workdir on a filesystem whose locks cannot be trusted (NEXUS_TRUST_FLOCK=1 overrides).

    Local filesystems and NFS (v4, or v3 with lockd: Linux maps flock to POSIX locks there)
    are fine; SMB/CIFS, sshfs, 9p and object-store mounts are not.
    """
    fstype = filesystem_type(paths.home)
    if fstype in UNTRUSTED_LOCK_FS and os.environ.get("NEXUS_TRUST_FLOCK") != "1":
        from nexus_core.errors import BadInputError

        raise BadInputError(f"{paths.home} is on {fstype}, whose file locks are not reliable across processes or "
                            "machines; put the workdir on a local disk or NFS (or set NEXUS_TRUST_FLOCK=1 if you know better)")
