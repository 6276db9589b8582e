"""Rotary position embedding (RoPE) in the rotate-half layout used by Llama in Hugging Face transformers.

Each head vector x = (x1, x2), halves of size D/2, is rotated by position-dependent angles:
    rope(x) = x * cos + rotate_half(x) * sin,   rotate_half(x1, x2) = (-x2, x1)
The rotation is linear and orthogonal, so its backward is the transposed rotation:
    dL/dx = g * cos + rotate_half^T(g * sin),   rotate_half^T(u1, u2) = (u2, -u1)
"""

from __future__ import annotations

import math

import numpy as np

from .. import backend
from ..tensor import Function, Tensor, array_of


def rotary_tables(head_dim: int, max_positions: int, theta: float = 10000.0, xp=None):
    """cos and sin tables (max_positions, head_dim) in float32: angle p * theta^(-2i/D), repeated for both halves."""
    if head_dim % 2:
        raise ValueError(f"rotary embedding needs an even head dimension, got {head_dim}")
    xp = xp or backend.get_array_module()
    inverse_frequency = 1.0 / theta ** (xp.arange(0, head_dim, 2, dtype=xp.float64) / head_dim)
    angles = xp.arange(max_positions, dtype=xp.float64)[:, None] * inverse_frequency[None, :]
    angles = xp.concatenate([angles, angles], axis=-1)
    return xp.cos(angles).astype(xp.float32), xp.sin(angles).astype(xp.float32)


def _rotate(x, cos, sin):
    """x * cos + rotate_half(x) * sin, with rotate_half(x1, x2) = (-x2, x1), updating the halves of x * cos in place
    instead of building rotate_half(x)."""
    half = x.shape[-1] // 2
    out = x * cos
    first, second = out[..., :half], out[..., half:]
    first -= x[..., half:] * sin[..., :half]
    second += x[..., :half] * sin[..., half:]
    return out


class Rotary(Function):
    def forward(self, x, cos, sin):
        """(..., T, D), cos and sin broadcast to it (T, D) -> (..., T, D), computed in float32 at least"""
        xp = backend.get_array_module(x)
        compute = x.astype(xp.promote_types(x.dtype, xp.float32), copy=False)
        self.tables = cos, sin
        return _rotate(compute, cos, sin).astype(x.dtype, copy=False)

    def backward(self, grad):
        # The transposed rotation is the same rotation with the sin table's halves swapped and negated:
        # d1 = g1 cos1 + g2 sin2 and d2 = g2 cos2 - g1 sin1.
        cos, sin = self.tables
        half = sin.shape[-1] // 2
        xp = backend.get_array_module(grad)
        transposed_sin = -xp.concatenate([sin[..., half:], sin[..., :half]], axis=-1)
        return _rotate(grad, cos, transposed_sin).astype(grad.dtype, copy=False)


def apply_rotary(x: Tensor, cos, sin) -> Tensor:
    """Rotate the last axis of x (..., T, D) by the angles of positions given as cos/sin rows (T, D), or as tables
    that broadcast to x's shape with a position per row (packed sequences: x (total, H, D), tables (total, 1, D))."""
    cos = array_of(cos)
    sin = array_of(sin)
    if sin.shape != cos.shape or cos.shape[-1:] != x.shape[-1:] or not _broadcasts_to(cos.shape, x.shape):
        raise ValueError(f"apply_rotary: tables of shape {cos.shape} do not fit input of shape {x.shape}")
    if backend.device_of(cos) != x.device:  # tables made on the host, for x on a GPU
        cos, sin = backend.to_device(cos, x.device), backend.to_device(sin, x.device)
    return Rotary.apply(x, cos=cos, sin=sin)


def _broadcasts_to(shape, target) -> bool:
    try:
        return np.broadcast_shapes(shape, target) == tuple(target)
    except ValueError:
        return False


def sinusoidal_table(max_positions: int, dim: int, xp=None):
    """"Attention Is All You Need" positions: sin on even features, cos on odd, wavelengths up to 10000 * 2 pi."""
    xp = xp or backend.get_array_module()
    positions = xp.arange(max_positions, dtype=xp.float64)[:, None]
    frequencies = xp.exp(xp.arange(0, dim, 2, dtype=xp.float64) * (-math.log(10000.0) / dim))
    table = xp.zeros((max_positions, dim), dtype=xp.float64)
    table[:, 0::2] = xp.sin(positions * frequencies)
    table[:, 1::2] = xp.cos(positions * frequencies[: dim // 2])
    return table.astype(xp.float32)
