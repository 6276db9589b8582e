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
from .expression import ElementwiseExpression


def rotary_tables(head_dim: int, max_positions: int, theta: float = 10000.0, xp=None):
    """cos and sin tables (max_positions, head_dim) in float32: angle p * theta^(-2i/D), repeated for both halves."""
    if head_dim % 2:
        raise ValueError(f"rotary embedding needs an even head dimension, got {head_dim}")
    xp = xp or backend.get_array_module()
    inverse_frequency = 1.0 / theta ** (xp.arange(0, head_dim, 2, dtype=xp.float64) / head_dim)
    angles = xp.arange(max_positions, dtype=xp.float64)[:, None] * inverse_frequency[None, :]
    angles = xp.concatenate([angles, angles], axis=-1)
    return xp.cos(angles).astype(xp.float32), xp.sin(angles).astype(xp.float32)


def rotate_study(x, cos, sin):
    """x * cos + rotate_half(x) * sin, with rotate_half(x1, x2) = (-x2, x1), updating the halves of x * cos in place
    instead of building rotate_half(x): the study version of `rotate`."""
    half = x.shape[-1] // 2
    out = x * cos
    first, second = out[..., :half], out[..., half:]
    first -= x[..., half:] * sin[..., :half]
    second += x[..., :half] * sin[..., half:]
    return out


# rotate_half(x) * sin = swap(x) * signed_sin, where swap(x) = (x2, x1) exchanges the halves and signed_sin carries
# the minus sign: the rotation is then one elementwise expression over x, swap(x) and the tables.
ROTATE = ElementwiseExpression("rotate", "y = x * c + x_swapped * s", inputs=("x", "x_swapped", "c", "s"),
                               outputs=("y",))
# Smaller arrays take the study version: on the host its few ufunc calls cost less than the expression's setup, and
# NumPy reads swap(x) in runs of D/2 elements, slow enough to use up the gain below this size (bench/NOTES.md); on a
# GPU the fused kernel saves little there, as the signed table takes launches of its own.
FUSED_MIN_BYTES = 512 * 1024


def rotate(x, cos, sin):
    """rotate_study(x, cos, sin), tuned, with the same float results for tables of x's dtype or narrower (a GPU may
    fuse a multiply and an add); x (..., D), cos and sin broadcast to it. Tricks: one fused pass (ROTATE), in which
    swap(x) is a view of x, not a copy (_halves_swapped), and the sign of rotate_half goes into a copy of the small
    sin table; arrays below FUSED_MIN_BYTES take the study version."""
    if x.nbytes < FUSED_MIN_BYTES:
        return rotate_study(x, cos, sin)
    xp = backend.get_array_module(x)
    half = x.shape[-1] // 2
    signed_sin = xp.concatenate([-sin[..., :half], sin[..., half:]], axis=-1)
    split, swapped = _halves_swapped(x)
    tables = [_halves_swapped(table.astype(x.dtype, copy=False))[0] for table in (cos, signed_sin)]
    return ROTATE(split, swapped, *tables).reshape(x.shape)


def _halves_swapped(x):
    """x (..., D) as (..., 2, D/2), and the view of it with the halves exchanged (read backwards along the 2)."""
    split = x.reshape(*x.shape[:-1], 2, x.shape[-1] // 2)
    return split, split[..., ::-1, :]


class Rotary(Function):
    def forward(self, x, cos, sin):
        """(..., T, D), cos and sin broadcast to it (T, D) -> (..., T, D), computed in float32 at least"""
        self.tables = cos, sin
        return rotate(_computed(x), cos, sin).astype(x.dtype, copy=False)

    def backward(self, grad):
        # The transposed rotation is the same rotation with the sin table's halves swapped and negated:
        # d1 = g1 cos1 + g2 sin2 and d2 = g2 cos2 - g1 sin1.
        cos, sin = self.tables
        half = sin.shape[-1] // 2
        xp = backend.get_array_module(grad)
        transposed_sin = -xp.concatenate([sin[..., half:], sin[..., :half]], axis=-1)
        return rotate(_computed(grad), cos, transposed_sin).astype(grad.dtype, copy=False)


def _computed(x):
    """x in float32 at least: half precision rotates in float32 and rounds once."""
    xp = backend.get_array_module(x)
    return x.astype(xp.promote_types(x.dtype, xp.float32), copy=False)


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
