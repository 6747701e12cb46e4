"""engines.backends.onnxruntime: load-time checks, session settings, warm-up."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from engines.backends import OnnxRuntimeBackend
from engines.backends.base import Device, zeros_like_spec
from engines.config import load_config
from engines.errors import BackendUnavailableError, ModelInputError, ModelLoadError
from engines.repository import ModelRepository


def _backend(repo: Path, name: str = "tiny_classifier", **kwargs: Any) -> OnnxRuntimeBackend:
    return OnnxRuntimeBackend(load_config(repo / name / "config.yaml"), **kwargs)


@pytest.mark.parametrize(
    "content",
    [b"", b"not an onnx model at all", b"\x08\x07\x12\x05junk" * 20],
    ids=["empty", "text", "truncated protobuf"],
)
def test_corrupt_model_is_a_load_error(make_repo: Any, content: bytes) -> None:
    repo = make_repo()
    artifact = repo / "tiny_classifier" / "1" / "model.onnx"
    artifact.write_bytes(content)
    with pytest.raises(ModelLoadError) as info:
        ModelRepository(repo).load("tiny_classifier")
    message = str(info.value)
    assert message.startswith(f"{artifact}: ONNX Runtime cannot load the model (")
    assert "\n" not in message


def test_absent_model_file_is_a_load_error(make_repo: Any) -> None:
    repo = make_repo()
    backend = _backend(repo)
    with pytest.raises(ModelLoadError, match="the ONNX model file does not exist"):
        backend.load(repo / "tiny_classifier" / "9", Device("cpu"))


def test_mismatched_input_names(make_repo: Any, build_classifier: Any) -> None:
    repo = make_repo()
    artifact = repo / "tiny_classifier" / "1" / "model.onnx"
    build_classifier(artifact, input_name="images")
    with pytest.raises(ModelLoadError) as info:
        ModelRepository(repo).load("tiny_classifier")
    assert str(info.value) == (
        f"{artifact}: the inputs ['images'] of the ONNX model do not match "
        "the config's inputs ['crops']"
    )


def test_missing_output(make_repo: Any) -> None:
    repo = make_repo(
        classifier_overrides={
            "output": [{"name": "logits_out", "data_type": "TYPE_FP32", "dims": [3]}]
        }
    )
    with pytest.raises(ModelLoadError, match=r"lack the config's output\(s\) \['logits_out'\]"):
        ModelRepository(repo).load("tiny_classifier")


def test_mismatched_data_type(make_repo: Any) -> None:
    repo = make_repo(
        classifier_overrides={
            "input": [{"name": "crops", "data_type": "TYPE_UINT8", "dims": [3, 4, 4]}]
        }
    )
    with pytest.raises(ModelLoadError) as info:
        ModelRepository(repo).load("tiny_classifier")
    assert str(info.value).endswith(
        "input 'crops' is tensor(float) in the ONNX model but TYPE_UINT8 (tensor(uint8)) "
        "in the config"
    )


def test_mismatched_dims(make_repo: Any) -> None:
    repo = make_repo(
        classifier_overrides={
            "output": [
                {"name": "probs", "data_type": "TYPE_FP32", "dims": [4]},
                {"name": "features", "data_type": "TYPE_FP32", "dims": [8]},
            ]
        }
    )
    with pytest.raises(ModelLoadError) as info:
        ModelRepository(repo).load("tiny_classifier")
    assert str(info.value).endswith(
        "output 'probs' has shape [N, 3] in the ONNX model, which disagrees with "
        "the config's [-1, 4]"
    )


def test_mismatched_rank(make_repo: Any, config_writer: Any) -> None:
    """max_batch_size 0 makes dims the full shapes: [-1, 8] is rank 2, the graph's rank 3."""
    repo = make_repo()
    config = yaml.safe_load((repo / "tiny_roi" / "config.yaml").read_text())
    config["max_batch_size"] = 0
    config_writer(repo / "tiny_roi", config)
    with pytest.raises(ModelLoadError) as info:
        ModelRepository(repo).load("tiny_roi")
    assert str(info.value).endswith(
        "input 'cell_features' has shape [N, M, 8] in the ONNX model, "
        "not of rank 2 as the config's [-1, 8]"
    )


def test_fixed_batch_export_with_max_batch_size(make_repo: Any, build_classifier: Any) -> None:
    repo = make_repo()
    build_classifier(repo / "tiny_classifier" / "1" / "model.onnx", batch=1)
    with pytest.raises(
        ModelLoadError, match="has a fixed batch dimension 1 but max_batch_size is 8"
    ):
        ModelRepository(repo).load("tiny_classifier")


def test_fixed_batch_one_with_max_batch_size_one(make_repo: Any, build_classifier: Any) -> None:
    repo = make_repo(classifier_overrides={"max_batch_size": 1})
    build_classifier(repo / "tiny_classifier" / "1" / "model.onnx", batch=1)
    with ModelRepository(repo).load("tiny_classifier") as model:
        assert model.infer({"crops": np.ones((3, 3, 4, 4), np.float32)})["probs"].shape == (3, 3)


def test_session_options(make_repo: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime as ort

    repo = make_repo()
    monkeypatch.setenv("PAPSCAN_INTRA_OP_THREADS", "2")
    backend = _backend(repo)
    options = backend._session_options(ort)
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert options.intra_op_num_threads == 2
    assert options.inter_op_num_threads == 1
    assert _backend(repo, intra_op_num_threads=1)._session_options(ort).intra_op_num_threads == 1
    monkeypatch.delenv("PAPSCAN_INTRA_OP_THREADS")
    assert _backend(repo)._session_options(ort).intra_op_num_threads == 0


def test_bad_thread_setting(make_repo: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = make_repo()
    monkeypatch.setenv("PAPSCAN_INTRA_OP_THREADS", "many")
    with pytest.raises(BackendUnavailableError) as info:
        ModelRepository(repo).load("tiny_classifier")
    assert str(info.value) == (
        "PAPSCAN_INTRA_OP_THREADS must be an integer >= 0 (0 = one per core), got 'many'"
    )


def test_providers_never_azure(make_repo: Any) -> None:
    import onnxruntime as ort

    assert OnnxRuntimeBackend._providers(ort, Device("cpu")) == ["CPUExecutionProvider"]
    providers = OnnxRuntimeBackend._providers(ort, Device("auto"))
    names = [p[0] if isinstance(p, tuple) else p for p in providers]
    assert "AzureExecutionProvider" not in names
    assert names[-1] == "CPUExecutionProvider"
    expected_first = (
        "CUDAExecutionProvider"
        if "CUDAExecutionProvider" in ort.get_available_providers()
        else "CPUExecutionProvider"
    )
    assert names[0] == expected_first


def test_warmup_runs_batch_one_and_max(make_repo: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = make_repo()
    backend = _backend(repo)
    backend.load(repo / "tiny_classifier" / "1", Device("cpu"))
    seen: list[dict[str, tuple[int, ...]]] = []
    real_infer = backend.infer

    def spy(inputs: Any) -> dict[str, np.ndarray]:
        seen.append({name: array.shape for name, array in inputs.items()})
        return real_infer(inputs)

    monkeypatch.setattr(backend, "infer", spy)
    backend.warmup()
    assert seen == [{"crops": (1, 3, 4, 4)}, {"crops": (8, 3, 4, 4)}]
    backend.close()
    with pytest.raises(ModelLoadError, match="is not loaded"):
        real_infer({"crops": np.zeros((1, 3, 4, 4), np.float32)})


def test_warmup_fills_dynamic_dims(make_repo: Any) -> None:
    repo = make_repo()
    config = load_config(repo / "tiny_roi" / "config.yaml")
    shapes = [zeros_like_spec(config, spec, 4).shape for spec in config.inputs]
    assert shapes == [(4, 1, 8), (4, 1)]
    backend = OnnxRuntimeBackend(config)
    backend.load(repo / "tiny_roi" / "1", Device("auto"))
    backend.warmup()
    assert backend.describe()["intra_op_num_threads"] == 0
    backend.close()


def test_warmup_failure_closes_the_backend(
    make_repo: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    closed: list[bool] = []

    def broken_warmup(self: OnnxRuntimeBackend) -> None:
        raise ModelLoadError("warm-up failed")

    monkeypatch.setattr(OnnxRuntimeBackend, "warmup", broken_warmup)
    monkeypatch.setattr(OnnxRuntimeBackend, "close", lambda self: closed.append(True))
    with caplog.at_level(logging.INFO), pytest.raises(ModelLoadError, match="warm-up failed"):
        ModelRepository(make_repo()).load("tiny_classifier")
    assert closed == [True]


def test_warmup_inference_failure_is_a_load_error(make_repo: Any) -> None:
    """A graph that only runs at batch 1 (a hard-coded reshape) fails warm-up at batch 8."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    repo = make_repo()
    artifact = repo / "tiny_classifier" / "1" / "model.onnx"
    inits = [
        numpy_helper.from_array(np.array([1, 48], dtype=np.int64), "shape"),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "minus_one"),
        numpy_helper.from_array(np.zeros((48, 8), np.float32), "w1"),
        numpy_helper.from_array(np.zeros((8, 3), np.float32), "w2"),
    ]
    # flat = reshape(reshape(crops, [1, 48]), [N, -1]): [N, 48 / N], which MatMul only
    # accepts at N = 1; the shapes stay symbolic, so the load-time checks pass.
    nodes = [
        helper.make_node("Reshape", ["crops", "shape"], ["one_row"]),
        helper.make_node("Shape", ["crops"], ["crops_shape"], end=1),
        helper.make_node("Concat", ["crops_shape", "minus_one"], ["batch_shape"], axis=0),
        helper.make_node("Reshape", ["one_row", "batch_shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w1"], ["features"]),
        helper.make_node("MatMul", ["features", "w2"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "batch_one_only",
        [helper.make_tensor_value_info("crops", TensorProto.FLOAT, ["N", 3, 4, 4])],
        [
            helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 3]),
            helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 8]),
        ],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(artifact))
    with pytest.raises(ModelLoadError) as info:
        ModelRepository(repo).load("tiny_classifier")
    assert str(info.value).startswith(f"{artifact}: the warm-up inference at batch 8 failed (")
    assert "\n" not in str(info.value)


def test_inter_op_threads_and_graph_level_settings(
    make_repo: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnxruntime as ort

    repo = make_repo()
    monkeypatch.setenv("PAPSCAN_INTER_OP_THREADS", "2")
    monkeypatch.setenv("PAPSCAN_ORT_GRAPH_OPTIMIZATION", "basic")
    options = _backend(repo)._session_options(ort)
    assert options.inter_op_num_threads == 2
    assert options.execution_mode == ort.ExecutionMode.ORT_PARALLEL
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    with ModelRepository(repo).load("tiny_classifier") as model:
        described = model.describe()
    assert (described["inter_op_num_threads"], described["graph_optimization"]) == (2, "basic")
    monkeypatch.setenv("PAPSCAN_ORT_GRAPH_OPTIMIZATION", "max")
    with pytest.raises(BackendUnavailableError) as info:
        ModelRepository(repo).load("tiny_classifier")
    assert str(info.value) == (
        "PAPSCAN_ORT_GRAPH_OPTIMIZATION must be one of disable, basic, extended, all, got 'max'"
    )
    monkeypatch.setenv("PAPSCAN_ORT_GRAPH_OPTIMIZATION", "all")
    monkeypatch.setenv("PAPSCAN_INTER_OP_THREADS", "0")
    with pytest.raises(BackendUnavailableError, match=r"INTER_OP_THREADS must be an integer >= 1"):
        ModelRepository(repo).load("tiny_classifier")


class HostMemoryExposedAsDevice:
    """Host memory behind `__cuda_array_interface__`: drives the I/O-binding path on a CPU."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array
        self.__cuda_array_interface__ = {
            "shape": array.shape,
            "typestr": array.dtype.str,
            "data": (array.ctypes.data, False),
            "strides": None,
            "version": 3,
        }


def test_io_binding_binds_pointer_inputs_in_place(make_repo: Any) -> None:
    with ModelRepository(make_repo()).load("tiny_classifier", device="cpu") as model:
        crops = np.random.default_rng(0).normal(size=(5, 3, 4, 4)).astype(np.float32)
        want = model.infer({"crops": crops})
        # The CUDA path with device_type "cpu": same binding code, pointers into host memory.
        got = model.backend._run_bound({"crops": HostMemoryExposedAsDevice(crops)}, "cpu")
        mixed = model.backend._run_bound({"crops": crops}, "cpu")
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])
        np.testing.assert_array_equal(mixed[name], want[name])


def test_gpu_arrays_on_a_cpu_session_are_refused_in_one_sentence(make_repo: Any) -> None:
    with ModelRepository(make_repo()).load("tiny_classifier", device="cpu") as model:
        crops = np.zeros((2, 3, 4, 4), np.float32)
        with pytest.raises(ModelInputError) as info:
            model.infer({"crops": HostMemoryExposedAsDevice(crops)})
    assert str(info.value) == (
        "tiny_classifier: input(s) ['crops'] are in GPU memory but this ONNX Runtime "
        "session runs on the CPU; pass host arrays"
    )
