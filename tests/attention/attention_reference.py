"""A materialized softmax attention on NumPy arrays, with its backward written out: the tests' reference.

Deliberately the plain way: repeat K/V for grouped-query attention, build the full (B, Hq, T, S) score matrix.
"""

from __future__ import annotations

import numpy as np


def reference_attention(q, k, v, dO=None, scale=None, is_causal=False, attn_mask=None, dtype=np.float64, window=None,
                        softcap=None, alibi_slopes=None, dropout_keep=None, dropout_p=0.0):
    """q (B, Hq, T, D), k, v (B, Hkv, S, D) -> O, or (O, dq, dk, dv) when dO is given; computed in `dtype`.

    The tests take it in a higher precision as the truth and measure float32 and float64 errors against it.

    attn_mask: bool (True = keep) or additive float, broadcastable to (B, Hq, T, S). Rows that see no key give 0.
    window (left, right), -1 unbounded: query i (at position i + S - T) sees keys i + S - T - left ... i + S - T +
    right; is_causal makes right 0. softcap: s -> softcap * tanh(s / softcap) after scaling; alibi_slopes (Hq,) or
    (B, Hq): s -> s - slope * |i + S - T - j| after that. dropout_keep: bool (B, Hq, T, S), the weights kept (and
    divided by 1 - dropout_p) after the softmax.
    """
    q, k, v = (np.asarray(x, dtype=dtype) for x in (q, k, v))
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = 1 / np.sqrt(D) if scale is None else scale
    dtype = np.dtype(dtype).type
    k_rep, v_rep = np.repeat(k, G, axis=1), np.repeat(v, G, axis=1)
    scores = q @ k_rep.transpose(0, 1, 3, 2) * dtype(scale)
    capped = None
    if softcap is not None:
        capped = np.tanh(scores / dtype(softcap))
        scores = dtype(softcap) * capped
    position = np.arange(T)[:, None] + (S - T)  # each query's own position among the keys
    j = np.arange(S)[None, :]
    if alibi_slopes is not None:
        slopes = np.broadcast_to(np.asarray(alibi_slopes, dtype=dtype), (B, Hq))
        scores = scores - slopes[:, :, None, None] * np.abs(position - j).astype(dtype)
    left, right = (-1, -1) if window is None else window
    right = 0 if is_causal else right
    keep = np.ones((T, S), dtype=bool)
    if left != -1:
        keep &= j >= position - left
    if right != -1:
        keep &= j <= position + right
    if attn_mask is not None and np.asarray(attn_mask).dtype == bool:
        keep = keep & np.asarray(attn_mask)
    elif attn_mask is not None:
        scores = scores + np.asarray(attn_mask, dtype=dtype)
    scores = np.where(keep, scores, -np.inf)
    m = scores.max(axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0)
    e = np.exp(scores - m)
    l = e.sum(axis=-1, keepdims=True)
    P = e / np.where(l > 0, l, 1)
    dropped = np.ones_like(P) if dropout_keep is None else np.where(dropout_keep, 1 / dtype(1 - dropout_p), 0)
    O = (P * dropped) @ v_rep
    if dO is None:
        return O
    dO = np.asarray(dO, dtype=dtype)
    dv = (P * dropped).transpose(0, 1, 3, 2) @ dO
    dP = (dO @ v_rep.transpose(0, 1, 3, 2)) * dropped
    dS = P * (dP - (dP * P).sum(axis=-1, keepdims=True))
    if capped is not None:
        dS = dS * (1 - capped**2)  # d/ds of softcap * tanh(s / softcap)
    dq = dS @ k_rep * dtype(scale)
    dk = dS.transpose(0, 1, 3, 2) @ q * dtype(scale)
    # Each K/V head fed G query heads: its gradient is the sum over them.
    dk = dk.reshape(B, Hkv, G, S, D).sum(axis=2)
    dv = dv.reshape(B, Hkv, G, S, D).sum(axis=2)
    return O, dq, dk, dv


def max_errors(results, truth):
    """Largest absolute error of each of the arrays in `results` against `truth`."""
    return [float(np.max(np.abs(np.asarray(r, dtype=np.longdouble) - t), initial=0.0)) for r, t in zip(results, truth)]


def assert_as_accurate_as_naive(results, q, k, v, dO=None, factor=4.0, **options):
    """Each of `results` (O, then dq, dk, dv if dO is given) is within `factor` times the error of the naive
    algorithm run in the same precision, both measured against the naive algorithm in a higher one (float64 for
    float32 and half results, long double for float64 ones).

    That is FlashAttention's own test criterion: a reordered computation may not be worse than a small multiple of
    the plain one's rounding error. Floors cover what FlashAttention-2 does differently by design, in the cases
    where naive's rounding cancels and flash's cannot:
    - a few ulps of the largest result;
    - for gradients, the rounding of D_i = rowsum(dO_i * O_i): FlashAttention-2 takes D from the saved O, while
      naive sums rowsum(P * dP) from the very dP it subtracts it from, so where dP - D cancels (few visible keys,
      D = 1) naive's error cancels too and flash's is ~ eps * sqrt(d) |dO| |v| * scale * |k or q|;
    - for gradients, P = exp(S - L) recomputed from L: the exponent carries the rounding of S and L, ~ eps * max|S|,
      straight into P, where naive's normalization cancels it for a dominant key. It shows only for large scores.
    """
    dtype = np.asarray(results[0]).dtype
    truth_dtype = np.longdouble if dtype == np.float64 else np.float64
    truth = reference_attention(q, k, v, dO, dtype=truth_dtype, **options)
    naive = reference_attention(q, k, v, dO, dtype=dtype, **options)
    truth = truth if dO is not None else (truth,)
    naive = naive if dO is not None else (naive,)
    eps = np.finfo(dtype).eps
    floors = [8 * eps * max([1.0] + [_max_abs(t) for t in truth])] * 4
    if dO is not None:
        d = q.shape[-1]
        scale = options.get("scale") or 1 / np.sqrt(d)
        rowsum_rounding = eps * np.sqrt(d) * _max_abs(dO) * _max_abs(v) * scale
        floors[1] += 8 * rowsum_rounding * _max_abs(k)
        floors[2] += 8 * rowsum_rounding * _max_abs(q)
        max_score = _max_abs(reference_scores(q, k, scale))
        for g in (1, 2, 3):
            floors[g] += 8 * eps * max_score * _max_abs(truth[g])
    names = ("O", "dq", "dk", "dv")
    for name, error, naive_error, floor in zip(names, max_errors(results, truth), max_errors(naive, truth), floors):
        assert error <= factor * naive_error + floor, (
            f"{name}: error {error:.3g} against {np.dtype(truth_dtype)}, naive {dtype} error {naive_error:.3g} "
            f"(allowed {factor * naive_error + floor:.3g})"
        )


def reference_scores(q, k, scale):
    """q k^T * scale in float64, with K/V heads repeated for grouped-query attention: (B, Hq, T, S)."""
    q, k = np.asarray(q, dtype=np.float64), np.asarray(k, dtype=np.float64)
    k = np.repeat(k, q.shape[1] // k.shape[1], axis=1)
    return q @ k.transpose(0, 1, 3, 2) * scale


def _max_abs(x) -> float:
    return float(np.max(np.abs(x), initial=0.0))
