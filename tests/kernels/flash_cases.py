"""Attention problems and the float64 check shared by the emulated and the GPU kernel tests.

A tolerance is justified as FlashAttention's tests do it: the kernel's error against a float64 reference may be at
most a small multiple of the error of plain float32 attention (materialized scores) against the same reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from attention.attention_reference import reference_attention
from tinytf.backend import to_numpy

LENGTHS = (1, 17, 97, 256)  # 1, lengths that are not multiples of any tile, and several full tiles
LENGTH_PAIRS = tuple((T, S) for T in LENGTHS for S in LENGTHS)  # T == S and T != S both ways
HEAD_DIMS = (16, 64, 128)
ERROR_MULTIPLE = 4  # the kernel may be this many times further from float64 than naive float32 attention
ERROR_FLOOR = 2e-6  # plus this much, for outputs where naive float32 happens to be (nearly) exact


@dataclass
class AttentionCase:
    q: np.ndarray  # (B, Hq, T, d) float32
    k: np.ndarray  # (B, Hkv, S, d)
    v: np.ndarray
    grad_out: np.ndarray  # (B, Hq, T, d)
    key_keep: np.ndarray  # (B, S) uint8, 1 = the key may be attended
    scale: float
    is_causal: bool

    @property
    def attn_mask(self) -> np.ndarray:
        """key_keep as reference_attention takes it: bool, broadcastable to (B, Hq, T, S)."""
        return self.key_keep.astype(bool)[:, None, None, :]


def make_case(T: int, S: int, head_dim: int, is_causal: bool, *, batch: int = 1, n_query_heads: int = 2,
              n_kv_heads: int = 1, hidden_keys: int = 0, seed: int = 0) -> AttentionCase:
    """Random float32 inputs; the last `hidden_keys` keys of the last batch entry are masked out."""
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return rng.standard_normal(shape, dtype=np.float32)

    key_keep = np.ones((batch, S), dtype=np.uint8)
    if hidden_keys:
        key_keep[-1, S - hidden_keys:] = 0
    return AttentionCase(
        q=normal(batch, n_query_heads, T, head_dim), k=normal(batch, n_kv_heads, S, head_dim),
        v=normal(batch, n_kv_heads, S, head_dim), grad_out=normal(batch, n_query_heads, T, head_dim),
        key_keep=key_keep, scale=1.0 / np.sqrt(head_dim), is_causal=is_causal,
    )


def masked_scores(case: AttentionCase, dtype) -> np.ndarray:
    """scale q k^T with -inf where a key is not visible: (B, Hq, T, S) in `dtype`, K repeated per query group."""
    q, k = case.q.astype(dtype), case.k.astype(dtype)
    scores = q @ np.repeat(k, q.shape[1] // k.shape[1], axis=1).transpose(0, 1, 3, 2) * dtype(case.scale)
    T, S = q.shape[2], k.shape[2]
    visible = np.broadcast_to(case.attn_mask, scores.shape)
    if case.is_causal:
        visible = visible & (np.arange(S)[None, :] <= np.arange(T)[:, None] + (S - T))
    return np.where(visible, scores, -np.inf)


def reference_logsumexp(case: AttentionCase) -> np.ndarray:
    """float64 L = log sum_j exp(S_ij) over visible keys, -inf for a query that sees none: (B, Hq, T)."""
    scores = masked_scores(case, np.float64)
    peak = np.max(scores, axis=-1, keepdims=True)
    peak = np.where(np.isfinite(peak), peak, 0.0)
    total = np.exp(scores - peak).sum(axis=-1)
    with np.errstate(divide="ignore"):
        return np.where(total > 0, peak[..., 0] + np.log(total), -np.inf)


def naive_float32_gradients_by_output(case: AttentionCase, out: np.ndarray):
    """Naive float32 (dq, dk, dv) with softmax's backward written as FlashAttention writes it, D = rowsum(dO * O).

    reference_attention writes D = rowsum(P * dP). Where the exact gradient is 0 (a query with one visible key), that
    form cancels exactly in float32 and this one leaves rounding; so both are fair baselines for the kernels' error.
    """
    scores = masked_scores(case, np.float32)
    peak = np.max(scores, axis=-1, keepdims=True)
    weights = np.exp(scores - np.where(np.isfinite(peak), peak, 0))
    total = weights.sum(axis=-1, keepdims=True)
    P = weights / np.where(total > 0, total, 1)
    group = case.q.shape[1] // case.k.shape[1]
    k, v = (np.repeat(x, group, axis=1) for x in (case.k, case.v))
    D = (case.grad_out * out.astype(np.float32)).sum(axis=-1, keepdims=True)
    dS = P * (case.grad_out @ v.transpose(0, 1, 3, 2) - D) * np.float32(case.scale)
    B, Hkv, S, d = case.k.shape
    dk = (dS.transpose(0, 1, 3, 2) @ case.q).reshape(B, Hkv, group, S, d).sum(axis=2)
    dv = (P.transpose(0, 1, 3, 2) @ case.grad_out).reshape(B, Hkv, group, S, d).sum(axis=2)
    return dS @ k, dk, dv


def assert_matches_reference(case: AttentionCase, out, logsumexp=None, grads=None) -> None:
    """out (and L, and (dq, dk, dv) when given) against float64, within ERROR_MULTIPLE of naive float32's error."""
    args = (case.q, case.k, case.v, case.grad_out)
    options = dict(scale=case.scale, is_causal=case.is_causal, attn_mask=case.attn_mask)
    exact = reference_attention(*args, dtype=np.float64, **options)
    naive = reference_attention(*args, dtype=np.float32, **options)
    results = {"out": out}
    naive_errors = {"out": np.abs(naive[0] - exact[0]).max()}
    if grads is not None:
        results.update(zip(("dq", "dk", "dv"), grads))
        by_output = naive_float32_gradients_by_output(case, naive[0])
        for index, name in enumerate(("dq", "dk", "dv"), start=1):
            naive_errors[name] = max(np.abs(naive[index] - exact[index]).max(),
                                     np.abs(by_output[index - 1] - exact[index]).max())
    for index, (name, result) in enumerate(results.items()):
        result = to_numpy(result)
        assert np.isfinite(result).all(), f"{name}: {np.isnan(result).sum()} elements unwritten or not finite"
        error = np.abs(result - exact[index]).max()
        allowed = ERROR_MULTIPLE * naive_errors[name] + ERROR_FLOOR
        assert error <= allowed, f"{name}: max error {error:.3g} > allowed {allowed:.3g}"
    if logsumexp is not None:
        expected = reference_logsumexp(case)
        logsumexp = to_numpy(logsumexp)
        assert np.array_equal(logsumexp == -np.inf, expected == -np.inf), "L: rows without visible keys differ"
        finite = np.isfinite(expected)
        assert np.abs(logsumexp[finite] - expected[finite]).max(initial=0.0) <= 1e-5 * (1 + np.abs(expected).max())


# Issue 17's features, for padded inputs with per-batch lengths T_b, S_b (offset S_b - T_b), written from the issue:
#     s = scale q.k;  s = c tanh(s / c);  s -= slope |i + offset - j|;  hidden keys -> -inf;  P = softmax(s)
#     O = (P * Z) V with Z = keep / (1 - p) from Philox4x32-10;  a row that sees no key gives 0 and L = -inf.
# A kernel may be ERROR_MULTIPLE times further from float64 than the same formulas in float32 are, plus ERROR_FLOOR.
PHILOX_M0, PHILOX_M1, PHILOX_W0, PHILOX_W1 = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85


def philox_word0(c0, c1, c2, c3, seed: int):
    """Word 0 of Philox4x32-10 (Salmon et al. 2011) on uint64 arrays holding 32-bit values."""
    low = np.uint64(0xFFFFFFFF)
    c = [np.asarray(x, dtype=np.uint64) for x in (c0, c1, c2, c3)]
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64(seed >> 32)
    for round_index in range(10):
        if round_index:
            k0, k1 = (k0 + np.uint64(PHILOX_W0)) & low, (k1 + np.uint64(PHILOX_W1)) & low
        p0, p1 = c[0] * np.uint64(PHILOX_M0), c[2] * np.uint64(PHILOX_M1)
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ k0, p1 & low, (p0 >> np.uint64(32)) ^ c[3] ^ k1, p0 & low]
    return c[0]


def feature_reference(q, k, v, grad_out, *, scale, dtype, query_lens=None, key_lens=None, key_keep=None,
                      window=(-1, -1), softcap=None, alibi=None, dropout_p=0.0, seed=0, offset=0):
    """(out, L, dq, dk, dv) of padded (B, H, T|S, d) inputs, in `dtype`. key_keep: (B, S), False hides a key."""
    B, Hq, T, _ = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    group = Hq // Hkv
    query_lens = np.full(B, T) if query_lens is None else np.asarray(query_lens)
    key_lens = np.full(B, S) if key_lens is None else np.asarray(key_lens)
    q, grad_out = q.astype(dtype), grad_out.astype(dtype)
    k, v = (np.repeat(x.astype(dtype), group, axis=1) for x in (k, v))
    i = np.arange(T)[None, None, :, None]
    j = np.arange(S)[None, None, None, :]
    Tb, Sb = query_lens[:, None, None, None], key_lens[:, None, None, None]
    position = i + Sb - Tb
    visible = (i < Tb) & (j < Sb)
    if window[0] >= 0:
        visible &= j >= position - window[0]
    if window[1] >= 0:
        visible &= j <= position + window[1]
    if key_keep is not None:
        visible = visible & key_keep.astype(bool)[:, None, None, :]
    visible = np.broadcast_to(visible, (B, Hq, T, S))
    raw = (q @ k.transpose(0, 1, 3, 2)) * dtype(scale)
    capped = softcap * np.tanh(raw / dtype(softcap)) if softcap else raw
    slopes = np.zeros((B, Hq)) if alibi is None else np.broadcast_to(alibi, (B, Hq))
    scores = capped - slopes[:, :, None, None].astype(dtype) * np.abs(position - j).astype(dtype)
    scores = np.where(visible, scores, -np.inf)
    peak = scores.max(axis=-1, keepdims=True)
    peak = np.where(np.isfinite(peak), peak, 0)
    weights = np.exp(scores - peak)
    total = weights.sum(axis=-1, keepdims=True)
    P = weights / np.where(total > 0, total, 1)
    with np.errstate(divide="ignore"):
        L = np.where(total[..., 0] > 0, peak[..., 0] + np.log(total[..., 0]), -np.inf)
    batch_head = (np.arange(B)[:, None] * Hq + np.arange(Hq)[None, :])[:, :, None, None]
    u = philox_word0(j, i, batch_head, offset, seed)
    Z = np.where(u >= np.uint64(int(dropout_p * 2**32)), dtype(1 / (1 - dropout_p)), dtype(0))
    out = (P * Z) @ v
    dP = (grad_out @ v.transpose(0, 1, 3, 2)) * Z
    dS = P * (dP - (P * dP).sum(axis=-1, keepdims=True))
    if softcap:
        dS = dS * (1 - (capped / dtype(softcap)) ** 2)
    dq = dS @ k * dtype(scale)
    dk = (dS.transpose(0, 1, 3, 2) @ q * dtype(scale)).reshape(B, Hkv, group, S, -1).sum(axis=2)
    dv = ((P * Z).transpose(0, 1, 3, 2) @ grad_out).reshape(B, Hkv, group, S, -1).sum(axis=2)
    return out, L, dq, dk, dv


def feature_inputs(B, Hq, Hkv, T, S, d, seed):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape, dtype=np.float32) for shape in
            ((B, Hq, T, d), (B, Hkv, S, d), (B, Hkv, S, d), (B, Hq, T, d))]


def assert_matches_feature_reference(results, arrays, **options):
    """results (out, L, dq, dk, dv), NumPy or CuPy arrays (L may be None), of arrays (q, k, v, grad_out) under the
    keywords of feature_reference."""
    exact = feature_reference(*arrays, dtype=np.float64, **options)
    naive = feature_reference(*arrays, dtype=np.float32, **options)
    for name, result, want, baseline in zip(("out", "L", "dq", "dk", "dv"), results, exact, naive):
        if result is None:
            continue
        result = to_numpy(result)
        if name == "L":
            assert np.array_equal(result == -np.inf, want == -np.inf), "L: rows without visible keys differ"
            finite = np.isfinite(want)
            assert np.abs(result[finite] - want[finite]).max(initial=0) <= 1e-5 * (1 + np.abs(want[finite]).max())
            continue
        assert np.isfinite(result).all(), f"{name}: not finite"
        error = np.abs(result - want).max()
        allowed = ERROR_MULTIPLE * np.abs(baseline - want).max() + ERROR_FLOOR
        assert error <= allowed, f"{name}: max error {error:.3g} > allowed {allowed:.3g}"
