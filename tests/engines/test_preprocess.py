"""Model inputs from pixels: fixed-field cell crops and normalisation, shared with training."""

from __future__ import annotations

import importlib

import numpy as np
import pytest

from engines import preprocess
from engines.config import Preprocessing
from engines.preprocess import cut_crops, normalise, to_input


def test_crops_are_centred_and_padded_with_glass() -> None:
    image = np.zeros((100, 100, 3), np.uint8)
    image[50, 50] = 200
    crops = cut_crops(image, np.array([[50.0, 50.0], [2.0, 2.0]]), field_px=11, out_px=11)
    assert crops.shape == (2, 11, 11, 3)
    assert crops[0, 5, 5, 0] == 200
    assert (crops[1, :3, :3] == 255).all() and (crops[1, 3:, 3:] == 0).all()


def test_crops_resize_a_larger_field() -> None:
    image = np.full((200, 200, 3), 10, np.uint8)
    crops = cut_crops(image, np.array([[100.0, 100.0]]), field_px=64, out_px=32)
    assert crops.shape == (1, 32, 32, 3) and (crops == 10).all()


def _prep(channel_order: str = "RGB") -> Preprocessing:
    return Preprocessing(
        mpp=0.5,
        input_size=(2, 2),
        mean=(10.0, 20.0, 30.0),
        std=(2.0, 4.0, 5.0),
        channel_order=channel_order,
        layout="NCHW",
    )


def test_to_input_normalises_into_nchw() -> None:
    prep = _prep()
    images = np.array([[[[12, 24, 35]] * 2] * 2], dtype=np.uint8)
    x = to_input(images, prep)
    assert x.shape == (1, 3, 2, 2) and x.dtype == np.float32
    np.testing.assert_allclose(x[0, :, 0, 0], [1.0, 1.0, 1.0])


def test_crops_equal_slices_of_the_image_on_glass() -> None:
    """`field_px == out_px` (training's crops): each crop is the field around the centre
    rounded half to even, on a white canvas; random images, centres off and on the edge."""
    rng = np.random.default_rng(0)
    for _ in range(50):
        h, w = rng.integers(1, 80, 2)
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        size = int(rng.integers(1, 40))
        centres = rng.uniform(-30, 110, (12, 2))
        centres[::2] = np.round(centres[::2] * 2) / 2  # exact halves: ties to even
        canvas = np.pad(image, ((size, size), (size, size), (0, 0)), constant_values=255)
        expected = np.zeros((len(centres), size, size, 3), np.uint8)
        for i, (cx, cy) in enumerate(np.round(centres).astype(int)):
            x0, y0 = cx - size // 2 + size, cy - size // 2 + size
            if -size < x0 - size < w and -size < y0 - size < h:
                expected[i] = canvas[y0 : y0 + size, x0 : x0 + size]
            else:
                expected[i] = 255
        for given in (centres, centres.astype(np.float32), centres.tolist()):
            np.testing.assert_array_equal(cut_crops(image, given, size, size), expected)


def test_to_input_is_normalise_in_the_configured_channel_order() -> None:
    images = np.random.default_rng(1).integers(0, 256, (3, 4, 5, 3), dtype=np.uint8)
    mean, std = (10.0, 20.0, 30.0), (2.0, 4.0, 5.0)
    x = normalise(images, mean, std)
    assert x.shape == (3, 3, 4, 5) and x.dtype == np.float32 and x.flags.c_contiguous
    expected = (images - np.float32(mean)) / np.float32(std)
    np.testing.assert_array_equal(x, expected.transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(to_input(images, _prep("RGB")), x)
    np.testing.assert_array_equal(
        to_input(images, _prep("BGR")), normalise(images[..., ::-1], mean, std)
    )


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("train.data.cric", "cut_crops"),
        ("train.data.synth_fields", "cut_crops"),
        ("train.data.lbc", "cut_crops"),
        ("train.data.scanner_crops", "cut_crops"),
        ("train.data.field_bags", "cut_crops"),
        ("train.data.crops", "normalise"),
        ("train.loops.defaults", "normalise"),
        ("train.loops.rois", "normalise"),
        ("train.loops.supervised", "normalise"),
        ("train.export.run_export", "normalise"),
    ],
)
def test_training_cuts_and_normalises_with_the_serving_functions(module: str, name: str) -> None:
    """No train/serve skew: training's crops and normalisation are these functions, not a
    copy of them."""
    assert getattr(importlib.import_module(module), name) is getattr(preprocess, name)


def test_training_resamples_fields_exactly_as_the_scanner_resamples_rois() -> None:
    import cv2

    from engines.preprocess import resample
    from train.data.scanner_crops import resample_to_mpp

    image = np.random.default_rng(3).integers(0, 256, (97, 131, 3), dtype=np.uint8)
    for mpp, target in ((0.25, 0.5), (0.6, 0.5), (0.5, 0.5)):
        factor = mpp / target
        trained = resample_to_mpp(image, mpp, target)
        assert np.array_equal(trained, resample(image, factor))
        if factor != 1.0:
            interp = cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR
            expected = cv2.resize(image, None, fx=factor, fy=factor, interpolation=interp)
            assert np.array_equal(trained, expected)
