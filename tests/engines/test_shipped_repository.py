"""Every model shipped in engines/repository loads, warms up and runs one inference."""

from __future__ import annotations

import numpy as np
import pytest

from engines.backends.base import zeros_like_spec
from engines.repository import ModelRepository, default_repository_path


def _shipped_models() -> list[str]:
    path = default_repository_path()
    if not path.is_dir():
        return []
    return ModelRepository(path).model_names()


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    _shipped_models()
    or [pytest.param(None, marks=pytest.mark.skip(reason="engines/repository ships no model yet"))],
)
def test_shipped_model_loads_and_runs(name: str) -> None:
    repo = ModelRepository(default_repository_path())
    assert repo.versions(name), f"{name} has no served version"
    with repo.load(name, warmup=True) as model:
        config = model.config
        batch = 2 if config.is_batched else None
        # Ones, not zeros: an all-zero ROI cell mask means "no real cell" (softmax of nothing).
        inputs = {
            spec.name: np.ones_like(zeros_like_spec(config, spec, batch)) for spec in config.inputs
        }
        outputs = model.infer(inputs)
        assert set(outputs) == {spec.name for spec in config.outputs}
        for spec in config.outputs:
            array = outputs[spec.name]
            assert array.dtype == spec.dtype
            assert array.ndim == len(config.full_shape(spec))
            if batch is not None:
                assert array.shape[0] == batch
            if array.dtype.kind == "f":
                assert np.isfinite(array).all(), f"{name}: {spec.name} has NaN or inf"
