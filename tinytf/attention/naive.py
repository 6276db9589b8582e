"""Attention the plain way: build every score, softmax each row, mix the values. The reference for all backends.

    s = Q K^T * scale                       scores (B, Hq, T, S) materialized, in float32 at least
    s = softcap * tanh(s / softcap)         if softcap
    s = s - slope * |i + S - T - j|         if alibi_slopes
    s = s + mask, hidden keys -> -inf       attn_mask, the window (causal is the window's right bound 0)
    O = dropout(softmax(s)) V               dropout's keep mask from Philox (dropout.py), as flash and cuda draw it

Composed of tinytf's differentiable ops, so its backward is autograd's and needs no code here. It costs
O(B * Hq * T * S) memory for the scores and the softmax kept for backward; the flash backend avoids that.
"""

from __future__ import annotations

import numpy as np

from .. import functional as F
from ..backend import get_array_module
from ..tensor import Tensor
from .dropout import dropout_keep
from .masks import UNBOUNDED, alibi_bias, normalized_window, softcapped, visibility


def naive_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask=None, is_causal: bool = False,
                    scale: float | None = None, dropout_p: float = 0.0, *, window=None, softcap: float | None = None,
                    alibi_slopes=None, dropout_seed: int | None = None, dropout_offset: int = 0,
                    dropout_first_batch: int = 0) -> Tensor:
    """q (B, Hq, T, D), k, v (B, Hkv, S, D) -> (B, Hq, T, D), with the meaning of scaled_dot_product_attention's
    arguments (its docstring).

    attn_mask: bool (True = attend) or additive float, broadcastable to (B, Hq, T, S); a float Tensor mask is
    differentiated too. alibi_slopes: an array (Hq,) or (B, Hq) on q's device. dropout_seed: None draws the dropout mask
    from tinytf's generator (F.dropout), an int gives the Philox mask the tiled backends draw. dropout_first_batch: the
    batch index of q's first sequence in the Philox counter (varlen attention runs sequence n as a batch of one that
    starts at n).
    Rows that see no key give zeros (and zero gradients), not NaN.
    """
    xp = get_array_module(q.data)
    B, Hq, T, D = q.shape
    _, Hkv, S, _ = k.shape
    compute = np.result_type(q.dtype, np.float32)
    weights = attention_probabilities(q, k, attn_mask, is_causal, scale, window=window, softcap=softcap,
                                      alibi_slopes=alibi_slopes)  # (B, Hkv, G*T, S)
    if dropout_p > 0 and dropout_seed is None:
        weights = F.dropout(weights, dropout_p)
    elif dropout_p > 0:
        batch_heads = dropout_first_batch * Hq + xp.arange(B * Hq)  # b * Hq + h, the counter's word 2
        kept = dropout_keep(dropout_seed, dropout_offset, batch_heads[:, None, None], xp.arange(T)[None, :, None],
                            xp.arange(S)[None, None, :], dropout_p, xp)
        kept_scaled = xp.where(kept, compute.type(1 / (1 - dropout_p)), compute.type(0))  # (B*Hq, T, S)
        weights = weights * Tensor(kept_scaled.reshape(B, Hkv, weights.shape[2], S))
    return F.cast((weights @ F.cast(v, compute)).reshape(B, Hq, T, D), q.dtype)


def attention_probabilities(q: Tensor, k: Tensor, attn_mask=None, is_causal: bool = False,
                            scale: float | None = None, *, window=None, softcap: float | None = None,
                            alibi_slopes=None) -> Tensor:
    """The attention weights before dropout, softmax(q k^T * scale, softcapped, + ALiBi, masked), of q (B, Hq, T, D)
    over k (B, Hkv, S, D) -> (B, Hkv, G*T, S), G = Hq // Hkv, in float32 at least: query head h = j G + g (the G
    consecutive heads that read K/V head j) is rows g T .. g T + T - 1 of head j. Rows that see no key are zeros.
    The arguments as naive_attention's."""
    xp = get_array_module(q.data)
    B, Hq, T, D = q.shape
    _, Hkv, S, _ = k.shape
    scale = 1.0 / np.sqrt(D) if scale is None else scale
    window = normalized_window(window, is_causal)
    compute = np.result_type(q.dtype, np.float32)
    q, k = (F.cast(x, compute) for x in (q, k))
    # Grouped-query attention: the G query heads that share a K/V head (consecutive heads) become G * T query rows
    # of that head, so K and V are used as they are, never repeated, and their gradients sum over the group.
    G = Hq // Hkv
    q = q.reshape(B, Hkv, G * T, D)
    scores = q @ k.transpose(-2, -1)  # (B, Hkv, G*T, S), scaled inside the softmax unless a bias needs it sooner
    keep = None
    if window != (UNBOUNDED, UNBOUNDED):
        keep = visibility(xp.arange(G * T) % T, xp.arange(S), T, S, window)  # rows ordered (head, position)
    if softcap is not None or alibi_slopes is not None:
        scores, scale = scores * scale, 1.0
        if softcap is not None:
            scores = softcapped(scores, softcap, F)
        if alibi_slopes is not None:
            slopes = xp.broadcast_to(xp.asarray(alibi_slopes, dtype=compute), (B, Hq))
            bias = alibi_bias(slopes, xp.arange(T), xp.arange(S), T, S, xp)  # (B, Hq, T, S)
            scores = scores + Tensor(bias.reshape(B, Hkv, G * T, S))
    if attn_mask is not None:
        if isinstance(attn_mask, Tensor) and attn_mask.dtype != bool:
            mask = attn_mask.reshape((1,) * (4 - attn_mask.ndim) + attn_mask.shape).expand(B, Hq, T, S)
            scores, scale = scores * scale + F.cast(mask.reshape(B, Hkv, G * T, S), compute), 1.0
        else:
            mask_data = attn_mask.data if isinstance(attn_mask, Tensor) else xp.asarray(attn_mask)
            grouped = xp.broadcast_to(mask_data, (B, Hq, T, S)).reshape(B, Hkv, G * T, S)
            if mask_data.dtype == bool:
                keep = grouped if keep is None else xp.logical_and(keep, grouped)
            else:
                scores, scale = scores * scale + Tensor(grouped.astype(compute, copy=False)), 1.0
    # A row that keeps no key is all zeros after the softmax (no NaN), so rows without a key give O = 0.
    return F.masked_softmax(scores, keep, scale)
