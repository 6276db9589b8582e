"""Causal multi-head self-attention with grouped-query heads, rotary positions, an optional sliding window and
logit softcap, and a KV cache for decoding."""

from __future__ import annotations

import math

import numpy as np

from .. import backend
from ..attention.masks import softcapped
from ..tensor import Tensor
from . import functional as F
from .kv_cache import KVCache
from .layers import DecodeLayouts, Dropout, Linear
from .module import Module


def _softmax_rows(scores, scale: float, softcap: float | None = None, bias=None):
    """softmax(scores * scale) along the last axis, in place, for decoding: a query's scores over the cache (a few
    short rows, each with its own key visible, so no row is all -inf); with a softcap, the scaled scores are capped
    first (softcapped), then the bias (-inf on hidden keys) is added. F.masked_softmax computes the same; its
    blocking and axis handling, made for training's large score matrices, cost several times these four passes on
    one token's rows (bench/NOTES.md)."""
    xp = backend.get_array_module(scores)
    scores *= scale
    if softcap is not None:
        scores = softcapped(scores, softcap, xp)
    if bias is not None:
        scores += bias
    scores -= scores.max(axis=-1, keepdims=True)
    xp.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    return scores


class MultiHeadAttention(Module):
    """Causal self-attention: one fused QKV projection, `n_head` query heads sharing `n_kv_head` key/value heads
    (GQA; MQA when n_kv_head = 1), optional RoPE on queries and keys, and the output projection.

    bias: on the projections; qkv_bias: on the q, k, v projections, None: as `bias` (Qwen2: on q, k, v, not on the
    output). dropout: on the attention weights (through scaled_dot_product_attention) and on the output.
    window: a query sees its own key and the `window` keys before it (None: all earlier keys). softcap: scores
    become softcap * tanh(scores / softcap) (Gemma 2). scale: of the scores, default 1/sqrt(head_dim).
    """

    def __init__(self, dim: int, n_head: int, n_kv_head: int | None = None, max_length: int = 1024,
                 bias: bool = True, dropout: float = 0.0, rope: bool = False, rope_theta: float = 10000.0,
                 head_dim: int | None = None, *, qkv_bias: bool | None = None, window: int | None = None,
                 softcap: float | None = None, scale: float | None = None):
        super().__init__()
        n_kv_head = n_kv_head or n_head
        if n_head % n_kv_head:
            raise ValueError(f"n_head ({n_head}) must be a multiple of n_kv_head ({n_kv_head})")
        if head_dim is None:
            if dim % n_head:
                raise ValueError(f"embedding size {dim} is not divisible by n_head {n_head}")
            head_dim = dim // n_head
        if window is not None and window < 0:
            raise ValueError(f"window must be None or a number of keys >= 0, got {window}")
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, head_dim
        self.c_attn = Linear(dim, (n_head + 2 * n_kv_head) * head_dim, bias if qkv_bias is None else qkv_bias)
        self.c_proj = Linear(n_head * head_dim, dim, bias)
        self.dropout_p = dropout
        self.resid_dropout = Dropout(dropout)
        self.window, self.softcap = window, softcap
        self.scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
        self.rope = rope
        if rope:
            cos, sin = F.rotary_tables(head_dim, max_length, rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, x: Tensor, kv_cache: KVCache | None = None, position_ids=None) -> Tensor:
        """x (B, T, C) -> (B, T, C). position_ids (B, T), for rows that pack several sequences (training on packed
        documents): a sequence starts at each row's first token and at each position 0, and attends only to itself
        (varlen attention); RoPE rotates each token by its own position."""
        if position_ids is not None:
            return self._packed_forward(x, position_ids, kv_cache)
        if kv_cache is not None and kv_cache.starts is not None:
            raise ValueError("MultiHeadAttention: a KV cache of rows that start at different indices (prompts of "
                             "different lengths) takes new tokens through decode, one per row")
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
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, **self._attention_options())  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, H * D)  # (B, H, T, D) -> (B, T, H*D)
        return self.resid_dropout(self.c_proj(y))

    def _packed_forward(self, x: Tensor, position_ids, kv_cache: KVCache | None) -> Tensor:
        """forward for rows of packed sequences: the tokens stay rows (B*T, heads, D), never transposed, which is the
        layout varlen attention takes. With kv_cache (empty), the sequences are prompts whose keys and values fill it,
        one cache row each (KVCache.store_sequences)."""
        B, T, _ = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        if tuple(position_ids.shape) != (B, T):
            raise ValueError(f"MultiHeadAttention: position_ids must have the shape (B, T) = {(B, T)} of the input, "
                             f"got {tuple(position_ids.shape)}")
        positions = backend.to_numpy(position_ids.data if isinstance(position_ids, Tensor) else position_ids)
        cu_seqlens, longest = F.cu_seqlens_from_positions(positions)
        qkv = self.c_attn(x).reshape(B * T, H + 2 * Hkv, D)
        q, k, v = qkv.split([H, Hkv, Hkv], dim=1)  # (B*T, H, D), (B*T, Hkv, D), (B*T, Hkv, D)
        if self.rope:
            rows = backend.to_device(positions.reshape(-1), x.device)
            with backend.device_scope(x.device):  # a gather: a kernel on the tables' device
                cos, sin = self.rope_cos[rows][:, None], self.rope_sin[rows][:, None]  # (B*T, 1, D)
            q, k = F.apply_rotary(q, cos, sin), F.apply_rotary(k, cos, sin)
        if kv_cache is not None:
            kv_cache.store_sequences(k.data, v.data, cu_seqlens)
        y = F.varlen_attention(q, k, v, cu_seqlens, cu_seqlens, longest, longest, is_causal=True,
                               **self._attention_options())  # (B*T, H, D)
        return self.resid_dropout(self.c_proj(y.reshape(B, T, H * D)))

    def _attention_options(self) -> dict:
        """The keywords of scaled_dot_product_attention and varlen_attention that this layer's settings give."""
        return dict(dropout_p=self.dropout_p if self.training else 0.0, scale=self.scale,
                    window=None if self.window is None else (self.window, 0), softcap=self.softcap)

    def decode(self, x, kv_cache: KVCache, layouts: DecodeLayouts):
        """forward in inference for one new token per sequence, on raw arrays (no graph): x (B, C) -> (B, C), the
        token's keys and values appended to kv_cache. The same maths in fewer ops: for one token the head split
        (B, 1, H+2Hkv, D) -> (B, H+2Hkv, 1, D) is a reshape, not a transpose; RoPE rotates q and k in one call; and
        a group's query heads attend as G rows of their K/V head, as in naive attention, with no mask to build: a
        sliding window is a slice of the cache. Rows that start at different cache indices (prompts of different
        lengths) take their positions and the bias hiding the keys before their start from the cache."""
        B = x.shape[0]
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        qkv = layouts.linear(x, self.c_attn).reshape(B, H + 2 * Hkv, 1, D)
        qk = qkv[:, : H + Hkv]
        if self.rope:
            position = kv_cache.positions()  # an int, or one per row (B,)
            cos, sin = self.rope_cos[position].reshape(-1, 1, 1, D), self.rope_sin[position].reshape(-1, 1, 1, D)
            qk = F.apply_rotary(Tensor(qk), cos, sin).data
        keys, values = kv_cache.store(qk[:, H:], qkv[:, H + Hkv :])  # (B, Hkv, S, D)
        first = 0
        if self.window is not None:  # the token, at index S - 1, sees keys S - 1 - window .. S - 1
            first = max(0, kv_cache.length - 1 - self.window)
            keys, values = keys[:, :, first:], values[:, :, first:]
        compute = np.result_type(x.dtype, np.float32)
        q = qk[:, :H].reshape(B, Hkv, H // Hkv, D).astype(compute, copy=False)  # (B, H, 1, D) -> (B, Hkv, G, D)
        scores = q @ keys.astype(compute, copy=False).swapaxes(-1, -2)  # (B, Hkv, G, S)
        weights = _softmax_rows(scores, self.scale, self.softcap, kv_cache.start_bias(first))
        y = (weights @ values.astype(compute, copy=False)).astype(x.dtype, copy=False)
        return layouts.linear(y.reshape(B, H * D), self.c_proj)

    def extra_repr(self) -> str:
        settings = f"n_head={self.n_head}, n_kv_head={self.n_kv_head}, head_dim={self.head_dim}, rope={self.rope}"
        return settings + "".join(f", {name}={getattr(self, name)}" for name in ("window", "softcap")
                                  if getattr(self, name) is not None)
