"""Write one model version into a model repository: config.yaml, model.onnx, card.json.

Layout (the contract's, Triton-style):
`<repo>/<name>/config.yaml`, `<repo>/<name>/<version>/model.onnx`, `.../card.json`, and
optionally `.../model.pt2` (the exported PyTorch program).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import platform
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from engines.hashing import file_sha256 as sha256_of
from train.data.paths import PROJECT_ROOT
from train.export.guards import check_overwrite
from train.export.onnx_export import onnx_opset

logger = logging.getLogger(__name__)


def git_commit(cwd: Path = PROJECT_ROOT) -> str | None:
    """The project's HEAD commit (with `-dirty` if the tree has changes), or None."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}-dirty" if dirty else head


def software_versions() -> dict[str, str]:
    """Versions of the packages that shaped the artifact."""
    import onnx
    import onnxruntime
    import torch

    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }
    if "ultralytics" in sys.modules:
        versions["ultralytics"] = sys.modules["ultralytics"].__version__
    return versions


def dump_config_yaml(config: dict[str, Any]) -> str:
    """The contract's layout: top-level keys in block style, nested values in flow style."""
    lines = []
    for key, value in config.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            lines.append(f"{key}:")
            lines.extend(f"  - {_flow(v)}" for v in value)
        elif isinstance(value, dict | list):
            lines.append(f"{key}: {_flow(value)}")
        else:
            lines.append(f"{key}: {_flow(value)}")
    text = "\n".join(lines) + "\n"
    if yaml.safe_load(text) != config:
        raise ValueError("config.yaml did not round-trip through YAML")
    return text


def _flow(value: Any) -> str:
    return (
        yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10_000)
        .strip()
        .removesuffix("\n...")
        .strip()
    )


def write_model_version(
    repo: Path,
    config: dict[str, Any],
    onnx_path: Path,
    card: dict[str, Any],
    version: int = 1,
    pt2_path: Path | None = None,
    pt2_checks: dict[str, Any] | None = None,
    extra_artifacts: Mapping[str, Path] | None = None,
) -> Path:
    """Write `config.yaml`, copy the ONNX file to `<version>/model.onnx`, write `card.json`.

    The card is completed with the model name and version, sha256 and size of `model.onnx`,
    its opset, software versions, date (UTC) and git commit; with `pt2_path`, the exported
    PyTorch program is copied to `<version>/model.pt2` and the card's `pytorch_artifact`
    gives its sha256, size and `pt2_checks`; each of `extra_artifacts` is copied under its
    file name and listed in the card's `extra_artifacts` with its sha256 and size. An
    existing version folder is replaced, unless a guard (`train.export.guards`) refuses: the
    `papscan` CLI refuses when scans in the results database ran its weights, whose audit
    trail would then name weights that no longer exist.

    Args:
        repo: The model repository folder.
        config: The config.yaml content (see `train.export.configs`).
        onnx_path: The exported ONNX file.
        card: Training data, metrics, seed, command, checks.
        version: The version number (folder name).
        pt2_path: The exported PyTorch program (`torch.export.save`), or None.
        pt2_checks: What the program was checked against (e.g. its max abs difference
            from ONNX Runtime), recorded beside its hash.
        extra_artifacts: File name in the version folder -> file to copy there (e.g.
            ``{"model.fp16.onnx": path}``).

    Returns:
        The version folder.

    Raises:
        PapscanError: a guard refused to replace the version folder.
    """
    if version < 1:
        raise ValueError(f"version must be a positive integer, got {version}")
    name = config["name"]
    model_dir = repo / name
    version_dir = model_dir / str(version)
    if version_dir.exists():
        if (version_dir / "model.onnx").is_file():
            sha256 = sha256_of(version_dir / "model.onnx")
            check_overwrite(version_dir, name, sha256)
        shutil.rmtree(version_dir)
    version_dir.mkdir(parents=True)
    (model_dir / "config.yaml").write_text(dump_config_yaml(config))
    target = version_dir / "model.onnx"
    shutil.copyfile(onnx_path, target)
    full_card = {
        "name": name,
        "version": version,
        **card,
        "artifact": {
            "file": "model.onnx",
            "sha256": sha256_of(target),
            "bytes": target.stat().st_size,
            "onnx_opset": onnx_opset(target),
        },
        **_pytorch_artifact(version_dir, pt2_path, pt2_checks),
        **_extra_artifacts(version_dir, extra_artifacts or {}),
        "software": software_versions(),
        "date_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "git_commit": git_commit(),
    }
    (version_dir / "card.json").write_text(
        json.dumps(full_card, indent=2, default=_json_default) + "\n"
    )
    logger.info(
        "wrote %s@%d to %s (%.1f kB)", name, version, version_dir, target.stat().st_size / 1024
    )
    return version_dir


def _pytorch_artifact(
    version_dir: Path, pt2_path: Path | None, checks: dict[str, Any] | None
) -> dict[str, Any]:
    """Copy the program to `model.pt2`; {"pytorch_artifact": {...}} for the card, or {}."""
    if pt2_path is None:
        return {}
    target = version_dir / "model.pt2"
    shutil.copyfile(pt2_path, target)
    return {
        "pytorch_artifact": {
            "file": target.name,
            "sha256": sha256_of(target),
            "bytes": target.stat().st_size,
            "format": "torch.export (torch.export.save)",
            **(checks or {}),
        }
    }


def _extra_artifacts(version_dir: Path, artifacts: Mapping[str, Path]) -> dict[str, Any]:
    """Copy each file under its name; {"extra_artifacts": {name: {sha256, bytes}}}, or {}."""
    listed = {}
    for file_name, source in artifacts.items():
        if Path(file_name).name != file_name or file_name in ("model.onnx", "card.json"):
            raise ValueError(f"extra artifact name {file_name!r} must be a new plain file name")
        target = version_dir / file_name
        shutil.copyfile(source, target)
        listed[file_name] = {"sha256": sha256_of(target), "bytes": target.stat().st_size}
    return {"extra_artifacts": listed} if listed else {}


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
