"""Scale-in spares busy workers: the pod-deletion-cost patches a worker sends to a real
HTTPS server standing in for the kube-apiserver (a self-signed certificate, the CA and a
token in a service-account folder, as Kubernetes mounts them), and the warm shutdown
that lets a worker told to stop (SIGTERM) finish its slide first.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import ssl
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.worker.conftest import Cluster, free_port, wait_for
from train.synth import write_synthetic_slide
from worker.queue.pod_cost import ANNOTATION, BUSY_COST, IDLE_COST, PodCost

TOKEN = "test-service-account-token"
POD, NAMESPACE = "papscan-worker-7d9f-abcde", "slides"
POD_PATH = f"/api/v1/namespaces/{NAMESPACE}/pods/{POD}"


@dataclass
class Patch:
    method: str
    path: str
    headers: dict[str, str]
    body: dict

    @property
    def cost(self) -> int:
        return int(self.body["metadata"]["annotations"][ANNOTATION])


@dataclass
class FakeApiServer:
    """A kube-apiserver that records every request and answers `status`."""

    port: int
    service_account: Path
    requests: list[Patch] = field(default_factory=list)
    status: int = 200

    def env(self) -> dict[str, str]:
        """What a pod's environment holds (downward API and the service's address)."""
        return {
            "POD_NAME": POD,
            "POD_NAMESPACE": NAMESPACE,
            "KUBERNETES_SERVICE_HOST": "127.0.0.1",
            "KUBERNETES_SERVICE_PORT": str(self.port),
            "PAPSCAN_SERVICE_ACCOUNT_DIR": str(self.service_account),
        }

    def costs(self) -> list[int]:
        return [r.cost for r in self.requests]


def _self_signed(folder: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make the fake API server's certificate")
    cert, key = folder / "server.crt", folder / "server.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
        + ["-nodes", "-days", "1", "-subj", "/CN=kube-apiserver"]
        + ["-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest.fixture
def apiserver(tmp_path: Path) -> Iterator[FakeApiServer]:
    cert, key = _self_signed(tmp_path)
    sa = tmp_path / "serviceaccount"
    sa.mkdir()
    (sa / "token").write_text(TOKEN + "\n")
    (sa / "namespace").write_text(NAMESPACE)
    shutil.copy(cert, sa / "ca.crt")
    port = free_port()
    server_state = FakeApiServer(port, sa)

    class Handler(BaseHTTPRequestHandler):
        def do_PATCH(self) -> None:  # noqa: N802 (http.server's name)
            length = int(self.headers.get("Content-Length", 0))
            body = json.loads(self.rfile.read(length) or b"{}")
            server_state.requests.append(
                Patch("PATCH", self.path, {k.lower(): v for k, v in self.headers.items()}, body)
            )
            reply = json.dumps({"kind": "Pod", "metadata": {"name": POD}}).encode()
            self.send_response(server_state.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield server_state
    httpd.shutdown()
    httpd.server_close()


def test_a_pod_patches_its_own_deletion_cost(apiserver: FakeApiServer) -> None:
    cost = PodCost(env=apiserver.env())
    assert cost.enabled
    with cost.busy():
        with cost.busy():  # a second scan in a threads pool: no new patch
            pass
        assert apiserver.costs() == [BUSY_COST]
    assert apiserver.costs() == [BUSY_COST, IDLE_COST]
    first = apiserver.requests[0]
    assert (first.method, first.path) == ("PATCH", POD_PATH)
    assert first.headers["authorization"] == f"Bearer {TOKEN}"
    assert first.headers["content-type"] == "application/merge-patch+json"
    assert first.body == {"metadata": {"annotations": {ANNOTATION: str(BUSY_COST)}}}


def test_the_namespace_comes_from_the_service_account_when_not_given(
    apiserver: FakeApiServer,
) -> None:
    env = {k: v for k, v in apiserver.env().items() if k != "POD_NAMESPACE"}
    assert PodCost(env=env).set(5)
    assert apiserver.requests[-1].path == POD_PATH


def test_outside_kubernetes_nothing_is_sent(apiserver: FakeApiServer) -> None:
    for env in ({}, {"POD_NAME": POD}, {"KUBERNETES_SERVICE_HOST": "127.0.0.1"}):
        cost = PodCost(env=env, service_account_dir=apiserver.service_account)
        assert not cost.enabled
        with cost.busy():
            pass
    assert apiserver.requests == []


def test_a_refused_or_untrusted_patch_is_logged_once_and_never_raised(
    apiserver: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    apiserver.status = 403  # no RBAC 'patch' on pods
    cost = PodCost(env=apiserver.env())
    with caplog.at_level(logging.WARNING, logger="worker.queue.pod_cost"):
        for _ in range(3):
            with cost.busy():
                pass
    assert len(apiserver.requests) == 6
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "HTTP 403" in warning and "patch" in warning
    apiserver.status = 200
    assert cost.set(IDLE_COST)

    # A server the mounted CA did not sign is not trusted (nothing is sent to it).
    (tmp_path / "other").mkdir()
    other_ca, _ = _self_signed(tmp_path / "other")
    sa = tmp_path / "other-sa"
    shutil.copytree(apiserver.service_account, sa)
    shutil.copy(other_ca, sa / "ca.crt")
    sent = len(apiserver.requests)
    assert not PodCost(env={**apiserver.env(), "PAPSCAN_SERVICE_ACCOUNT_DIR": str(sa)}).set(1)
    assert len(apiserver.requests) == sent


@pytest.mark.slow
def test_a_worker_pod_is_costly_to_delete_while_it_scans_and_finishes_its_slide_on_sigterm(
    cluster: Cluster, apiserver: FakeApiServer, tmp_path: Path
) -> None:
    slide = tmp_path / "big.tiff"
    write_synthetic_slide(slide, width=4096, height=4096, mpp=0.5, seed=41, cells=240)
    port = free_port()
    env = {**apiserver.env(), "PAPSCAN_DB_CHUNK_ROIS": "2"}  # many chunks: a long scan
    worker = cluster.start_worker("pod@test", "--metrics-port", str(port), env=env)
    wait_for(lambda: apiserver.costs() == [IDLE_COST], 30, "the idle mark at start")

    scan_id = cluster.submit(str(slide))["queued"][0]["scan_id"]

    def midway() -> bool:
        scan = cluster.scan(scan_id)
        return scan.status == "running" and (scan.rois_done or 0) >= 4

    wait_for(midway, 120, "the scan to be part-way", every=0.05)
    assert apiserver.costs() == [IDLE_COST, BUSY_COST]  # scale-in now picks another pod
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    lines = dict(line.rsplit(" ", 1) for line in text.decode().splitlines() if line[:1] != "#")
    assert float(lines["papscan_running_scans"]) == 1
    assert 0 <= float(lines["papscan_lease_age_seconds"]) < 120  # renewed within the lease

    # Every pod was busy, so this one was picked after all: SIGTERM, as the kubelet sends,
    # while the slide is still part-way.
    running = cluster.scan(scan_id)
    assert running.status == "running" and running.rois_done < running.rois_planned
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.proc.wait(timeout=240) == 0, worker.text()
    scan = cluster.scan(scan_id)
    assert (scan.status, scan.attempt, scan.worker) == ("done", 1, "pod@test"), scan.error
    assert scan.rois_done == scan.rois_planned
    assert cluster.row_counts(scan_id)[0] == scan.rois_planned
    assert apiserver.costs() == [IDLE_COST, BUSY_COST, IDLE_COST]
    assert "Warm shutdown" in worker.text()
    assert all(r.path == POD_PATH for r in apiserver.requests)
