"""Reductions over axes. Each accepts NumPy's (`axis`, `keepdims`) and PyTorch's (`dim`, `keepdim`) spellings."""

from __future__ import annotations

from .. import backend
from ..tensor import Function, Tensor
from .common import expand_reduced, normalize_axis


def _reduced_count(shape: tuple[int, ...], axis) -> int:
    """How many elements each output element of a reduction over `axis` combines."""
    axes = range(len(shape)) if axis is None else (axis,) if isinstance(axis, int) else axis
    count = 1
    for single in axes:
        count *= shape[single]
    return count


def _check_axis(op: str, a: Tensor, axis) -> None:
    axes = () if axis is None else (axis,) if isinstance(axis, int) else axis
    for single in axes:
        if not isinstance(single, int) or not -a.ndim <= single < (a.ndim or 1):
            raise ValueError(f"{op}: axis {axis} is out of range for a tensor of shape {a.shape}")


class Sum(Function):
    def forward(self, a, axis, keepdims: bool):
        """(...) -> (...) with `axis` removed (or kept as size 1)"""
        self.reduction = a.shape, axis, keepdims
        return a.sum(axis=axis, keepdims=keepdims)

    def backward(self, grad):
        shape, axis, keepdims = self.reduction
        xp = backend.get_array_module(grad)
        return xp.broadcast_to(expand_reduced(grad, shape, axis, keepdims), shape)


class Mean(Function):
    def forward(self, a, axis, keepdims: bool):
        out = a.mean(axis=axis, keepdims=keepdims)
        self.reduction = a.shape, axis, keepdims
        self.count = _reduced_count(a.shape, axis)
        return out

    def backward(self, grad):
        shape, axis, keepdims = self.reduction
        xp = backend.get_array_module(grad)
        return xp.broadcast_to(expand_reduced(grad, shape, axis, keepdims) / self.count, shape)


class Extreme(Function):
    """max or min over axes; ties share the gradient equally (the subgradient PyTorch's amax uses)."""

    def forward(self, a, axis, keepdims: bool, take_max: bool):
        out = a.max(axis=axis, keepdims=keepdims) if take_max else a.min(axis=axis, keepdims=keepdims)
        self.save_for_backward(a, out)
        self.reduction = axis, keepdims
        return out

    def backward(self, grad):
        a, out = self.saved_tensors
        axis, keepdims = self.reduction
        hits = a == expand_reduced(out, a.shape, axis, keepdims)
        share = hits / hits.sum(axis=axis, keepdims=True)
        return (expand_reduced(grad, a.shape, axis, keepdims) * share).astype(grad.dtype)


class LogSumExp(Function):
    def forward(self, a, axis, keepdims: bool):
        xp = backend.get_array_module(a)
        row_max = a.max(axis=axis, keepdims=True)
        row_max = xp.where(xp.isfinite(row_max), row_max, 0)
        out = xp.log(xp.exp(a - row_max).sum(axis=axis, keepdims=True)) + row_max
        self.save_for_backward(a, out)
        self.reduction = axis, keepdims
        return out if keepdims else out.squeeze(axis=axis)

    def backward(self, grad):
        a, out = self.saved_tensors
        axis, keepdims = self.reduction
        xp = backend.get_array_module(a)
        # d logsumexp / d a_j = softmax_j
        return expand_reduced(grad, a.shape, axis, keepdims) * xp.exp(a - out)


def _reduce(op: str, function, a: Tensor, axis, dim, keepdims, keepdim, **params) -> Tensor:
    axis, keepdims = normalize_axis(axis, dim, keepdims, keepdim)
    _check_axis(op, a, axis)
    return function.apply(a, axis=axis, keepdims=keepdims, **params)


def sum(a: Tensor, axis=None, keepdims=None, *, dim=None, keepdim=None) -> Tensor:
    return _reduce("sum", Sum, a, axis, dim, keepdims, keepdim)


def mean(a: Tensor, axis=None, keepdims=None, *, dim=None, keepdim=None) -> Tensor:
    if not backend.is_floating(a.dtype):
        raise TypeError(f"mean: needs a floating-point tensor, got dtype {a.dtype}")
    return _reduce("mean", Mean, a, axis, dim, keepdims, keepdim)


def _check_not_empty(op: str, a: Tensor) -> None:
    if a.data.size == 0:
        raise ValueError(f"{op}: cannot reduce an empty tensor of shape {a.shape}")


def max(a: Tensor, axis=None, keepdims=None, *, dim=None, keepdim=None) -> Tensor:
    """Largest values over axes (values only; use argmax for the indices)."""
    _check_not_empty("max", a)
    return _reduce("max", Extreme, a, axis, dim, keepdims, keepdim, take_max=True)


def min(a: Tensor, axis=None, keepdims=None, *, dim=None, keepdim=None) -> Tensor:
    _check_not_empty("min", a)
    return _reduce("min", Extreme, a, axis, dim, keepdims, keepdim, take_max=False)


def logsumexp(a: Tensor, axis=None, keepdims=None, *, dim=None, keepdim=None) -> Tensor:
    return _reduce("logsumexp", LogSumExp, a, axis, dim, keepdims, keepdim)


def var(a: Tensor, axis=None, keepdims=None, *, dim=None, keepdim=None, correction=None, ddof=None) -> Tensor:
    """Variance: sum((a - mean)^2) / (N - correction).

    The default correction is 1 (PyTorch's unbiased estimate); pass `ddof=0` or `correction=0` for NumPy's default.
    """
    if correction is not None and ddof is not None:
        raise TypeError("var: pass either correction= or ddof=, not both")
    correction = 1 if correction is None and ddof is None else (correction if ddof is None else ddof)
    axis, keepdims = normalize_axis(axis, dim, keepdims, keepdim)
    _check_axis("var", a, axis)
    centered = a - a.mean(axis=axis, keepdims=True)
    count = _reduced_count(a.shape, axis)
    return (centered * centered).sum(axis=axis, keepdims=keepdims) / (count - correction)


def argmax(a: Tensor, axis=None, keepdims=None, *, dim=None, keepdim=None) -> Tensor:
    """Index of the largest value (over the flattened tensor when no axis is given); not differentiable."""
    axis, keepdims = normalize_axis(axis, dim, keepdims, keepdim)
    _check_not_empty("argmax", a)
    if axis is not None and not isinstance(axis, int):
        raise ValueError(f"argmax: axis must be a single int, got {axis}")
    _check_axis("argmax", a, axis)
    return Tensor(a.data.argmax(axis=axis, keepdims=keepdims))
