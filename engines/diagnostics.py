"""Checks and timings of a model repository: what `papscan models verify|warmup|bench` run.

Verification loads every served version of a model on every backend of its config that
has an artifact and can run here, runs each on the same seeded random inputs, and
compares every output with the first backend's (the reference) within a tolerance; it
also checks the artifacts' sha256 against the version's `card.json`. A backend that is
listed but cannot run here (TensorRT without a GPU) is reported with its reason, not as a
failure.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engines.backends import BACKENDS
from engines.backends.base import Device, example_feed, first_line
from engines.config import ModelConfig
from engines.errors import PapscanError
from engines.model import Model
from engines.repository import CARD_FILENAME, ModelRepository

#: Largest |difference| allowed between two FP32 backends, and against a reduced-precision
#: (FP16/INT8) TensorRT engine, whose error is of the order of FP16's 1e-3 relative step.
FP32_ATOL = 1e-3
REDUCED_PRECISION_ATOL = 5e-2


@dataclass
class BackendCheck:
    """One backend's part in a version's verification.

    Attributes:
        backend: The backend's name.
        status: ``reference`` (outputs others are compared with), ``agrees``,
            ``disagrees``, ``failed`` (listed, has an artifact, but did not load or run)
            or ``unavailable`` (cannot run on this machine; not a failure).
        detail: The reason or the error sentence, where there is one.
        max_abs_diff: Per output, the largest |difference| from the reference.
        tolerance: The largest difference allowed for this backend.
        load_ms: Load and warm-up time, for those that loaded.
    """

    backend: str
    status: str
    detail: str = ""
    max_abs_diff: dict[str, float] = field(default_factory=dict)
    tolerance: float | None = None
    load_ms: float | None = None


@dataclass
class VersionCheck:
    """Everything verified of one model version."""

    model: str
    version: int
    artifacts: list[str]
    hashes: list[str]
    hash_errors: list[str]
    backends: list[BackendCheck]

    @property
    def ok(self) -> bool:
        """No hash mismatch, no failure, no disagreement, and at least one backend ran."""
        ran = [b for b in self.backends if b.status in ("reference", "agrees")]
        bad = [b for b in self.backends if b.status in ("failed", "disagrees")]
        return bool(ran) and not bad and not self.hash_errors


def verify_repository(
    repository: ModelRepository,
    names: list[str] | None = None,
    device: str = "cpu",
    atol: float = FP32_ATOL,
) -> list[VersionCheck]:
    """Verifies every served version of `names` (default: every model)."""
    checks = []
    for name in names or repository.model_names():
        for version in repository.versions(name):
            checks.append(verify_version(repository, name, version, device, atol))
    return checks


def verify_version(
    repository: ModelRepository,
    name: str,
    version: int,
    device: str = "cpu",
    atol: float = FP32_ATOL,
    batch_sizes: tuple[int, ...] = (1, 3),
) -> VersionCheck:
    """Loads one version on each listed backend and compares their outputs."""
    config = repository.config(name)
    version_dir = repository.path / name / str(version)
    hashes, hash_errors = _check_card_hashes(version_dir)
    feeds = [example_feed(config, b, "random", seed=b) for b in _batches(config, batch_sizes)]
    reference: list[dict[str, np.ndarray]] | None = None
    checks: list[BackendCheck] = []
    for backend_name in config.backend:
        backend_cls = BACKENDS[backend_name]
        if backend_cls.find_artifact(version_dir) is None:
            checks.append(
                BackendCheck(backend_name, "unavailable", f"no {backend_cls.artifact_name}")
            )
            continue
        reason = backend_cls.unavailable_reason(Device.parse(device))
        if reason is not None:
            checks.append(BackendCheck(backend_name, "unavailable", reason))
            continue
        check, outputs = _run_backend(repository, config, version, device, backend_name, feeds)
        if outputs is not None:
            if reference is None:
                reference, check.status = outputs, "reference"
            else:
                _compare(check, reference, outputs, _tolerance(backend_name, config, atol))
        checks.append(check)
    artifacts = sorted(p.name for p in version_dir.iterdir() if p.is_file())
    return VersionCheck(name, version, artifacts, hashes, hash_errors, checks)


def _batches(config: ModelConfig, batch_sizes: tuple[int, ...]) -> list[int | None]:
    if not config.is_batched:
        return [None]
    return sorted({min(b, config.max_batch_size) for b in batch_sizes})


def _run_backend(
    repository: ModelRepository,
    config: ModelConfig,
    version: int,
    device: str,
    backend_name: str,
    feeds: list[dict[str, np.ndarray]],
) -> tuple[BackendCheck, list[dict[str, np.ndarray]] | None]:
    start = time.perf_counter()
    try:
        with repository.load(config.name, version, device=device, backend=backend_name) as m:
            load_ms = (time.perf_counter() - start) * 1e3
            outputs = [m.infer(feed) for feed in feeds]
    except PapscanError as exc:
        return BackendCheck(backend_name, "failed", str(exc)), None
    except Exception as exc:  # a runtime's own error while running: still one sentence
        return BackendCheck(backend_name, "failed", first_line(exc)), None
    return BackendCheck(backend_name, "agrees", load_ms=round(load_ms, 1)), outputs


def _tolerance(backend_name: str, config: ModelConfig, atol: float) -> float:
    if backend_name == "tensorrt" and config.precision != "FP32":
        return max(atol, REDUCED_PRECISION_ATOL)
    return atol


def _compare(
    check: BackendCheck,
    reference: list[dict[str, np.ndarray]],
    outputs: list[dict[str, np.ndarray]],
    tolerance: float,
) -> None:
    check.tolerance = tolerance
    for want, got in zip(reference, outputs, strict=True):
        for name, array in want.items():
            if got[name].shape != array.shape:
                check.status = "disagrees"
                check.detail = f"output '{name}' has shape {got[name].shape}, not {array.shape}"
                return
            diff = float(np.max(np.abs(got[name].astype(np.float64) - array), initial=0.0))
            check.max_abs_diff[name] = max(check.max_abs_diff.get(name, 0.0), diff)
    worst = max(check.max_abs_diff.values(), default=0.0)
    if worst > tolerance:
        check.status = "disagrees"
        check.detail = f"max |difference| {worst:.2e} exceeds {tolerance:.0e}"


def _check_card_hashes(version_dir: Path) -> tuple[list[str], list[str]]:
    """Checks each file the card gives a sha256 for; returns (checked files, errors)."""
    path = version_dir / CARD_FILENAME
    if not path.is_file():
        return [], []

    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return [], [f"{path}: the model card is not valid JSON ({exc})"]
    checked, errors = [], []
    for entry in _file_entries(card):
        file = version_dir / entry["file"]
        if not file.is_file():
            errors.append(f"{file}: the card lists this file but it does not exist")
            continue
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        checked.append(entry["file"])
        if digest != entry["sha256"]:
            errors.append(
                f"{file}: sha256 {digest[:12]}… differs from the card's {entry['sha256'][:12]}…"
            )
    return checked, errors


def _file_entries(value: Any) -> Iterator[dict[str, str]]:
    """Every {file, sha256} object anywhere in a card."""
    if isinstance(value, dict):
        if isinstance(value.get("file"), str) and isinstance(value.get("sha256"), str):
            yield value
        for item in value.values():
            yield from _file_entries(item)
    elif isinstance(value, list):
        for item in value:
            yield from _file_entries(item)


@dataclass(frozen=True)
class Timing:
    """A model's speed at one batch size."""

    batch_size: int
    runs: int
    mean_ms: float
    p50_ms: float
    p95_ms: float
    items_per_s: float


def time_model(model: Model, batch_sizes: list[int], seconds: float = 2.0) -> list[Timing]:
    """Runs `model` on seeded random inputs at each batch size for about `seconds`."""
    timings = []
    for batch_size in batch_sizes:
        feed = example_feed(model.config, batch_size if model.config.is_batched else None)
        model.infer(feed)  # this shape's first run may plan or allocate
        latencies: list[float] = []
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline or len(latencies) < 3:
            start = time.perf_counter()
            model.infer(feed)
            latencies.append(time.perf_counter() - start)
        ms = np.asarray(latencies) * 1e3
        timings.append(
            Timing(
                batch_size,
                len(ms),
                float(ms.mean()),
                float(np.percentile(ms, 50)),
                float(np.percentile(ms, 95)),
                batch_size * len(ms) / float(ms.sum() / 1e3),
            )
        )
    return timings
