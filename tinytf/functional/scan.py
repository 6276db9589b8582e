"""Cumulative ops along one dimension, as PyTorch names them: cumsum, cumprod, cummax, cummin, logcumsumexp.

NumPy and CuPy scan with add and multiply only (CuPy's ufunc.accumulate has no other), so the running maximum, the
running log-sum-exp and cumprod's gradient use `inclusive_scan`: Hillis and Steele's doubling scan, log2(n) rounds of
whole-array ops for any associative combine, the same code on NumPy and CuPy. Bool and integer inputs of cumsum and
cumprod give int64, as in PyTorch.
"""

from __future__ import annotations

import numpy as np

from .. import backend
from ..tensor import Function, Tensor
from .common import computes_in_float32, floating
from .reduction import accumulator_dtype
from .indexing import Gather
from .sorting import ValuesIndices, along_dim, single_dim


def inclusive_scan(combine, operands: tuple, axis: int) -> tuple:
    """The running results r_i = x_0 . x_1 . ... . x_i along `axis`, where `combine(earlier, later)` is associative and
    takes and returns tuples of arrays (one element of x is one entry of each of `operands`).

    Round d combines each r_i with r_(i-d), so afterwards r_i covers the 2d elements ending at i (or all from 0).
    """
    xp = backend.get_array_module(operands[0])
    running = tuple(xp.moveaxis(operand, axis, -1) for operand in operands)
    offset = 1
    while offset < running[0].shape[-1]:
        combined = combine(tuple(r[..., :-offset] for r in running), tuple(r[..., offset:] for r in running))
        running = tuple(xp.concatenate([r[..., :offset], c], axis=-1) for r, c in zip(running, combined))
        offset *= 2
    return tuple(xp.moveaxis(r, -1, axis) for r in running)


def _reverse_cumsum(values, axis: int):
    """sum_{i >= j} values_i at each j: the adjoint of cumsum."""
    xp = backend.get_array_module(values)
    return xp.flip(xp.flip(values, axis).cumsum(axis=axis), axis)


def _logcumsumexp(values, axis: int):
    xp = backend.get_array_module(values)
    return inclusive_scan(lambda earlier, later: (xp.logaddexp(earlier[0], later[0]),), (values,), axis)[0]


def _compose_affine(earlier, later):
    """The map s -> m s + b that applies `earlier`'s, then `later`'s (both such maps, as (m, b))."""
    (earlier_factor, earlier_offset), (later_factor, later_offset) = earlier, later
    return later_factor * earlier_factor, later_factor * earlier_offset + later_offset


@computes_in_float32
class CumSum(Function):
    def forward(self, a, axis: int):
        """(...) -> (...): running sums along `axis`"""
        self.axis = axis
        return a.cumsum(axis=axis, dtype=accumulator_dtype(a.dtype))

    def backward(self, grad):
        return _reverse_cumsum(grad, self.axis)


@computes_in_float32
class CumProd(Function):
    def forward(self, a, axis: int):
        """(...) -> (...): running products along `axis`"""
        out = a.cumprod(axis=axis, dtype=accumulator_dtype(a.dtype))
        self.save_for_backward(a, out)
        self.axis = axis
        return out

    def backward(self, grad):
        # d out_i / d a_j = prod_{k <= i, k != j} a_k for i >= j, so grad_j = (prod_{k < j} a_k) s_j with
        # s_j = sum_{i >= j} grad_i prod_{j < k <= i} a_k = grad_j + a_(j+1) s_(j+1): a recurrence run backwards from
        # the end, solved by scanning the maps s -> a_(j+1) s + grad_j. No division, so zeros in `a` are exact.
        a, out = self.saved_tensors
        xp = backend.get_array_module(a)
        a, out, grad = (xp.moveaxis(array, self.axis, -1) for array in (a, out, grad))
        next_factor = xp.concatenate([a[..., 1:], xp.zeros_like(a[..., :1])], axis=-1)  # nothing follows the last
        _, suffix = inclusive_scan(_compose_affine, (xp.flip(next_factor, -1), xp.flip(grad, -1)), -1)
        product_before = xp.concatenate([xp.ones_like(a[..., :1]), out[..., :-1]], axis=-1)
        return xp.moveaxis(product_before * xp.flip(suffix, -1), -1, self.axis)


@computes_in_float32
class LogCumSumExp(Function):
    def forward(self, a, axis: int):
        """(...) -> (...): log(cumsum(exp(a))) along `axis`, without overflow"""
        out = _logcumsumexp(a, axis)
        self.save_for_backward(a, out)
        self.axis = axis
        return out

    def backward(self, grad):
        # grad_j = sum_{i >= j} grad_i exp(a_j - out_i). The sum runs in log space, the positive and the negative
        # grad_i apart (as PyTorch does), so no exp overflows however large a or small out.
        a, out = self.saved_tensors
        xp = backend.get_array_module(a)
        magnitude = xp.log(xp.where(grad == 0, 1, xp.abs(grad)))

        def reverse_logcumsumexp(part):
            log_terms = xp.where(part, magnitude - out, -xp.inf)
            return xp.flip(_logcumsumexp(xp.flip(log_terms, self.axis), self.axis), self.axis)

        return xp.exp(a + reverse_logcumsumexp(grad > 0)) - xp.exp(a + reverse_logcumsumexp(grad < 0))


def cumsum(a: Tensor, dim=None, *, axis=None) -> Tensor:
    """Running sums along `dim`; bool and integer tensors give int64."""
    return along_dim("cumsum", a, single_dim("cumsum", axis, dim), lambda a, axis: CumSum.apply(a, axis=axis))


def cumprod(a: Tensor, dim=None, *, axis=None) -> Tensor:
    """Running products along `dim`; bool and integer tensors give int64. The gradient is exact with zeros."""
    return along_dim("cumprod", a, single_dim("cumprod", axis, dim), lambda a, axis: CumProd.apply(a, axis=axis))


def logcumsumexp(a: Tensor, dim=None, *, axis=None) -> Tensor:
    """log(cumsum(exp(a))) along `dim`, computed stably; integer tensors compute in the default float dtype."""
    return along_dim("logcumsumexp", floating(a), single_dim("logcumsumexp", axis, dim),
                     lambda a, axis: LogCumSumExp.apply(a, axis=axis))


def _running_extreme(op: str, a: Tensor, dim: int, take_max: bool) -> ValuesIndices:
    def compute(a: Tensor, axis: int) -> ValuesIndices:
        with backend.device_scope(a.device):
            xp = backend.get_array_module(a.data)
            shape = [1] * a.ndim
            shape[axis] = a.shape[axis]
            positions = xp.broadcast_to(xp.arange(a.shape[axis], dtype=np.int64).reshape(shape), a.shape)

            def keep_extreme(earlier, later):
                # The later element wins ties (PyTorch reports the last index of a repeated extreme), and a NaN
                # wins over everything, so that once one is seen the running extreme stays NaN.
                (earlier_value, earlier_index), (later_value, later_index) = earlier, later
                better = later_value >= earlier_value if take_max else later_value <= earlier_value
                later_wins = better | xp.isnan(later_value)
                return (xp.where(later_wins, later_value, earlier_value),
                        xp.where(later_wins, later_index, earlier_index))

            _, indices = inclusive_scan(keep_extreme, (a.data, positions), axis)
        return ValuesIndices(Gather.apply(a, index=indices, dim=axis), Tensor(indices))

    return along_dim(op, a, dim, compute)


def cummax(a: Tensor, dim=None, *, axis=None) -> ValuesIndices:
    """(values, indices) of the running maximum along `dim`; of equal maxima the index is the latest, as in PyTorch."""
    return _running_extreme("cummax", a, single_dim("cummax", axis, dim), take_max=True)


def cummin(a: Tensor, dim=None, *, axis=None) -> ValuesIndices:
    """(values, indices) of the running minimum along `dim`; of equal minima the index is the latest, as in PyTorch."""
    return _running_extreme("cummin", a, single_dim("cummin", axis, dim), take_max=False)
