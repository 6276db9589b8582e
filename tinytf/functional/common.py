"""Helpers shared by the ops: broadcasting gradients back, Python scalars as tensors, PyTorch's type promotion, axis
checks, and the tricks the tuned ops share (cache-sized row blocks, one scratch block reused by every block, row sums
by a matrix-vector product, row maxima by a halving tree).

Type promotion follows PyTorch, not NumPy, so that float32 never turns into float64 silently:
- categories rank bool < integer < floating; an operand of a higher category decides the result's dtype
  (int64 tensor + float32 tensor -> float32; int64 tensor + Python float -> float32, the default float dtype);
- within one category, a tensor with dimensions decides over a 0-d one (float32 tensor + float64 0-d -> float32),
  and two tensors of the same kind of rank promote as NumPy does (float32 + float64 -> float64, int8 + uint8 -> int16);
- a Python scalar takes the tensor's dtype (a float scalar with an integer or bool tensor: the default float dtype);
- floating functions of integer or bool tensors (exp, sin, true division, ...) compute in the default float dtype.
bfloat16 is a floating dtype like the others here (bfloat16 + float16 -> float32, bfloat16 + float32 -> float32,
bfloat16 + int64 -> bfloat16, bfloat16 + Python float -> bfloat16), although NumPy's dtype.kind calls it "V".

Half precision (float16, bfloat16) is stored and returned as such, but the ops that accumulate or chain many steps
compute in float32 and round once at the end, as PyTorch's kernels do: `computes_in_float32` below.
"""

from __future__ import annotations

import numpy as np

from .. import backend
from ..tensor import Tensor
from ..threads import get_num_threads, run_on_workers


def sum_to(grad, shape: tuple[int, ...]):
    """Sum `grad` over the axes that broadcasting added or stretched, so it has `shape` again.

    If y = broadcast(x), each element of x feeds every copy of itself in y, so dL/dx sums dL/dy over the copies.
    Half precision sums in float32 and rounds once.
    """
    if grad.shape == shape:
        return grad
    leading = grad.ndim - len(shape)
    stretched = tuple(leading + axis for axis, size in enumerate(shape) if size == 1 and grad.shape[leading + axis] != 1)
    summed = grad.sum(axis=tuple(range(leading)) + stretched, keepdims=True, dtype=backend.compute_dtype(grad.dtype))
    return summed.astype(grad.dtype, copy=False).reshape(shape)


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


# Blocks a worker thread must get before a blocked loop is split between threads: with fewer, handing work to the
# pool costs more than the second core saves (bench/NOTES.md).
MIN_BLOCKS_PER_THREAD = 2


def map_row_blocks(work, array) -> list:
    """[work(run) for each run of consecutive row_blocks(array)], the runs shared out to the worker threads
    (threads.run_on_workers): one run per thread, contiguous so that each thread streams its own part of memory.
    `work` must only write its own blocks' rows (and may allocate its own scratch); results come back in order, for
    the caller to combine (per-thread partial sums, say). Arrays of a few blocks, and GPU arrays, run as one run on
    the calling thread."""
    blocks = row_blocks(array)
    if len(blocks) <= 1:  # the common case of small arrays, without the pool's bookkeeping
        return [work(blocks)] if blocks else []
    n_threads = min(get_num_threads(), len(blocks) // MIN_BLOCKS_PER_THREAD) or 1
    per_thread = -(-len(blocks) // n_threads)
    return run_on_workers(work, [blocks[start : start + per_thread] for start in range(0, len(blocks), per_thread)],
                          n_threads)


def block_scratch(array, blocks: list[slice]):
    """An uninitialized buffer the size of `array`'s first (largest) block, for a blocked loop to reuse in every
    block instead of allocating a temporary per block; `blocks` is row_blocks(array), empty for an empty array."""
    return backend.get_array_module(array).empty_like(array[blocks[0]] if blocks else array)


def row_sum_vector(width: int, dtype, xp, scale: float = 1.0):
    """The vector v with rows @ v == scale * rows.sum(axis=-1) (scale = 1 / width gives row means): BLAS runs that
    matrix-vector product in one vectorized pass over a block, where NumPy's sum(axis=-1) is slow on short rows."""
    return xp.full(width, scale, dtype=dtype)


# Rows up to this wide get their maxima from row_max's halving tree; on wider rows NumPy's max(axis=-1) has enough
# elements per row to amortise its cost per row, and the tree stops paying. With fewer rows than the minimum, the
# tree's log2(C) calls cost more than max's loop calls (bench/NOTES.md).
ROW_MAX_TREE_WIDTH = 128
ROW_MAX_TREE_MIN_ROWS = 128


def row_max_study(a):
    """The maximum of each row of `a` (..., C), as (..., 1): NaN where a row holds one; the reference for row_max."""
    return a.max(axis=-1, keepdims=True)


def row_max(a):
    """row_max_study(a), exactly, faster on NumPy's short rows: NumPy's max(axis=-1) runs one inner loop per row,
    whose cost per call dominates on rows of a few dozen elements. A halving tree instead takes the maximum of each
    even and odd element of the flat array in one long strided loop, which halves every row at once, and repeats
    until one element per row is left (an odd width pairs the rows' halves, row by row, and folds the last column
    in). Maxima are exact and maximum propagates NaN, so the order of the comparisons changes nothing. Wide rows,
    few rows and GPU arrays (where max(axis=-1) is one kernel, the tree one per level) take the study version."""
    width = a.shape[-1] if a.ndim else 1
    if backend.is_cupy_array(a) or not 1 < width <= ROW_MAX_TREE_WIDTH or a.size < ROW_MAX_TREE_MIN_ROWS * width:
        return row_max_study(a)
    xp = backend.get_array_module(a)
    level = a.reshape(-1, width)
    while width > 1:
        half = width // 2
        if width % 2:
            pairs = xp.maximum(level[:, :half], level[:, half : 2 * half])
            xp.maximum(pairs[:, 0], level[:, -1], out=pairs[:, 0])
        else:
            flat = level.reshape(-1)  # a copy only if a's rows are not contiguous
            pairs = xp.maximum(flat[0::2], flat[1::2]).reshape(-1, half)
        level, width = pairs, half
    return level.reshape(a.shape[:-1] + (1,))


def stable_max(a, axis):
    """The maxima of `a` over `axis` (an int, a tuple of ints or None), kept as size-1 axes, for shifting before exp:
    rows of only -inf get 0, so they give exp(-inf) = 0, not NaN. Over the last axis alone by row_max."""
    xp = backend.get_array_module(a)
    last = a.ndim - 1
    maxima = row_max(a) if a.ndim and axis in (-1, last, (last,)) else a.max(axis=axis, keepdims=True)
    return xp.where(xp.isfinite(maxima), maxima, 0)


def as_tensor(value, like: Tensor) -> Tensor:
    """`value` as a Tensor on `like`'s device; Python scalars take `like`'s dtype (NumPy 2 would otherwise upcast)."""
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (float, int)):  # bool is an int
        dtype = like.dtype
        if type(value) is float and not backend.is_floating(dtype):
            dtype = backend.DEFAULT_DTYPE
        elif type(value) is int and dtype == bool:
            dtype = np.dtype(np.int64)
        scalar = dtype.type(value)
        return Tensor(scalar if type(like.data) is np.ndarray else backend.to_device(scalar, like.device))
    return Tensor(backend.to_device(value, like.device))


def _category(dtype) -> int:
    if backend.is_floating(dtype):
        return 2
    return {"b": 0, "i": 1, "u": 1}.get(np.dtype(dtype).kind, 3)


def promoted_dtype(a: Tensor, b: Tensor) -> np.dtype:
    """The dtype PyTorch gives a binary op of `a` and `b` (the rules in this module's docstring)."""
    if a.dtype == b.dtype:
        return a.dtype
    category_a, category_b = _category(a.dtype), _category(b.dtype)
    if category_a != category_b:
        return a.dtype if category_a > category_b else b.dtype
    if (a.ndim == 0) != (b.ndim == 0):
        return b.dtype if a.ndim == 0 else a.dtype
    return np.promote_types(a.dtype, b.dtype)


def floating(a: Tensor) -> Tensor:
    """`a` itself if it is floating, else `a` in the default float dtype: the input of a floating function."""
    if backend.is_floating(a.dtype):
        return a
    with backend.device_scope(a.device):  # CuPy converts on its current device: make it the tensor's
        return Tensor(a.data.astype(backend.DEFAULT_DTYPE))  # integers carry no gradient


def computes_in_float32(function_class):
    """Class decorator for a Function whose arithmetic accumulates or chains many steps: for float16 and bfloat16
    inputs, Function.apply runs a variant of it that widens them to float32 for forward and backward and rounds each
    result once, to the inputs' dtype (the output) or to each input's dtype (its gradient): float32 accumulation, as in
    PyTorch's kernels. Half arrays among the keyword parameters (class weights, say) are widened too. Other dtypes run
    the class itself, untouched: the float32 path pays nothing."""
    forward, backward = function_class.forward, function_class.backward

    class HalfPrecision(function_class):
        def forward(self, *arrays, **params):
            self.input_dtypes = tuple(array.dtype for array in arrays)
            half = next(dtype for dtype in self.input_dtypes if backend.is_half(dtype))
            params = {name: _widened(value) for name, value in params.items()}
            out = forward(self, *[_widened(array) for array in arrays], **params)
            return out.astype(half) if backend.is_floating(out.dtype) else out

        def backward(self, grad):
            grads = backward(self, _widened(grad))
            if not isinstance(grads, tuple):
                return grads.astype(self.input_dtypes[0], copy=False)
            return tuple(None if g is None else g.astype(dtype, copy=False)
                         for g, dtype in zip(grads, self.input_dtypes))

    HalfPrecision.__name__ = HalfPrecision.__qualname__ = function_class.__name__  # as grad_fn shows it
    HalfPrecision.__doc__ = function_class.__doc__
    function_class.half_precision_variant = HalfPrecision
    return function_class


def scatter_added(shape: tuple[int, ...], index, values):
    """zeros(shape) with `values` added at `index`, an index that may name an element several times (each adds):
    the backward of a gather. Half precision is summed in float32 and rounded once."""
    xp = backend.get_array_module(values)
    compute = backend.compute_dtype(values.dtype)
    total = xp.zeros(shape, dtype=compute)
    xp.add.at(total, index, values.astype(compute, copy=False))
    return total.astype(values.dtype, copy=False)


def _widened(value):
    """A float16 or bfloat16 array as float32; anything else as it is."""
    dtype = getattr(value, "dtype", None)  # arrays, and parameters that are not (numbers, windows, scalar types)
    return value.astype(backend.DEFAULT_DTYPE) if isinstance(dtype, np.dtype) and backend.is_half(dtype) else value


def canonical_axes(axis, ndim: int, op: str) -> tuple[int, ...] | None:
    """`axis` (None, an int or a sequence of ints, negative counting from the end) as sorted non-negative axes, or
    None for all of them. A 0-d tensor accepts the axes 0 and -1, as PyTorch does, and has no axes to reduce (()).
    An axis out of range is an IndexError naming the range, as in PyTorch and NumPy."""
    if axis is None:
        return None
    axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
    extent = max(ndim, 1)
    for value in axes:
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
            raise TypeError(f"{op}: axes must be integers, got {value!r}")
        if not -extent <= value < extent:
            raise IndexError(f"{op}: dimension {value} is out of range for a tensor of {ndim} dimensions "
                             f"(expected a value in [{-extent}, {extent - 1}])")
    if ndim == 0:
        return ()
    normalized = sorted(int(value) % ndim for value in axes)
    if len(set(normalized)) != len(normalized):
        raise ValueError(f"{op}: the dimension {axis!r} names an axis twice")
    return tuple(normalized)


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
    if keepdims or not input_shape:  # a 0-d input loses no axis
        return grad
    axes = (axis,) if isinstance(axis, int) else axis
    axes = sorted(a % len(input_shape) for a in axes)
    shape = list(grad.shape)
    for a in axes:
        shape.insert(a, 1)
    return grad.reshape(shape)
