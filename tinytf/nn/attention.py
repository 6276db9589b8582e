"""Multi-head attention: causal or bidirectional self-attention with grouped-query heads, rotary positions, an
optional sliding window and logit softcap, key-padding masks and a KV cache for decoding; and cross-attention, whose
keys and values come from an encoder's output, computed once per source (ContextKV)."""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import numpy as np

from .. import backend
from ..attention.masks import softcapped
from ..attention.naive import attention_probabilities
from ..functional.rotary import rotate
from ..tensor import Tensor, array_of, no_grad
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


# The list that MultiHeadAttention.forward appends its attention weights to, while record_attention_weights is active;
# None otherwise, so that forward pays one global lookup when nothing records.
_recorded_weights: list | None = None


@contextlib.contextmanager
def record_attention_weights():
    """While active, each MultiHeadAttention.forward (not the packed rows of position_ids, not decode) appends its
    attention weights (B, H, T, S), an array in float32 at least, to the list this yields, in call order: one per
    layer of a decoder. They are computed apart from the layer's output (attention_weights), which stays the same."""
    global _recorded_weights
    previous, _recorded_weights = _recorded_weights, []
    try:
        yield _recorded_weights
    finally:
        _recorded_weights = previous


def attention_weights(q, k, attn_mask=None, is_causal: bool = False, scale: float = 1.0, *, window=None,
                      softcap: float | None = None):
    """The attention weights P (B, Hq, T, S), an array in float32 at least, of queries q (B, Hq, T, D) over keys k
    (B, Hkv, S, D), arrays, as scaled_dot_product_attention defines them: the naive backend's weights before dropout
    (attention.naive.attention_probabilities), query head h reading K/V head h // (Hq // Hkv); zeros in a row that
    sees no key. attn_mask: bool, broadcastable to (B, Hq, T, S)."""
    B, Hq, T, _ = q.shape
    with no_grad():
        weights = attention_probabilities(Tensor(q), Tensor(k), attn_mask, is_causal, scale, window=window,
                                          softcap=softcap)  # (B, Hkv, G*T, S)
    return weights.data.reshape(B, Hq, T, -1)


class ContextKV(NamedTuple):
    """A cross-attention layer's keys and values of one batch of sources (B, Hkv, S, D), and the sources' padding
    (B, S) bool, True = a token, or None: computed once per source (context_keys_values), read by every decoding
    step."""
    keys: Tensor
    values: Tensor
    key_padding_mask: object = None


def _checked_key_padding_mask(key_padding_mask, batch_size: int, S: int, device: str):
    """A key_padding_mask (B, S) bool, Tensor or array, as an array on `device`."""
    mask = backend.to_device(array_of(key_padding_mask), device)
    if tuple(mask.shape) != (batch_size, S) or mask.dtype != np.bool_:
        raise ValueError(f"MultiHeadAttention: key_padding_mask must be bool of shape (B, S) = {(batch_size, S)}, "
                         f"got {mask.dtype} of shape {tuple(mask.shape)}")
    return mask


def _padding_bias(key_padding_mask):
    """The scores' bias (B, 1, 1, S) float32 for decoding: -inf on padding keys, 0 on tokens."""
    xp = backend.get_array_module(key_padding_mask)
    return xp.where(key_padding_mask[:, None, None, :], np.float32(0), np.float32(-np.inf))


class MultiHeadAttention(Module):
    """Multi-head attention: `n_head` query heads sharing `n_kv_head` key/value heads (GQA; MQA when n_kv_head = 1),
    optional RoPE on queries and keys, and the output projection.

    Self-attention (cross=False) has one fused QKV projection, c_attn; causal=False makes it bidirectional (an
    encoder's). Cross-attention (cross=True) takes its queries from x through q_proj and its keys and values from a
    context (B, S, context_dim) through one fused KV projection, kv_proj (BART's and T5's separate q and k, v
    weights); it is never causal and takes neither RoPE nor a window, the source's positions being apart from the
    target's.

    bias: on the projections; qkv_bias: on the q, k, v projections, None: as `bias` (Qwen2: on q, k, v, not on the
    output). dropout: on the attention weights (through scaled_dot_product_attention) and on the output.
    window: a query sees its own key and the `window` keys before it (None: all earlier keys). softcap: scores
    become softcap * tanh(scores / softcap) (Gemma 2). scale: of the scores, default 1/sqrt(head_dim).
    """

    def __init__(self, dim: int, n_head: int, n_kv_head: int | None = None, max_length: int = 1024,
                 bias: bool = True, dropout: float = 0.0, rope: bool = False, rope_theta: float = 10000.0,
                 head_dim: int | None = None, *, qkv_bias: bool | None = None, window: int | None = None,
                 softcap: float | None = None, scale: float | None = None, causal: bool = True, cross: bool = False,
                 context_dim: int | None = None):
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
        if cross and (rope or window is not None):
            raise ValueError("MultiHeadAttention: cross-attention takes neither rope nor a window (the source's "
                             "positions are apart from the target's)")
        if context_dim is not None and not cross:
            raise ValueError("MultiHeadAttention: context_dim is the size of cross-attention's context; this layer "
                             "has cross=False")
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, head_dim
        self.cross, self.causal = cross, causal and not cross
        qkv_bias = bias if qkv_bias is None else qkv_bias
        if cross:
            self.q_proj = Linear(dim, n_head * head_dim, qkv_bias)
            self.kv_proj = Linear(context_dim or dim, 2 * n_kv_head * head_dim, qkv_bias)
        else:
            self.c_attn = Linear(dim, (n_head + 2 * n_kv_head) * head_dim, qkv_bias)
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

    def forward(self, x: Tensor, kv_cache: KVCache | None = None, position_ids=None, *, key_padding_mask=None,
                context: Tensor | ContextKV | None = None) -> Tensor:
        """x (B, T, C) -> (B, T, C).

        key_padding_mask (B, S) bool, True = a token, False = padding: the keys that queries may see, S = T (plus the
        cached keys with kv_cache; the source's length in cross-attention). It reaches scaled_dot_product_attention
        as attn_mask (B, 1, 1, S), a key-padding mask that its flash and cuda backends take.
        position_ids (B, T), for rows that pack several sequences (training on packed documents): a sequence starts at
        each row's first token and at each position 0, and attends only to itself (varlen attention); RoPE rotates
        each token by its own position.
        context (cross-attention only): the encoder's output (B, S, context_dim) with its key_padding_mask, or their
        ContextKV from context_keys_values (generation computes it once per source).
        """
        if self.cross != (context is not None):
            raise ValueError("MultiHeadAttention: cross-attention takes a context, self-attention none; this layer "
                             f"has cross={self.cross}")
        if position_ids is not None:
            if self.cross or key_padding_mask is not None:
                raise ValueError("MultiHeadAttention: position_ids (rows of packed sequences) are for "
                                 "self-attention without a key_padding_mask")
            return self._packed_forward(x, position_ids, kv_cache)
        if kv_cache is not None and kv_cache.starts is not None:
            raise ValueError("MultiHeadAttention: a KV cache of rows that start at different indices (prompts of "
                             "different lengths) takes new tokens through decode, one per row")
        B, T, _ = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        if self.cross:
            if kv_cache is not None:
                raise ValueError("MultiHeadAttention: cross-attention keeps its keys and values in a ContextKV "
                                 "(context_keys_values), not in a KV cache")
            if not isinstance(context, ContextKV):
                context = self.context_keys_values(context, key_padding_mask)
            elif key_padding_mask is not None:
                raise ValueError("MultiHeadAttention: a ContextKV carries its source's key_padding_mask; give no "
                                 "other")
            q = self.q_proj(x).reshape(B, T, H, D).transpose(1, 2)  # (B, T, H*D) -> (B, H, T, D)
            k, v, key_padding_mask = context
        else:
            # One reshape and one transpose for q, k and v together (rather than one of each per tensor), then a split.
            qkv = self.c_attn(x).reshape(B, T, H + 2 * Hkv, D).transpose(1, 2)  # -> (B, H+2Hkv, T, D)
            q, k, v = qkv.split([H, Hkv, Hkv], dim=1)  # (B, H, T, D), (B, Hkv, T, D), (B, Hkv, T, D)
            if self.rope:
                start = kv_cache.length if kv_cache is not None else 0
                cos, sin = self.rope_cos[start : start + T], self.rope_sin[start : start + T]
                q, k = F.apply_rotary(q, cos, sin), F.apply_rotary(k, cos, sin)
            if kv_cache is not None:
                k, v = kv_cache.append(k, v)  # (B, Hkv, S, D) with S = cached + T
        attn_mask = None
        if key_padding_mask is not None:  # (B, S) -> (B, 1, 1, S): key padding, which the tiled backends take
            attn_mask = _checked_key_padding_mask(key_padding_mask, B, k.shape[2], x.device)[:, None, None, :]
        options = self._attention_options()
        if _recorded_weights is not None:
            with backend.device_scope(x.device):
                _recorded_weights.append(attention_weights(q.data, k.data, attn_mask, self.causal, options["scale"],
                                                           window=options["window"], softcap=options["softcap"]))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask, is_causal=self.causal, **options)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, H * D)  # (B, H, T, D) -> (B, T, H*D)
        return self.resid_dropout(self.c_proj(y))

    def context_keys_values(self, context: Tensor, key_padding_mask=None) -> ContextKV:
        """Cross-attention's keys and values of a context (B, S, context_dim), with its padding (B, S) bool or None."""
        B, S, _ = context.shape
        if key_padding_mask is not None:
            key_padding_mask = _checked_key_padding_mask(key_padding_mask, B, S, context.device)
        kv = self.kv_proj(context).reshape(B, S, 2 * self.n_kv_head, self.head_dim).transpose(1, 2)
        keys, values = kv.split([self.n_kv_head, self.n_kv_head], dim=1)  # (B, Hkv, S, D) each
        return ContextKV(keys, values, key_padding_mask)

    def _packed_forward(self, x: Tensor, position_ids, kv_cache: KVCache | None) -> Tensor:
        """forward for rows of packed sequences: the tokens stay rows (B*T, heads, D), never transposed, which is the
        layout varlen attention takes. With kv_cache (empty), the sequences are prompts whose keys and values fill it,
        one cache row each (KVCache.store_sequences)."""
        B, T, _ = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        if tuple(position_ids.shape) != (B, T):
            raise ValueError(f"MultiHeadAttention: position_ids must have the shape (B, T) = {(B, T)} of the input, "
                             f"got {tuple(position_ids.shape)}")
        positions = backend.to_numpy(array_of(position_ids))
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
        y = F.varlen_attention(q, k, v, cu_seqlens, cu_seqlens, longest, longest, is_causal=self.causal,
                               **self._attention_options())  # (B*T, H, D)
        return self.resid_dropout(self.c_proj(y.reshape(B, T, H * D)))

    def _attention_options(self) -> dict:
        """The keywords of scaled_dot_product_attention and varlen_attention that this layer's settings give."""
        return dict(dropout_p=self.dropout_p if self.training else 0.0, scale=self.scale,
                    window=None if self.window is None else (self.window, 0 if self.causal else self.window),
                    softcap=self.softcap)

    def decode(self, x, kv_cache: KVCache | ContextKV, layouts: DecodeLayouts):
        """forward in inference for one new token per sequence, on raw arrays (no graph): x (B, C) -> (B, C), the
        token's keys and values appended to kv_cache (cross-attention: kv_cache is the sources' ContextKV, read only).
        The same maths in fewer ops: for one token the head split (B, 1, H+2Hkv, D) -> (B, H+2Hkv, 1, D) is a
        reshape, not a transpose; RoPE rotates q and k in one call; and a group's query heads attend as G rows of
        their K/V head, as in naive attention, with no mask to build: a sliding window is a slice of the cache. Rows
        that start at different cache indices (prompts of different lengths) take their positions and the bias
        hiding the keys before their start from the cache."""
        B = x.shape[0]
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        compute = np.result_type(x.dtype, np.float32)
        if self.cross:
            q = layouts.linear(x, self.q_proj).reshape(B, H, 1, D)
            keys, values = kv_cache.keys.data, kv_cache.values.data  # (B, Hkv, S, D)
            bias = None if kv_cache.key_padding_mask is None else _padding_bias(kv_cache.key_padding_mask)
        else:
            qkv = layouts.linear(x, self.c_attn).reshape(B, H + 2 * Hkv, 1, D)
            qk = qkv[:, : H + Hkv]
            if self.rope:
                position = kv_cache.positions()  # an int, or one per row (B,)
                cos, sin = self.rope_cos[position].reshape(-1, 1, 1, D), self.rope_sin[position].reshape(-1, 1, 1, D)
                qk = rotate(qk.astype(compute, copy=False), cos, sin).astype(x.dtype, copy=False)  # no Tensor
            q = qk[:, :H]
            keys, values = kv_cache.store(qk[:, H:], qkv[:, H + Hkv :])  # (B, Hkv, S, D)
            first = 0
            if self.window is not None:  # the token, at index S - 1, sees keys S - 1 - window .. S - 1
                first = max(0, kv_cache.length - 1 - self.window)
                keys, values = keys[:, :, first:], values[:, :, first:]
            bias = kv_cache.start_bias(first)
        q = q.reshape(B, Hkv, H // Hkv, D).astype(compute, copy=False)  # (B, H, 1, D) -> (B, Hkv, G, D)
        scores = q @ keys.astype(compute, copy=False).swapaxes(-1, -2)  # (B, Hkv, G, S)
        weights = _softmax_rows(scores, self.scale, self.softcap, bias)
        y = (weights @ values.astype(compute, copy=False)).astype(x.dtype, copy=False)
        return layouts.linear(y.reshape(B, H * D), self.c_proj)

    def extra_repr(self) -> str:
        settings = f"n_head={self.n_head}, n_kv_head={self.n_kv_head}, head_dim={self.head_dim}, rope={self.rope}"
        if self.cross or not self.causal:  # the settings apart from a decoder's causal self-attention
            settings += ", cross=True" if self.cross else ", causal=False"
        return settings + "".join(f", {name}={getattr(self, name)}" for name in ("window", "softcap")
                                  if getattr(self, name) is not None)
