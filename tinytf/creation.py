"""Creating tensors: from data, filled, ranges, identity matrices, triangle indices and random draws (one seeded
generator per device)."""

from __future__ import annotations

import contextlib

import numpy as np

from . import backend
from .tensor import Tensor


@contextlib.contextmanager
def _allocating_on(device: str):
    """The array module for `device`, with that device current: CuPy allocates and computes on its current one."""
    device = backend.check_device(device)
    with backend.device_scope(device):
        yield np if device == "cpu" else backend.cupy_module()


def _shape(shape) -> tuple[int, ...]:
    """zeros(2, 3) and zeros((2, 3)) both mean shape (2, 3)."""
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = shape[0]
    return tuple(int(n) for n in shape)


def _finish(array, dtype, requires_grad: bool, device: str) -> Tensor:
    if dtype is not None:
        array = array.astype(backend.as_dtype(dtype), copy=False)
    if backend.device_of(array) != backend.canonical_device(device):
        array = backend.to_device(array, device)
    return Tensor(array, requires_grad=requires_grad)


def tensor(data, dtype=None, requires_grad: bool = False, device: str = "cpu") -> Tensor:
    """A new tensor holding a copy of `data` (nested lists, scalars, NumPy/CuPy arrays or a Tensor).

    Python floats become the default dtype (float32), Python ints int64; arrays keep their dtype.
    """
    if isinstance(data, Tensor):
        data = data.data
    with _allocating_on(device):  # a CuPy array's copy lands on the current device: the one asked for
        if backend.is_cupy_array(data) or isinstance(data, (np.ndarray, np.generic)):
            array = data.copy() if not isinstance(data, np.generic) else np.asarray(data)
        else:
            array = np.array(data)
            if array.dtype == np.float64 and dtype is None:  # with a dtype given, _finish rounds once, to it
                array = array.astype(backend.DEFAULT_DTYPE)
        if array.dtype == object or (array.dtype.kind in "USV" and not backend.is_floating(array.dtype)):
            raise TypeError(
                f"tensor(): cannot make a numeric tensor from {type(data).__name__} data of dtype {array.dtype}"
            )
        return _finish(array, dtype, requires_grad, device)


def zeros(*shape, dtype=None, requires_grad: bool = False, device: str = "cpu") -> Tensor:
    with _allocating_on(device) as xp:
        return _finish(xp.zeros(_shape(shape), dtype=backend.as_dtype(dtype or backend.DEFAULT_DTYPE)), None, requires_grad, device)


def ones(*shape, dtype=None, requires_grad: bool = False, device: str = "cpu") -> Tensor:
    with _allocating_on(device) as xp:
        return _finish(xp.ones(_shape(shape), dtype=backend.as_dtype(dtype or backend.DEFAULT_DTYPE)), None, requires_grad, device)


def full(shape, fill_value, dtype=None, requires_grad: bool = False, device: str = "cpu") -> Tensor:
    if dtype is None:
        dtype = backend.DEFAULT_DTYPE if isinstance(fill_value, float) else np.asarray(fill_value).dtype
    with _allocating_on(device) as xp:
        return _finish(xp.full(_shape((shape,)), fill_value, dtype=backend.as_dtype(dtype)), None, requires_grad,
                       device)


def arange(start, end=None, step=1, dtype=None, requires_grad: bool = False, device: str = "cpu") -> Tensor:
    """Like torch.arange: integers give int64, any float argument gives the default float dtype."""
    if end is None:
        start, end = 0, start
    if dtype is None:
        is_float = any(isinstance(value, float) for value in (start, end, step))
        dtype = backend.DEFAULT_DTYPE if is_float else np.int64
    dtype = backend.as_dtype(dtype)
    with _allocating_on(device) as xp:
        # Half precision counts in float32 and rounds each value once, as PyTorch does.
        values = xp.arange(start, end, step, dtype=backend.compute_dtype(dtype))
        return _finish(values, dtype, requires_grad, device)


def eye(n: int, m: int | None = None, dtype=None, requires_grad: bool = False, device: str = "cpu") -> Tensor:
    """The (n, m) matrix (m = n by default) with ones on the main diagonal and zeros elsewhere."""
    with _allocating_on(device) as xp:
        array = xp.eye(n, n if m is None else m, dtype=backend.as_dtype(dtype or backend.DEFAULT_DTYPE))
        return _finish(array, None, requires_grad, device)


def linspace(start, end, steps: int, dtype=None, requires_grad: bool = False, device: str = "cpu") -> Tensor:
    """`steps` evenly spaced values from `start` to `end`, both included; integer dtypes truncate, as in PyTorch."""
    if steps < 0:
        raise ValueError(f"linspace: steps must be non-negative, got {steps}")
    with _allocating_on(device) as xp:
        # Computed in float64 and then cast, so float32 results are the nearest values to the exact ones.
        array = xp.linspace(start, end, steps, dtype=np.float64)
        return _finish(array, dtype or backend.DEFAULT_DTYPE, requires_grad, device)


def _triangle_indices(row: int, col: int, offset: int, upper: bool, dtype, device: str) -> Tensor:
    dtype = backend.as_dtype(dtype or np.int64)
    if dtype.kind not in "iu":
        raise TypeError(f"{'triu' if upper else 'tril'}_indices: dtype must be an integer type, got {dtype}")
    with _allocating_on(device) as xp:
        rows, cols = (xp.triu_indices if upper else xp.tril_indices)(row, offset, col)
        return _finish(xp.stack([rows, cols]), dtype, False, device)


def tril_indices(row: int, col: int, offset: int = 0, dtype=None, device: str = "cpu") -> Tensor:
    """(2, N): the row and column of each element of the lower triangle of a (row, col) matrix, row by row; `offset`
    moves the diagonal that bounds it (> 0 above the main one)."""
    return _triangle_indices(row, col, offset, False, dtype, device)


def triu_indices(row: int, col: int, offset: int = 0, dtype=None, device: str = "cpu") -> Tensor:
    """(2, N): the row and column of each element of the upper triangle of a (row, col) matrix, row by row; `offset`
    moves the diagonal that bounds it (> 0 above the main one)."""
    return _triangle_indices(row, col, offset, True, dtype, device)


def randn(*shape, dtype=None, requires_grad: bool = False, device: str = "cpu") -> Tensor:
    """Standard normal draws from the device's seeded generator (half precision: float32 draws, rounded)."""
    dtype = backend.as_dtype(dtype or backend.DEFAULT_DTYPE)
    with _allocating_on(device):
        draws = backend.generator(device).standard_normal(_shape(shape), dtype=backend.compute_dtype(dtype))
        return _finish(draws, dtype, requires_grad, device)


def rand(*shape, dtype=None, requires_grad: bool = False, device: str = "cpu") -> Tensor:
    """Uniform draws in [0, 1) from the device's seeded generator (half precision: float32 draws, rounded)."""
    dtype = backend.as_dtype(dtype or backend.DEFAULT_DTYPE)
    with _allocating_on(device) as xp:
        draws = backend.generator(device).random(_shape(shape), dtype=backend.compute_dtype(dtype))
        if backend.is_half(dtype):  # a draw just below 1 rounds up to 1: keep the interval half-open
            draws = xp.minimum(draws.astype(dtype), dtype.type(1 - backend.finfo(dtype).epsneg))
        return _finish(draws, dtype, requires_grad, device)


def _like(maker):
    def made_like(other: Tensor, dtype=None, requires_grad: bool = False, device: str | None = None, **kwargs):
        return maker(
            other.shape,
            dtype=dtype or other.dtype,
            requires_grad=requires_grad,
            device=device or other.device,
            **kwargs,
        )

    made_like.__name__ = maker.__name__ + "_like"
    made_like.__doc__ = f"`{maker.__name__}` with the shape, dtype and device of another tensor."
    return made_like


zeros_like = _like(zeros)
ones_like = _like(ones)
randn_like = _like(randn)
rand_like = _like(rand)


def full_like(other: Tensor, fill_value, dtype=None, requires_grad: bool = False, device: str | None = None) -> Tensor:
    return full(other.shape, fill_value, dtype=dtype or other.dtype, requires_grad=requires_grad,
                device=device or other.device)


manual_seed = backend.manual_seed
