# syntax=docker/dockerfile:1
# papscan's GPU worker: CUDA 13.0 runtime, TensorRT 10, DALI for CUDA 13.0, papscan and
# the model repository it ships (engines/repository, inside the installed package).
#
#   docker build -f deploy/docker/worker-gpu.Dockerfile -t papscan-worker-gpu:0.1.0 .
#
# (from the repository root). One container owns one GPU. On its first start the worker
# builds a TensorRT plan per model for the GPU it finds (the shipped repository holds only
# ONNX files) and caches it under XDG_CACHE_HOME=/cache: mount a volume there (compose) or
# a per-node folder (Kubernetes) so later starts on that GPU model load in seconds. Plans
# are named per GPU architecture and TensorRT version, so one cache serves mixed nodes.
#
# Another model repository: mount it read-only and set PAPSCAN_MODELS to its path
# (deploy/README.md, "Roll out a new model version").
#
# Versions: the CUDA base image by tag, TensorRT 10.16.1.11 for CUDA 13 (the newest 10.x:
# the backend is written for TensorRT 10's API) and cuda-python 13.0.3 here, everything
# else by deploy/docker/constraints.txt. Ubuntu 24.04 brings Python 3.12.

ARG CUDA_IMAGE=nvidia/cuda:13.0.2-runtime-ubuntu24.04

# --- build: a virtual environment with papscan and its GPU runtimes ----------------------
FROM ${CUDA_IMAGE} AS build
ARG DEBIAN_FRONTEND=noninteractive
# Ubuntu's own python3 of this release; the base image tag fixes the release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/papscan
COPY deploy/docker/constraints.txt /tmp/constraints.txt
COPY pyproject.toml README.md /src/
COPY worker /src/worker
COPY engines /src/engines
COPY train /src/train
# TensorRT's wheels live on NVIDIA's index (PyPI's tensorrt-cu13-libs only redirects there).
RUN /opt/papscan/bin/pip install --constraint /tmp/constraints.txt /src \
    && /opt/papscan/bin/pip install --constraint /tmp/constraints.txt \
        --extra-index-url https://pypi.nvidia.com \
        tensorrt-cu13==10.16.1.11 cuda-python==13.0.3

# --- runtime: the same base, the environment, a user without privileges -------------------
FROM ${CUDA_IMAGE} AS runtime
ARG DEBIAN_FRONTEND=noninteractive
# OpenCV (a dependency of ultralytics) needs libGL and GLib even headless.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin papscan \
    && mkdir -p /cache /models \
    && chown papscan:papscan /cache
COPY --from=build /opt/papscan /opt/papscan
COPY deploy/docker/papscan_probe.py /usr/local/bin/papscan-probe
ENV PATH=/opt/papscan/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    XDG_CACHE_HOME=/cache \
    PAPSCAN_METRICS_PORT=9400 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
VOLUME ["/cache"]
USER 10001:10001
WORKDIR /home/papscan
EXPOSE 9400
# Healthy once the three engines are loaded and warmed up; the first start on a new GPU
# builds TensorRT plans (minutes), hence the long start period.
HEALTHCHECK --interval=30s --timeout=10s --start-period=20m --retries=3 \
    CMD ["papscan-probe", "ready"]
# SIGTERM is Celery's warm shutdown: the slide in hand is finished, then the process exits.
STOPSIGNAL SIGTERM
ENTRYPOINT ["papscan"]
CMD ["worker", "--gpu", "0", "--queues", "stat,routine"]
