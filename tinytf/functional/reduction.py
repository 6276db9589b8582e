"""Reductions over axes. Each accepts NumPy's (`axis`, `keepdims`) and PyTorch's (`dim`, `keepdim`) spellings; an
axis may be an int, a tuple of ints or None (all axes), and a 0-d tensor accepts the axes 0 and -1, as in PyTorch.

Integer and bool inputs follow PyTorch: sum and prod give int64, argmax/argmin int64, any/all bool, and the
floating statistics (mean, var, std, norm) refuse them with a TypeError.
"""

from __future__ import annotations

import math
import numpy as np

from .. import backend
from ..tensor import Function, Tensor
from .arithmetic import cast, sqrt
from .common import canonical_axes, computes_in_float32, expand_reduced, floating, normalize_axis, stable_max
from .shape import reshape


def _reduction_axes(op: str, a: Tensor, axis, dim, keepdims, keepdim) -> tuple[tuple[int, ...] | None, bool]:
    """(the sorted non-negative axes or None for all, keepdims) from either spelling; an IndexError if out of range."""
    axis, keepdims = normalize_axis(axis, dim, keepdims, keepdim)
    return canonical_axes(axis, a.ndim, op), keepdims


def _reduced_count(shape: tuple[int, ...], axes) -> int:
    """How many elements each output element of a reduction over `axes` combines."""
    return math.prod(shape if axes is None else [shape[axis] for axis in axes])


def _reduced_shape(shape: tuple[int, ...], axes, keepdims: bool) -> tuple[int, ...]:
    reduced = range(len(shape)) if axes is None else axes
    return tuple(1 if i in reduced else size for i, size in enumerate(shape) if keepdims or i not in reduced)


def accumulator_dtype(dtype):
    """PyTorch sums and multiplies bools and integers in int64 (NumPy would keep uint8's sums unsigned), and float16
    and bfloat16 in float32 (bfloat16 sums stop growing at 256 ones); None: the dtype itself."""
    if backend.is_floating(dtype):
        return backend.DEFAULT_DTYPE if backend.is_half(dtype) else None
    return np.int64


def _check_floating(op: str, a: Tensor) -> None:
    if not backend.is_floating(a.dtype):
        raise TypeError(f"{op}: needs a floating-point tensor, got dtype {a.dtype} (as in PyTorch)")


def _check_not_empty(op: str, a: Tensor, axes) -> None:
    """max, min, argmax, ... have no identity: reducing a size-0 axis is an error (other axes may be empty)."""
    if _reduced_count(a.shape, axes) == 0:
        raise ValueError(f"{op}: cannot reduce over an empty axis of a tensor of shape {a.shape}")


class Sum(Function):
    def forward(self, a, axis, keepdims: bool):
        """(...) -> (...) with `axis` removed (or kept as size 1)"""
        self.reduction = a.shape, axis, keepdims
        out = a.sum(axis=axis, keepdims=keepdims, dtype=accumulator_dtype(a.dtype))
        return out.astype(a.dtype) if backend.is_half(a.dtype) else out

    def backward(self, grad):
        shape, axis, keepdims = self.reduction
        xp = backend.get_array_module(grad)
        return xp.broadcast_to(expand_reduced(grad, shape, axis, keepdims), shape)


class Mean(Function):
    def forward(self, a, axis, keepdims: bool):
        """(...) -> (...) with `axis` removed (or kept as size 1)"""
        out = a.mean(axis=axis, keepdims=keepdims, dtype=accumulator_dtype(a.dtype))
        if backend.is_half(a.dtype):
            out = out.astype(a.dtype)
        self.reduction = a.shape, axis, keepdims
        self.count = _reduced_count(a.shape, axis)
        return out

    def backward(self, grad):
        shape, axis, keepdims = self.reduction
        xp = backend.get_array_module(grad)
        return xp.broadcast_to(expand_reduced(grad, shape, axis, keepdims) / self.count, shape)


@computes_in_float32
class Prod(Function):
    def forward(self, a, axis, keepdims: bool):
        """(...) -> (...) with `axis` removed (or kept as size 1)"""
        self.save_for_backward(a)
        self.reduction = axis, keepdims
        return a.prod(axis=axis, keepdims=keepdims, dtype=accumulator_dtype(a.dtype))

    def backward(self, grad):
        # d prod / d a_j is the product of all the other elements: the product of those before j times the product
        # of those after j, both by cumprod. Dividing prod by a_j instead would fail wherever a_j is 0.
        (a,) = self.saved_tensors
        axis, keepdims = self.reduction
        xp = backend.get_array_module(a)
        reduced = tuple(range(a.ndim)) if axis is None else axis
        kept = tuple(i for i in range(a.ndim) if i not in reduced)
        order = kept + reduced  # the reduced axes last, flattened into one row per output element
        moved = xp.transpose(a, order)
        rows = moved.reshape(moved.shape[: len(kept)] + (_reduced_count(a.shape, reduced),))
        ones = xp.ones_like(rows[..., :1])
        before = xp.concatenate([ones, xp.cumprod(rows[..., :-1], axis=-1)], axis=-1)
        reversed_after = xp.concatenate([ones, xp.cumprod(xp.flip(rows[..., 1:], axis=-1), axis=-1)], axis=-1)
        grad_rows = expand_reduced(grad, a.shape, axis, keepdims).reshape(moved.shape[: len(kept)] + (1,))
        others = (before * xp.flip(reversed_after, axis=-1) * grad_rows).reshape(moved.shape)
        return xp.transpose(others, [order.index(i) for i in range(a.ndim)])  # back to a's axis order


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


@computes_in_float32
class LogSumExp(Function):
    def forward(self, a, axis, keepdims: bool):
        """(...) -> (...) with `axis` removed (or kept as size 1)"""
        xp = backend.get_array_module(a)
        maxima = stable_max(a, axis)
        out = xp.log(xp.exp(a - maxima).sum(axis=axis, keepdims=True)) + maxima
        self.save_for_backward(a, out)
        self.reduction = axis, keepdims
        return out if keepdims else out.squeeze(axis=axis)

    def backward(self, grad):
        a, out = self.saved_tensors
        axis, keepdims = self.reduction
        xp = backend.get_array_module(a)
        # d logsumexp / d a_j = softmax_j
        return expand_reduced(grad, a.shape, axis, keepdims) * xp.exp(a - out)


@computes_in_float32
class Norm(Function):
    def forward(self, a, axis, keepdims: bool, p: float):
        """(...) -> (...) with `axis` removed (or kept as size 1): (sum |a|^p)^(1/p), max|a|, min|a| or count(a != 0)"""
        xp = backend.get_array_module(a)
        magnitude = xp.abs(a)
        if p == math.inf:
            out = magnitude.max(axis=axis, keepdims=True)
        elif p == -math.inf:
            out = magnitude.min(axis=axis, keepdims=True)
        elif p == 0:
            out = (a != 0).sum(axis=axis, keepdims=True).astype(a.dtype)
        else:
            out = (magnitude**p).sum(axis=axis, keepdims=True) ** (1 / p)
        self.save_for_backward(a, out)
        self.reduction, self.p = (axis, keepdims), p
        return out if keepdims else out.squeeze(axis=axis)

    def backward(self, grad):
        a, norm = self.saved_tensors
        axis, keepdims = self.reduction
        xp = backend.get_array_module(a)
        grad = expand_reduced(grad, a.shape, axis, keepdims)
        if self.p == 0:  # a step function of each element
            return xp.zeros_like(a)
        if math.isinf(self.p):  # as max/min of |a|: ties share the gradient
            hits = xp.abs(a) == norm
            return xp.sign(a) * hits * (grad / hits.sum(axis=axis, keepdims=True))
        # d/da_j (sum |a|^p)^(1/p) = sign(a_j) |a_j|^(p-1) / norm^(p-1). Where a_j = 0 or norm = 0 that factor is
        # taken as 0, as PyTorch does: the subgradient that keeps the gradient of a zero vector finite.
        magnitude = xp.abs(a)
        zero, zero_norm = magnitude == 0, norm == 0
        scaled = xp.where(zero, 0, xp.where(zero, 1, magnitude) ** (self.p - 1))
        scale = xp.where(zero_norm, 0, grad / xp.where(zero_norm, 1, norm) ** (self.p - 1))
        return (xp.sign(a) * scaled * scale).astype(a.dtype)


def _reduce(op: str, function, a: Tensor, axis, dim, keepdims, keepdim, **params) -> Tensor:
    axes, keepdims = _reduction_axes(op, a, axis, dim, keepdims, keepdim)
    return function.apply(a, axis=axes, keepdims=keepdims, **params)


def sum(a: Tensor, axis=None, keepdims=None, *, dim=None, keepdim=None) -> Tensor:
    """Sum over axes; bool and integer tensors sum to int64, as in PyTorch."""
    return _reduce("sum", Sum, a, axis, dim, keepdims, keepdim)


def prod(a: Tensor, axis=None, keepdims=None, *, dim=None, keepdim=None) -> Tensor:
    """Product over axes; bool and integer tensors give int64, as in PyTorch. The gradient is exact with zeros."""
    return _reduce("prod", Prod, a, axis, dim, keepdims, keepdim)


def mean(a: Tensor, axis=None, keepdims=None, *, dim=None, keepdim=None) -> Tensor:
    """Mean over axes of a floating tensor; an integer tensor is a TypeError, as in PyTorch (cast it first)."""
    _check_floating("mean", a)
    return _reduce("mean", Mean, a, axis, dim, keepdims, keepdim)


def max(a: Tensor, axis=None, keepdims=None, *, dim=None, keepdim=None) -> Tensor:
    """Largest values over axes (values only; use argmax for the indices)."""
    axes, keepdims = _reduction_axes("max", a, axis, dim, keepdims, keepdim)
    _check_not_empty("max", a, axes)
    return Extreme.apply(a, axis=axes, keepdims=keepdims, take_max=True)


def min(a: Tensor, axis=None, keepdims=None, *, dim=None, keepdim=None) -> Tensor:
    """Smallest values over axes (values only; use argmin for the indices)."""
    axes, keepdims = _reduction_axes("min", a, axis, dim, keepdims, keepdim)
    _check_not_empty("min", a, axes)
    return Extreme.apply(a, axis=axes, keepdims=keepdims, take_max=False)


def logsumexp(a: Tensor, axis=None, keepdims=None, *, dim=None, keepdim=None) -> Tensor:
    """log(sum(exp(a))) over axes, without overflow; integers compute in the default float dtype."""
    return _reduce("logsumexp", LogSumExp, floating(a), axis, dim, keepdims, keepdim)


def norm(a: Tensor, p=2, dim=None, keepdim=None, *, axis=None, keepdims=None) -> Tensor:
    """Vector norm over axes (all of them by default), as torch.norm and torch.linalg.vector_norm:
    p = 2 or 'fro' (Euclidean), 1, any real p ((sum |a|^p)^(1/p)), inf (max |a|), -inf (min |a|), 0 (count of
    nonzeros). The gradient at a zero vector is 0, as in PyTorch."""
    _check_floating("norm", a)
    if p == "fro":
        p = 2
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise ValueError(f"norm: p must be a number, inf, -inf or 'fro', got {p!r}")
    axes, keepdims = _reduction_axes("norm", a, axis, dim, keepdims, keepdim)
    if math.isinf(p):
        _check_not_empty(f"norm with p={p}", a, axes)
    return Norm.apply(a, axis=axes, keepdims=keepdims, p=float(p))


def _correction(op: str, correction, unbiased, ddof) -> float:
    """The one of PyTorch's correction= (default 1), its older unbiased= and NumPy's ddof= that was passed."""
    given = [value for value in (correction, unbiased, ddof) if value is not None]
    if len(given) > 1:
        raise TypeError(f"{op}: pass only one of correction=, unbiased= and ddof=")
    if unbiased is not None:
        return 1 if unbiased else 0
    return given[0] if given else 1


def _var_and_mean(op: str, a: Tensor, axis, dim, keepdims, keepdim, correction, unbiased, ddof):
    """(variance, mean, a's dtype), the statistics in float32 at least: the callers round them once, to a's dtype."""
    _check_floating(op, a)
    correction = _correction(op, correction, unbiased, ddof)
    axes, keepdims = _reduction_axes(op, a, axis, dim, keepdims, keepdim)
    dtype = a.dtype
    a = cast(a, backend.compute_dtype(dtype))  # half precision: every step in float32, one rounding at the end
    kept_mean = a.mean(axis=axes, keepdims=True)
    centered = a - kept_mean
    # With no more elements than the correction there is no estimate: PyTorch divides by max(0, N - correction),
    # giving inf (or nan for 0/0, as over an empty axis), never a negative variance.
    count = _reduced_count(a.shape, axes)
    degrees_of_freedom = count - correction if count > correction else 0
    variance = (centered * centered).sum(axis=axes, keepdims=keepdims) / degrees_of_freedom
    mean_ = kept_mean if keepdims else reshape(kept_mean, _reduced_shape(a.shape, axes, keepdims))
    return variance, mean_, dtype


def var(a: Tensor, axis=None, keepdims=None, *, dim=None, keepdim=None, correction=None, unbiased=None,
        ddof=None) -> Tensor:
    """Variance: sum((a - mean)^2) / max(0, N - correction).

    The default correction is 1 (PyTorch's unbiased estimate); pass `correction=0`, `unbiased=False` or `ddof=0` for
    NumPy's default. N <= correction gives inf (nan if all elements are equal, or over an empty axis), as in PyTorch.
    """
    variance, _, dtype = _var_and_mean("var", a, axis, dim, keepdims, keepdim, correction, unbiased, ddof)
    return cast(variance, dtype)


def std(a: Tensor, axis=None, keepdims=None, *, dim=None, keepdim=None, correction=None, unbiased=None,
        ddof=None) -> Tensor:
    """Standard deviation: the square root of var (same arguments)."""
    variance, _, dtype = _var_and_mean("std", a, axis, dim, keepdims, keepdim, correction, unbiased, ddof)
    return cast(sqrt(variance), dtype)


def var_mean(a: Tensor, axis=None, keepdims=None, *, dim=None, keepdim=None, correction=None, unbiased=None,
             ddof=None) -> tuple[Tensor, Tensor]:
    """(var, mean) over the same axes, sharing the mean's computation, as torch.var_mean."""
    variance, mean_, dtype = _var_and_mean("var_mean", a, axis, dim, keepdims, keepdim, correction, unbiased, ddof)
    return cast(variance, dtype), cast(mean_, dtype)


def std_mean(a: Tensor, axis=None, keepdims=None, *, dim=None, keepdim=None, correction=None, unbiased=None,
             ddof=None) -> tuple[Tensor, Tensor]:
    """(std, mean) over the same axes, as torch.std_mean."""
    variance, mean_, dtype = _var_and_mean("std_mean", a, axis, dim, keepdims, keepdim, correction, unbiased, ddof)
    return cast(sqrt(variance), dtype), cast(mean_, dtype)


def _index_of_extreme(op: str, a: Tensor, axis, dim, keepdims, keepdim) -> Tensor:
    """argmax or argmin (`op`): the first index of the extreme value, over the flattened tensor when no axis is given;
    NaN counts as the extreme, as in PyTorch. Not differentiable."""
    axis, keepdims = normalize_axis(axis, dim, keepdims, keepdim)
    if axis is not None and not isinstance(axis, (int, np.integer)):
        raise TypeError(f"{op}: dim must be a single int or None, got {axis!r}")
    axes = canonical_axes(axis, a.ndim, op)
    _check_not_empty(op, a, axes)
    data = a.data.reshape(1) if a.ndim == 0 else a.data  # a 0-d tensor is its own only element
    with backend.device_scope(a.device):
        index = getattr(data, op)(axis=axes[0] if axes else None, keepdims=keepdims)
    return Tensor(index.reshape(()) if a.ndim == 0 else index)


def argmax(a: Tensor, axis=None, keepdims=None, *, dim=None, keepdim=None) -> Tensor:
    """Index of the largest value (over the flattened tensor when no axis is given); not differentiable."""
    return _index_of_extreme("argmax", a, axis, dim, keepdims, keepdim)


def argmin(a: Tensor, axis=None, keepdims=None, *, dim=None, keepdim=None) -> Tensor:
    """Index of the smallest value (over the flattened tensor when no axis is given); not differentiable."""
    return _index_of_extreme("argmin", a, axis, dim, keepdims, keepdim)


def _truth_reduction(op: str, a: Tensor, axis, dim, keepdims, keepdim) -> Tensor:
    axes, keepdims = _reduction_axes(op, a, axis, dim, keepdims, keepdim)
    with backend.device_scope(a.device):
        return Tensor(getattr(a.data, op)(axis=axes, keepdims=keepdims))


def any(a: Tensor, axis=None, keepdims=None, *, dim=None, keepdim=None) -> Tensor:
    """Whether any element over the axes is nonzero (NaN counts as true); a bool tensor."""
    return _truth_reduction("any", a, axis, dim, keepdims, keepdim)


def all(a: Tensor, axis=None, keepdims=None, *, dim=None, keepdim=None) -> Tensor:
    """Whether every element over the axes is nonzero (NaN counts as true); a bool tensor."""
    return _truth_reduction("all", a, axis, dim, keepdims, keepdim)
