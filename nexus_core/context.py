"""The narrow channel between a stage function and whoever runs it.

A stage calls `ctx.started(...)` once it knows where it resumes, `ctx.progress(...)` per
shard/step, and `ctx.poll()` between batches. The default context does nothing, so stage
functions run and are tested without Redis; the worker supplies one that records events,
honours signals (SIGUSR1/SIGUSR2/SIGTERM) and the thermal pause key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path


class Control(str, Enum):
    """What a stage must do at its next batch boundary."""

    CONTINUE = "continue"
    CHECKPOINT = "sigusr2"  # save a checkpoint now, carry on
    PAUSE = "pause"  # thermal: save a checkpoint (reason 'pause'), then ctx.wait_while_paused()
    STOP_USR1 = "sigusr1"  # save a checkpoint, then raise StageInterrupted('sigusr1')
    STOP_TERM = "sigterm"  # save a checkpoint, then raise StageInterrupted('sigterm')
    STOP_INT = "sigint"  # Ctrl+C: the same, recorded as 'sigint' 

    @property
    def stops(self) -> bool:
        return self in (Control.STOP_USR1, Control.STOP_TERM, Control.STOP_INT)


@dataclass
class StageResult:
    """What a stage made. The runner hashes `artifacts` into StageCompleted.data.artifacts."""

    artifacts: list[Path]
    data: dict = field(default_factory=dict)


class StageContext:
    """Default: no events, no signals, never paused. Subclassed by the worker."""

    def started(self, **data) -> None:
        """Once, when the stage knows where it resumes (resume_step / resume_shard)."""

    def progress(self, **data) -> None:
        """Per shard / per N steps: becomes a StageProgress event."""

    def checkpoint_saved(self, step: int, reason: str, path: Path | None = None) -> None:
        """After a checkpoint landed on disk: becomes CheckpointSaved."""

    def oom_recovered(self, **data) -> None:
        """After a batch was split or a sequence skipped for out-of-memory: becomes OOMRecovered."""

    def note(self, event_type: str, **data) -> None:
        """Any other fact worth recording (e.g. 'StudentWarmStarted')."""

    def poll(self) -> Control:
        """Between batches. Cheap; never blocks."""
        return Control.CONTINUE

    def wait_while_paused(self) -> None:
        """Block while a pause is in force (thermal); returns when work may go on."""
