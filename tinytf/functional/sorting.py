"""Sorting and selection along one dimension: sort, argsort, topk, median, as PyTorch names and returns them.

Each op finds indices without gradient (a stable sort), then takes the values at those indices with indexing's
`Gather`, whose backward adds each output's gradient to the element it took: gradients flow to the selected elements
only. NaN sorts as the largest value, as in PyTorch.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .. import backend
from ..tensor import Function, Tensor
from .common import canonical_axes, normalize_axis
from .indexing import Gather
from .shape import reshape


class ValuesIndices(NamedTuple):
    """What sort, topk, median(dim), cummax and cummin return, as PyTorch's torch.return_types: unpacks as a pair."""

    values: Tensor
    indices: Tensor


def single_dim(op: str, axis, dim, default=None) -> int:
    """One dimension from PyTorch's `dim` or NumPy's `axis` (`default` when neither is given), as an int."""
    axis, _ = normalize_axis(axis, dim)
    axis = default if axis is None else axis
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"{op}: dim must be one int, got {axis!r}")
    return axis


def along_dim(op: str, a: Tensor, dim: int, compute):
    """compute(a, axis) with `dim` checked (an IndexError when out of range); a 0-d tensor, which PyTorch lets these
    ops treat as one element along dim 0 or -1, goes in as a 1-element vector and its results come back 0-d."""
    axes = canonical_axes(dim, a.ndim, op)
    if a.ndim > 0:
        return compute(a, axes[0])
    result = compute(reshape(a, 1), 0)
    if isinstance(result, ValuesIndices):
        return ValuesIndices(reshape(result.values, ()), reshape(result.indices, ()))
    return reshape(result, ())


def _stable_argsort(data, axis: int, descending: bool):
    """Indices that sort `data` along `axis`, equal elements in their original order."""
    xp = backend.get_array_module(data)
    if not descending:
        return xp.argsort(data, axis=axis, kind="stable")
    # Negating would break unsigned and bool data and put NaN last. Sorting the reversed data and reversing the
    # result instead gives descending order with NaN first and ties back in their original order.
    reversed_order = xp.argsort(xp.flip(data, axis), axis=axis, kind="stable")
    return data.shape[axis] - 1 - xp.flip(reversed_order, axis)


def sort(a: Tensor, dim=None, descending: bool = False, stable: bool = False, *, axis=None) -> ValuesIndices:
    """(values, indices) of `a` sorted along `dim` (default -1). Always stable: equal elements keep their order, so
    `stable` only mirrors PyTorch's signature."""

    def compute(a: Tensor, axis: int) -> ValuesIndices:
        with backend.device_scope(a.device):
            indices = _stable_argsort(a.data, axis, descending)
        return ValuesIndices(Gather.apply(a, index=indices, dim=axis), Tensor(indices))

    return along_dim("sort", a, single_dim("sort", axis, dim, -1), compute)


def argsort(a: Tensor, dim=None, descending: bool = False, stable: bool = False, *, axis=None) -> Tensor:
    """The int64 indices that sort `a` along `dim` (default -1), stably; not differentiable."""
    return sort(a, dim, descending, stable, axis=axis).indices


def topk(a: Tensor, k: int, dim=None, largest: bool = True, sorted: bool = True, *, axis=None) -> ValuesIndices:
    """(values, indices) of the k largest (or smallest) elements along `dim` (default -1), in order; of equal
    elements the earlier comes first. Results are always sorted, so `sorted` only mirrors PyTorch's signature."""
    dim = single_dim("topk", axis, dim, -1)
    smallest_k = 1 if a.ndim == 0 else 0  # a 0-d result holds exactly one element

    def compute(a: Tensor, axis: int) -> ValuesIndices:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not smallest_k <= k <= a.shape[axis]:
            raise ValueError(f"topk: k={k!r} is out of range for dimension {dim} of size {a.shape[axis]}")
        with backend.device_scope(a.device):
            order = _stable_argsort(a.data, axis, descending=largest)
            indices = order[(slice(None),) * axis + (slice(0, k),)]  # the first k along `axis`
        return ValuesIndices(Gather.apply(a, index=indices, dim=axis), Tensor(indices))

    return along_dim("topk", a, dim, compute)


def _lower_median_position(data, axis: int):
    """Where the median sits in `data` sorted along `axis` (kept as size 1): the lower of the two middle elements,
    or the first NaN (NaN sorts last), since one NaN makes the median NaN, as in PyTorch."""
    xp = backend.get_array_module(data)
    nan_count = xp.isnan(data).sum(axis=axis, keepdims=True)
    return xp.where(nan_count > 0, data.shape[axis] - nan_count, (data.shape[axis] - 1) // 2)


class MedianOfAll(Function):
    def forward(self, a):
        """(...) -> (): the lower median of all elements (NaN if there are none, or if one is NaN)"""
        xp = backend.get_array_module(a)
        flat = a.reshape(-1)
        if flat.size == 0:
            out = xp.full((), xp.nan, dtype=a.dtype)
        else:
            out = xp.sort(flat)[_lower_median_position(flat, 0)].reshape(())
        self.save_for_backward(a, out)
        return out

    def backward(self, grad):
        # As PyTorch: elements equal to the median share its gradient (a subgradient that does not depend on order).
        a, out = self.saved_tensors
        xp = backend.get_array_module(a)
        hits = (a == out) | (xp.isnan(a) & xp.isnan(out))
        return (grad * hits / hits.sum()).astype(grad.dtype)


def median(a: Tensor, dim=None, keepdim=None, *, axis=None, keepdims=None):
    """Without `dim`: the lower median of all elements, a 0-d tensor. With `dim`: (values, indices) of the lower
    median along it, (...) -> (...) with `dim` removed (or kept as size 1); the index is that of the median in a
    stable sort, so the first of equal elements. A NaN anywhere along `dim` makes the median NaN, as in PyTorch."""
    dim, keepdim = normalize_axis(axis, dim, keepdims, keepdim)
    if dim is None:
        return MedianOfAll.apply(a)

    def compute(a: Tensor, axis: int) -> ValuesIndices:
        if a.shape[axis] == 0:
            raise ValueError(f"median: cannot take the median over an empty dimension of a tensor of shape {a.shape}")
        with backend.device_scope(a.device):
            xp = backend.get_array_module(a.data)
            order = _stable_argsort(a.data, axis, descending=False)
            indices = xp.take_along_axis(order, _lower_median_position(a.data, axis), axis)
        values, indices = Gather.apply(a, index=indices, dim=axis), Tensor(indices)
        if keepdim:
            return ValuesIndices(values, indices)
        reduced_shape = a.shape[:axis] + a.shape[axis + 1 :]
        return ValuesIndices(reshape(values, reduced_shape), reshape(indices, reduced_shape))

    return along_dim("median", a, single_dim("median", None, dim), compute)
