# syntax=docker/dockerfile:1
# papscan without a GPU: the REST API and review page (`papscan serve`, the default
# command), the watch folder (`papscan watch`), and a CPU worker for a laptop (compose's
# `cpu` profile), which scans with ONNX Runtime and DALI on the CPU.
#
#   docker build -f deploy/docker/cpu.Dockerfile -t papscan-cpu:0.1.0 .
#
# (from the repository root). torch comes from PyTorch's CPU index (PyPI's build carries
# CUDA libraries this image never uses); every version is pinned by the base image tag,
# deploy/docker/constraints.txt and the torch line below.

ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

# --- build ----------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/papscan
COPY deploy/docker/constraints.txt /tmp/constraints.txt
RUN grep -v -E '^(torch|torchvision)==' /tmp/constraints.txt > /tmp/constraints-cpu.txt \
    && /opt/papscan/bin/pip install --index-url https://download.pytorch.org/whl/cpu \
        torch==2.14.1+cpu torchvision==0.29.1+cpu
COPY pyproject.toml README.md /src/
COPY worker /src/worker
COPY engines /src/engines
COPY train /src/train
RUN /opt/papscan/bin/pip install --constraint /tmp/constraints-cpu.txt /src

# --- runtime --------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
ARG DEBIAN_FRONTEND=noninteractive
# OpenCV (a dependency of ultralytics) needs libGL and GLib even headless; Debian
# bookworm's own versions (the base image tag fixes the release).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin papscan \
    && mkdir -p /cache /slides \
    && chown papscan:papscan /cache
COPY --from=build /opt/papscan /opt/papscan
COPY deploy/docker/papscan_probe.py /usr/local/bin/papscan-probe
ENV PATH=/opt/papscan/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    XDG_CACHE_HOME=/cache \
    PAPSCAN_API_PORT=8000
USER 10001:10001
WORKDIR /home/papscan
EXPOSE 8000
# For the default command (the API); compose gives the watch folder and the CPU worker
# their own checks.
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["papscan-probe", "api"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["papscan"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
