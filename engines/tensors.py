"""Arrays a model accepts: host numpy arrays, or device arrays used in place.

A device array is anything exposing `__cuda_array_interface__` (DALI's TensorGPU,
PyTorch CUDA tensors, CuPy): the GPU backends read its pointer and use the memory where
it lies, so a batch DALI decoded on the GPU never travels through the host. Everything
papscan needs of an array — shape, dtype, where it is — comes through this module, so
`engines` never imports a GPU library to check one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class CudaArrayView:
    """What `__cuda_array_interface__` says of a device array (version 2 or 3).

    Attributes:
        shape: The array's shape.
        dtype: Its numpy dtype.
        pointer: The device address of its first element.
        contiguous: Whether it is C-contiguous (GPU backends need that).
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    pointer: int
    contiguous: bool


def is_device_array(array: Any) -> bool:
    """Whether `array` lives in GPU memory and says so through `__cuda_array_interface__`."""
    return hasattr(array, "__cuda_array_interface__")


def cuda_view(array: Any) -> CudaArrayView:
    """The shape, dtype, pointer and contiguity of a device array."""
    interface = array.__cuda_array_interface__
    shape = tuple(int(d) for d in interface["shape"])
    dtype = np.dtype(interface["typestr"])
    strides = interface.get("strides")
    contiguous = strides is None or tuple(strides) == _c_strides(shape, dtype.itemsize)
    return CudaArrayView(shape, dtype, int(interface["data"][0]), contiguous)


def shape_and_dtype(array: Any) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of a numpy or device array."""
    if is_device_array(array) and not isinstance(array, np.ndarray):
        view = cuda_view(array)
        return view.shape, view.dtype
    return tuple(array.shape), np.dtype(array.dtype)


def _c_strides(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    strides = []
    step = itemsize
    for dim in reversed(shape):
        strides.append(step)
        step *= dim
    return tuple(reversed(strides))
