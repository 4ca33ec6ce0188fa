"""Thermal monitor: the pure hysteresis step, and the loop against a real Redis with a file sensor."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import types

import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from nexus_core.broker import keys
from nexus_core.config import ThermalSettings, load_settings
from nexus_core.records.events import read_events
from tests.helpers import wait_until
from workers import gpu, monitor
from workers.monitor import Action, MonitorState, monitor_step

TH = ThermalSettings(threshold_c=83.0, pause_s=30.0, poll_s=5.0, hysteresis_c=5.0)


# ---------------------------------------------------------------- pure step

def run_trace(temps, th=TH, t0=0.0):
    """Feed one reading per poll; return [(t, temp, action)] and the final state."""
    state, out = MonitorState(), []
    for i, temp in enumerate(temps):
        now = t0 + i * th.poll_s
        state, action = monitor_step(state, temp, now, th)
        out.append((now, temp, action))
    return out, state


def actions(trace):
    return [a for _, _, a in trace if a is not Action.NONE]


def test_below_and_at_threshold_do_nothing():
    trace, state = run_trace([40, 70, 82.9, 83.0, 83.0])
    assert actions(trace) == [] and not state.paused


def test_pause_then_resume_only_after_pause_s_and_below_band():
    # hot once, then cool at once: the pause still lasts pause_s (30 s = 6 polls)
    trace, state = run_trace([90, 60, 60, 60, 60, 60, 60, 60])
    assert [(t, a) for t, _, a in trace if a is not Action.NONE] == [(0.0, Action.PAUSE), (30.0, Action.RESUME)]
    assert state == MonitorState()


def test_no_flapping_around_the_threshold():
    # 10 minutes oscillating 82.9 / 83.1: one pause, kept alive by extensions, never resumed
    temps = [83.1 if i % 2 else 82.9 for i in range(120)]
    trace, state = run_trace(temps)
    acts = actions(trace)
    assert acts.count(Action.PAUSE) == 1 and Action.RESUME not in acts
    assert acts.count(Action.EXTEND) >= 10 and state.paused
    # inside the hysteresis band (78..83) after the pause: still extended, not resumed
    trace, state = run_trace([90] + [79.0] * 12)
    assert Action.RESUME not in actions(trace) and state.paused
    # just below the band resumes once the pause ran out; 82 afterwards does not re-pause
    trace, state = run_trace([90] + [77.9] * 7 + [82.0] * 5)
    assert actions(trace) == [Action.PAUSE, Action.RESUME] and not state.paused
    assert trace[6][2] is Action.RESUME  # at t = 30 s exactly


def test_extension_keeps_the_key_alive_without_gaps():
    trace, state = run_trace([90] + [85] * 30)
    expiry = None
    for now, _, action in trace:
        assert expiry is None or expiry > now, f"pause lapsed before the poll at t={now}"
        if action in (Action.PAUSE, Action.EXTEND):
            expiry = now + TH.pause_s
        assert expiry > now + TH.poll_s, f"a late poll after t={now} would find the key expired"
    assert actions(trace).count(Action.PAUSE) == 1
    assert state.peak_c == 90


@hsettings(max_examples=200, deadline=None)
@given(st.lists(st.floats(min_value=20, max_value=110, allow_nan=False), min_size=1, max_size=80))
def test_step_invariants(temps):
    resume_below = TH.threshold_c - TH.hysteresis_c
    trace, _ = run_trace(temps)
    paused_at = expiry = None
    was_hot = False  # the previous poll was hot during a pause, so the key had to outlive it
    for now, temp, action in trace:
        if was_hot:
            assert expiry > now  # the key was still alive when this poll came
        if action is Action.PAUSE:
            assert paused_at is None and temp > TH.threshold_c
            paused_at, expiry = now, now + TH.pause_s
        elif action is Action.EXTEND:
            assert paused_at is not None and temp >= resume_below
            expiry = now + TH.pause_s
        elif action is Action.RESUME:
            assert paused_at is not None and temp < resume_below and now - paused_at >= TH.pause_s
            paused_at = expiry = None
        was_hot = paused_at is not None and temp >= resume_below
        if was_hot:
            assert expiry > now + TH.poll_s  # hot: the key outlives the next poll, even a late one


def test_step_accepts_whole_settings():
    cfg = load_settings(environ={}, thermal={"threshold_c": 70.0})
    assert monitor_step(MonitorState(), 71.0, 0.0, cfg)[1] is Action.PAUSE


def test_decode_throttle_reasons():
    assert gpu.decode_throttle(0x40 | 0x04 | 0x01) == ["hw_thermal_slowdown", "sw_power_cap"]
    assert gpu.decode_throttle(0) == []


# ---------------------------------------------------------------- loop against Redis

@pytest.fixture
def conn(redis_conn):
    """conftest's real Redis (REDIS_URL's spare database or the embedded server), flushed around each test."""
    return redis_conn


def fast_cfg(home, **thermal):
    th = {"threshold_c": 83.0, "pause_s": 0.3, "poll_s": 0.05, "hysteresis_c": 5.0, **thermal}
    return load_settings(home, environ={}, thermal=th)


def event_types(paths):
    return [e.type for e in read_events(paths.log)]


def next_control(pubsub, timeout=3.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        msg = pubsub.get_message(timeout=0.1)
        if msg and msg["type"] == "message":
            return json.loads(msg["data"])
    raise AssertionError("no message on nexus:control")


def test_file_sensor_pause_extend_resume(workdir, conn):
    paths = workdir
    cfg = fast_cfg(paths.home)
    sensor_file = paths.home / "gpu_temp"
    sensor_file.write_text("60\n")
    pubsub = conn.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(keys.CONTROL_CHANNEL)
    wait_until(lambda: pubsub.get_message(timeout=0.01) is None and conn.pubsub_numsub(keys.CONTROL_CHANNEL)[0][1] == 1)

    stop, rc = threading.Event(), []
    env = {"NEXUS_GPU_SENSOR": f"file:{sensor_file}"}
    t = threading.Thread(target=lambda: rc.append(monitor.main(cfg, paths, conn, stop=stop, environ=env)))
    t.start()
    try:
        reading = json.loads(wait_until(lambda: conn.get(keys.MONITOR_TEMP_KEY)))
        assert reading["temp_c"] == 60.0 and reading["paused"] is False
        assert 0 < conn.pttl(keys.MONITOR_TEMP_KEY) <= 1000
        assert conn.get(keys.PAUSE_KEY) is None

        sensor_file.write_text("90\n")
        # value and TTL in one round trip: a stalled test must not see the 0.3 s key expire between them
        raw, ttl_ms = wait_until(lambda: (lambda r: r if r[0] else None)(
            conn.pipeline().get(keys.PAUSE_KEY).pttl(keys.PAUSE_KEY).execute()))
        assert 0 < ttl_ms <= 300
        assert json.loads(raw) == {"cmd": "pause", "seconds": 0.3, "reason": "thermal", "temp_c": 90.0}
        assert next_control(pubsub) == {"cmd": "pause", "seconds": 0.3, "reason": "thermal", "temp_c": 90.0}
        # the monitor sets the key, publishes, then appends the event: wait for the log, don't race it
        pause_events = wait_until(lambda: [e for e in read_events(paths.log) if e.type == "ThermalPause"],
                                  what="the ThermalPause event")
        assert len(pause_events) == 1
        assert pause_events[0].data == {"temp_c": 90.0, "threshold_c": 83.0, "seconds": 0.3, "throttle_reasons": []}

        # still hot for over two pause lengths: the pause keeps being extended (re-published, the key set
        # again), and there is no second ThermalPause event
        hot_since = time.monotonic()

        def extended_after_two_pause_lengths():
            msg = pubsub.get_message(timeout=0.05)
            return (msg and msg["type"] == "message" and json.loads(msg["data"])["cmd"] == "pause"
                    and time.monotonic() - hot_since >= 0.7)
        wait_until(extended_after_two_pause_lengths, what="a pause extension 0.7 s into the heat")
        assert event_types(paths) == ["ThermalPause"]

        sensor_file.write_text("60\n")
        wait_until(lambda: "ThermalResume" in event_types(paths))
        assert not conn.exists(keys.PAUSE_KEY)
        while (msg := next_control(pubsub))["cmd"] == "pause":  # extensions re-publish the pause
            pass
        assert msg == {"cmd": "resume"}
        resume = read_events(paths.log)[-1]
        assert resume.type == "ThermalResume" and resume.data["temp_c"] == 60.0
        assert resume.data["paused_s"] >= 0.7 and resume.data["peak_c"] == 90.0
        assert event_types(paths) == ["ThermalPause", "ThermalResume"]
        wait_until(lambda: conn.xlen(keys.EVENTS_STREAM) == 2)  # mirrored (after the file) for live views
    finally:
        stop.set()
        t.join(5)
        pubsub.close()
    assert not t.is_alive() and rc == [0]


class FakeSensor:
    name = "fake"

    def __init__(self, temps, reasons=()):
        self.temps, self.reasons, self.closed = list(temps), list(reasons), False

    def read(self):
        return self.temps.pop(0) if len(self.temps) > 1 else self.temps[0]

    def throttle_reasons(self):
        return self.reasons

    def close(self):
        self.closed = True


def test_throttle_reasons_recorded_in_the_event(workdir, conn):
    paths = workdir
    sensor = FakeSensor([95.0], ["hw_thermal_slowdown", "sw_power_cap"])
    assert monitor.main(fast_cfg(paths.home), paths, conn, max_polls=1, sensor=sensor) == 0
    (event,) = read_events(paths.log)
    assert event.type == "ThermalPause" and event.data["throttle_reasons"] == ["hw_thermal_slowdown", "sw_power_cap"]
    assert sensor.closed
    # stopping the monitor does not un-pause a hot GPU: the key runs out by its TTL
    assert keys.read_pause(conn)["reason"] == "thermal"


def test_bad_reading_is_skipped_not_fatal(workdir, conn):
    paths = workdir
    sensor_file = paths.home / "gpu_temp"
    sensor_file.write_text("hot?\n")
    env = {"NEXUS_GPU_SENSOR": f"file:{sensor_file}"}
    with capture_logs() as logs:
        assert monitor.main(fast_cfg(paths.home), paths, conn, max_polls=2, environ=env) == 0
    assert any(entry["event"] == "temperature read failed" and "hot?" in entry["error"] for entry in logs)
    assert not conn.exists(keys.PAUSE_KEY) and event_types(paths) == []


def test_pause_left_by_a_previous_monitor_is_resumed(workdir, conn):
    paths = workdir
    keys.set_pause(conn, 0.2, "thermal", temp_c=91.0)
    sensor = FakeSensor([60.0])
    assert monitor.main(fast_cfg(paths.home), paths, conn, max_polls=12, sensor=sensor) == 0
    (event,) = read_events(paths.log)
    assert event.type == "ThermalResume" and event.data["peak_c"] == 91.0
    assert not conn.exists(keys.PAUSE_KEY)


def test_sigterm_stops_the_loop(workdir, conn):
    paths = workdir
    before = signal.getsignal(signal.SIGTERM)
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    start = time.monotonic()
    assert monitor.main(fast_cfg(paths.home), paths, conn, sensor=FakeSensor([50.0])) == 0
    assert time.monotonic() - start < 3.0
    assert signal.getsignal(signal.SIGTERM) is before  # handlers restored


# ---------------------------------------------------------------- no sensor

def test_no_sensor_and_no_nvml_returns_0_with_message(workdir, monkeypatch):
    class NoNvml:
        def __init__(self):
            raise gpu.SensorError("NVML is not available (NVML Shared Library Not Found)")

    monkeypatch.setattr(gpu, "NvmlSensor", NoNvml)
    for quiet, level in ((False, "warning"), (True, "info")):
        with capture_logs() as logs:
            rc = monitor.main(fast_cfg(workdir.home), workdir, conn=None, environ={}, quiet_if_off=quiet)
        assert rc == 0
        (entry,) = [e for e in logs if e["event"].startswith("thermal protection is off")]
        assert entry["log_level"] == level
        assert "NVML is not available" in entry["reason"] and "NEXUS_GPU_SENSOR=file:PATH" in entry["reason"]
    with pytest.raises(gpu.ConfigError, match="NEXUS_GPU_SENSOR=nvml but NVML is not available"):
        gpu.open_sensor({"NEXUS_GPU_SENSOR": "nvml"})


class FakeNvml(types.ModuleType):
    """Just the pynvml calls NvmlSensor makes: two GPUs, one hot and power-capped."""

    NVML_TEMPERATURE_GPU = 0

    class NVMLError(Exception):
        pass

    def __init__(self, temps, masks, new_api=True):
        super().__init__("pynvml")
        self.temps, self.masks, self.shutdown = temps, masks, False
        self.nvmlInit = lambda: None
        self.nvmlDeviceGetCount = lambda: len(temps)
        self.nvmlDeviceGetHandleByIndex = lambda i: i
        self.nvmlDeviceGetTemperature = lambda h, sensor: temps[h]
        self.nvmlShutdown = lambda: setattr(self, "shutdown", True)
        reasons = lambda h: masks[h]  # noqa: E731
        if new_api:
            self.nvmlDeviceGetCurrentClocksEventReasons = reasons
        else:  # drivers/bindings before the rename
            self.nvmlDeviceGetCurrentClocksThrottleReasons = reasons


@pytest.mark.parametrize("new_api", [True, False])
def test_nvml_sensor_reads_the_hottest_gpu_and_its_reasons(monkeypatch, new_api):
    fake = FakeNvml(temps=[61, 88], masks=[0x01, 0x40 | 0x04], new_api=new_api)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    sensor, how = gpu.open_sensor({})
    assert how == "NVML" and isinstance(sensor, gpu.NvmlSensor)
    assert sensor.read() == 88.0
    assert sensor.throttle_reasons() == ["hw_thermal_slowdown", "sw_power_cap"]
    sensor.close()
    assert fake.shutdown


def test_sensor_choice_from_env(tmp_path):
    assert gpu.open_sensor({"NEXUS_GPU_SENSOR": "off"})[0] is None
    sensor, _ = gpu.open_sensor({"NEXUS_GPU_SENSOR": f"file:{tmp_path / 't'}"})
    assert isinstance(sensor, gpu.FileSensor)
    with pytest.raises(gpu.ConfigError, match="file:PATH"):
        gpu.open_sensor({"NEXUS_GPU_SENSOR": "thermometer"})


def test_real_nvml_here_is_either_a_sensor_or_a_clear_error():
    try:
        sensor = gpu.NvmlSensor()
    except gpu.SensorError as exc:
        assert "NVML" in str(exc) or "nvidia-ml-py" in str(exc)
        return
    try:
        assert 0.0 < sensor.read() < 130.0
        assert isinstance(sensor.throttle_reasons(), list)
    finally:
        sensor.close()
