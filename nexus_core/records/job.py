"""The job contract: what the producer puts on queue `nexus`, and the only thing a worker runs.

A job is data, never code. RQ stores it as JSON (`JobSerializer`, never pickle): the function
name JOB_FUNC and one argument, `JobPayload.to_dict()`. The worker runs JOB_FUNC alone, and only
on a payload that `JobPayload.from_dict` accepts; anything else is refused with a reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from nexus_core.broker.keys import Stage
from nexus_core.config import Settings
from nexus_core.data import DatasetRef
from nexus_core.errors import ConfigError, DatasetError, NexusError
from nexus_core.records.plan import DistillPlan
from nexus_core.records.registry import Teacher

JOB_FUNC = "workers.jobs.run_stage"  # the one function a Nexus worker executes
MAX_PAYLOAD_BYTES = 4 << 20  # a payload is a few KB; anything near this is not ours


class JobSerializer:
    """RQ's serializer protocol (dumps/loads) over strict JSON: a job can only ever decode to data."""

    @staticmethod
    def dumps(obj) -> bytes:
        return json.dumps(obj, allow_nan=False, separators=(",", ":")).encode("utf-8")

    @staticmethod
    def loads(data: bytes):
        if len(data) > MAX_PAYLOAD_BYTES:
            raise ValueError(f"job data of {len(data)} bytes")
        return json.loads(data)


class JobRefusedError(NexusError):
    """Raised when a job on the queue is not a Nexus stage job the worker may run (foreign function,
    undecodable or invalid payload, another workdir, a teacher not on record); nothing of it runs."""


_KEYS = {
    Stage.PROFILE: {"teacher", "datasets"},
    Stage.EXTRACT: {"teacher", "dataset", "range"},
    Stage.DISTILL: {"plan"},
    Stage.ROUTER: {"plan"},
}


@dataclass(frozen=True)
class JobPayload:
    """One stage job's inputs: the workdir, the resolved settings, and what the stage works on."""

    stage: Stage
    home: str
    settings: Settings
    teacher: Teacher | None = None  # profile, extract
    datasets: tuple[DatasetRef, ...] = ()  # profile: the calibration datasets
    dataset: DatasetRef | None = None  # extract
    part: tuple[int, int] = (0, 1)  # extract: block r of R of the dataset's shards (extract.ranges)
    plan: DistillPlan | None = None  # distill, router

    @property
    def teacher_id(self) -> str | None:
        return self.teacher.teacher_id if self.teacher else None

    def teachers(self) -> tuple[Teacher, ...]:
        """Every teacher the job reads: its own, or its plan's."""
        if self.teacher is not None:
            return (self.teacher,)
        return self.plan.teachers if self.plan is not None else ()

    def to_dict(self) -> dict:
        d = {"home": self.home, "stage": self.stage.value, "settings": self.settings.to_dict()}
        if self.teacher is not None:
            d["teacher"] = self.teacher.to_dict()
        if self.stage == Stage.PROFILE:
            d["datasets"] = [r.key for r in self.datasets]
        if self.dataset is not None:
            d["dataset"] = self.dataset.key
        if self.part != (0, 1):
            d["range"] = list(self.part)
        if self.plan is not None:
            d["plan"] = self.plan.to_dict()
        return d

    @classmethod
    def from_dict(cls, d) -> "JobPayload":
        """The payload a job carries, validated field by field; JobRefusedError names what is wrong."""
        if not isinstance(d, dict):
            raise JobRefusedError(f"payload is a {type(d).__name__}, not an object")
        try:
            stage = Stage(d.get("stage"))
        except ValueError:
            raise JobRefusedError(f"unknown stage {str(d.get('stage'))[:40]!r}") from None
        extra = set(d) - {"home", "stage", "settings"} - _KEYS[stage]
        if extra:
            raise JobRefusedError(f"unexpected payload field(s) {sorted(extra)} for stage {stage.value}")
        if not isinstance(d.get("home"), str) or not isinstance(d.get("settings"), dict):
            raise JobRefusedError("payload needs 'home' (a string) and 'settings' (an object)")
        try:
            kwargs = {"stage": stage, "home": d["home"], "settings": Settings.from_dict(d["settings"])}
            if stage in (Stage.PROFILE, Stage.EXTRACT):
                kwargs["teacher"] = _teacher(d.get("teacher"))
            if stage == Stage.PROFILE:
                kwargs["datasets"] = tuple(DatasetRef.parse(_str(x, "datasets")) for x in _list(d.get("datasets")))
            if stage == Stage.EXTRACT:
                kwargs["dataset"] = DatasetRef.parse(_str(d.get("dataset"), "dataset"))
                kwargs["part"] = _part(d.get("range", [0, 1]))
            if stage in (Stage.DISTILL, Stage.ROUTER):
                kwargs["plan"] = _plan(d.get("plan"))
        except (ConfigError, DatasetError) as exc:
            raise JobRefusedError(str(exc)) from None
        return cls(**kwargs)


def _str(x, what: str) -> str:
    if not isinstance(x, str):
        raise JobRefusedError(f"payload field {what!r} must be a string")
    return x


def _list(x) -> list:
    if not isinstance(x, list):
        raise JobRefusedError("payload field 'datasets' must be a list")
    return x


def _part(x) -> tuple[int, int]:
    if not (isinstance(x, list) and len(x) == 2 and all(type(v) is int for v in x) and 0 <= x[0] < x[1]):
        raise JobRefusedError(f"payload field 'range' must be [r, R] with 0 <= r < R, not {str(x)[:40]}")
    return x[0], x[1]


def _teacher(x) -> Teacher:
    if not isinstance(x, dict):
        raise JobRefusedError("payload field 'teacher' must be an object")
    try:
        return Teacher.from_dict(x)
    except (TypeError, ValueError, KeyError) as exc:
        raise JobRefusedError(f"payload field 'teacher' is not a teacher record ({exc})") from None


def _plan(x) -> DistillPlan:
    if not isinstance(x, dict):
        raise JobRefusedError("payload field 'plan' must be an object")
    try:
        return DistillPlan.from_dict(x)
    except (TypeError, ValueError, KeyError, AssertionError) as exc:
        raise JobRefusedError(f"payload field 'plan' is not a distillation plan ({exc})") from None
