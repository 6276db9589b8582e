"""Attention the plain way: build every score, softmax each row, mix the values. The reference for all backends.

    O = dropout(softmax(Q K^T * scale + mask)) V        scores (B, Hq, T, S) materialized, softmax in float32 at least

Composed of tinytf's differentiable ops, so its backward is autograd's and needs no code here. It costs
O(B * Hq * T * S) memory for the scores and the softmax kept for backward; the flash backend avoids that.
"""

from __future__ import annotations

import numpy as np

from .. import functional as F
from ..backend import get_array_module
from ..tensor import Tensor
from .masks import causal_visibility


def naive_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask=None, is_causal: bool = False,
                    scale: float | None = None, dropout_p: float = 0.0) -> Tensor:
    """q (B, Hq, T, D), k, v (B, Hkv, S, D) -> (B, Hq, T, D).

    attn_mask: bool (True = attend) or additive float, broadcastable to (B, Hq, T, S); a float Tensor mask is
    differentiated too. is_causal aligns the mask bottom-right: query t sees keys s <= t + S - T.
    dropout_p: each attention weight is dropped with this probability (and the rest scaled by 1 / (1 - p)).
    Rows that see no key give zeros (and zero gradients), not NaN.
    """
    xp = get_array_module(q.data)
    B, Hq, T, D = q.shape
    _, Hkv, S, _ = k.shape
    scale = 1.0 / np.sqrt(D) if scale is None else scale
    out_dtype = q.dtype
    compute = np.result_type(q.dtype, np.float32)
    q, k, v = (F.cast(x, compute) for x in (q, k, v))
    # Grouped-query attention: the G query heads that share a K/V head (consecutive heads) become G * T query rows
    # of that head, so K and V are used as they are, never repeated, and their gradients sum over the group.
    G = Hq // Hkv
    q = q.reshape(B, Hkv, G * T, D)
    scores = q @ k.transpose(-2, -1)  # (B, Hkv, G*T, S), scaled inside the softmax
    keep = None
    if is_causal:
        keep = causal_visibility(xp.arange(G * T) % T, xp.arange(S), T, S)  # rows ordered (head, position)
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
    weights = F.dropout(F.masked_softmax(scores, keep, scale), dropout_p)
    return F.cast((weights @ v).reshape(B, Hq, T, D), out_dtype)
