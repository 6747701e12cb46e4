"""Scale-in spares busy workers: a worker pod marks itself costly to delete while it scans.

When a Deployment scales down, its ReplicaSet deletes the pods with the lowest
`controller.kubernetes.io/pod-deletion-cost` annotation first. A worker running inside
Kubernetes sets its own pod's annotation to `BUSY_COST` when it takes a scan job and back
to `IDLE_COST` when it has none left, so an autoscaler that removes a replica removes an
idle one whenever there is one. (When every pod is busy, the pod chosen gets SIGTERM and
Celery's warm shutdown finishes its slide first: the pod's termination grace period must
outlast a slide.)

The worker knows it is in a pod from the downward API (`POD_NAME`, `POD_NAMESPACE`) and
the service account mounted at `/var/run/secrets/kubernetes.io/serviceaccount/` (`token`,
`ca.crt`), and reaches the API server at `KUBERNETES_SERVICE_HOST:KUBERNETES_SERVICE_PORT`
with a JSON merge patch of its own pod. Its service account needs RBAC `patch` on `pods`
in its namespace. Outside Kubernetes all of this is a no-op; a failed patch is logged
(once, until one succeeds again) and never stops a scan.

Only the standard library is used (no Kubernetes client): one PATCH per change of state.
"""

from __future__ import annotations

import json
import logging
import os
import ssl
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

__all__ = ["ANNOTATION", "BUSY_COST", "IDLE_COST", "PodCost", "pod_cost"]

logger = logging.getLogger(__name__)

ANNOTATION = "controller.kubernetes.io/pod-deletion-cost"
BUSY_COST = 10000
IDLE_COST = 0
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
_TIMEOUT_S = 5.0


class PodCost:
    """Sets this pod's deletion cost: high while it has jobs in hand, 0 when idle.

    Thread-safe; `busy()` nests (a threads-pool worker with several scans stays costly
    until its last one ends).

    Args:
        env: the environment to read the pod's identity and API server from.
        service_account_dir: where the service account's `token`, `ca.crt` and
            `namespace` are mounted (`PAPSCAN_SERVICE_ACCOUNT_DIR` overrides the default).
    """

    def __init__(
        self,
        env: Mapping[str, str] | None = None,
        service_account_dir: Path | None = None,
    ) -> None:
        env = os.environ if env is None else env
        sa_dir = service_account_dir or Path(
            env.get("PAPSCAN_SERVICE_ACCOUNT_DIR") or SERVICE_ACCOUNT_DIR
        )
        self._lock = threading.Lock()
        self._jobs = 0
        self._failing = False
        self._url: str | None = None
        self._token_file = sa_dir / "token"
        self._ssl: ssl.SSLContext | None = None
        pod = env.get("POD_NAME", "").strip()
        host = env.get("KUBERNETES_SERVICE_HOST", "").strip()
        if not pod or not host:
            return  # not in a pod (or no downward API): nothing to do, quietly
        namespace = env.get("POD_NAMESPACE", "").strip() or _read(sa_dir / "namespace")
        ca = sa_dir / "ca.crt"
        if not namespace or not self._token_file.is_file() or not ca.is_file():
            logger.warning(
                "pod deletion cost off: POD_NAME is set but the service account (%s) or the"
                " namespace (POD_NAMESPACE) is missing; scale-in may pick a busy worker",
                sa_dir,
            )
            return
        port = env.get("KUBERNETES_SERVICE_PORT", "").strip() or "443"
        if ":" in host:  # an IPv6 address
            host = f"[{host}]"
        self._url = (
            f"https://{host}:{port}/api/v1/namespaces/{quote(namespace, safe='')}"
            f"/pods/{quote(pod, safe='')}"
        )
        self._ssl = ssl.create_default_context(cafile=str(ca))

    @property
    def enabled(self) -> bool:
        """Whether this process runs in a pod it can annotate."""
        return self._url is not None

    def set(self, cost: int) -> bool:
        """PATCH the pod's deletion cost to `cost`; False (logged) when that failed."""
        if self._url is None:
            return False
        body = json.dumps({"metadata": {"annotations": {ANNOTATION: str(cost)}}}).encode()
        try:
            token = self._token_file.read_text().strip()  # rotated by the kubelet: read anew
            request = urllib.request.Request(
                self._url,
                data=body,
                method="PATCH",
                headers={
                    "Authorization": f"Bearer {token}",
                    "Content-Type": "application/merge-patch+json",
                    "Accept": "application/json",
                },
            )
            with urllib.request.urlopen(request, timeout=_TIMEOUT_S, context=self._ssl):
                pass
        except (OSError, ValueError) as exc:  # HTTPError, URLError, timeouts, TLS
            if not self._failing:
                logger.warning(
                    "pod deletion cost: could not set %s=%d on this pod (%s); scans go on,"
                    " but scale-in may pick this pod while it scans (does its service account"
                    " have RBAC 'patch' on 'pods'?)",
                    ANNOTATION,
                    cost,
                    _reason(exc),
                )
            self._failing = True
            return False
        if self._failing:
            logger.info("pod deletion cost: set again (%s=%d)", ANNOTATION, cost)
        self._failing = False
        logger.debug("pod deletion cost %d", cost)
        return True

    @contextmanager
    def busy(self) -> Iterator[None]:
        """Costly to delete while the block runs (a scan job in hand), 0 after the last."""
        with self._lock:
            self._jobs += 1
            if self._jobs == 1:
                self.set(BUSY_COST)
        try:
            yield
        finally:
            with self._lock:
                self._jobs -= 1
                if self._jobs == 0:
                    self.set(IDLE_COST)

    def idle(self) -> None:
        """Mark the pod idle (at start: a restarted container may find its old cost)."""
        with self._lock:
            if self._jobs == 0:
                self.set(IDLE_COST)


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return str(exc.reason)
    return f"{type(exc).__name__}: {exc}"


_pod_cost: PodCost | None = None
_pod_cost_lock = threading.Lock()


def pod_cost() -> PodCost:
    """This process's `PodCost`, read from the environment on first use."""
    global _pod_cost
    with _pod_cost_lock:
        if _pod_cost is None:
            _pod_cost = PodCost()
        return _pod_cost
