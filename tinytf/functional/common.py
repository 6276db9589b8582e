"""Helpers shared by the ops: broadcasting gradients back, Python scalars as tensors, and the tricks the tuned ops
share (cache-sized row blocks, one scratch block reused by every block, row sums by a matrix-vector product)."""

from __future__ import annotations

import numpy as np

from .. import backend
from ..tensor import Tensor


def sum_to(grad, shape: tuple[int, ...]):
    """Sum `grad` over the axes that broadcasting added or stretched, so it has `shape` again.

    If y = broadcast(x), each element of x feeds every copy of itself in y, so dL/dx sums dL/dy over the copies.
    """
    if grad.shape == shape:
        return grad
    leading = grad.ndim - len(shape)
    stretched = tuple(leading + axis for axis, size in enumerate(shape) if size == 1 and grad.shape[leading + axis] != 1)
    grad = grad.sum(axis=tuple(range(leading)) + stretched, keepdims=True)
    return grad.reshape(shape)


# Fused ops run their chain of in-place passes one block of rows at a time: a block of this size stays in the L2
# cache for the whole chain, where whole arrays would stream every pass through memory. Much smaller blocks lose
# again, to Python's cost per ufunc call.
BLOCK_BYTES = 256 * 1024


def row_blocks(array) -> list[slice]:
    """Slices of `array`'s first axis, each about BLOCK_BYTES of rows; a single slice for a GPU array, whose kernels
    gain nothing from host-cache blocking."""
    rows = array.shape[0]
    if backend.is_cupy_array(array):
        return [slice(0, rows)]
    per_block = max(1, BLOCK_BYTES // max(1, array.itemsize * (array.size // max(rows, 1))))
    return [slice(start, min(start + per_block, rows)) for start in range(0, rows, per_block)]


def block_scratch(array, blocks: list[slice]):
    """An uninitialized buffer the size of `array`'s first (largest) block, for a blocked loop to reuse in every
    block instead of allocating a temporary per block; `blocks` is row_blocks(array), empty for an empty array."""
    return backend.get_array_module(array).empty_like(array[blocks[0]] if blocks else array)


def row_sum_vector(width: int, dtype, xp, scale: float = 1.0):
    """The vector v with rows @ v == scale * rows.sum(axis=-1) (scale = 1 / width gives row means): BLAS runs that
    matrix-vector product in one vectorized pass over a block, where NumPy's sum(axis=-1) is slow on short rows."""
    return xp.full(width, scale, dtype=dtype)


def as_tensor(value, like: Tensor) -> Tensor:
    """`value` as a Tensor on `like`'s device; Python scalars take `like`'s dtype (NumPy 2 would otherwise upcast)."""
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (float, int)):  # bool is an int
        dtype = like.dtype
        if type(value) is float and dtype.kind != "f":
            dtype = backend.DEFAULT_DTYPE
        elif type(value) is int and dtype == bool:
            dtype = np.dtype(np.int64)
        scalar = dtype.type(value)
        return Tensor(scalar if type(like.data) is np.ndarray else backend.to_device(scalar, like.device))
    return Tensor(backend.to_device(value, like.device))


def normalize_axis(axis=None, dim=None, keepdims=None, keepdim=None):
    """Accept NumPy's (`axis`, `keepdims`) and PyTorch's (`dim`, `keepdim`) spellings; returns (axis, keepdims)."""
    if axis is not None and dim is not None:
        raise TypeError("pass either axis= or dim=, not both")
    if keepdims is not None and keepdim is not None:
        raise TypeError("pass either keepdims= or keepdim=, not both")
    axis = dim if axis is None else axis
    if isinstance(axis, list):
        axis = tuple(axis)
    return axis, bool(keepdims if keepdims is not None else keepdim)


def expand_reduced(grad, input_shape: tuple[int, ...], axis, keepdims: bool):
    """Reinsert the axes a reduction removed, so `grad` broadcasts against the reduction's input."""
    if axis is None:
        return grad.reshape((1,) * len(input_shape)) if not keepdims else grad
    if keepdims:
        return grad
    axes = (axis,) if isinstance(axis, int) else axis
    axes = sorted(a % len(input_shape) for a in axes)
    shape = list(grad.shape)
    for a in axes:
        shape.insert(a, 1)
    return grad.reshape(shape)
