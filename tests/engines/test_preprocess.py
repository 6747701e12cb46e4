"""Model inputs from pixels: fixed-field cell crops and normalisation."""

from __future__ import annotations

import numpy as np

from engines.config import Preprocessing
from engines.preprocess import cut_crops, to_input


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


def test_to_input_normalises_into_nchw() -> None:
    prep = Preprocessing(
        mpp=0.5,
        input_size=(2, 2),
        mean=(10.0, 20.0, 30.0),
        std=(2.0, 4.0, 5.0),
        channel_order="RGB",
        layout="NCHW",
    )
    images = np.array([[[[12, 24, 35]] * 2] * 2], dtype=np.uint8)
    x = to_input(images, prep)
    assert x.shape == (1, 3, 2, 2) and x.dtype == np.float32
    np.testing.assert_allclose(x[0, :, 0, 0], [1.0, 1.0, 1.0])
