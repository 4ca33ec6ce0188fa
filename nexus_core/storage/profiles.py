"""The one reader of results/profiles/<teacher>.json (written by the profile stage)."""

from __future__ import annotations

import json

from nexus_core.errors import CorruptArtifactError, NexusError
from nexus_core.paths import Paths


def read_profile(paths: Paths, teacher_id: str) -> dict | None:
    p = paths.profile(teacher_id)
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CorruptArtifactError(f"profile {p}: cannot read it ({exc}); rerun the profile stage") from None


def load_profile(paths: Paths, teacher_id: str) -> dict:
    """A profile a stage cannot do without: NexusError saying to run the profile stage when it is missing."""
    profile = read_profile(paths, teacher_id)
    if profile is None:
        raise NexusError(f"teacher {teacher_id!r} has no profile ({paths.profile(teacher_id)}); "
                         "run the profile stage first")
    return profile


def read_profiles(paths: Paths, teachers) -> dict[str, dict]:
    """Every teacher's profile (empty when it has none yet), read once for a stage that needs several."""
    return {t.teacher_id: read_profile(paths, t.teacher_id) or {} for t in teachers}
