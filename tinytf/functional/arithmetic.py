"""Elementwise arithmetic with NumPy broadcasting: each op's forward beside its backward."""

from __future__ import annotations

import numpy as np

from .. import backend
from ..tensor import Function, Tensor
from .common import as_tensor, computes_in_float32, floating, promoted_dtype, sum_to


class Add(Function):
    def forward(self, a, b):
        """(..., ) + (..., ) -> broadcast shape"""
        self.shapes = a.shape, b.shape
        return a + b

    def backward(self, grad):
        return sum_to(grad, self.shapes[0]), sum_to(grad, self.shapes[1])


class Sub(Function):
    def forward(self, a, b):
        self.shapes = a.shape, b.shape
        return a - b

    def backward(self, grad):
        return sum_to(grad, self.shapes[0]), sum_to(-grad, self.shapes[1]) if self.needs_input_grad[1] else None


class Mul(Function):
    def forward(self, a, b):
        self.save_for_backward(a, b)
        return a * b

    def backward(self, grad):
        a, b = self.saved_tensors
        grad_a = sum_to(grad * b, a.shape) if self.needs_input_grad[0] else None
        grad_b = sum_to(grad * a, b.shape) if self.needs_input_grad[1] else None
        return grad_a, grad_b


class AddScalar(Function):
    """a + c for a number c already in a's dtype: the fast path of `+` and `-` with a Python number (no promotion,
    no broadcasting, nothing saved)."""

    def forward(self, a, scalar):
        """(...) + number -> (...)"""
        return a + scalar

    def backward(self, grad):
        return grad


class MulScalar(Function):
    """a * c for a number c already in a's dtype: the fast path of `*` with a Python number."""

    def forward(self, a, scalar):
        """(...) * number -> (...)"""
        self.scalar = scalar
        return a * scalar

    def backward(self, grad):
        return grad * self.scalar


@computes_in_float32
class Div(Function):
    def forward(self, a, b):
        out = a / b
        self.save_for_backward(b, out)
        self.shape_a = a.shape
        return out

    def backward(self, grad):
        b, out = self.saved_tensors
        grad_a = grad / b
        # d(a/b)/db = -a/b^2 = -(a/b)/b
        grad_b = sum_to(-grad_a * out, b.shape) if self.needs_input_grad[1] else None
        return sum_to(grad_a, self.shape_a), grad_b


@computes_in_float32
class Pow(Function):
    """a ** b. At the points where the calculus is undefined, PyTorch's conventions:
    d/da = b a^(b-1) is 0 where b == 0 (so x ** 0 has gradient 0 at x = 0, not 0 * inf);
    d/db = a^b log a is 0 where a == 0 and b >= 0 (the limit), -inf where a == 0 and b < 0, and NaN for a < 0."""

    def forward(self, a, b):
        """(...) ** (...) -> broadcast shape"""
        out = a**b
        self.save_for_backward(a, b, out)
        return out

    def backward(self, grad):
        a, b, out = self.saved_tensors
        xp = backend.get_array_module(a)
        with np.errstate(divide="ignore", invalid="ignore"):  # NumPy's warnings at the points set below
            grad_a = None
            if self.needs_input_grad[0]:  # b a^(b-1), taken as 0 where b == 0 (a^0 is constant; 0^-1 is inf)
                grad_a = sum_to(xp.where(b == 0, 0, grad * b * a ** (b - 1)).astype(grad.dtype), a.shape)
            grad_b = None
            if self.needs_input_grad[1]:
                grad_b = xp.where((a == 0) & (b >= 0), 0, grad * out * xp.log(a)).astype(grad.dtype)
                grad_b = sum_to(grad_b, b.shape)
        return grad_a, grad_b


@computes_in_float32
class PowScalar(Function):
    """a ** c for a Python number c, with Pow's convention: the gradient of a ** 0 is 0 everywhere."""

    def forward(self, a, exponent):
        """(...) ** python number -> (...)"""
        self.save_for_backward(a)
        self.exponent = exponent
        return a**exponent

    def backward(self, grad):
        (a,) = self.saved_tensors
        if self.exponent == 0:
            return backend.get_array_module(grad).zeros_like(grad)  # not grad * 0: an infinite grad gives NaN
        with np.errstate(divide="ignore"):  # 0 to a negative power is inf, as the derivative is
            return grad * (self.exponent * a ** (self.exponent - 1))


class Neg(Function):
    def forward(self, a):
        return -a

    def backward(self, grad):
        return -grad


class Abs(Function):
    def forward(self, a):
        self.save_for_backward(a)
        return backend.get_array_module(a).abs(a)

    def backward(self, grad):
        (a,) = self.saved_tensors
        return grad * backend.get_array_module(a).sign(a)


class Exp(Function):
    def forward(self, a):
        out = backend.get_array_module(a).exp(a)
        self.save_for_backward(out)
        return out

    def backward(self, grad):
        (out,) = self.saved_tensors
        return grad * out


class Log(Function):
    def forward(self, a):
        self.save_for_backward(a)
        return backend.get_array_module(a).log(a)

    def backward(self, grad):
        (a,) = self.saved_tensors
        return grad / a


@computes_in_float32
class Sqrt(Function):
    def forward(self, a):
        out = backend.get_array_module(a).sqrt(a)
        self.save_for_backward(out)
        return out

    def backward(self, grad):
        (out,) = self.saved_tensors
        return grad / (2 * out)


@computes_in_float32
class Rsqrt(Function):
    def forward(self, a):
        out = 1 / backend.get_array_module(a).sqrt(a)
        self.save_for_backward(out)
        return out

    def backward(self, grad):
        (out,) = self.saved_tensors
        # d(a^-1/2)/da = -1/2 a^-3/2 = -1/2 out^3
        return grad * (-0.5 * out**3)


class Sin(Function):
    def forward(self, a):
        self.save_for_backward(a)
        return backend.get_array_module(a).sin(a)

    def backward(self, grad):
        (a,) = self.saved_tensors
        return grad * backend.get_array_module(a).cos(a)


class Cos(Function):
    def forward(self, a):
        self.save_for_backward(a)
        return backend.get_array_module(a).cos(a)

    def backward(self, grad):
        (a,) = self.saved_tensors
        return -grad * backend.get_array_module(a).sin(a)


class Extremum(Function):
    """Elementwise maximum or minimum; a tie splits the gradient equally between both inputs (as PyTorch)."""

    def forward(self, a, b, take_max: bool):
        xp = backend.get_array_module(a, b)
        out = xp.maximum(a, b) if take_max else xp.minimum(a, b)
        self.save_for_backward(a, b, out)
        return out

    def backward(self, grad):
        a, b, out = self.saved_tensors
        share_a = (a == out) * (1 - 0.5 * (a == b))
        share_a = share_a.astype(grad.dtype)
        return sum_to(grad * share_a, a.shape), sum_to(grad * (1 - share_a), b.shape)


class Clamp(Function):
    def forward(self, a, low, high):
        xp = backend.get_array_module(a)
        self.save_for_backward(a)
        self.bounds = low, high
        return xp.clip(a, low, high).astype(a.dtype, copy=False)  # NumPy clips bfloat16 into float32

    def backward(self, grad):
        (a,) = self.saved_tensors
        low, high = self.bounds
        inside = backend.get_array_module(a).ones(a.shape, dtype=bool)
        if low is not None:
            inside &= a >= low
        if high is not None:
            inside &= a <= high
        return grad * inside


class Where(Function):
    def forward(self, a, b, condition):
        """where(condition, a, b): condition is a boolean array, not differentiated."""
        self.condition = condition
        self.shapes = a.shape, b.shape
        return backend.get_array_module(a, b).where(condition, a, b)

    def backward(self, grad):
        xp = backend.get_array_module(grad)
        zero = xp.zeros((), dtype=grad.dtype)
        grad_a = sum_to(xp.where(self.condition, grad, zero), self.shapes[0]) if self.needs_input_grad[0] else None
        grad_b = sum_to(xp.where(self.condition, zero, grad), self.shapes[1]) if self.needs_input_grad[1] else None
        return grad_a, grad_b


class Cast(Function):
    def forward(self, a, dtype):
        self.input_dtype = a.dtype
        return a.astype(dtype)

    def backward(self, grad):
        return grad.astype(self.input_dtype)


class ToDevice(Function):
    def forward(self, a, device):
        self.input_device = backend.device_of(a)
        return backend.to_device(a, device)

    def backward(self, grad):
        return backend.to_device(grad, self.input_device)


def _binary(function, a, b, **params) -> Tensor:
    a, b = promoted(a, b)
    return function.apply(a, b, **params)


def promoted(a, b) -> tuple[Tensor, Tensor]:
    """Both operands as Tensors of the dtype PyTorch's promotion gives them (common.promoted_dtype)."""
    if not isinstance(a, Tensor):
        a = as_tensor(a, b)
    b = as_tensor(b, a)
    if a.dtype == b.dtype:  # the common case, kept cheap: every add and compare passes here
        return a, b
    dtype = promoted_dtype(a, b)
    return cast(a, dtype), cast(b, dtype)


def _number_in_dtype_of(tensor, number):
    """`number` as a scalar of `tensor`'s floating dtype when the pair needs no promotion (a float16/32/64 Tensor and
    a Python int or float: PyTorch's rules give the tensor's dtype), else None."""
    if type(number) in (float, int) and type(tensor) is Tensor and tensor.data.dtype.kind == "f":
        data = tensor.data
        if type(data) is np.ndarray:
            return np.array(number, data.dtype)  # NumPy's ufuncs take a 0-d array twice as fast as a scalar
        return data.dtype.type(number)  # CuPy takes NumPy scalars, not NumPy arrays
    return None


def _commutative(number_op, tensor_op, a, b) -> Tensor:
    """a op b for a commutative op: number_op when one side is a Python number that needs no promotion, whichever
    side it is on, else tensor_op with promotion."""
    for tensor, number in ((a, b), (b, a)):
        scalar = _number_in_dtype_of(tensor, number)
        if scalar is not None:
            return number_op.apply(tensor, scalar=scalar)
    return _binary(tensor_op, a, b)


def add(a, b) -> Tensor:
    return _commutative(AddScalar, Add, a, b)


def sub(a, b) -> Tensor:
    if type(b) in (float, int):  # a - c == a + (-c) exactly: negation only flips the sign bit
        scalar = _number_in_dtype_of(a, -b)
        if scalar is not None:
            return AddScalar.apply(a, scalar=scalar)
    return _binary(Sub, a, b)


def mul(a, b) -> Tensor:
    return _commutative(MulScalar, Mul, a, b)


def true_divide(a, b) -> Tensor:
    """a / b, true division: integer operands divide in the default float dtype, as in PyTorch."""
    a, b = promoted(a, b)
    if not backend.is_floating(a.dtype):
        a, b = floating(a), floating(b)
    return Div.apply(a, b)


def pow(a, b) -> Tensor:
    if isinstance(a, Tensor) and isinstance(b, (int, float)) and not isinstance(b, bool):
        if isinstance(b, float):
            a = floating(a)  # an integer tensor to a float power is a float tensor
        elif a.dtype == bool:
            a = cast(a, "int64")  # PyTorch: bool ** int is int64
        return PowScalar.apply(a, exponent=b)
    return _binary(Pow, a, b)


def neg(a: Tensor) -> Tensor:
    return Neg.apply(a)


def abs(a: Tensor) -> Tensor:
    return Abs.apply(a)


def exp(a: Tensor) -> Tensor:
    return Exp.apply(floating(a))


def log(a: Tensor) -> Tensor:
    return Log.apply(floating(a))


def sqrt(a: Tensor) -> Tensor:
    return Sqrt.apply(floating(a))


def rsqrt(a: Tensor) -> Tensor:
    return Rsqrt.apply(floating(a))


def sin(a: Tensor) -> Tensor:
    return Sin.apply(floating(a))


def cos(a: Tensor) -> Tensor:
    return Cos.apply(floating(a))


def maximum(a, b) -> Tensor:
    return _binary(Extremum, a, b, take_max=True)


def minimum(a, b) -> Tensor:
    return _binary(Extremum, a, b, take_max=False)


def clamp(a: Tensor, min=None, max=None) -> Tensor:
    if min is None and max is None:
        raise ValueError("clamp: give at least one of min and max")
    return Clamp.apply(a, low=min, high=max)


def where(condition, a, b) -> Tensor:
    """Elements of `a` where `condition` is True, else of `b` (either may be a Python scalar)."""
    if not isinstance(a, Tensor) and not isinstance(b, Tensor):
        raise TypeError("where: at least one of the two value arguments must be a Tensor")
    a, b = promoted(a, b)
    if isinstance(condition, Tensor):
        if condition.device != a.device:
            raise RuntimeError(f"where: the condition is on {condition.device}, the values on {a.device}")
        condition = condition.data
    else:
        condition = backend.to_device(condition, a.device)  # host data (lists, NumPy arrays) goes to the values
    if getattr(condition, "dtype", None) != bool:
        raise TypeError(f"where: condition must be a boolean tensor, got dtype {getattr(condition, 'dtype', None)}")
    return Where.apply(a, b, condition=condition)


def masked_fill(a: Tensor, mask, value) -> Tensor:
    """`a` with `value` wherever the boolean `mask` (broadcast to a's shape) is True."""
    return where(mask, as_tensor(value, a), a)


def cast(a: Tensor, dtype) -> Tensor:
    dtype = backend.as_dtype(dtype)
    if a.dtype == dtype:
        return a
    if a.requires_grad and backend.is_floating(dtype):
        return Cast.apply(a, dtype=dtype)
    with backend.device_scope(a.device):  # CuPy converts on its current device: make it the tensor's
        return Tensor(a.data.astype(dtype))


def to(a: Tensor, device=None, dtype=None) -> Tensor:
    """A tensor on `device` and/or of `dtype` (itself when nothing changes); differentiable.

    Accepts `to("cuda")`, `to(np.float64)`, `to("bfloat16")` and `to(device, dtype)` like PyTorch.
    """
    if dtype is None and device is not None and not backend.is_device_name(device):
        device, dtype = None, device
    if device is not None and backend.canonical_device(device) != a.device:
        a = ToDevice.apply(a, device=backend.check_device(device))
    if dtype is not None:
        a = cast(a, dtype)
    return a


def _comparison(name: str):
    def compare(a, b) -> Tensor:
        a, b = promoted(a, b)
        with backend.device_scope(a.device):
            return Tensor(getattr(a.data, name)(b.data))

    compare.__name__ = name.strip("_")
    compare.__doc__ = f"Elementwise `{name}` as a boolean tensor (not differentiable)."
    return compare


eq = _comparison("__eq__")
ne = _comparison("__ne__")
lt = _comparison("__lt__")
le = _comparison("__le__")
gt = _comparison("__gt__")
ge = _comparison("__ge__")
