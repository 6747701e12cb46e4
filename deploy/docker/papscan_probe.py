#!/usr/bin/env python3
"""Container probes for papscan's images (installed as `papscan-probe`).

    papscan-probe ready   a worker has loaded and warmed up its three engines
    papscan-probe alive   a worker's metrics endpoint answers
    papscan-probe api     `papscan serve` answers HTTP

`ready` reads the worker's own `/metrics` (`papscan worker --metrics-port`, i.e.
PAPSCAN_METRICS_PORT, default 9400). The worker serves that port before it loads its
models, so an answer alone says only that the process is alive. The engines' Triton-style
series (`nv_inference_count_total{model=...}`) appear only once a model version has been
loaded *and warmed up* (engines.repository builds the TensorRT plan, warms the backend
up, and only then makes the `Model` that registers its counters), so a worker is ready
when the series of all three engines a scan needs are there. The three names are
`worker.pipeline.scan.MODEL_NAMES` (a test keeps them equal).

`api` asks `papscan serve` (PAPSCAN_API_PORT, default 8000) for `/api/queue`: 200, or 401
without a token, means the app is serving.

Standard library only, so a probe every few seconds imports nothing heavy. Exit 0 when
the check passes, 1 with one line saying why when it does not.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import urllib.error
import urllib.request

ENGINES = ("cell_detector", "cell_classifier", "roi_classifier")
_SERIES = re.compile(r'^nv_inference_count(?:_total)?\{[^}]*\bmodel="([^"]+)"', re.MULTILINE)


def warm_engines(metrics_text: str) -> set[str]:
    """The models whose inference counters a `/metrics` page lists."""
    return set(_SERIES.findall(metrics_text))


def missing_engines(metrics_text: str) -> list[str]:
    """The engines of a scan not yet loaded and warmed up, per a `/metrics` page."""
    warm = warm_engines(metrics_text)
    return [name for name in ENGINES if name not in warm]


def _get(url: str, timeout_s: float) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, ""


def check(kind: str, timeout_s: float = 5.0) -> str | None:
    """Run one check; None when it passes, else the reason."""
    if kind == "api":
        port = int(os.environ.get("PAPSCAN_API_PORT") or 8000)
        url = f"http://127.0.0.1:{port}/api/queue"
    else:
        port = int(os.environ.get("PAPSCAN_METRICS_PORT") or 9400)
        url = f"http://127.0.0.1:{port}/metrics"
    try:
        status, body = _get(url, timeout_s)
    except OSError as exc:
        return f"{url} does not answer ({exc})"
    if kind == "api":
        return None if status in (200, 401) else f"{url} answered HTTP {status}"
    if status != 200:
        return f"{url} answered HTTP {status}"
    if kind == "ready":
        missing = missing_engines(body)
        if missing:
            return f"models not warmed up yet: {', '.join(missing)}"
    return None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="papscan-probe", description=__doc__.splitlines()[0])
    p.add_argument("kind", choices=("ready", "alive", "api"), help="what to check")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for an answer")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    reason = check(args.kind, args.timeout)
    if reason:
        print(f"papscan-probe {args.kind}: {reason}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
