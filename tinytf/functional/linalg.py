"""Matrix products: matmul with NumPy's batching and 1-D rules, and the fused linear layer."""

from __future__ import annotations

from .. import backend
from ..tensor import Function, Tensor
from .common import sum_to


class MatMul(Function):
    def forward(self, a, b):
        """(..., n, k) @ (..., k, m) -> (..., n, m); a 1-D operand is a row (left) or a column (right) vector."""
        self.save_for_backward(a, b)
        return a @ b

    def backward(self, grad):
        a, b = self.saved_tensors
        # Treat vectors as matrices so one formula serves every case: dA = G B^T, dB = A^T G.
        a2 = a[None, :] if a.ndim == 1 else a
        b2 = b[:, None] if b.ndim == 1 else b
        if b.ndim == 1:
            grad = grad[..., None]
        if a.ndim == 1:
            grad = grad[..., None, :]
        grad_a = grad_b = None
        if self.needs_input_grad[0]:
            grad_a = sum_to(grad @ b2.swapaxes(-1, -2), a2.shape).reshape(a.shape)
        if self.needs_input_grad[1]:
            grad_b = sum_to(a2.swapaxes(-1, -2) @ grad, b2.shape).reshape(b.shape)
        return grad_a, grad_b


def matmul(a: Tensor, b: Tensor) -> Tensor:
    if a.ndim == 0 or b.ndim == 0:
        raise ValueError(f"matmul: both operands need at least one dimension, got shapes {a.shape} and {b.shape}")
    inner_a = a.shape[-1]
    inner_b = b.shape[0] if b.ndim == 1 else b.shape[-2]
    if inner_a != inner_b:
        raise ValueError(f"matmul: {a.shape} @ {b.shape}: inner dimensions {inner_a} and {inner_b} differ")
    batch_a, batch_b = a.shape[:-2], b.shape[:-2]
    try:
        backend.get_array_module(a.data).broadcast_shapes(batch_a, batch_b)
    except ValueError:
        raise ValueError(f"matmul: {a.shape} @ {b.shape}: batch dimensions {batch_a} and {batch_b} do not broadcast") from None
    return MatMul.apply(a, b)


class Linear(Function):
    def forward(self, x, weight, bias=None):
        """(..., in) @ (out, in)^T + (out,) -> (..., out)"""
        # One GEMM over all leading dimensions: (N, in) @ (in, out), with N = prod(leading).
        x2 = x.reshape(-1, x.shape[-1])
        out = x2 @ weight.T
        if bias is not None:
            out += bias
        self.save_for_backward(x2, weight)
        self.input_shape = x.shape
        return out.reshape(*x.shape[:-1], weight.shape[0])

    def backward(self, grad):
        x2, weight = self.saved_tensors
        grad2 = grad.reshape(-1, weight.shape[0])
        grad_x = (grad2 @ weight).reshape(self.input_shape) if self.needs_input_grad[0] else None
        grad_weight = grad2.T @ x2 if self.needs_input_grad[1] else None
        if len(self.needs_input_grad) == 2:
            return grad_x, grad_weight
        grad_bias = grad2.sum(axis=0) if self.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x W^T + b, with W of shape (out_features, in_features) as in PyTorch."""
    if weight.ndim != 2 or x.ndim == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"linear: input of shape {x.shape} does not fit weight of shape {weight.shape} "
            f"(expected input (..., {weight.shape[1] if weight.ndim == 2 else '?'}))"
        )
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"linear: bias of shape {bias.shape}, expected ({weight.shape[0]},)")
    if bias is None:
        return Linear.apply(x, weight)
    return Linear.apply(x, weight, bias)
