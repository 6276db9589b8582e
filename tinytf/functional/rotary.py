"""Rotary position embedding (RoPE) in the rotate-half layout used by Llama in Hugging Face transformers.

Each head vector x = (x1, x2), halves of size D/2, is rotated by position-dependent angles:
    rope(x) = x * cos + rotate_half(x) * sin,   rotate_half(x1, x2) = (-x2, x1)
The rotation is linear and orthogonal, so its backward is the transposed rotation:
    dL/dx = g * cos + rotate_half^T(g * sin),   rotate_half^T(u1, u2) = (u2, -u1)
"""

from __future__ import annotations

import math

from .. import backend
from ..tensor import Function, Tensor


def rotary_tables(head_dim: int, max_positions: int, theta: float = 10000.0, xp=None):
    """cos and sin tables (max_positions, head_dim) in float32: angle p * theta^(-2i/D), repeated for both halves."""
    if head_dim % 2:
        raise ValueError(f"rotary embedding needs an even head dimension, got {head_dim}")
    xp = xp or backend.get_array_module()
    inverse_frequency = 1.0 / theta ** (xp.arange(0, head_dim, 2, dtype=xp.float64) / head_dim)
    angles = xp.arange(max_positions, dtype=xp.float64)[:, None] * inverse_frequency[None, :]
    angles = xp.concatenate([angles, angles], axis=-1)
    return xp.cos(angles).astype(xp.float32), xp.sin(angles).astype(xp.float32)


def _rotate_half(x, xp):
    half = x.shape[-1] // 2
    return xp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


class Rotary(Function):
    def forward(self, x, cos, sin):
        """(..., T, D), (T, D), (T, D) -> (..., T, D), computed in float32 at least"""
        xp = backend.get_array_module(x)
        compute = x.astype(xp.promote_types(x.dtype, xp.float32), copy=False)
        self.tables = cos, sin
        return (compute * cos + _rotate_half(compute, xp) * sin).astype(x.dtype, copy=False)

    def backward(self, grad):
        cos, sin = self.tables
        xp = backend.get_array_module(grad)
        u = grad * sin
        half = grad.shape[-1] // 2
        return (grad * cos + xp.concatenate([u[..., half:], -u[..., :half]], axis=-1)).astype(grad.dtype, copy=False)


def apply_rotary(x: Tensor, cos, sin) -> Tensor:
    """Rotate the last axis of x (..., T, D) by the angles of positions given as cos/sin rows (T, D)."""
    cos = cos.data if isinstance(cos, Tensor) else cos
    sin = sin.data if isinstance(sin, Tensor) else sin
    if cos.shape != (x.shape[-2], x.shape[-1]) or sin.shape != cos.shape:
        raise ValueError(f"apply_rotary: tables of shape {cos.shape} do not fit input of shape {x.shape}")
    return Rotary.apply(x, cos=cos, sin=sin)


def sinusoidal_table(max_positions: int, dim: int, xp=None):
    """"Attention Is All You Need" positions: sin on even features, cos on odd, wavelengths up to 10000 * 2 pi."""
    xp = xp or backend.get_array_module()
    positions = xp.arange(max_positions, dtype=xp.float64)[:, None]
    frequencies = xp.exp(xp.arange(0, dim, 2, dtype=xp.float64) * (-math.log(10000.0) / dim))
    table = xp.zeros((max_positions, dim), dtype=xp.float64)
    table[:, 0::2] = xp.sin(positions * frequencies)
    table[:, 1::2] = xp.cos(positions * frequencies[: dim // 2])
    return table.astype(xp.float32)
