"""A Triton-style model repository on disk, and loading a model version from it.

```
<repo>/<model>/config.yaml
<repo>/<model>/<version>/model.onnx     (one artifact per backend; version = 1, 2, …)
<repo>/<model>/<version>/card.json      (optional: training data, metrics, hashes)
```

A model is a folder holding `config.yaml`; a version is a sub-folder named by a positive
integer (other sub-folders are ignored). The config's `version_policy` says which
versions are served. A version runs on the first backend of the config's `backend` list
that has its artifact in the version folder and can run on the device.
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import Any

from engines.backends import BACKENDS
from engines.backends.base import Backend, Device
from engines.config import CONFIG_FILENAME, ModelConfig, load_config
from engines.errors import BackendUnavailableError, ModelLoadError, ModelNotFoundError
from engines.hashing import cached_file_sha256
from engines.metrics import METRICS, InferenceMetrics
from engines.model import Model

logger = logging.getLogger(__name__)

CARD_FILENAME = "card.json"
_VERSION_NAME = re.compile(r"[1-9][0-9]*")


def default_repository_path() -> Path:
    """The repository shipped inside the installed `engines` package (`engines/repository`)."""
    return Path(__file__).resolve().parent / "repository"


class ModelRepository:
    """A folder of models, each with a `config.yaml` and numbered version folders.

    The folder is read afresh on every call, so models written by `train` while a process
    runs are seen by its next `load`.

    Args:
        path: The repository folder.
        metrics: Where its models count requests and executions; None means the
            process-wide `engines.metrics.METRICS` that the worker serves.

    Raises:
        ModelNotFoundError: `path` is not a folder.
    """

    def __init__(self, path: str | Path, metrics: InferenceMetrics | None = None) -> None:
        self.path = Path(path)
        self.metrics = METRICS if metrics is None else metrics
        if not self.path.is_dir():
            raise ModelNotFoundError(f"the model repository {self.path} does not exist")

    def __repr__(self) -> str:
        return f"ModelRepository({str(self.path)!r})"

    def model_names(self) -> list[str]:
        """The models in the repository (folders holding a `config.yaml`), sorted."""
        return sorted(
            entry.name
            for entry in self.path.iterdir()
            if entry.is_dir() and (entry / CONFIG_FILENAME).is_file()
        )

    def config(self, name: str) -> ModelConfig:
        """The validated config of model `name`.

        Raises:
            ModelNotFoundError: The repository has no such model.
            ModelConfigError: Its `config.yaml` is invalid.
        """
        names = self.model_names()
        if name not in names:
            raise ModelNotFoundError(
                f"the model repository {self.path} has no model '{name}' "
                f"(models: {', '.join(names) or 'none'})"
            )
        return load_config(self.path / name / CONFIG_FILENAME)

    def versions(self, name: str) -> list[int]:
        """The versions of model `name` its `version_policy` serves, ascending.

        Raises:
            ModelNotFoundError: The repository has no such model.
            ModelConfigError: Its `config.yaml` is invalid.
        """
        return self.config(name).version_policy.select(self._version_folders(name))

    def weights_sha256(self, name: str, version: int) -> str:
        """The identity of one version's weights: see `weights_sha256`."""
        return weights_sha256(self.path / name / str(version), self.config(name))

    def load(
        self,
        name: str,
        version: int | None = None,
        *,
        device: str | Device = "auto",
        warmup: bool = True,
        backend: str | None = None,
    ) -> Model:
        """Loads one version of a model on the first backend that can run it.

        Args:
            name: The model's name (its folder).
            version: The version to load; None picks the highest one the policy serves.
            device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (see `Device`).
            warmup: Run the backend's warm-up before returning (the model is not ready
                for timed work until it has run).
            backend: Use this backend (one of the config's list) instead of the first
                available one; `papscan models verify` compares them this way.

        Returns:
            The loaded model; `close()` it when done.

        Raises:
            ModelNotFoundError: No such model, no such served version, or no artifact any
                listed backend loads.
            ModelConfigError: Its `config.yaml` is invalid.
            BackendUnavailableError: Artifacts exist but no listed backend can run here.
            ModelLoadError: The chosen backend cannot load the artifact.
        """
        device = Device.parse(device)
        config = self.config(name)
        version = self._served_version(config, version)
        version_dir = self.path / name / str(version)
        card = _read_card(version_dir)
        backend_cls, selection = _choose_backend(config, version, version_dir, device, backend)
        backend: Backend = backend_cls(config)
        start = time.perf_counter()
        backend.load(version_dir, device)
        try:
            if warmup:
                backend.warmup()
        except BaseException:
            backend.close()
            raise
        logger.info(
            "loaded %s@%d on %s in %.0f ms (%s): %s",
            name,
            version,
            backend_cls.name,
            (time.perf_counter() - start) * 1e3,
            selection,
            backend.describe(),
        )
        return Model(
            config,
            version,
            version_dir,
            card,
            backend_cls.name,
            backend,
            selection,
            metrics=self.metrics,
        )

    def _version_folders(self, name: str) -> list[int]:
        folders = []
        for entry in (self.path / name).iterdir():
            if entry.is_dir() and _VERSION_NAME.fullmatch(entry.name):
                folders.append(int(entry.name))
            else:
                logger.debug("%s: ignoring %s (not a version folder)", name, entry.name)
        return sorted(folders)

    def _served_version(self, config: ModelConfig, version: int | None) -> int:
        name = config.name
        existing = self._version_folders(name)
        served = config.version_policy.select(existing)
        listed = ", ".join(map(str, existing)) or "none"
        if version is None:
            if not served:
                raise ModelNotFoundError(
                    f"model '{name}' has no version folder its version_policy "
                    f"{config.version_policy} serves (version folders: {listed})"
                )
            return served[-1]
        if isinstance(version, bool) or not isinstance(version, int):
            raise ModelNotFoundError(
                f"model '{name}' version must be a positive integer, got {version!r}"
            )
        if version not in existing:
            raise ModelNotFoundError(
                f"model '{name}' has no version {version} (version folders: {listed})"
            )
        if version not in served:
            raise ModelNotFoundError(
                f"model '{name}' version {version} exists but its version_policy "
                f"{config.version_policy} serves only {', '.join(map(str, served)) or 'none'}"
            )
        return version


def weights_sha256(version_dir: Path, config: ModelConfig) -> str:
    """The sha256 of a version's weights: its ONNX file where it has one, else the artifact
    its first listed backend would load.

    ONNX comes first because every runtime's artifact is exported beside it or built from
    it (a TensorRT plan differs per GPU), so workers on different runtimes agree on what
    ran. Hashes are cached by path, size and modification time.

    Raises:
        ModelNotFoundError: the version folder holds no artifact of any listed backend.
    """
    version_dir = Path(version_dir)
    candidates = [version_dir / "model.onnx"]
    candidates += [BACKENDS[b].find_artifact(version_dir) for b in config.backend if b in BACKENDS]
    for path in candidates:
        if path is not None and path.is_file():
            return cached_file_sha256(path)
    raise ModelNotFoundError(f"{version_dir} holds no model artifact to identify its weights")


def _read_card(version_dir: Path) -> dict[str, Any]:
    """The version's card.json, or {} when it has none."""
    path = version_dir / CARD_FILENAME
    if not path.is_file():
        return {}
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path}: the model card is not valid JSON ({exc})") from exc
    if not isinstance(card, dict):
        raise ModelLoadError(f"{path}: the model card must be a JSON object")
    return card


def _choose_backend(
    config: ModelConfig,
    version: int,
    version_dir: Path,
    device: Device,
    only: str | None = None,
) -> tuple[type[Backend], str]:
    """The first backend of the config's list with its artifact that can run on `device`.

    Args:
        only: Consider just this backend (it must be in the config's list).

    Returns:
        The backend class, and the reason it was chosen (the ones skipped before it).
    """
    candidates = config.backend
    if only is not None:
        if only not in config.backend:
            raise BackendUnavailableError(
                f"model '{config.name}' does not list backend '{only}' "
                f"(its backends: {', '.join(config.backend)})"
            )
        candidates = (only,)
    skipped: list[str] = []
    has_artifact = False
    for backend_name in candidates:
        backend_cls = BACKENDS[backend_name]
        if backend_cls.find_artifact(version_dir) is None:
            skipped.append(f"{backend_name}: no {backend_cls.artifact_name}")
            continue
        has_artifact = True
        reason = backend_cls.unavailable_reason(device)
        if reason is not None:
            skipped.append(f"{backend_name}: {reason}")
            continue
        if only is not None:
            return backend_cls, f"asked for, available for {device}"
        if skipped:
            return backend_cls, f"first available for {device}; skipped {'; '.join(skipped)}"
        return backend_cls, f"first preference, available for {device}"
    detail = "; ".join(skipped)
    who = f"model '{config.name}' version {version}"
    if not has_artifact:
        raise ModelNotFoundError(f"{who} has no artifact any of its backends loads ({detail})")
    raise BackendUnavailableError(f"{who} cannot run on {device} here ({detail})")
