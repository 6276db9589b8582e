"""Causal multi-head self-attention with grouped-query heads, rotary positions and a KV cache for decoding."""

from __future__ import annotations

from .. import backend
from ..creation import zeros
from ..tensor import Tensor
from . import functional as F
from .layers import Dropout, Linear
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
        start, new = self.length, keys.shape[2]
        if start + new > self.max_length:
            raise ValueError(f"KV cache holds {self.max_length} positions; {start} are used and {new} more do not fit")
        if keys.shape[:2] != self.keys.shape[:2] or keys.shape[3] != self.keys.shape[3]:
            raise ValueError(f"KV cache of shape {self.keys.shape} cannot take keys of shape {keys.shape}")
        with backend.device_scope(self.device):  # the copy is a kernel on the cache's device
            self.keys[:, :, start : start + new] = keys.data
            self.values[:, :, start : start + new] = values.data
        self.length = start + new
        return Tensor(self.keys[:, :, : self.length]), Tensor(self.values[:, :, : self.length])


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

    def extra_repr(self) -> str:
        return f"n_head={self.n_head}, n_kv_head={self.n_kv_head}, head_dim={self.head_dim}, rope={self.rope}"
