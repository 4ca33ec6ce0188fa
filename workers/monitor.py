"""The thermal monitor (`nexus monitor`): pauses GPU work while the GPU is too hot.

Every `thermal.poll_s` it reads the GPU temperature (NVML, or NEXUS_GPU_SENSOR=file:PATH).
Above `threshold_c` it sets the `nexus:pause` key (TTL = `pause_s`), publishes the pause on
`nexus:control` and appends a `ThermalPause` event. While the GPU stays at or above
`threshold_c - hysteresis_c` it refreshes the key before it runs out (no new event); once the
pause has lasted `pause_s` and the GPU is below that level, it clears the key, publishes a
resume and appends `ThermalResume`. The decision is the pure `monitor_step`, so the
hysteresis is testable without clocks; `main` only does the I/O around it.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from dataclasses import dataclass, replace
from enum import Enum

import redis
import structlog

from nexus_core.broker import keys
from nexus_core.records.events import EventLog
from workers.gpu import Sensor, SensorError, open_sensor

log = structlog.get_logger("nexus.monitor")

THERMAL_REASON = "thermal"


@dataclass(frozen=True)
class MonitorState:
    paused: bool = False
    since: float | None = None  # clock time the pause began
    until: float | None = None  # clock time the current pause (the key's TTL) runs out
    peak_c: float | None = None  # hottest reading during this pause


class Action(str, Enum):
    NONE = "none"
    PAUSE = "pause"  # set the key, publish, append ThermalPause
    EXTEND = "extend"  # refresh the key before it expires: still hot
    RESUME = "resume"  # clear the key, publish, append ThermalResume


def monitor_step(state: MonitorState, temp_c: float, now: float, cfg) -> tuple[MonitorState, Action]:
    """One poll's decision. `cfg` is Settings or its ThermalSettings; `now` is any monotonic clock."""
    th = getattr(cfg, "thermal", cfg)
    if not state.paused:
        if temp_c > th.threshold_c:
            return MonitorState(True, now, now + th.pause_s, temp_c), Action.PAUSE
        return state, Action.NONE
    peak = temp_c if state.peak_c is None else max(state.peak_c, temp_c)
    if temp_c < th.threshold_c - th.hysteresis_c:
        if now >= state.until:
            return MonitorState(), Action.RESUME
        return replace(state, peak_c=peak), Action.NONE
    # Still in or above the hysteresis band. Refresh while two polls remain, so that even a
    # late next poll finds the key alive: waiting for `until` would let the worker resume.
    if now + 2 * th.poll_s >= state.until:
        return replace(state, until=now + th.pause_s, peak_c=peak), Action.EXTEND
    return replace(state, peak_c=peak), Action.NONE


def main(cfg, paths, conn, *, max_polls: int | None = None, stop: threading.Event | None = None,
         sensor: Sensor | None = None, environ=None, quiet_if_off: bool = False) -> int:
    """Run the monitor until SIGTERM/SIGINT, `stop` is set, or `max_polls` reads. Returns the exit code.

    Without a sensor it says so and returns 0 at once (an info line instead of a warning with
    `quiet_if_off`, for `nexus run` on a CPU machine), so a supervisor does not restart it in a loop.
    """
    th = cfg.thermal
    if sensor is None:
        sensor, why = open_sensor(environ)
        if sensor is None:
            (log.info if quiet_if_off else log.warning)("thermal protection is off: no GPU temperature sensor",
                                                       reason=why)
            return 0
    stop = stop or threading.Event()
    restore = _install_signal_handlers(stop)
    events = EventLog(paths.log, redis=conn)
    state = _adopt_pause(conn, time.monotonic())
    log.info("thermal monitor started", sensor=sensor.name, threshold_c=th.threshold_c,
             hysteresis_c=th.hysteresis_c, pause_s=th.pause_s, poll_s=th.poll_s, resumed_pause=state.paused)
    polls = 0
    try:
        while not stop.is_set():
            state = _poll(sensor, state, conn, events, th)
            polls += 1
            if max_polls is not None and polls >= max_polls:
                break
            stop.wait(th.poll_s)
    finally:
        restore()
        sensor.close()
    # A pause still running is left to its TTL: stopping the monitor must not un-pause a hot GPU.
    log.info("thermal monitor stopped", polls=polls, paused=state.paused)
    return 0


def _poll(sensor: Sensor, state: MonitorState, conn, events: EventLog, th) -> MonitorState:
    """Read, decide, act. On a failed read or a Redis error the state is kept and the next poll retries."""
    try:
        temp = sensor.read()
    except SensorError as exc:
        log.warning("temperature read failed", error=str(exc))
        return state
    now = time.monotonic()
    new, action = monitor_step(state, temp, now, th)
    try:
        _record_temp(conn, temp, new.paused, th)
        if action in (Action.PAUSE, Action.EXTEND):  # the key's TTL restarts at pause_s
            keys.set_pause(conn, th.pause_s, THERMAL_REASON, temp_c=temp)
        elif action is Action.RESUME:
            keys.clear_pause(conn)
    except redis.RedisError as exc:
        log.warning("redis unavailable; retrying at the next poll", error=str(exc), action=action.value)
        return state
    if action is Action.PAUSE:
        reasons = sensor.throttle_reasons()
        log.warning("GPU too hot: pausing", temp_c=temp, threshold_c=th.threshold_c, seconds=th.pause_s,
                    throttle_reasons=reasons)
        _append(events, "ThermalPause", {"temp_c": temp, "threshold_c": th.threshold_c,
                                         "seconds": th.pause_s, "throttle_reasons": reasons})
    elif action is Action.EXTEND:
        log.info("GPU still hot: pause extended", temp_c=temp, seconds=th.pause_s)
    elif action is Action.RESUME:
        paused_s = round(now - state.since, 3)
        log.info("GPU cooled down: resuming", temp_c=temp, paused_s=paused_s)
        _append(events, "ThermalResume", {"temp_c": temp, "paused_s": paused_s, "peak_c": state.peak_c})
    return new


def _append(events: EventLog, type: str, data: dict) -> None:
    try:
        events.append(type, data=data)
    except OSError as exc:  # the pause itself is in Redis already; keep protecting the GPU
        log.error("could not append to the event log", type=type, error=str(exc), path=str(events.path))


def _record_temp(conn, temp: float, paused: bool, th) -> None:
    """Last reading for `nexus status`; expires after a few missed polls so a dead monitor shows."""
    ttl_ms = int(max(3 * th.poll_s, 1.0) * 1000)
    conn.set(keys.MONITOR_TEMP_KEY, json.dumps({"temp_c": temp, "ts": time.time(), "paused": paused}), px=ttl_ms)


def _adopt_pause(conn, now: float) -> MonitorState:
    """A thermal pause left by a previous monitor process is continued, so it ends with ThermalResume."""
    try:
        current = keys.read_pause(conn)
        if not current or current.get("reason") != THERMAL_REASON:
            return MonitorState()
        ttl_ms = conn.pttl(keys.PAUSE_KEY)
    except redis.RedisError:
        return MonitorState()
    if ttl_ms is None or ttl_ms < 0:
        return MonitorState()
    return MonitorState(True, now, now + ttl_ms / 1000.0, current.get("temp_c"))


def _install_signal_handlers(stop: threading.Event):
    """SIGTERM/SIGINT only set `stop` (the loop wakes from its wait). Returns a function that restores."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

    def handler(signum, frame):
        log.info("stop requested", signal=signal.Signals(signum).name)
        stop.set()

    for s in previous:
        signal.signal(s, handler)

    def restore():
        for s, h in previous.items():
            signal.signal(s, h)

    return restore
