"""What a Nexus worker agrees to run: its own stage function, on a payload that is data and on record.

Two gates. `structural_refusal` runs before RQ resolves anything of a dequeued job (RQ imports
the function a job names, and would call its callbacks and webhooks): only JOB_FUNC with one
JSON object as its argument passes. `verify_payload` runs at the start of the job, with the
replayed event log in hand: the payload decodes, names this workdir, and every teacher it
carries is registered, with the same fingerprint (so a payload cannot point a worker at another
folder or switch on trust_remote_code).
"""

from __future__ import annotations

from pathlib import Path

from rq.exceptions import DeserializationError

from nexus_core.records.job import JOB_FUNC, JobPayload, JobRefusedError
from nexus_core.records.state import State


def structural_refusal(job) -> str | None:
    """Why `job` must not run, or None. Reads only the job's stored data, imports nothing it names."""
    try:
        func, instance, args, kwargs = job.func_name, job._instance, job.args, job.kwargs
    except DeserializationError:
        return "its data does not decode as JSON (a pickled payload?)"
    except Exception as exc:  # the data decoded to something that is not (func, instance, args, kwargs)
        return f"its data is not a job record ({type(exc).__name__})"
    if func != JOB_FUNC:
        return f"it names the function {str(func)[:80]!r}; a Nexus worker runs only {JOB_FUNC}"
    if instance is not None or kwargs or not isinstance(args, (list, tuple)) or len(args) != 1 \
            or not isinstance(args[0], dict):
        return "its arguments are not one payload object"
    if job._success_callback_name or job._failure_callback_name or job._stopped_callback_name:
        return "it carries callbacks (Nexus jobs have none)"
    if getattr(job, "webhooks", None):
        return "it carries webhooks (Nexus jobs have none)"
    return None


def verify_payload(raw: dict, state: State, home: Path) -> JobPayload:
    """The job's payload, decoded and checked against this workdir and the registry on record."""
    payload = JobPayload.from_dict(raw)
    if Path(payload.home).resolve() != Path(home).resolve():
        raise JobRefusedError(f"the job is for workdir {payload.home}; this worker serves {home}")
    for t in payload.teachers():
        on_record = state.teachers.get(t.teacher_id)
        if on_record is None or not on_record.active:
            raise JobRefusedError(f"teacher {t.teacher_id!r} is not registered in {home} (removed, or never dropped)")
        if on_record.fingerprint != t.fingerprint():
            raise JobRefusedError(f"teacher {t.teacher_id!r} in the job differs from the one on record "
                                  f"(changed since it was queued?)")
    return payload
