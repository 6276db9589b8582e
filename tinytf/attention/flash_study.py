"""FlashAttention-2, the study version: the paper's Algorithms 1 and 2, line by line, on arrays.

Tri Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning" (2023).
Attention O = softmax(S) V with S = Q K^T * scale needs each row's max and sum over all of its S scores, so the plain
way builds the whole (T, S) matrix. FlashAttention cuts Q into Tr row tiles of Br queries, and K, V into Tc column
tiles of Bc keys, and only ever holds one (Br, Bc) tile of scores S_ij.

Forward (Algorithm 1), the online softmax: row tile i keeps, per row, the max m of the scores seen so far, the sum l
of exp(score - m), and the output O_i not yet divided by l. When a column tile raises m, everything summed so far was
taken against a smaller max, so l and O_i are multiplied by exp(m_old - m_new) before the new tile is added. At the end
O_i = O_i / l, and the row log-sum-exp L_i = m + log(l) is saved for the backward (with O; the scores are not).

Backward (Algorithm 2): P_ij = exp(S_ij - L_i) is the softmax again, recomputed tile by tile from L without any max or
sum. The softmax's gradient dS = P * (dP - rowsum(P * dP)) needs a row sum over all keys, but that sum equals
D = rowsum(dO * O), computed once before the loops. The loop runs over column tiles j outside, so each dK_j, dV_j is
summed in one place, and adds each tile's share into dQ_i.

Also here, as in the tuned version (which adds windows, softcap, ALiBi and dropout):
- scale multiplies the scores (the paper folds it into Q);
- masks: a key a query may not see gets the score -inf, so P = 0 for it. Causal is aligned bottom-right (query t sees
  keys s <= t + S - T, masks.causal_visibility); key_mask is a key-padding mask, bool (B or 1, S), True = visible;
- grouped-query attention: query head h reads K/V head h // (Hq // Hkv); K and V are repeated for the query heads, and
  each K/V head's gradient is the sum over the query heads that read it;
- a row that sees no key at all gets O = 0 and L = -inf (the log of an empty sum); the backward takes +inf in its
  place, so that P = exp(S - L) = exp(-inf - inf) is 0, not NaN, and the row gets zero gradients.

Every tile is batched over the leading (B, Hq) axes; the arithmetic is in the inputs' dtype, float32 at least: half
precision (float16, bfloat16) is widened on the way in and O, dQ, dK, dV are rounded back once (L stays float32).
The tuned version of the same algorithm is flash.py; tests/attention/test_flash_study.py checks this one against a
float64 softmax(Q K^T) V and the tuned one against this one.
"""

from __future__ import annotations

from ..backend import compute_dtype, get_array_module
from .masks import causal_visibility


def flash_attention_forward(Q, K, V, scale, is_causal=False, key_mask=None, block_q=64, block_k=64):
    """Algorithm 1. Q (B, Hq, T, d), K, V (B, Hkv, S, d) -> O (B, Hq, T, d), L (B, Hq, T): the output and each row's
    log-sum-exp of its scores (-inf for a row that sees no key). block_q, block_k: the tile sizes Br, Bc."""
    xp = get_array_module(Q)
    out_dtype = Q.dtype
    Q, K, V = _widened(Q, K, V)
    T, S = Q.shape[2], K.shape[2]
    K, V = _repeat_kv(K, Q.shape[1]), _repeat_kv(V, Q.shape[1])  # (B, Hq, S, d)
    Br, Bc = block_q, block_k
    Tr, Tc = -(-T // Br), -(-S // Bc)
    O = xp.empty_like(Q)
    L = xp.empty(Q.shape[:3], Q.dtype)
    for i in range(Tr):
        rows = slice(i * Br, (i + 1) * Br)
        Q_i = Q[..., rows, :]  # (B, Hq, Br, d)
        O_i = xp.zeros_like(Q_i)
        l = xp.zeros(Q_i.shape[:3], Q.dtype)  # (B, Hq, Br)
        m = xp.full(Q_i.shape[:3], -xp.inf, Q.dtype)
        for j in range(Tc):
            cols = slice(j * Bc, (j + 1) * Bc)
            S_ij = _masked(Q_i @ K[..., cols, :].swapaxes(-1, -2) * scale, rows, cols, T, S, is_causal, key_mask)
            m_new = xp.maximum(m, S_ij.max(axis=-1))
            # A row that has seen no key yet keeps m = -inf; subtracting 0 instead makes its exp 0, not NaN.
            m_shift = xp.where(m_new > -xp.inf, m_new, 0)
            P_ij = xp.exp(S_ij - m_shift[..., None])  # (B, Hq, Br, Bc)
            l = xp.exp(m - m_shift) * l + P_ij.sum(axis=-1)
            O_i = xp.exp(m - m_shift)[..., None] * O_i + P_ij @ V[..., cols, :]
            m = m_new
        seen = l > 0  # False for a row that sees no key at all
        l = xp.where(seen, l, 1)
        O[..., rows, :] = O_i / l[..., None]
        L[..., rows] = xp.where(seen, m + xp.log(l), -xp.inf)
    return O.astype(out_dtype, copy=False), L


def flash_attention_backward(dO, Q, K, V, O, L, scale, is_causal=False, key_mask=None, block_q=64, block_k=64):
    """Algorithm 2. dO, Q, O (B, Hq, T, d), K, V (B, Hkv, S, d), L (B, Hq, T) from the forward -> dQ, dK, dV with
    the shapes of Q, K, V."""
    xp = get_array_module(Q)
    dtypes = Q.dtype, K.dtype, V.dtype
    dO, Q, K, V, O = _widened(dO, Q, K, V, O)
    (B, Hq, T, d), (_, Hkv, S, _) = Q.shape, K.shape
    K, V = _repeat_kv(K, Hq), _repeat_kv(V, Hq)  # (B, Hq, S, d)
    Br, Bc = block_q, block_k
    Tr, Tc = -(-T // Br), -(-S // Bc)
    D = (dO * O).sum(axis=-1)  # (B, Hq, T): rowsum(dO * O) = rowsum(P * dP)
    L = xp.where(L > -xp.inf, L, xp.inf)  # rows without keys: all their scores are -inf, and exp(-inf - inf) = 0
    dQ, dK, dV = xp.zeros_like(Q), xp.empty_like(K), xp.empty_like(V)
    for j in range(Tc):
        cols = slice(j * Bc, (j + 1) * Bc)
        K_j, V_j = K[..., cols, :], V[..., cols, :]  # (B, Hq, Bc, d)
        dK_j, dV_j = xp.zeros_like(K_j), xp.zeros_like(V_j)
        for i in range(Tr):
            rows = slice(i * Br, (i + 1) * Br)
            Q_i, dO_i, L_i, D_i = Q[..., rows, :], dO[..., rows, :], L[..., rows], D[..., rows]
            S_ij = _masked(Q_i @ K_j.swapaxes(-1, -2) * scale, rows, cols, T, S, is_causal, key_mask)
            P_ij = xp.exp(S_ij - L_i[..., None])  # (B, Hq, Br, Bc)
            dV_j += P_ij.swapaxes(-1, -2) @ dO_i
            dP_ij = dO_i @ V_j.swapaxes(-1, -2)
            dS_ij = P_ij * (dP_ij - D_i[..., None])
            dQ[..., rows, :] += dS_ij @ K_j * scale
            dK_j += dS_ij.swapaxes(-1, -2) @ Q_i * scale
        dK[..., cols, :], dV[..., cols, :] = dK_j, dV_j
    # Each K/V head was read by G = Hq // Hkv query heads: its gradient is the sum of theirs.
    dK = dK.reshape(B, Hkv, Hq // Hkv, S, d).sum(axis=2)
    dV = dV.reshape(B, Hkv, Hq // Hkv, S, d).sum(axis=2)
    return tuple(grad.astype(dtype, copy=False) for grad, dtype in zip((dQ, dK, dV), dtypes))


def _widened(*arrays):
    """The arrays in float32 at least (half precision computes in float32)."""
    return tuple(X.astype(compute_dtype(X.dtype), copy=False) for X in arrays)


def _repeat_kv(X, Hq: int):
    """(B, Hkv, S, d) -> (B, Hq, S, d): head h of the result is head h // (Hq // Hkv) of X."""
    return get_array_module(X).repeat(X, Hq // X.shape[1], axis=1)


def _masked(S_ij, rows: slice, cols: slice, T: int, S: int, is_causal: bool, key_mask):
    """The score tile S_ij (B, Hq, Br, Bc) with -inf where query `rows` may not see key `cols`: future keys when
    is_causal, and keys that key_mask (B or 1, S) marks False."""
    xp = get_array_module(S_ij)
    visible = xp.ones(S_ij.shape[-2:], bool)
    if is_causal:
        visible = causal_visibility(xp.arange(T)[rows], xp.arange(S)[cols], T, S)
    if key_mask is not None:
        visible = visible & key_mask[:, None, None, cols]
    return xp.where(visible, S_ij, -xp.inf)
