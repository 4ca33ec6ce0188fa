# One image for every Nexus service (producer, worker, monitor): docker-compose.yml picks the command.
#
#   docker build -t nexus .                                   # CUDA torch (default)
#   docker build -t nexus:cpu --build-arg NEXUS_TORCH=cpu .   # CPU-only torch, much smaller
#
# TORCH_INDEX overrides the wheel index outright (e.g. another CUDA version:
# --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126).
FROM python:3.11-slim

ARG NEXUS_TORCH=cuda
ARG TORCH_INDEX=""
ARG TORCH_CUDA_INDEX=https://download.pytorch.org/whl/cu128
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NEXUS_HOME=/nexus \
    HOME=/home/nexus \
    HF_HOME=/home/nexus/.cache/huggingface \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1

WORKDIR /opt/nexus

# 1. torch first, in its own layer: by far the largest download, and it changes rarely.
RUN set -eux; \
    case "$NEXUS_TORCH" in cuda) idx="$TORCH_CUDA_INDEX" ;; cpu) idx="$TORCH_CPU_INDEX" ;; \
        *) echo "NEXUS_TORCH must be cuda or cpu, not '$NEXUS_TORCH'" >&2; exit 2 ;; esac; \
    pip install --index-url "${TORCH_INDEX:-$idx}" torch

# 2. the other dependencies, read from pyproject.toml so they are cached apart from the source.
COPY pyproject.toml constraints.txt ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -c constraints.txt -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# 3. the project itself (no dependency resolution: everything is installed above).
COPY . .
RUN pip install --no-deps . \
    && nexus --help > /dev/null && python -c "import torch; print('torch', torch.__version__)"

# An unprivileged user; docker-compose.yml may run it under the host's uid (NEXUS_UID) so that
# files in the bind-mounted folders stay the user's. HOME is writable whatever the uid.
RUN useradd --create-home --uid 1000 nexus \
    && mkdir -p /nexus "$HF_HOME" \
    && chmod 1777 /nexus /home/nexus "$HF_HOME"
USER nexus
WORKDIR /nexus

CMD ["nexus", "status"]
