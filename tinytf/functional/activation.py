"""Activations, softmax and dropout: each forward beside its hand-derived backward."""

from __future__ import annotations

import math

from .. import backend
from ..tensor import Function, Tensor
from .common import normalize_axis


class Tanh(Function):
    def forward(self, a):
        out = backend.get_array_module(a).tanh(a)
        self.save_for_backward(out)
        return out

    def backward(self, grad):
        (out,) = self.saved_tensors
        return grad * (1 - out * out)


class Sigmoid(Function):
    def forward(self, a):
        xp = backend.get_array_module(a)
        # 1/(1+e^-a) overflows e^-a for a << 0; (1 + tanh(a/2))/2 is the same function and never overflows.
        out = 0.5 * (1 + xp.tanh(0.5 * a))
        self.save_for_backward(out)
        return out

    def backward(self, grad):
        (out,) = self.saved_tensors
        return grad * out * (1 - out)


class ReLU(Function):
    def forward(self, a):
        self.save_for_backward(a > 0)
        return backend.get_array_module(a).maximum(a, 0)

    def backward(self, grad):
        (positive,) = self.saved_tensors
        return grad * positive


_GELU_C = math.sqrt(2 / math.pi)


class GELUTanh(Function):
    """GELU with the tanh approximation (GPT-2's "gelu_new"): x/2 (1 + tanh(c (x + k x^3))), k = 0.044715.

    Written with in-place updates: this op runs on the widest activations of a transformer (B, T, 4C).
    """

    K = 0.044715

    def forward(self, a):
        xp = backend.get_array_module(a)
        t = xp.multiply(a, a, out=xp.empty_like(a))  # out= keeps 0-d inputs arrays, so the updates stay in place
        t *= self.K
        t += 1
        t *= a
        t *= _GELU_C
        xp.tanh(t, out=t)  # t = tanh(c (x + k x^3))
        self.save_for_backward(a, t)
        out = t + 1
        out *= a
        out *= 0.5
        return out

    def backward(self, grad):
        a, t = self.saved_tensors
        # d/dx = (1 + t)/2 + x/2 (1 - t^2) c (1 + 3k x^2)
        xp = backend.get_array_module(a)
        slope = xp.multiply(a, a, out=xp.empty_like(a))
        slope *= 3 * self.K * _GELU_C
        slope += _GELU_C
        slope *= a
        slope *= 1 - t * t
        slope += t
        slope += 1
        slope *= 0.5
        slope *= grad
        return slope


def erf(x):
    """The error function to float64 accuracy on NumPy or CuPy arrays (NumPy itself has none).

    erf(x) = 2/sqrt(pi) e^(-x^2) sum_n 2^n x^(2n+1) / (1*3*...*(2n+1)): every term is positive, so there is no
    cancellation; 100 terms reach double precision for |x| <= 6, and beyond that erf is +-1 in float64.
    """
    xp = backend.get_array_module(x)
    clipped = xp.clip(x.astype("float64"), -6.0, 6.0)
    twice_square = 2 * clipped * clipped
    series = xp.ones_like(clipped)
    for n in range(100, 0, -1):  # Horner form, innermost term first
        series = 1 + twice_square / (2 * n + 1) * series
    return (2 / math.sqrt(math.pi) * xp.exp(-clipped * clipped) * clipped * series).astype(x.dtype)


class GELUErf(Function):
    """Exact GELU: x Phi(x), with Phi the standard normal CDF."""

    def forward(self, a):
        cdf = 0.5 * (1 + erf(a / math.sqrt(2)))
        self.save_for_backward(a, cdf)
        return a * cdf

    def backward(self, grad):
        a, cdf = self.saved_tensors
        pdf = backend.get_array_module(a).exp(-0.5 * a * a) / math.sqrt(2 * math.pi)
        return grad * (cdf + a * pdf)


class SiLU(Function):
    def forward(self, a):
        xp = backend.get_array_module(a)
        s = 0.5 * (1 + xp.tanh(0.5 * a))
        self.save_for_backward(a, s)
        return a * s

    def backward(self, grad):
        a, s = self.saved_tensors
        # d(x s(x))/dx = s + x s (1 - s)
        return grad * (s * (1 + a * (1 - s)))


def _stable_max(a, axis: int):
    """Row maxima for shifting before exp; rows of only -inf get 0 so they give exp(-inf) = 0, not NaN."""
    xp = backend.get_array_module(a)
    row_max = a.max(axis=axis, keepdims=True)
    return xp.where(xp.isfinite(row_max), row_max, 0)


class Softmax(Function):
    def forward(self, a, axis: int):
        xp = backend.get_array_module(a)
        out = xp.exp(a - _stable_max(a, axis))
        total = out.sum(axis=axis, keepdims=True)
        out /= xp.where(total > 0, total, 1)  # a fully masked row stays all zeros
        self.save_for_backward(out)
        self.axis = axis
        return out

    def backward(self, grad):
        (out,) = self.saved_tensors
        # dL/da_j = y_j (g_j - sum_k g_k y_k)
        return out * (grad - (grad * out).sum(axis=self.axis, keepdims=True))


class LogSoftmax(Function):
    def forward(self, a, axis: int):
        xp = backend.get_array_module(a)
        shifted = a - _stable_max(a, axis)
        out = shifted - xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))
        self.save_for_backward(out)
        self.axis = axis
        return out

    def backward(self, grad):
        (out,) = self.saved_tensors
        # dL/da_j = g_j - softmax_j sum_k g_k
        xp = backend.get_array_module(out)
        return grad - xp.exp(out) * grad.sum(axis=self.axis, keepdims=True)


class Dropout(Function):
    def forward(self, a, p: float, device: str):
        keep = backend.generator(device).random(a.shape, dtype=a.dtype) >= p
        # Inverted dropout: scale the kept units now so evaluation needs no rescaling.
        self.scaled_mask = keep.astype(a.dtype) * a.dtype.type(1 / (1 - p))
        return a * self.scaled_mask

    def backward(self, grad):
        return grad * self.scaled_mask


def tanh(a: Tensor) -> Tensor:
    return Tanh.apply(a)


def sigmoid(a: Tensor) -> Tensor:
    return Sigmoid.apply(a)


def relu(a: Tensor) -> Tensor:
    return ReLU.apply(a)


def gelu(a: Tensor, approximate: str = "none") -> Tensor:
    """GELU; approximate="tanh" is GPT-2's form, "none" the exact erf form (PyTorch's names)."""
    if approximate == "tanh":
        return GELUTanh.apply(a)
    if approximate == "none":
        return GELUErf.apply(a)
    raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")


def silu(a: Tensor) -> Tensor:
    return SiLU.apply(a)


def _single_axis(op: str, a: Tensor, axis, dim) -> int:
    axis, _ = normalize_axis(axis, dim)
    if axis is None:
        axis = -1
    if not isinstance(axis, int) or not -a.ndim <= axis < (a.ndim or 1):
        raise ValueError(f"{op}: axis {axis} is out of range for a tensor of shape {a.shape}")
    return axis


def softmax(a: Tensor, axis: int | None = None, dim: int | None = None) -> Tensor:
    """exp(a) / sum(exp(a)) along one axis (default the last), stable for large logits and -inf."""
    return Softmax.apply(a, axis=_single_axis("softmax", a, axis, dim))


def log_softmax(a: Tensor, axis: int | None = None, dim: int | None = None) -> Tensor:
    return LogSoftmax.apply(a, axis=_single_axis("log_softmax", a, axis, dim))


def dropout(a: Tensor, p: float = 0.5, training: bool = True) -> Tensor:
    """Zero each element with probability p and scale the rest by 1/(1-p); the identity when not training."""
    if not 0 <= p < 1:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    if not training or p == 0:
        return a
    return Dropout.apply(a, p=p, device=a.device)
