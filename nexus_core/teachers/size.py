"""A teacher's parameter count, cheaply, before anything is loaded: what the planner compares to pick
the teacher that seeds the student.

The weights' own headers win (a safetensors folder's JSON headers, a GGUF file's tensor table); the
registry's `params` hint ("135M") is the fallback when they cannot be read.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

from nexus_core.config import parse_count
from nexus_core.errors import NexusError
from nexus_core.records.registry import Teacher, gguf_file
from nexus_core.storage.safetensors_meta import scan


def param_count(teacher: Teacher) -> tuple[int | None, str]:
    """(parameters, where the figure comes from); (None, "unknown") when neither headers nor hint say.
    Cached per path, weight files (names and sizes) and hint: every producer pass plans again."""
    return _param_count(teacher.path, teacher.weight_files, teacher.params)


@functools.lru_cache(maxsize=64)
def _param_count(path: str, weight_files: tuple, hint: str | None) -> tuple[int | None, str]:
    try:
        file = gguf_file(Path(path))
        if file is not None:
            from nexus_core.teachers.gguf import read_header

            return sum(math.prod(t.shape) for t in read_header(file).tensors.values()), "GGUF header"
        return scan(Path(path)).params, "safetensors headers"
    except (NexusError, OSError, ValueError, KeyError, TypeError):
        pass  # unreadable weights fail the profile stage with a proper message; here the hint is enough
    if hint:
        try:
            return int(parse_count(hint)), "registry hint"
        except ValueError:
            pass
    return None, "unknown"
