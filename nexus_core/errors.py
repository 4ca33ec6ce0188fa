"""Errors Nexus raises on purpose. Each message says what is wrong, where, and what to do."""


class NexusError(Exception):
    """Root of every error Nexus raises deliberately."""

    exit_code = 1


class BadInputError(NexusError):
    """Raised when user input (teacher JSON, dataset, settings, CLI flag) is invalid. Exit code 2."""

    exit_code = 2


class ConfigError(BadInputError):
    """Raised when nexus.toml, a NEXUS_* variable or a CLI flag names an unknown key or a bad value."""


class RegistryError(BadInputError):
    """Raised when a teacher JSON is malformed, fails the schema, or names a missing model."""

    def __init__(self, source: str, reason: str, teacher_id: str | None = None):
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason
        self.teacher_id = teacher_id


class DatasetError(BadInputError):
    """Raised when a dataset folder is missing, empty, unreadable or has no text column."""


class UnsafePathError(BadInputError):
    """Raised when a teacher_id or dataset name would resolve outside its folder."""


class CorruptArtifactError(NexusError):
    """Raised when a shard, checkpoint or release file fails its sha256 or cannot be parsed."""


class CorruptLogError(NexusError):
    """Raised when events/log.jsonl has a gap in seq or an unreadable line before its last one."""


class DiskFullError(NexusError):
    """Raised when free disk is short of what a stage needs, or a write hits ENOSPC."""


class StageInterrupted(NexusError):
    """Raised inside a stage after it saved its state because it was asked to stop (SIGUSR1, SIGTERM).

    `reason` is 'sigusr1', 'sigterm' or 'sigint'; a rerun resumes the stage.
    """

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"stage interrupted ({reason}){': ' + detail if detail else ''}")
        self.reason = reason


class PlanMismatchError(NexusError):
    """Raised when a shard or checkpoint does not match the plan (tokenizer, k, seq_len, config)."""


class WorkdirLockedError(NexusError):
    """Raised when another `nexus run` already holds the workdir lock."""

    exit_code = 2


class RedisGoneError(NexusError):
    """Raised when the Redis server a run depends on went away mid-run (killed, crashed, restarted without
    persistence). Work on disk is kept; a rerun resumes it."""
