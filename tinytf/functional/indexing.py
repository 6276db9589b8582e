"""Gathers and scatters by integer index tensors, as in PyTorch: gather / scatter and their reductions along one
dimension, index_select / index_add of whole slices, masked_select and nonzero.

A gather's backward is a scatter-add (an element read several times gets the sum of its gradients), and a
scatter-add's backward is a gather: the two are each other's adjoint. Like PyTorch, these ops take indices in
[0, size) only; a negative or too large index is an IndexError naming it and the range.
"""

from __future__ import annotations

import math

import numpy as np

from .. import backend
from ..tensor import Function, Tensor
from .common import computes_in_float32, scatter_added
from .shape import check_dim, expand, flatten, getitem, reshape


def _coordinates(index, dim: int) -> tuple:
    """The full index of the elements that `index` addresses along `dim`: position p of `index` stands for the
    element (p_0, ..., index[p], ..., p_last), as in torch.gather and torch.scatter."""
    xp = backend.get_array_module(index)
    coordinates = []
    for axis, size in enumerate(index.shape):
        if axis == dim:
            coordinates.append(index)
        else:
            along = [1] * index.ndim
            along[axis] = size
            coordinates.append(xp.arange(size).reshape(along))
    return tuple(coordinates)


def _leading(shape: tuple[int, ...]) -> tuple[slice, ...]:
    """The leading block of that shape: the part of a larger `src` that an `index` of this shape reads."""
    return tuple(slice(0, n) for n in shape)


def _gathered_into(grad, coordinates, index_shape, src_shape):
    """d(loss)/d(src) of a scatter from `src`: the gradient at each element's target, zero where `index` does not
    reach into `src`."""
    xp = backend.get_array_module(grad)
    values = grad[coordinates]
    if index_shape == src_shape:
        return values
    full = xp.zeros(src_shape, dtype=grad.dtype)
    full[_leading(index_shape)] = values
    return full


class Gather(Function):
    def forward(self, a, index, dim: int):
        """(..., n, ...) input, (..., k, ...) index -> (..., k, ...): out[p] = a[p with p[dim] = index[p]]"""
        self.coordinates, self.input_shape = _coordinates(index, dim), a.shape
        return a[self.coordinates]

    def backward(self, grad):
        return scatter_added(self.input_shape, self.coordinates, grad)


class Scatter(Function):
    def forward(self, a, src, index, dim: int):
        """(..., n, ...) input, (..., k, ...) index and src -> input's shape: out[p with p[dim] = index[p]] = src[p]"""
        self.coordinates, self.index_shape, self.src_shape = _coordinates(index, dim), index.shape, src.shape
        out = a.copy()
        out[self.coordinates] = src[_leading(index.shape)]
        return out

    def backward(self, grad):
        # Like PyTorch, every src element gets the gradient of its target, which is exact for distinct indices.
        grad_input = None
        if self.needs_input_grad[0]:
            grad_input = grad.copy()
            grad_input[self.coordinates] = 0  # overwritten elements do not reach the output
        return grad_input, _gathered_into(grad, self.coordinates, self.index_shape, self.src_shape)


def _multiply_at(out, coordinates, values) -> None:
    """out[coordinates] *= values, each repeat of a target multiplying again: multiply.at, which CuPy lacks. Round r
    takes every target's r-th occurrence, so within a round no target repeats and plain indexing is exact."""
    xp = backend.get_array_module(out)
    flat = xp.ravel_multi_index(xp.broadcast_arrays(*coordinates), out.shape).reshape(-1)
    values = values.reshape(-1)
    order = xp.argsort(flat)
    sorted_targets = flat[order]
    first_of_target = xp.searchsorted(sorted_targets, sorted_targets, side="left")
    occurrence = xp.empty_like(order)
    occurrence[order] = xp.arange(order.size) - first_of_target
    flat_out = out.reshape(-1)  # a view: `out` is contiguous, made by the caller
    for round_ in range(int(occurrence.max()) + 1 if occurrence.size else 0):
        chosen = occurrence == round_
        flat_out[flat[chosen]] *= values[chosen]


def _identity(reduce: str, dtype):
    """The value a reduction starts from when it leaves the input out."""
    if reduce in ("sum", "mean"):
        return 0
    if reduce == "prod":
        return 1
    if backend.is_floating(dtype):
        return -math.inf if reduce == "amax" else math.inf
    return np.iinfo(dtype).min if reduce == "amax" else np.iinfo(dtype).max


@computes_in_float32
class ScatterReduce(Function):
    def forward(self, a, src, index, dim: int, reduce: str, include_self: bool):
        """(..., n, ...) input, (..., k, ...) index and src -> input's shape: each src element reduced into
        out[p with p[dim] = index[p]], which starts from the input (include_self) or from the reduction's identity"""
        xp = backend.get_array_module(a)
        coordinates = _coordinates(index, dim)
        values = src[_leading(index.shape)]
        out = a.copy()
        if not include_self:
            out[coordinates] = _identity(reduce, a.dtype)
        if reduce in ("sum", "mean"):
            xp.add.at(out, coordinates, values)
        elif reduce == "prod":
            _multiply_at(out, coordinates, values)
        else:
            (xp.maximum if reduce == "amax" else xp.minimum).at(out, coordinates, values)
        count = None
        if reduce == "mean":
            count = xp.ones(a.shape, dtype=a.dtype)  # the input counts once, where it is included
            if not include_self:
                count[coordinates] = 0
            xp.add.at(count, coordinates, 1)
            out = out / count if backend.is_floating(a.dtype) else out // count  # PyTorch floors integer means
        self.save_for_backward(a, values, out, count)
        self.coordinates, self.index_shape, self.src_shape = coordinates, index.shape, src.shape
        self.reduce, self.include_self = reduce, include_self
        return out

    def backward(self, grad):
        """grad_input = grad * w_input and grad_src = grad[target] * w_src, with the weights d out / d element:
        1 for sum; 1 / count for mean; for amax / amin, the share of an element equal to the result among all equal
        ones (PyTorch splits the gradient evenly between ties); for prod, the product of the other factors."""
        a, values, out, count = self.saved_tensors
        xp = backend.get_array_module(grad)
        coordinates = self.coordinates
        if self.reduce in ("sum", "mean"):
            weight_input = 1 if count is None else 1 / count
            weight_src = 1 if count is None else weight_input[coordinates]
        elif self.reduce in ("amax", "amin"):
            winners_input = (a == out).astype(grad.dtype)
            if not self.include_self:
                winners_input[coordinates] = 0
            winners_src = (values == out[coordinates]).astype(grad.dtype)
            ties = winners_input.copy()
            xp.add.at(ties, coordinates, winners_src)
            ties = xp.maximum(ties, 1)  # elements no source reaches: their own input is the only winner
            weight_input, weight_src = winners_input / ties, winners_src / ties[coordinates]
        else:
            weight_input, weight_src = self._product_of_others(a, values, xp)
        grad_input = grad * weight_input
        if not self.include_self:
            grad_input[coordinates] = 0  # the replaced input elements do not reach the output
        grad_src = _gathered_into(grad, coordinates, self.index_shape, self.src_shape)
        if not isinstance(weight_src, int):
            grad_src[_leading(self.index_shape)] *= weight_src
        return grad_input, grad_src

    def _product_of_others(self, a, values, xp):
        """For each factor of each target's product, the product of the other factors, exact with zeros: the product
        of the non-zero factors divided by this one, or, for a zero, that product if it is the only zero."""
        coordinates = self.coordinates
        factors = a.copy()
        if not self.include_self:
            factors[coordinates] = 1
        nonzero_product = xp.where(factors == 0, 1, factors)
        _multiply_at(nonzero_product, coordinates, xp.where(values == 0, 1, values))
        zeros = (factors == 0).astype(a.dtype)
        xp.add.at(zeros, coordinates, (values == 0).astype(a.dtype))

        def others(factor, product, zero_count):
            without = product / xp.where(factor == 0, 1, factor)
            return xp.where(factor == 0, xp.where(zero_count == 1, product, 0), xp.where(zero_count == 0, without, 0))

        return others(factors, nonzero_product, zeros), others(values, nonzero_product[coordinates], zeros[coordinates])


class IndexSelect(Function):
    def forward(self, a, index, dim: int):
        """(..., n, ...) input, (k,) index -> (..., k, ...): the slices index[0], index[1], ... along `dim`"""
        self.index, self.dim, self.input_shape = index, dim, a.shape
        return backend.get_array_module(a).take(a, index, axis=dim)

    def backward(self, grad):
        return scatter_added(self.input_shape, (slice(None),) * self.dim + (self.index,), grad)


def _add_slices(target, dim: int, index, slices):
    """`target` with slices[..., k, ...] added to its slice index[k] along `dim`, repeats accumulating."""
    backend.get_array_module(target).add.at(target, (slice(None),) * dim + (index,), slices)
    return target


@computes_in_float32
class IndexAdd(Function):
    def forward(self, a, source, index, dim: int, alpha):
        """(..., n, ...) input, (k,) index, (..., k, ...) source -> input's shape, source's slices added at index"""
        self.index, self.dim, self.alpha = index, dim, alpha
        return _add_slices(a.copy(), dim, index, source * alpha)

    def backward(self, grad):
        return grad, backend.get_array_module(grad).take(grad, self.index, axis=self.dim) * self.alpha


def _index_array(op: str, index, a: Tensor):
    """`index` (a Tensor, a NumPy array or nested lists) as an integer array on `a`'s device."""
    if not isinstance(index, Tensor):
        index = Tensor(backend.to_device(np.asarray(index), a.device))
    elif index.device != a.device:
        raise RuntimeError(f"{op}: the index is on {index.device}, the input on {a.device}")
    if index.dtype.kind not in "iu":
        raise TypeError(f"{op}: index must be an integer tensor, got dtype {index.dtype}")
    return index.data


def _check_range(op: str, index, size: int, dim: int) -> None:
    """IndexError naming the first index outside [0, size), as PyTorch refuses negative indices here too."""
    if index.size == 0:
        return
    low, high = int(index.min()), int(index.max())
    if low < 0 or high >= size:
        raise IndexError(f"{op}: index {low if low < 0 else high} is out of range for dimension {dim} of size {size} "
                         f"(expected a value in [0, {size - 1}])")


def _as_1d(a: Tensor) -> Tensor:
    """A 0-d tensor as one element along dimension 0, as PyTorch treats a scalar in the index ops."""
    return reshape(a, 1) if a.ndim == 0 else a


def _prepare_scatter(op: str, a: Tensor, dim: int, index, src: Tensor | None = None):
    """Check the operands of gather / scatter ops; returns (dim, index array, its shape), 0-d operands counting as
    1-D."""
    dim = check_dim(op, a, dim)
    index = _index_array(op, index, a)
    index_shape = index.shape or (1,)
    if len(index_shape) != max(a.ndim, 1):
        raise ValueError(f"{op}: index has {index.ndim} dimensions, the input {a.ndim}: they must be equal")
    shape = a.shape or (1,)
    too_large = [axis for axis, n in enumerate(index_shape) if axis != dim and n > shape[axis]]
    if src is not None:
        if src.dtype != a.dtype:
            raise TypeError(f"{op}: src has dtype {src.dtype}, the input {a.dtype}: they must be equal")
        src_shape = src.shape or (1,)
        too_large += [axis for axis, n in enumerate(index_shape)
                      if len(src_shape) != len(index_shape) or n > src_shape[axis]]
    if too_large:
        raise ValueError(f"{op}: index of shape {index.shape} is larger than the input {a.shape}"
                         + (f" or src {src.shape}" if src is not None else "") + f" outside dimension {dim}")
    with backend.device_scope(a.device):  # CuPy checks and reshapes on the current device
        _check_range(op, index, shape[dim], dim)
        return dim, index.reshape(index_shape), index.shape


def gather(input: Tensor, dim: int, index) -> Tensor:
    """out[i][j][k] = input[index[i][j][k]][j][k] (dim = 0): the index's shape, with index.size(d) <= input.size(d)
    outside `dim`."""
    dim, index_data, index_shape = _prepare_scatter("gather", input, dim, index)
    return reshape(Gather.apply(_as_1d(input), index=index_data, dim=dim), index_shape)


def scatter(input: Tensor, dim: int, index, src=None, *, value=None) -> Tensor:
    """A copy of `input` with input[index[i][j][k]][j][k] = src[i][j][k] (dim = 0); `src` may be a tensor or a
    scalar (or pass `value=`). With a repeated index, which write wins is unspecified, as in PyTorch."""
    if (src is None) == (value is None):
        raise TypeError("scatter: pass exactly one of src (a tensor or a scalar) and value")
    if not isinstance(src, Tensor):  # a scalar fills every target
        index_shape = _index_array("scatter", index, input).shape
        with backend.device_scope(input.device):
            src = Tensor(backend.get_array_module(input.data).full(index_shape, value if src is None else src,
                                                                   dtype=input.dtype))
    dim, index_data, _ = _prepare_scatter("scatter", input, dim, index, src)
    return reshape(Scatter.apply(_as_1d(input), _as_1d(src), index=index_data, dim=dim), input.shape)


REDUCTIONS = ("sum", "prod", "mean", "amax", "amin")


def scatter_reduce(input: Tensor, dim: int, index, src: Tensor, reduce: str, *, include_self: bool = True) -> Tensor:
    """A copy of `input` where each src[i][j][k] is reduced ('sum', 'prod', 'mean', 'amax', 'amin') into
    input[index[i][j][k]][j][k] (dim = 0), the input's own element included unless include_self=False."""
    if reduce not in REDUCTIONS:
        raise ValueError(f"scatter_reduce: reduce must be one of {REDUCTIONS}, got {reduce!r}")
    dim, index_data, _ = _prepare_scatter("scatter_reduce", input, dim, index, src)
    out = ScatterReduce.apply(_as_1d(input), _as_1d(src), index=index_data, dim=dim, reduce=reduce,
                              include_self=bool(include_self))
    return reshape(out, input.shape)


def scatter_add(input: Tensor, dim: int, index, src: Tensor) -> Tensor:
    """A copy of `input` with src[i][j][k] added to input[index[i][j][k]][j][k] (dim = 0); repeats accumulate."""
    return scatter_reduce(input, dim, index, src, "sum")


def _prepare_slices(op: str, a: Tensor, dim: int, index):
    """Check the operands of index_select / index_add; returns (dim, 1-D index array)."""
    dim = check_dim(op, a, dim)
    index = _index_array(op, index, a)
    if index.ndim > 1 or a.ndim == 0 and index.size != 1:
        raise ValueError(f"{op}: index must be 0-d or 1-D (one element for a 0-d input), got shape {index.shape}")
    with backend.device_scope(a.device):  # CuPy checks and reshapes on the current device
        _check_range(op, index, (a.shape or (1,))[dim], dim)
        return dim, index.reshape(-1)


def index_select(input: Tensor, dim: int, index) -> Tensor:
    """The slices of `input` along `dim` at the positions in the 1-D `index`, in its order (repeats allowed)."""
    dim, index_data = _prepare_slices("index_select", input, dim, index)
    out = IndexSelect.apply(_as_1d(input), index=index_data, dim=dim)
    return reshape(out, ()) if input.ndim == 0 else out


def index_add(input: Tensor, dim: int, index, source: Tensor, *, alpha=1) -> Tensor:
    """A copy of `input` with alpha * source's k-th slice along `dim` added to its slice index[k]; repeats add up."""
    dim, index_data = _prepare_slices("index_add", input, dim, index)
    expected = tuple(index_data.size if axis == dim else n for axis, n in enumerate(input.shape or (1,)))
    if (source.shape or (1,)) != expected:
        raise ValueError(f"index_add: source has shape {source.shape}, expected {expected} for an input of shape "
                         f"{input.shape} and {index_data.size} indices along dimension {dim}")
    if source.dtype != input.dtype:
        raise TypeError(f"index_add: source has dtype {source.dtype}, the input {input.dtype}: they must be equal")
    out = IndexAdd.apply(_as_1d(input), _as_1d(source), index=index_data, dim=dim, alpha=alpha)
    return reshape(out, input.shape)


def take_along_dim(input: Tensor, indices, dim: int | None = None) -> Tensor:
    """torch.take_along_dim: gather along `dim` after broadcasting `indices` and `input` against each other outside
    it; without `dim`, from the flattened input."""
    if not isinstance(indices, Tensor):
        indices = Tensor(_index_array("take_along_dim", indices, input))
    if dim is None:
        return gather(flatten(input), 0, flatten(indices))
    dim = check_dim("take_along_dim", input, dim)
    if indices.ndim != input.ndim:
        raise ValueError(f"take_along_dim: indices have {indices.ndim} dimensions, the input {input.ndim}")
    operands = (_as_1d(input), _as_1d(indices))
    try:
        outside = np.broadcast_shapes(*(t.shape[:dim] + t.shape[dim + 1 :] for t in operands))
    except ValueError:
        raise ValueError(f"take_along_dim: shapes {input.shape} and {indices.shape} do not broadcast outside dimension "
                         f"{dim}") from None
    source, positions = (expand(t, *outside[:dim], t.shape[dim], *outside[dim:]) for t in operands)
    gathered = gather(source, dim, positions)
    return reshape(gathered, indices.shape) if input.ndim == 0 else gathered


def masked_select(input: Tensor, mask) -> Tensor:
    """The elements of `input` where the boolean `mask` is True, as a 1-D tensor (the two broadcast together)."""
    mask = mask.data if isinstance(mask, Tensor) else backend.to_device(np.asarray(mask), input.device)
    if mask.dtype != bool:
        raise TypeError(f"masked_select: mask must be boolean, got dtype {mask.dtype}")
    try:
        shape = np.broadcast_shapes(input.shape, mask.shape)
    except ValueError:
        raise ValueError(f"masked_select: mask of shape {mask.shape} does not broadcast with input {input.shape}"
                         ) from None
    return getitem(expand(input, *shape), backend.get_array_module(mask).broadcast_to(mask, shape))


def nonzero(input: Tensor, *, as_tuple: bool = False):
    """Positions of the non-zero elements: an int64 tensor (count, ndim), or with as_tuple one 1-D tensor per
    dimension (a 0-d input counts as 1-D). Not differentiable."""
    xp = backend.get_array_module(input.data)
    with backend.device_scope(input.device):
        positions = [axis.astype(xp.int64) for axis in xp.nonzero(_as_1d(input).data)]
        if as_tuple:
            return tuple(Tensor(axis) for axis in positions)
        count = positions[0].size
        return Tensor(xp.stack(positions, axis=1) if input.ndim else xp.zeros((count, 0), dtype=xp.int64))
