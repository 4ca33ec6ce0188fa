"""GPU temperature sensors for the thermal monitor: NVML (nvidia-ml-py) or a text file.

`NEXUS_GPU_SENSOR` picks the sensor:
  unset or `auto`  NVML when a driver and a GPU are there, else none (thermal protection off)
  `nvml`           NVML, and a clear error when it is not available
  `file:PATH`      degrees Celsius read from the text file PATH (tests, machines without NVML)
  `off` / `none`   no sensor
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

from nexus_core.errors import ConfigError, NexusError

SENSOR_ENV = "NEXUS_GPU_SENSOR"

# NVML clock-event (formerly "throttle") reason bits worth recording: thermal and power limits.
# Values are fixed by the NVML ABI; the names follow nvmlClocksEventReason*.
THROTTLE_BITS = {
    0x04: "sw_power_cap",
    0x08: "hw_slowdown",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
}


class SensorError(NexusError):
    """Raised when a temperature sensor cannot be opened or read."""


class Sensor(Protocol):
    name: str

    def read(self) -> float: ...

    def throttle_reasons(self) -> list[str]: ...

    def close(self) -> None: ...


def decode_throttle(mask: int) -> list[str]:
    """Bitmask from nvmlDeviceGetCurrentClocksEventReasons -> sorted names of thermal/power reasons."""
    return sorted(name for bit, name in THROTTLE_BITS.items() if mask & bit)


class FileSensor:
    """Reads one number (deg C) from a text file on every poll."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.name = f"file:{self.path}"

    def read(self) -> float:
        try:
            text = self.path.read_text().strip()
        except OSError as exc:
            raise SensorError(f"{self.path}: cannot read the temperature file ({exc.strerror})") from None
        try:
            return float(text.split()[0])
        except (ValueError, IndexError):
            # Also what a reader sees mid-write (empty file): the next poll tries again.
            raise SensorError(f"{self.path}: expected degrees Celsius such as 71.5, found {text[:40]!r}") from None

    def throttle_reasons(self) -> list[str]:
        return []

    def close(self) -> None:
        pass


class NvmlSensor:
    """Hottest GPU NVML can see, and the union of their thermal/power clock-event reasons."""

    def __init__(self):
        try:
            import pynvml
        except ImportError:
            raise SensorError("the nvidia-ml-py package (module pynvml) is not installed") from None
        self._nv = pynvml
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            raise SensorError(f"NVML is not available ({exc}): no NVIDIA driver or GPU visible") from None
        try:
            count = pynvml.nvmlDeviceGetCount()
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        except pynvml.NVMLError as exc:
            self.close()
            raise SensorError(f"NVML could not list the GPUs ({exc})") from None
        if not self._handles:
            self.close()
            raise SensorError("NVML found no GPU")
        self.name = f"nvml:{len(self._handles)} gpu"

    def read(self) -> float:
        nv = self._nv
        try:
            return float(max(nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU) for h in self._handles))
        except nv.NVMLError as exc:
            raise SensorError(f"NVML temperature read failed ({exc})") from None

    def throttle_reasons(self) -> list[str]:
        nv = self._nv
        # Newer drivers name it ClocksEventReasons; the older ThrottleReasons call is the same bits.
        get = getattr(nv, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
            getattr(nv, "nvmlDeviceGetCurrentClocksThrottleReasons", None)
        if get is None:
            return []
        mask = 0
        for h in self._handles:
            try:
                mask |= int(get(h))
            except nv.NVMLError:  # not supported on this board: nothing to record
                pass
        return decode_throttle(mask)

    def close(self) -> None:
        try:
            self._nv.nvmlShutdown()
        except Exception:  # already shut down, or init never succeeded
            pass


def open_sensor(environ=None) -> tuple[Sensor | None, str]:
    """The sensor `NEXUS_GPU_SENSOR` asks for, or (None, why thermal protection is off)."""
    env = os.environ if environ is None else environ
    spec = (env.get(SENSOR_ENV) or "auto").strip()
    if spec.startswith("file:"):
        path = spec[len("file:"):]
        if not path:
            raise ConfigError(f"{SENSOR_ENV}=file: needs a path, e.g. file:/tmp/gpu_temp")
        return FileSensor(Path(path)), f"reading {path}"
    if spec in ("off", "none"):
        return None, f"{SENSOR_ENV}={spec}"
    if spec not in ("auto", "nvml"):
        raise ConfigError(f"{SENSOR_ENV}={spec!r}: use auto, nvml, off or file:PATH")
    try:
        return NvmlSensor(), "NVML"
    except SensorError as exc:
        if spec == "nvml":
            raise ConfigError(f"{SENSOR_ENV}=nvml but {exc}") from None
        return None, f"{exc}; set {SENSOR_ENV}=file:PATH to read degrees Celsius from a file"
