#!/usr/bin/env bash
# Bootstrap .venv (once), then run `nexus run "$@"`.
#   NEXUS_TORCH=cpu  (default) pins the CPU build of torch 2.13.0
#   NEXUS_TORCH=cuda installs the CUDA build from PyTorch's index (for a GPU machine)
#   NEXUS_TORCH=skip keeps whatever torch the venv already has
# `./run_nexus_master.sh --test [pytest args]` runs the test suite in the same venv.
set -euo pipefail
cd "$(dirname "$0")"
PY="${PYTHON:-python3}"
VENV=".venv"
TORCH_VERSION="${NEXUS_TORCH_VERSION:-2.13.0}"

if [ ! -x "$VENV/bin/nexus" ] || [ pyproject.toml -nt "$VENV/.installed" ] || [ constraints.txt -nt "$VENV/.installed" ]; then
  echo "run_nexus_master: setting up $VENV (first run only)..." >&2
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  case "${NEXUS_TORCH:-cpu}" in
    cpu)  "$VENV/bin/python" -m pip install -q "torch==${TORCH_VERSION}" \
            || "$VENV/bin/python" -m pip install -q "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu ;;
    cuda) "$VENV/bin/python" -m pip install -q "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cu128 ;;
    skip) ;;
    *) echo "NEXUS_TORCH must be cpu, cuda or skip" >&2; exit 2 ;;
  esac
  "$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[test]"
  touch "$VENV/.installed"
fi

if [ "${1:-}" = "--test" ]; then
  shift
  exec "$VENV/bin/python" -m pytest "$@"
fi
exec "$VENV/bin/nexus" run "$@"
