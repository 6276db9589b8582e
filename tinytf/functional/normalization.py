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
from .common import row_blocks


def _row_averager(width: int, dtype, xp):
    """The vector that gives row means as rows @ vector: a matrix-vector product is one BLAS pass, 3-4x faster
    here than sum(axis=-1) on rows of a few hundred elements."""
    return xp.full(width, 1 / width, dtype=dtype)


def _normalize_rows(x, weight, bias, eps: float, centered: bool):
    """y = x_hat * weight + bias with x_hat = (x - mean) * rstd over the last axis (no centering for RMS norm), one
    cache-sized block of rows at a time, statistics in float32 at least. Returns y (x's shape and dtype) and, for
    backward, x_hat (rows, C) and rstd (rows, 1)."""
    xp = backend.get_array_module(x)
    width = x.shape[-1]
    rows = x.reshape(-1, width)
    compute = xp.promote_types(x.dtype, xp.float32)
    x_hat = xp.empty(rows.shape, dtype=compute)
    rstd = xp.empty((rows.shape[0], 1), dtype=compute)
    out = xp.empty_like(rows) if weight is not None or x.dtype != compute else None
    averager = _row_averager(width, compute, xp)
    for block in row_blocks(rows):
        xb, hb, rb = rows[block], x_hat[block], rstd[block]
        if centered:
            xp.subtract(xb, (xb @ averager)[:, None], out=hb)
        else:
            hb[...] = xb
        # einsum's row dot products make no (rows, C) temporary for the squares
        xp.sqrt(xp.einsum("ij,ij->i", hb, hb)[:, None] * (1 / width) + eps, out=rb)
        xp.divide(1, rb, out=rb)
        hb *= rb
        if weight is not None:
            ob = out[block]
            xp.multiply(hb, weight, out=ob, casting="unsafe")
            if bias is not None:
                ob += bias
        elif out is not None:
            out[block] = hb
    # Without a weight and in float32 already, y is x_hat: a copy, because backward keeps x_hat.
    y = x_hat.copy() if out is None else out
    return y.reshape(x.shape), x_hat, rstd


def _normalize_rows_backward(function: Function, grad, centered: bool):
    """Gradients of the normalized rows' inputs (x, weight[, bias]) from dL/dy, with y = x_hat * w (+ b)."""
    x_hat, rstd, weight = function.saved_tensors
    xp = backend.get_array_module(x_hat)
    width = x_hat.shape[-1]
    g = grad.reshape(-1, width)
    needs = function.needs_input_grad
    grad_x = xp.empty(g.shape, dtype=x_hat.dtype) if needs[0] else None
    grad_weight = xp.zeros(width, dtype=x_hat.dtype) if weight is not None and needs[1] else None
    grad_bias = xp.zeros(width, dtype=x_hat.dtype) if function.has_bias and needs[-1] else None
    blocks = row_blocks(x_hat)
    scratch = xp.empty_like(x_hat[blocks[0]]) if needs[0] else None
    averager = _row_averager(width, x_hat.dtype, xp)
    for block in blocks:
        hb, gb = x_hat[block], g[block]
        if grad_weight is not None:
            grad_weight += xp.einsum("ij,ij->j", gb, hb)
        if grad_bias is not None:
            grad_bias += gb.sum(axis=0)
        if grad_x is None:
            continue
        rb = grad_x[block]
        if weight is not None:
            xp.multiply(gb, weight, out=rb)  # dL/dx_hat
        else:
            rb[...] = gb
        projection = xp.multiply(hb, xp.einsum("ij,ij->i", rb, hb)[:, None] * (1 / width), out=scratch[: hb.shape[0]])
        if centered:
            rb -= (rb @ averager)[:, None]
        rb -= projection
        rb *= rstd[block]
    grads = [None if grad_x is None else grad_x.reshape(grad.shape).astype(grad.dtype, copy=False)]
    if weight is not None:
        grads.append(None if grad_weight is None else grad_weight.astype(weight.dtype, copy=False))
    if function.has_bias:
        grads.append(grad_bias)
    return tuple(grads)


class LayerNorm(Function):
    def forward(self, x, weight=None, bias=None, eps: float = 1e-5):
        """(..., C), (C,), (C,) -> (..., C); statistics in float32 at least."""
        out, x_hat, rstd = _normalize_rows(x, weight, bias, eps, centered=True)
        self.save_for_backward(x_hat, rstd, weight)
        self.has_bias = bias is not None
        return out

    def backward(self, grad):
        return _normalize_rows_backward(self, grad, centered=True)


class RMSNorm(Function):
    def forward(self, x, weight=None, eps: float = 1e-6):
        """(..., C), (C,) -> (..., C); statistics in float32 at least (half-precision inputs are upcast)."""
        out, x_hat, rstd = _normalize_rows(x, weight, None, eps, centered=False)
        self.save_for_backward(x_hat, rstd, weight)
        self.has_bias = False
        return out

    def backward(self, grad):
        return _normalize_rows_backward(self, grad, centered=False)


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
