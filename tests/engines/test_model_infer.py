"""engines.model.Model.infer: batch splitting, input checks, dtypes."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from engines.errors import ModelInputError
from engines.model import Model


def test_batch_37_with_max_8_matches_one_by_one(
    classifier: Model, monkeypatch: pytest.MonkeyPatch
) -> None:
    crops = np.random.default_rng(0).normal(size=(37, 3, 4, 4)).astype(np.float32)
    batch_sizes: list[int] = []
    real_infer = classifier.backend.infer

    def counting(inputs: Any) -> dict[str, np.ndarray]:
        batch_sizes.append(inputs["crops"].shape[0])
        return real_infer(inputs)

    monkeypatch.setattr(classifier.backend, "infer", counting)
    batched = classifier.infer({"crops": crops})
    assert batch_sizes == [8, 8, 8, 8, 5]
    one_by_one = [classifier.infer({"crops": crops[i : i + 1]}) for i in range(37)]
    for name in ("probs", "features"):
        expected = np.concatenate([out[name] for out in one_by_one], axis=0)
        assert batched[name].shape == expected.shape
        np.testing.assert_allclose(batched[name], expected, rtol=1e-5, atol=1e-6)
    assert batched["probs"].shape == (37, 3)
    np.testing.assert_allclose(batched["probs"].sum(axis=1), 1.0, rtol=1e-5)


def test_multi_input_dynamic_dims_split(roi: Model) -> None:
    rng = np.random.default_rng(1)
    features = rng.normal(size=(10, 6, 8)).astype(np.float32)
    mask = np.ones((10, 6), np.float32)
    mask[:, 4:] = 0  # two padding cells per ROI
    out = roi.infer({"cell_features": features, "cell_mask": mask})
    assert out["roi_probs"].shape == (10, 3)
    assert out["attention"].shape == (10, 6)
    np.testing.assert_allclose(out["attention"][:, 4:], 0.0)
    np.testing.assert_allclose(out["attention"].sum(axis=1), 1.0, rtol=1e-5)
    single = roi.infer({"cell_features": features[7:8], "cell_mask": mask[7:8]})
    np.testing.assert_allclose(out["roi_probs"][7:8], single["roi_probs"], rtol=1e-5, atol=1e-6)


def test_empty_batch(classifier: Model) -> None:
    out = classifier.infer({"crops": np.zeros((0, 3, 4, 4), np.float32)})
    assert out["probs"].shape == (0, 3)
    assert out["features"].shape == (0, 8)
    assert out["probs"].dtype == np.float32


def test_float64_is_cast_for_fp32(classifier: Model) -> None:
    crops = np.random.default_rng(2).normal(size=(3, 3, 4, 4))
    out64 = classifier.infer({"crops": crops})
    out32 = classifier.infer({"crops": crops.astype(np.float32)})
    np.testing.assert_array_equal(out64["probs"], out32["probs"])


def test_non_contiguous_input(classifier: Model) -> None:
    crops = np.random.default_rng(3).normal(size=(4, 4, 4, 3)).astype(np.float32)
    transposed = crops.transpose(0, 3, 1, 2)  # NHWC view as NCHW, not C-contiguous
    out = classifier.infer({"crops": transposed})
    expected = classifier.infer({"crops": np.ascontiguousarray(transposed)})
    np.testing.assert_array_equal(out["probs"], expected["probs"])


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        pytest.param(
            {"images": np.zeros((1, 3, 4, 4), np.float32)},
            "tiny_classifier@1 takes inputs ['crops'], got ['images']",
            id="wrong name",
        ),
        pytest.param(
            {},
            "tiny_classifier@1 takes inputs ['crops'], got []",
            id="missing",
        ),
        pytest.param(
            {"crops": np.zeros((1, 3, 4, 4), np.uint8)},
            "tiny_classifier@1: input 'crops' must be float32 (TYPE_FP32), got uint8",
            id="uint8",
        ),
        pytest.param(
            {"crops": np.zeros((1, 3, 4, 4), np.float16)},
            "tiny_classifier@1: input 'crops' must be float32 (TYPE_FP32), got float16",
            id="float16",
        ),
        pytest.param(
            {"crops": np.zeros((3, 4, 4), np.float32)},
            "tiny_classifier@1: input 'crops' must have shape [-1, 3, 4, 4] (-1 = any), "
            "got [3, 4, 4]",
            id="rank",
        ),
        pytest.param(
            {"crops": np.zeros((2, 3, 5, 4), np.float32)},
            "tiny_classifier@1: input 'crops' must have shape [-1, 3, 4, 4] (-1 = any), "
            "got [2, 3, 5, 4]",
            id="fixed dim",
        ),
        pytest.param(
            {"crops": [[0.0]]},
            "tiny_classifier@1: input 'crops' must be a numpy or CUDA array, got list",
            id="list",
        ),
    ],
)
def test_input_errors(classifier: Model, inputs: dict[str, Any], message: str) -> None:
    with pytest.raises(ModelInputError) as info:
        classifier.infer(inputs)
    assert str(info.value) == message


def test_inputs_must_share_batch_size(roi: Model) -> None:
    with pytest.raises(ModelInputError, match="inputs must share one batch size"):
        roi.infer(
            {
                "cell_features": np.zeros((3, 5, 8), np.float32),
                "cell_mask": np.ones((2, 5), np.float32),
            }
        )


def test_input_spec(classifier: Model) -> None:
    spec = classifier.input_spec("crops")
    assert (spec.name, spec.data_type, spec.dims) == ("crops", "TYPE_FP32", (3, 4, 4))
    with pytest.raises(ModelInputError) as info:
        classifier.input_spec("images")
    assert str(info.value) == "tiny_classifier has no input 'images' (tensors: crops)"
    assert classifier.config.output("features").dims == (8,)
    with pytest.raises(ModelInputError, match="tiny_classifier has no output 'logits'"):
        classifier.config.output("logits")


def test_repr(classifier: Model) -> None:
    assert repr(classifier) == "Model(tiny_classifier@1, backend=onnxruntime)"
