"""Layer norm and RMS norm as fused ops: forward caches the row statistics, backward is derived by hand.

With x_hat = (x - mean) * rstd and y = x_hat * w + b over the last axis of size C, and g = dL/dy:
    dL/dx_hat = g * w
    dL/dx     = rstd * (dx_hat - mean(dx_hat) - x_hat * mean(dx_hat * x_hat))      (layer norm)
    dL/dx     = rstd * (dx_hat - x_hat * mean(dx_hat * x_hat))                     (RMS norm: no centering)
    dL/dw     = sum over rows of g * x_hat,   dL/db = sum over rows of g
The mean terms come from every output of a row depending on that row's mean and rstd.
"""

from __future__ import annotations

from .. import backend
from ..tensor import Function, Tensor


def _row_sums(array, width: int):
    """Sum over every axis but the last: the gradient of a per-feature weight shared by all rows."""
    return array.reshape(-1, width).sum(axis=0)


class LayerNorm(Function):
    def forward(self, x, weight=None, bias=None, eps: float = 1e-5):
        """(..., C), (C,), (C,) -> (..., C)"""
        xp = backend.get_array_module(x)
        mean = x.mean(axis=-1, keepdims=True)
        centered = x - mean
        variance = (centered * centered).mean(axis=-1, keepdims=True)
        rstd = 1 / xp.sqrt(variance + eps)
        out = centered
        out *= rstd  # centered becomes x_hat in place: one temporary less
        self.save_for_backward(x, mean, rstd, weight)
        self.has_bias = bias is not None
        if weight is not None:
            out = out * weight
        if bias is not None:
            out += bias
        return out

    def backward(self, grad):
        x, mean, rstd, weight = self.saved_tensors
        x_hat = (x - mean) * rstd
        grad_x_hat = grad * weight if weight is not None else grad
        grad_x = None
        if self.needs_input_grad[0]:
            grad_x = grad_x_hat - grad_x_hat.mean(axis=-1, keepdims=True)
            grad_x -= x_hat * (grad_x_hat * x_hat).mean(axis=-1, keepdims=True)
            grad_x *= rstd
        grads = [grad_x]
        if weight is not None:
            grads.append(_row_sums(grad * x_hat, x.shape[-1]) if self.needs_input_grad[1] else None)
        if self.has_bias:
            grads.append(_row_sums(grad, x.shape[-1]) if self.needs_input_grad[-1] else None)
        return tuple(grads)


class RMSNorm(Function):
    def forward(self, x, weight=None, eps: float = 1e-6):
        """(..., C), (C,) -> (..., C); statistics in float32 at least (half-precision inputs are upcast)."""
        xp = backend.get_array_module(x)
        compute = x.astype(xp.promote_types(x.dtype, xp.float32), copy=False)
        rstd = 1 / xp.sqrt((compute * compute).mean(axis=-1, keepdims=True) + eps)
        out = (compute * rstd).astype(x.dtype, copy=False)
        self.save_for_backward(x, rstd, weight)
        return out * weight if weight is not None else out

    def backward(self, grad):
        x, rstd, weight = self.saved_tensors
        x_hat = x * rstd
        grad_x_hat = grad * weight if weight is not None else grad
        grad_x = None
        if self.needs_input_grad[0]:
            grad_x = grad_x_hat - x_hat * (grad_x_hat * x_hat).mean(axis=-1, keepdims=True)
            grad_x *= rstd
            grad_x = grad_x.astype(x.dtype, copy=False)
        if weight is None:
            return grad_x
        grad_weight = _row_sums(grad * x_hat, x.shape[-1]).astype(weight.dtype) if self.needs_input_grad[1] else None
        return grad_x, grad_weight


def _check_feature(op: str, x: Tensor, normalized_shape: int, *params) -> None:
    if x.ndim == 0 or x.shape[-1] != normalized_shape:
        raise ValueError(f"{op}: input of shape {x.shape} does not end in the normalized size {normalized_shape}")
    for param in params:
        if param is not None and param.shape != (normalized_shape,):
            raise ValueError(f"{op}: parameter of shape {param.shape}, expected ({normalized_shape},)")


def layer_norm(x: Tensor, normalized_shape, weight: Tensor | None = None, bias: Tensor | None = None,
               eps: float = 1e-5) -> Tensor:
    """Normalize the last axis to zero mean and unit variance, then scale by `weight` and shift by `bias`."""
    size = normalized_shape[-1] if isinstance(normalized_shape, (tuple, list)) else normalized_shape
    _check_feature("layer_norm", x, size, weight, bias)
    inputs = [tensor for tensor in (x, weight, bias) if tensor is not None]
    if bias is not None and weight is None:
        raise ValueError("layer_norm: a bias needs a weight")
    return LayerNorm.apply(*inputs, eps=eps)


def rms_norm(x: Tensor, normalized_shape, weight: Tensor | None = None, eps: float = 1e-6) -> Tensor:
    """Divide the last axis by its root mean square, then scale by `weight` (Llama's norm)."""
    size = normalized_shape[-1] if isinstance(normalized_shape, (tuple, list)) else normalized_shape
    _check_feature("rms_norm", x, size, weight)
    return RMSNorm.apply(x, weight, eps=eps) if weight is not None else RMSNorm.apply(x, eps=eps)
