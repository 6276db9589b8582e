"""Ops that move elements without changing them: reshaping, permuting, indexing, joining and splitting."""

from __future__ import annotations

import math

from .. import backend
from ..tensor import Function, SliceGrad, Tensor
from .common import sum_to


class Reshape(Function):
    def forward(self, a, shape):
        self.input_shape = a.shape
        return a.reshape(shape)

    def backward(self, grad):
        return grad.reshape(self.input_shape)


class Permute(Function):
    def forward(self, a, axes):
        self.axes = axes
        return a.transpose(axes)

    def backward(self, grad):
        inverse = [0] * len(self.axes)
        for position, axis in enumerate(self.axes):
            inverse[axis] = position
        return grad.transpose(inverse)


class Expand(Function):
    def forward(self, a, shape):
        self.input_shape = a.shape
        return backend.get_array_module(a).broadcast_to(a, shape)

    def backward(self, grad):
        return sum_to(grad, self.input_shape)


class GetItem(Function):
    def forward(self, a, index):
        self.index = index
        self.input_shape = a.shape
        return a[index]

    def backward(self, grad):
        if not _is_advanced(self.index):
            return SliceGrad(self.index, grad, self.input_shape)  # the engine places it
        # An index array may name one element several times; each occurrence adds its gradient.
        full = backend.get_array_module(grad).zeros(self.input_shape, dtype=grad.dtype)
        backend.get_array_module(grad).add.at(full, self.index, grad)
        return full


class Concatenate(Function):
    def forward(self, *arrays, axis: int):
        self.sizes = [array.shape[axis] for array in arrays]
        self.axis = axis
        return backend.get_array_module(*arrays).concatenate(arrays, axis=axis)

    def backward(self, grad):
        xp = backend.get_array_module(grad)
        boundaries = list(_running_sum(self.sizes))[:-1]
        return tuple(xp.split(grad, boundaries, axis=self.axis))


def _running_sum(values):
    total = 0
    for value in values:
        total += value
        yield total


def _is_advanced(index) -> bool:
    """True when NumPy would use advanced (copying, possibly repeating) indexing for `index`."""
    parts = index if isinstance(index, tuple) else (index,)
    return any(hasattr(part, "shape") or isinstance(part, (list, bool)) for part in parts)


def _resolve_shape(op: str, a: Tensor, shape) -> tuple[int, ...]:
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = shape[0]
    shape = tuple(int(n) for n in shape)
    known = math.prod(n for n in shape if n != -1)
    if shape.count(-1) > 1 or (shape.count(-1) == 0 and known != a.data.size) or (
        shape.count(-1) == 1 and (known == 0 or a.data.size % known)
    ):
        raise ValueError(f"{op}: cannot reshape a tensor of shape {a.shape} ({a.data.size} elements) into {shape}")
    return shape


def reshape(a: Tensor, *shape) -> Tensor:
    """A tensor with the same elements in `shape` (one entry may be -1); `reshape(2, 3)` or `reshape((2, 3))`."""
    shape = _resolve_shape("reshape", a, shape)
    return a if shape == a.shape else Reshape.apply(a, shape=shape)


view = reshape


def flatten(a: Tensor, start_dim: int = 0, end_dim: int = -1) -> Tensor:
    if a.ndim == 0:
        return reshape(a, 1)
    start, end = start_dim % a.ndim, end_dim % a.ndim
    return reshape(a, *a.shape[:start], -1, *a.shape[end + 1 :])


def _check_dim(op: str, a: Tensor, dim: int, extra: int = 0) -> int:
    size = a.ndim + extra
    if not isinstance(dim, int) or not -size <= dim < (size or 1):
        raise ValueError(f"{op}: dimension {dim} is out of range for a tensor of shape {a.shape}")
    return dim % size if size else 0


def permute(a: Tensor, *axes) -> Tensor:
    if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
        axes = axes[0]
    axes = tuple(_check_dim("permute", a, axis) for axis in axes)
    if sorted(axes) != list(range(a.ndim)):
        raise ValueError(f"permute: {axes} is not a permutation of the {a.ndim} dimensions of shape {a.shape}")
    return Permute.apply(a, axes=axes)


def transpose(a: Tensor, dim0: int = -2, dim1: int = -1) -> Tensor:
    """Swap two dimensions (PyTorch's transpose; the last two by default)."""
    if a.ndim < 2:
        return a
    axes = list(range(a.ndim))
    dim0, dim1 = _check_dim("transpose", a, dim0), _check_dim("transpose", a, dim1)
    axes[dim0], axes[dim1] = axes[dim1], axes[dim0]
    return Permute.apply(a, axes=tuple(axes))


swapaxes = transpose


def unsqueeze(a: Tensor, dim: int) -> Tensor:
    dim = _check_dim("unsqueeze", a, dim, extra=1)
    return reshape(a, *a.shape[:dim], 1, *a.shape[dim:])


def squeeze(a: Tensor, dim=None) -> Tensor:
    """Remove dimensions of size 1 (all of them, or only `dim` if it has size 1)."""
    if dim is None:
        return reshape(a, *(n for n in a.shape if n != 1))
    dims = {_check_dim("squeeze", a, d) for d in ((dim,) if isinstance(dim, int) else dim)}
    return reshape(a, *(n for i, n in enumerate(a.shape) if not (i in dims and n == 1)))


def expand(a: Tensor, *shape) -> Tensor:
    """Broadcast to `shape` without copying; -1 keeps a dimension."""
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = shape[0]
    offset = len(shape) - a.ndim
    if offset < 0:
        raise ValueError(f"expand: cannot expand shape {a.shape} to fewer dimensions {tuple(shape)}")
    shape = tuple(a.shape[i - offset] if n == -1 else int(n) for i, n in enumerate(shape))
    for i, n in enumerate(a.shape):
        if n != 1 and n != shape[i + offset]:
            raise ValueError(f"expand: cannot expand shape {a.shape} to {shape}")
    return a if shape == a.shape else Expand.apply(a, shape=shape)


def getitem(a: Tensor, index) -> Tensor:
    """NumPy indexing: ints, slices, None, Ellipsis, boolean masks and integer arrays (a gather)."""
    if isinstance(index, Tensor):
        index = index.data
    elif isinstance(index, tuple):
        index = tuple(part.data if isinstance(part, Tensor) else part for part in index)
    try:
        return GetItem.apply(a, index=index)
    except IndexError as error:
        raise IndexError(f"index {index!r} is invalid for a tensor of shape {a.shape}: {error}") from None


def cat(tensors, dim: int = 0, *, axis: int | None = None) -> Tensor:
    """Join tensors along an existing dimension."""
    tensors = list(tensors)
    if not tensors:
        raise ValueError("cat: needs at least one tensor")
    axis = _check_dim("cat", tensors[0], dim if axis is None else axis)
    for tensor in tensors[1:]:
        if tensor.ndim != tensors[0].ndim or any(
            n != m for i, (n, m) in enumerate(zip(tensor.shape, tensors[0].shape)) if i != axis
        ):
            shapes = ", ".join(str(t.shape) for t in tensors)
            raise ValueError(f"cat: shapes {shapes} differ outside dimension {axis}")
    return Concatenate.apply(*tensors, axis=axis)


def stack(tensors, dim: int = 0, *, axis: int | None = None) -> Tensor:
    """Join tensors of one shape along a new dimension."""
    tensors = list(tensors)
    if not tensors:
        raise ValueError("stack: needs at least one tensor")
    if any(tensor.shape != tensors[0].shape for tensor in tensors):
        raise ValueError(f"stack: all tensors need one shape, got {', '.join(str(t.shape) for t in tensors)}")
    axis = _check_dim("stack", tensors[0], dim if axis is None else axis, extra=1)
    return cat([unsqueeze(tensor, axis) for tensor in tensors], axis)


def split(a: Tensor, split_size_or_sections, dim: int = 0) -> tuple[Tensor, ...]:
    """PyTorch's split: an int gives chunks of that size (the last may be smaller); a list gives the sizes."""
    dim = _check_dim("split", a, dim)
    length = a.shape[dim]
    if isinstance(split_size_or_sections, int):
        if split_size_or_sections <= 0:
            raise ValueError(f"split: chunk size must be positive, got {split_size_or_sections}")
        sizes = [min(split_size_or_sections, length - start) for start in range(0, length, split_size_or_sections)]
    else:
        sizes = list(split_size_or_sections)
        if sum(sizes) != length:
            raise ValueError(f"split: sizes {sizes} add up to {sum(sizes)}, but dimension {dim} has size {length}")
    pieces, start = [], 0
    for size in sizes:
        index = (slice(None),) * dim + (slice(start, start + size),)
        pieces.append(getitem(a, index))
        start += size
    return tuple(pieces)


def chunk(a: Tensor, chunks: int, dim: int = 0) -> tuple[Tensor, ...]:
    """Split into `chunks` pieces of equal size (the last may be smaller), as PyTorch."""
    if chunks <= 0:
        raise ValueError(f"chunk: number of chunks must be positive, got {chunks}")
    length = a.shape[_check_dim("chunk", a, dim)]
    return split(a, max(1, -(-length // chunks)), dim)
