"""Causal multi-head self-attention with grouped-query heads, rotary positions and a KV cache for decoding."""

from __future__ import annotations

import math

import numpy as np

from .. import backend
from ..creation import zeros
from ..tensor import Tensor
from . import functional as F
from .layers import DecodeLayouts, Dropout, Linear
from .module import Module


class KVCache:
    """One layer's keys and values for incremental decoding, preallocated up to `max_length` positions.

    Decoding appends the keys and values of the new tokens; the prefix is never recomputed.
    """

    def __init__(self, batch_size: int, n_kv_head: int, max_length: int, head_dim: int, dtype, device: str = "cpu"):
        shape = (batch_size, n_kv_head, max_length, head_dim)
        self.keys = zeros(shape, dtype=dtype, device=device).data
        self.values = zeros(shape, dtype=dtype, device=device).data
        self.device = backend.canonical_device(device)
        self.max_length = max_length
        self.length = 0

    def append(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Store keys/values (B, Hkv, T, D) after the cached ones; returns all cached (B, Hkv, length, D)."""
        cached_keys, cached_values = self.store(keys.data, values.data)
        return Tensor(cached_keys), Tensor(cached_values)

    def store(self, keys, values) -> tuple:
        """append on raw arrays (decoding): keys/values (B, Hkv, T, D) -> the cached arrays (B, Hkv, length, D)."""
        start, new = self.length, keys.shape[2]
        if start + new > self.max_length:
            raise ValueError(f"KV cache holds {self.max_length} positions; {start} are used and {new} more do not fit")
        if keys.shape[:2] != self.keys.shape[:2] or keys.shape[3] != self.keys.shape[3]:
            raise ValueError(f"KV cache of shape {self.keys.shape} cannot take keys of shape {keys.shape}")
        with backend.device_scope(self.device):  # the copy is a kernel on the cache's device
            self.keys[:, :, start : start + new] = keys
            self.values[:, :, start : start + new] = values
        self.length = start + new
        return self.keys[:, :, : self.length], self.values[:, :, : self.length]


def _softmax_rows(scores, scale: float):
    """softmax(scores * scale) along the last axis, in place, for decoding: a query's scores over the cache (a few
    short rows, all finite: no mask). F.masked_softmax computes the same; its blocking and axis handling, made for
    training's large score matrices, cost several times these four passes on one token's rows (bench/NOTES.md)."""
    xp = backend.get_array_module(scores)
    scores *= scale
    scores -= scores.max(axis=-1, keepdims=True)
    xp.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    return scores


class MultiHeadAttention(Module):
    """Causal self-attention: one fused QKV projection, `n_head` query heads sharing `n_kv_head` key/value heads
    (GQA; MQA when n_kv_head = 1), optional RoPE on queries and keys, and the output projection."""

    def __init__(self, dim: int, n_head: int, n_kv_head: int | None = None, max_length: int = 1024,
                 bias: bool = True, dropout: float = 0.0, rope: bool = False, rope_theta: float = 10000.0,
                 head_dim: int | None = None):
        super().__init__()
        n_kv_head = n_kv_head or n_head
        if n_head % n_kv_head:
            raise ValueError(f"n_head ({n_head}) must be a multiple of n_kv_head ({n_kv_head})")
        if head_dim is None:
            if dim % n_head:
                raise ValueError(f"embedding size {dim} is not divisible by n_head {n_head}")
            head_dim = dim // n_head
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, head_dim
        self.c_attn = Linear(dim, (n_head + 2 * n_kv_head) * head_dim, bias)
        self.c_proj = Linear(n_head * head_dim, dim, bias)
        self.dropout_p = dropout
        self.resid_dropout = Dropout(dropout)
        self.rope = rope
        if rope:
            cos, sin = F.rotary_tables(head_dim, max_length, rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, x: Tensor, kv_cache: KVCache | None = None) -> Tensor:
        B, T, _ = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        # One reshape and one transpose for q, k and v together (rather than one of each per tensor), then a split.
        qkv = self.c_attn(x).reshape(B, T, H + 2 * Hkv, D).transpose(1, 2)  # (B, T, (H+2Hkv)*D) -> (B, H+2Hkv, T, D)
        q, k, v = qkv.split([H, Hkv, Hkv], dim=1)  # (B, H, T, D), (B, Hkv, T, D), (B, Hkv, T, D)
        if self.rope:
            start = kv_cache.length if kv_cache is not None else 0
            cos, sin = self.rope_cos[start : start + T], self.rope_sin[start : start + T]
            q, k = F.apply_rotary(q, cos, sin), F.apply_rotary(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.append(k, v)  # (B, Hkv, S, D) with S = cached + T
        dropout_p = self.dropout_p if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, H * D)  # (B, H, T, D) -> (B, T, H*D)
        return self.resid_dropout(self.c_proj(y))

    def decode(self, x, kv_cache: KVCache, layouts: DecodeLayouts):
        """forward in inference for one new token per sequence, on raw arrays (no graph): x (B, C) -> (B, C), the
        token's keys and values appended to kv_cache. The same maths in fewer ops: for one token the head split
        (B, 1, H+2Hkv, D) -> (B, H+2Hkv, 1, D) is a reshape, not a transpose; RoPE rotates q and k in one call; and
        a group's query heads attend as G rows of their K/V head, as in naive attention, with no mask to build."""
        B = x.shape[0]
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        qkv = layouts.linear(x, self.c_attn).reshape(B, H + 2 * Hkv, 1, D)
        qk = qkv[:, : H + Hkv]
        if self.rope:
            position = kv_cache.length
            cos, sin = self.rope_cos[position : position + 1], self.rope_sin[position : position + 1]
            qk = F.apply_rotary(Tensor(qk), cos, sin).data
        keys, values = kv_cache.store(qk[:, H:], qkv[:, H + Hkv :])  # (B, Hkv, S, D)
        compute = np.result_type(x.dtype, np.float32)
        q = qk[:, :H].reshape(B, Hkv, H // Hkv, D).astype(compute, copy=False)  # (B, H, 1, D) -> (B, Hkv, G, D)
        scores = q @ keys.astype(compute, copy=False).swapaxes(-1, -2)  # (B, Hkv, G, S)
        y = (_softmax_rows(scores, 1.0 / math.sqrt(D)) @ values.astype(compute, copy=False)).astype(x.dtype, copy=False)
        return layouts.linear(y.reshape(B, H * D), self.c_proj)

    def extra_repr(self) -> str:
        return f"n_head={self.n_head}, n_kv_head={self.n_kv_head}, head_dim={self.head_dim}, rope={self.rope}"
