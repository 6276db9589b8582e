"""Elementwise ops beyond arithmetic.py, with PyTorch's names and semantics: rounding, more exponentials, logarithms
and trigonometry, floating-point tests, rounding divisions and the remainder, logical and bitwise ops.

Dtypes follow PyTorch (common.py states the rules): floating functions of integer or bool tensors compute in the
default float dtype (common.floating), and binary ops cast both operands to the promoted dtype before computing
(arithmetic.promoted). Rounding ops and rounding divisions are piecewise constant: PyTorch gives them a zero
gradient, steps included (Stepwise). Tests, logical and bitwise ops return tensors without gradient (_untracked).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

from .. import backend
from ..tensor import Function, Tensor
from .arithmetic import promoted, true_divide
from .common import as_tensor, computes_in_float32, floating, sum_to


class Derivable(NamedTuple):
    """A differentiable elementwise f on raw arrays: value(xp, a) = f(a), slope(xp, a, out) = f'(a) given out = f(a)."""

    value: Callable
    slope: Callable


_LN2, _LN10 = math.log(2), math.log(10)

_DERIVABLE = {
    "log2": Derivable(lambda xp, a: xp.log2(a), lambda xp, a, out: 1 / (a * _LN2)),
    "log10": Derivable(lambda xp, a: xp.log10(a), lambda xp, a, out: 1 / (a * _LN10)),
    "log1p": Derivable(lambda xp, a: xp.log1p(a), lambda xp, a, out: 1 / (1 + a)),
    "exp2": Derivable(lambda xp, a: xp.exp2(a), lambda xp, a, out: out * _LN2),
    "expm1": Derivable(lambda xp, a: xp.expm1(a), lambda xp, a, out: out + 1),
    "tan": Derivable(lambda xp, a: xp.tan(a), lambda xp, a, out: 1 + out * out),
    "sinh": Derivable(lambda xp, a: xp.sinh(a), lambda xp, a, out: xp.cosh(a)),
    "cosh": Derivable(lambda xp, a: xp.cosh(a), lambda xp, a, out: xp.sinh(a)),
    "asin": Derivable(lambda xp, a: xp.arcsin(a), lambda xp, a, out: 1 / xp.sqrt(1 - a * a)),
    "acos": Derivable(lambda xp, a: xp.arccos(a), lambda xp, a, out: -1 / xp.sqrt(1 - a * a)),
    "atan": Derivable(lambda xp, a: xp.arctan(a), lambda xp, a, out: 1 / (1 + a * a)),
    # frac(a) = a - trunc(a): slope 1 between the integers, as PyTorch takes it at them too
    "frac": Derivable(lambda xp, a: a - xp.trunc(a), lambda xp, a, out: xp.ones_like(a)),
}


@computes_in_float32
class Elementwise(Function):
    """y = f(a) for a Derivable f; dL/da = grad * f'(a)."""

    def forward(self, a, rule: Derivable):
        """(...) -> (...)"""
        out = rule.value(backend.get_array_module(a), a)
        self.rule = rule
        self.save_for_backward(a, out)
        return out

    def backward(self, grad):
        a, out = self.saved_tensors
        return grad * self.rule.slope(backend.get_array_module(a), a, out)


@computes_in_float32
class Stepwise(Function):
    """An op piecewise constant in its inputs (floor, sign, floor division, ...): its gradient is zero where it
    exists, and PyTorch takes it as zero at the steps too (zeros, not grad * 0, which is NaN for an infinite grad).
    Half precision rounds in float32 (exact): CuPy has no bfloat16 rounding ufuncs."""

    def forward(self, *arrays, compute: Callable):
        """compute(xp, *arrays): (...) per input -> broadcast shape"""
        self.shapes = [array.shape for array in arrays]
        return compute(backend.get_array_module(*arrays), *arrays)

    def backward(self, grad):
        xp = backend.get_array_module(grad)
        grads = tuple(xp.zeros(shape, dtype=grad.dtype) if needed else None
                      for shape, needed in zip(self.shapes, self.needs_input_grad))
        return grads if len(grads) > 1 else grads[0]


@computes_in_float32
class Atan2(Function):
    def forward(self, a, b):
        """(...), (...) -> broadcast shape: the angle of the point (x=b, y=a), in [-pi, pi]"""
        self.save_for_backward(a, b)
        return backend.get_array_module(a, b).arctan2(a, b)

    def backward(self, grad):
        a, b = self.saved_tensors
        # d atan2(a, b) = (b da - a db) / (a^2 + b^2)
        scaled = grad / (a * a + b * b)
        grad_a = sum_to(scaled * b, a.shape) if self.needs_input_grad[0] else None
        grad_b = sum_to(-scaled * a, b.shape) if self.needs_input_grad[1] else None
        return grad_a, grad_b


@computes_in_float32
class Remainder(Function):
    def forward(self, a, b):
        """(...), (...) -> broadcast shape: a - b floor(a / b), with the sign of b (Python's %)"""
        self.save_for_backward(a, b)
        return backend.get_array_module(a, b).remainder(a, b)

    def backward(self, grad):
        a, b = self.saved_tensors
        # d/da = 1, d/db = -floor(a / b): the floor's own gradient is zero, as in PyTorch
        grad_a = sum_to(grad, a.shape) if self.needs_input_grad[0] else None
        grad_b = None
        if self.needs_input_grad[1]:
            grad_b = sum_to(-grad * backend.get_array_module(a, b).floor_divide(a, b), b.shape)
        return grad_a, grad_b


def _untracked(compute: Callable, *tensors: Tensor) -> Tensor:
    """compute(xp, *arrays) as a Tensor without gradient, on the tensors' device (CuPy computes on its current one)."""
    arrays = [tensor.data for tensor in tensors]
    with backend.device_scope(tensors[0].device):
        return Tensor(compute(backend.get_array_module(*arrays), *arrays))


def _tensors(a, b) -> tuple[Tensor, Tensor]:
    """Both operands as tensors; a Python scalar takes the other operand's dtype (common.as_tensor)."""
    if not isinstance(a, Tensor):
        a = as_tensor(a, b)
    return a, as_tensor(b, a)


# --- rounding ----------------------------------------------------------------------------------------------------


def _rounded(a: Tensor, compute: Callable) -> Tensor:
    """A rounding op: integers are rounded already, so an integer or bool tensor comes back as a copy (PyTorch)."""
    if not backend.is_floating(a.dtype):
        return _untracked(lambda xp, x: x.copy(), a)
    return Stepwise.apply(a, compute=compute)


def floor(a: Tensor) -> Tensor:
    """(...) -> (...): the largest integer <= a."""
    return _rounded(a, lambda xp, x: xp.floor(x))


def ceil(a: Tensor) -> Tensor:
    """(...) -> (...): the smallest integer >= a."""
    return _rounded(a, lambda xp, x: xp.ceil(x))


def trunc(a: Tensor) -> Tensor:
    """(...) -> (...): a rounded toward zero."""
    return _rounded(a, lambda xp, x: xp.trunc(x))


def round(a: Tensor, decimals: int = 0) -> Tensor:
    """(...) -> (...): a rounded to `decimals` decimal places, halves to even (negative decimals: to tens, ...)."""
    def compute(xp, x):
        return xp.round(x, decimals)

    # integers are already rounded to decimals >= 0, but not to tens or hundreds
    return _rounded(a, compute) if decimals >= 0 else Stepwise.apply(a, compute=compute)


def sign(a: Tensor) -> Tensor:
    """(...) -> (...): -1, 0 or 1 by the sign of a (a bool tensor is its own sign)."""
    if a.dtype == bool:
        return _untracked(lambda xp, x: x.copy(), a)
    return Stepwise.apply(a, compute=lambda xp, x: xp.sign(x))


def frac(a: Tensor) -> Tensor:
    """(...) -> (...): a - trunc(a), with the sign of a; floating tensors only, as in PyTorch."""
    if not backend.is_floating(a.dtype):
        raise TypeError(f"frac: needs a floating tensor, got dtype {a.dtype}")
    return Elementwise.apply(a, rule=_DERIVABLE["frac"])


# --- floating functions ------------------------------------------------------------------------------------------


def log2(a: Tensor) -> Tensor:
    """(...) -> (...): the base-2 logarithm."""
    return Elementwise.apply(floating(a), rule=_DERIVABLE["log2"])


def log10(a: Tensor) -> Tensor:
    """(...) -> (...): the base-10 logarithm."""
    return Elementwise.apply(floating(a), rule=_DERIVABLE["log10"])


def log1p(a: Tensor) -> Tensor:
    """(...) -> (...): log(1 + a), accurate for small a."""
    return Elementwise.apply(floating(a), rule=_DERIVABLE["log1p"])


def exp2(a: Tensor) -> Tensor:
    """(...) -> (...): 2 ** a."""
    return Elementwise.apply(floating(a), rule=_DERIVABLE["exp2"])


def expm1(a: Tensor) -> Tensor:
    """(...) -> (...): exp(a) - 1, accurate for small a."""
    return Elementwise.apply(floating(a), rule=_DERIVABLE["expm1"])


def tan(a: Tensor) -> Tensor:
    """(...) -> (...)"""
    return Elementwise.apply(floating(a), rule=_DERIVABLE["tan"])


def sinh(a: Tensor) -> Tensor:
    """(...) -> (...)"""
    return Elementwise.apply(floating(a), rule=_DERIVABLE["sinh"])


def cosh(a: Tensor) -> Tensor:
    """(...) -> (...)"""
    return Elementwise.apply(floating(a), rule=_DERIVABLE["cosh"])


def asin(a: Tensor) -> Tensor:
    """(...) -> (...): arcsine, in [-pi/2, pi/2]; NaN outside [-1, 1]."""
    return Elementwise.apply(floating(a), rule=_DERIVABLE["asin"])


def acos(a: Tensor) -> Tensor:
    """(...) -> (...): arccosine, in [0, pi]; NaN outside [-1, 1]."""
    return Elementwise.apply(floating(a), rule=_DERIVABLE["acos"])


def atan(a: Tensor) -> Tensor:
    """(...) -> (...): arctangent, in (-pi/2, pi/2)."""
    return Elementwise.apply(floating(a), rule=_DERIVABLE["atan"])


def atan2(a, b) -> Tensor:
    """(...), (...) -> broadcast shape: the angle of the point (x=b, y=a), atan(a / b) in the right quadrant."""
    a, b = promoted(a, b)
    return Atan2.apply(floating(a), floating(b))


# --- floating-point tests ----------------------------------------------------------------------------------------


def isnan(a: Tensor) -> Tensor:
    """(...) -> (...) bool"""
    return _untracked(lambda xp, x: xp.isnan(x), a)


def isinf(a: Tensor) -> Tensor:
    """(...) -> (...) bool: True at +inf and -inf."""
    return _untracked(lambda xp, x: xp.isinf(x), a)


def isfinite(a: Tensor) -> Tensor:
    """(...) -> (...) bool: False at NaN and at +-inf."""
    return _untracked(lambda xp, x: xp.isfinite(x), a)


def isclose(a, b, rtol: float = 1e-5, atol: float = 1e-8, equal_nan: bool = False) -> Tensor:
    """(...), (...) -> broadcast shape, bool: |a - b| <= atol + rtol |b|, in the promoted dtype."""
    return _untracked(lambda xp, x, y: xp.isclose(x, y, rtol=rtol, atol=atol, equal_nan=equal_nan), *promoted(a, b))


# --- rounding divisions and the remainder ------------------------------------------------------------------------


def floor_divide(a, b) -> Tensor:
    """(...), (...) -> broadcast shape: a / b rounded toward -inf (Python's //; PyTorch's since 1.13)."""
    return Stepwise.apply(*promoted(a, b), compute=lambda xp, x, y: xp.floor_divide(x, y))


def _truncated_quotient(xp, a, b):
    if backend.is_floating(a.dtype):
        return xp.trunc(a / b)
    # a - fmod(a, b) is an exact multiple of b (fmod has a's sign), so floor division of it is exact
    return (a - xp.fmod(a, b)) // b


def trunc_divide(a, b) -> Tensor:
    """(...), (...) -> broadcast shape: a / b rounded toward zero (C's integer division; torch.div with
    rounding_mode="trunc")."""
    return Stepwise.apply(*promoted(a, b), compute=_truncated_quotient)


def div(a, b, rounding_mode: str | None = None) -> Tensor:
    """(...), (...) -> broadcast shape: torch.div. rounding_mode None: true division (a / b); "floor": floor_divide;
    "trunc": trunc_divide."""
    roundings = {None: true_divide, "floor": floor_divide, "trunc": trunc_divide}
    if rounding_mode not in roundings:
        raise ValueError(f"div: rounding_mode must be None, 'floor' or 'trunc', got {rounding_mode!r}")
    return roundings[rounding_mode](a, b)


def remainder(a, b) -> Tensor:
    """(...), (...) -> broadcast shape: a - b floor(a / b), which has the sign of b (Python's %)."""
    return Remainder.apply(*promoted(a, b))


# --- logical and bitwise ops -------------------------------------------------------------------------------------


def logical_and(a, b) -> Tensor:
    """(...), (...) -> broadcast shape, bool: nonzero elements count as True."""
    return _untracked(lambda xp, x, y: xp.logical_and(x, y), *_tensors(a, b))


def logical_or(a, b) -> Tensor:
    """(...), (...) -> broadcast shape, bool"""
    return _untracked(lambda xp, x, y: xp.logical_or(x, y), *_tensors(a, b))


def logical_xor(a, b) -> Tensor:
    """(...), (...) -> broadcast shape, bool"""
    return _untracked(lambda xp, x, y: xp.logical_xor(x, y), *_tensors(a, b))


def logical_not(a: Tensor) -> Tensor:
    """(...) -> (...) bool"""
    return _untracked(lambda xp, x: xp.logical_not(x), a)


def _integer_operands(op: str, a, b, bool_allowed: bool = True) -> tuple[Tensor, Tensor]:
    """The promoted operands of a bitwise op, or a TypeError naming a dtype it does not take."""
    for operand in _tensors(a, b):
        _check_integer(op, operand, bool_allowed)
    return promoted(a, b)


def _check_integer(op: str, a: Tensor, bool_allowed: bool = True) -> None:
    if a.dtype.kind not in ("biu" if bool_allowed else "iu"):
        raise TypeError(f"{op}: needs integer{' or bool' if bool_allowed else ''} tensors, got dtype {a.dtype}")


def bitwise_and(a, b) -> Tensor:
    """(...), (...) -> broadcast shape, integer or bool"""
    return _untracked(lambda xp, x, y: xp.bitwise_and(x, y), *_integer_operands("bitwise_and", a, b))


def bitwise_or(a, b) -> Tensor:
    """(...), (...) -> broadcast shape, integer or bool"""
    return _untracked(lambda xp, x, y: xp.bitwise_or(x, y), *_integer_operands("bitwise_or", a, b))


def bitwise_xor(a, b) -> Tensor:
    """(...), (...) -> broadcast shape, integer or bool"""
    return _untracked(lambda xp, x, y: xp.bitwise_xor(x, y), *_integer_operands("bitwise_xor", a, b))


def bitwise_not(a: Tensor) -> Tensor:
    """(...) -> (...): every bit flipped (~a; logical not for bool)."""
    _check_integer("bitwise_not", a)
    return _untracked(lambda xp, x: xp.invert(x), a)


def bitwise_left_shift(a, b) -> Tensor:
    """(...), (...) -> broadcast shape: a << b; integer tensors only (PyTorch shifts no bools)."""
    a, b = _integer_operands("bitwise_left_shift", a, b, bool_allowed=False)
    return _untracked(lambda xp, x, y: xp.left_shift(x, y), a, b)


def bitwise_right_shift(a, b) -> Tensor:
    """(...), (...) -> broadcast shape: a >> b, arithmetic (sign-extending) for signed integers."""
    a, b = _integer_operands("bitwise_right_shift", a, b, bool_allowed=False)
    return _untracked(lambda xp, x, y: xp.right_shift(x, y), a, b)
