"""Ops that move elements without changing them: reshaping, permuting, indexing, joining and splitting, flipping,
rolling, repeating, padding, and the triangles and diagonal of matrices."""

from __future__ import annotations

import math

import numpy as np

from .. import backend
from ..tensor import Function, SliceGrad, Tensor, array_of
from .common import canonical_axes, scatter_added, sum_to


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
        return scatter_added(self.input_shape, self.index, grad)


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


def check_dim(op: str, a: Tensor, dim: int, extra: int = 0) -> int:
    """`dim` of `a` (of a result with `extra` more dimensions, for ops that insert one) as a non-negative int; an
    IndexError naming the valid range when it is out of range. A 0-d tensor accepts 0 and -1, as in PyTorch."""
    size = a.ndim + extra
    if type(dim) is int and -size <= dim < size:  # the common case, without canonical_axes' tuples
        return dim % size
    axes = canonical_axes(dim, size, op)  # 0-d tensors, NumPy integers, and the IndexError naming the range
    return axes[0] if axes else 0


def permute(a: Tensor, *axes) -> Tensor:
    if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
        axes = axes[0]
    axes = tuple(check_dim("permute", a, axis) for axis in axes)
    if sorted(axes) != list(range(a.ndim)):
        raise ValueError(f"permute: {axes} is not a permutation of the {a.ndim} dimensions of shape {a.shape}")
    return Permute.apply(a, axes=axes)


def transpose(a: Tensor, dim0: int = -2, dim1: int = -1) -> Tensor:
    """Swap two dimensions (PyTorch's transpose; the last two by default)."""
    if a.ndim < 2:
        return a
    axes = list(range(a.ndim))
    dim0, dim1 = check_dim("transpose", a, dim0), check_dim("transpose", a, dim1)
    axes[dim0], axes[dim1] = axes[dim1], axes[dim0]
    return Permute.apply(a, axes=tuple(axes))


swapaxes = transpose


def unsqueeze(a: Tensor, dim: int) -> Tensor:
    dim = check_dim("unsqueeze", a, dim, extra=1)
    return reshape(a, *a.shape[:dim], 1, *a.shape[dim:])


def squeeze(a: Tensor, dim=None) -> Tensor:
    """Remove dimensions of size 1 (all of them, or only `dim` if it has size 1)."""
    if dim is None:
        return reshape(a, *(n for n in a.shape if n != 1))
    dims = set(canonical_axes(dim, a.ndim, "squeeze"))
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
        index = tuple(array_of(part) for part in index)
    try:
        return GetItem.apply(a, index=index)
    except IndexError as error:
        raise IndexError(f"index {index!r} is invalid for a tensor of shape {a.shape}: {error}") from None


def cat(tensors, dim: int = 0, *, axis: int | None = None) -> Tensor:
    """Join tensors along an existing dimension."""
    tensors = list(tensors)
    if not tensors:
        raise ValueError("cat: needs at least one tensor")
    axis = check_dim("cat", tensors[0], dim if axis is None else axis)
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
    axis = check_dim("stack", tensors[0], dim if axis is None else axis, extra=1)
    return cat([unsqueeze(tensor, axis) for tensor in tensors], axis)


def split(a: Tensor, split_size_or_sections, dim: int = 0) -> tuple[Tensor, ...]:
    """PyTorch's split: an int gives chunks of that size (the last may be smaller); a list gives the sizes."""
    dim = check_dim("split", a, dim)
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
    length = a.shape[check_dim("chunk", a, dim)]
    return split(a, max(1, -(-length // chunks)), dim)


def flip(a: Tensor, dims) -> Tensor:
    """`a` with the order of elements reversed along each of `dims` (an int or a sequence)."""
    reversed_dims = canonical_axes(dims, a.ndim, "flip")
    return getitem(a, tuple(slice(None, None, -1) if axis in reversed_dims else slice(None) for axis in range(a.ndim)))


def roll(a: Tensor, shifts, dims=None) -> Tensor:
    """Shift elements by `shifts` along `dims`, wrapping around; without `dims`, along the flattened tensor."""
    if dims is None:
        return reshape(roll(flatten(a), shifts, 0), a.shape)
    shifts = (shifts,) if isinstance(shifts, int) else tuple(shifts)
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    if len(shifts) != len(dims):
        raise ValueError(f"roll: {len(shifts)} shifts for {len(dims)} dimensions")
    for shift, dim in zip(shifts, dims):
        dim = check_dim("roll", a, dim)
        length = a.shape[dim] if a.ndim else 1
        if length == 0 or shift % length == 0:
            continue
        # Rolling by s puts the last s elements first.
        tail, head = split(a, [length - shift % length, shift % length], dim)
        a = cat([head, tail], dim)
    return a


def repeat(a: Tensor, *repeats) -> Tensor:
    """torch.Tensor.repeat: `a` tiled repeats[i] times along dimension i; extra leading repeats add dimensions."""
    if len(repeats) == 1 and isinstance(repeats[0], (tuple, list)):
        repeats = repeats[0]
    repeats = tuple(int(n) for n in repeats)
    if len(repeats) < a.ndim:
        raise ValueError(f"repeat: {len(repeats)} repeats for a tensor of {a.ndim} dimensions (need at least {a.ndim})")
    if any(n < 0 for n in repeats):
        raise ValueError(f"repeat: repeats must be non-negative, got {repeats}")
    shape = (1,) * (len(repeats) - a.ndim) + a.shape
    # Each dimension of size n becomes (repeats, n): a broadcast copy, then merged back into repeats * n.
    interleaved = reshape(a, *(size for n in shape for size in (1, n)))
    copies = expand(interleaved, *(size for pair in zip(repeats, shape) for size in pair))
    return reshape(copies, *(r * n for r, n in zip(repeats, shape)))


def tile(a: Tensor, dims) -> Tensor:
    """torch.tile: like `repeat`, but fewer `dims` than dimensions repeat the last ones."""
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    return repeat(a, (1,) * (a.ndim - len(dims)) + dims)


def repeat_interleave(a: Tensor, repeats, dim: int | None = None) -> Tensor:
    """Each element (along `dim`, or of the flattened tensor) repeated `repeats` times: an int, or a tensor with one
    count per element (or a single count)."""
    if dim is None:
        a, dim = flatten(a), 0
    dim = check_dim("repeat_interleave", a, dim)
    if a.ndim == 0:
        a = reshape(a, 1)
    length = a.shape[dim]
    # The output's length depends on the counts, so they are read on the host (as PyTorch does without output_size).
    counts = np.asarray(repeats.numpy() if isinstance(repeats, Tensor) else repeats)
    if counts.dtype.kind not in "iu" or counts.ndim > 1:
        raise TypeError(f"repeat_interleave: repeats must be an int or a 1-D integer tensor, got {counts.dtype} of "
                        f"shape {counts.shape}")
    counts = counts.reshape(-1)
    if counts.size not in (1, length):
        raise ValueError(f"repeat_interleave: {counts.size} repeats for dimension {dim} of size {length}")
    if counts.size and counts.min() < 0:
        raise ValueError(f"repeat_interleave: repeats must be non-negative, got {counts.min()}")
    xp = backend.get_array_module(a.data)
    with backend.device_scope(a.device):
        positions = xp.repeat(xp.arange(length), counts.tolist() if counts.size == length else int(counts[0]))
    return getitem(a, (slice(None),) * dim + (positions,))


class Triangle(Function):
    def forward(self, a, diagonal: int, upper: bool):
        """(..., m, n) -> (..., m, n) with the elements below (upper) or above (lower) `diagonal` set to 0"""
        xp = backend.get_array_module(a)
        self.keep = xp.triu if upper else xp.tril
        self.diagonal = diagonal
        return self.keep(a, diagonal)

    def backward(self, grad):
        return self.keep(grad, self.diagonal)


def _triangle(op: str, a: Tensor, diagonal: int, upper: bool) -> Tensor:
    if a.ndim < 2:
        raise ValueError(f"{op}: needs a tensor of at least 2 dimensions, got shape {a.shape}")
    return Triangle.apply(a, diagonal=int(diagonal), upper=upper)


def tril(a: Tensor, diagonal: int = 0) -> Tensor:
    """The lower triangle of the last two dimensions: elements above `diagonal` (0 the main one, > 0 above) zeroed."""
    return _triangle("tril", a, diagonal, upper=False)


def triu(a: Tensor, diagonal: int = 0) -> Tensor:
    """The upper triangle of the last two dimensions: elements below `diagonal` (0 the main one, > 0 above) zeroed."""
    return _triangle("triu", a, diagonal, upper=True)


class Diag(Function):
    def forward(self, a, diagonal: int):
        """(n,) -> (n + |k|, n + |k|) with `a` on diagonal k; (m, n) -> (length of diagonal k,)"""
        self.input_shape, self.diagonal = a.shape, diagonal
        return backend.get_array_module(a).diag(a, diagonal)

    def backward(self, grad):
        xp = backend.get_array_module(grad)
        if len(self.input_shape) == 1:
            return xp.diag(grad, self.diagonal)  # taking diagonal k back out of the matrix
        full = xp.zeros(self.input_shape, dtype=grad.dtype)
        along = xp.arange(grad.shape[0])
        full[along + max(-self.diagonal, 0), along + max(self.diagonal, 0)] = grad
        return full


def diag(a: Tensor, diagonal: int = 0) -> Tensor:
    """A vector to the matrix with it on `diagonal` (0 the main one, > 0 above), or a matrix to that diagonal."""
    if a.ndim not in (1, 2):
        raise ValueError(f"diag: needs a 1-D or 2-D tensor, got shape {a.shape}")
    return Diag.apply(a, diagonal=int(diagonal))


class ConstantPad(Function):
    def forward(self, a, widths, value):
        """(..., n) -> (..., left + n + right) per padded dimension, the new elements `value`"""
        xp = backend.get_array_module(a)
        self.interior = tuple(slice(before, before + n) for (before, _), n in zip(widths, a.shape))
        return xp.pad(a, widths, mode="constant", constant_values=value)

    def backward(self, grad):
        return grad[self.interior]


PAD_MODES = {"constant": "constant", "reflect": "reflect", "replicate": "edge"}  # PyTorch's name -> NumPy's


def pad(a: Tensor, pad, mode: str = "constant", value: float = 0.0) -> Tensor:
    """F.pad: `pad` = (left, right) for the last dimension, then for the one before it, ...

    'constant' fills with `value` (negative widths crop); 'reflect' mirrors without repeating the edge; 'replicate'
    repeats the edge. Unlike PyTorch, the non-constant modes take any number of dimensions."""
    pad = tuple(int(width) for width in pad)
    if len(pad) % 2 or len(pad) > 2 * a.ndim:
        raise ValueError(f"pad: needs an even number of widths, at most 2 per dimension ({2 * a.ndim}), got {pad}")
    if mode not in PAD_MODES:
        raise ValueError(f"pad: mode must be one of {sorted(PAD_MODES)}, got {mode!r}")
    padded = a.ndim - len(pad) // 2
    widths = [(0, 0)] * padded + [(pad[2 * k], pad[2 * k + 1]) for k in reversed(range(len(pad) // 2))]
    if mode == "constant":
        if any(before < 0 or after < 0 for before, after in widths):
            crop = tuple(slice(max(-before, 0), n - max(-after, 0)) for (before, after), n in zip(widths, a.shape))
            a = getitem(a, crop)
        widths = tuple((max(before, 0), max(after, 0)) for before, after in widths)
        return ConstantPad.apply(a, widths=widths, value=value)
    for axis, (before, after) in enumerate(widths):
        size = a.shape[axis]
        too_wide = mode == "reflect" and max(before, after) >= size
        if min(before, after) < 0 or (before or after) and (size == 0 or too_wide):
            raise ValueError(f"pad: {mode} padding needs non-negative widths (for reflect, less than the size) of a "
                             f"non-empty dimension, got ({before}, {after}) for dimension {axis} of size {size}")
    # Padding copies existing elements: gather them through each padded axis's source positions, so the backward
    # adds every copy's gradient back onto its source.
    xp = backend.get_array_module(a.data)
    with backend.device_scope(a.device):
        sources = [xp.pad(xp.arange(n), width, mode=PAD_MODES[mode]) for n, width in zip(a.shape, widths)]
        index = xp.ix_(*sources)
    return getitem(a, index)


def meshgrid(*tensors, indexing: str = "ij") -> tuple[Tensor, ...]:
    """Coordinate grids from 1-D (or 0-d) tensors; 'ij' gives shape (n0, n1, ...), 'xy' swaps the first two."""
    if len(tensors) == 1 and isinstance(tensors[0], (tuple, list)):
        tensors = tuple(tensors[0])
    if indexing not in ("ij", "xy"):
        raise ValueError(f"meshgrid: indexing must be 'ij' or 'xy', got {indexing!r}")
    if any(tensor.ndim > 1 for tensor in tensors):
        raise ValueError(f"meshgrid: needs 0-d or 1-D tensors, got shapes {[t.shape for t in tensors]}")
    order = list(range(len(tensors)))
    if indexing == "xy" and len(tensors) > 1:
        order[0], order[1] = 1, 0
    shape = tuple(tensors[k].data.size for k in order)
    grids = []
    for k, tensor in enumerate(tensors):
        along = [1] * len(tensors)
        along[order.index(k)] = tensor.data.size
        grids.append(expand(reshape(tensor, *along), *shape))
    return tuple(grids)
