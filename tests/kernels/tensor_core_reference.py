"""References for the bf16/fp16 tensor-core attention kernels, written from the semantics of issue 17 (window, softcap,
ALiBi, per-batch lengths, Philox dropout: tinytf/kernels/attention_mask.cuh), and the kernels' launches.

float64 attention and gradients are the truth; a naive attention and backward that round where the kernels round set
the tolerance, as FlashAttention's tests do: the kernels' error may be at most ERROR_MULTIPLE times the naive error.
A TensorCoreCase holds its arrays in the element type, so every reference sees the inputs the kernels see.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from tinytf.attention.cuda import FlashAttentionKernels
from tinytf.kernels import tensor_core_variant

ELEMENT_TYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}
# Twice the naive path's error, as FlashAttention's own tests allow: the kernels round at the same points as the naive
# references, so only the order of the float32 sums (and exp's last bit) differs between them.
ERROR_MULTIPLE = 2
UNBOUNDED = -1


def rounded(x: np.ndarray, element_type: np.dtype) -> np.ndarray:
    """x rounded to nearest even in the element type, returned as float32 (which holds every such value exactly)."""
    return np.asarray(x, dtype=np.float32).astype(element_type).astype(np.float32)


# ---- Philox4x32-10, from Salmon et al. 2011 (the Random123 reference), for the dropout mask -----------------------
PHILOX_MULTIPLIERS = (0xD2511F53, 0xCD9E8D57)
PHILOX_WEYL = (0x9E3779B9, 0xBB67AE85)
LOW_WORD = 0xFFFFFFFF


def philox(counter, key) -> tuple[np.ndarray, ...]:
    """Philox4x32-10 of counter (c0, c1, c2, c3) under key (k0, k1), each an int or integer array (broadcast): the
    four output words as uint64 arrays holding uint32 values."""
    c0, c1, c2, c3 = (np.asarray(word, dtype=np.uint64) for word in counter)
    k0, k1 = (np.uint64(word) for word in key)
    m0, m1 = (np.uint64(m) for m in PHILOX_MULTIPLIERS)
    for round_index in range(10):
        if round_index:  # the key is bumped between rounds
            k0, k1 = ((k + np.uint64(w)) & np.uint64(LOW_WORD) for k, w in zip((k0, k1), PHILOX_WEYL))
        product0, product1 = m0 * c0, m1 * c2  # < 2^64: exact
        c0, c1, c2, c3 = ((product1 >> np.uint64(32)) ^ c1 ^ k0, product1 & np.uint64(LOW_WORD),
                          (product0 >> np.uint64(32)) ^ c3 ^ k1, product0 & np.uint64(LOW_WORD))
    return c0, c1, c2, c3


# ---- the problem ----------------------------------------------------------------------------------------------------
@dataclass
class TensorCoreCase:
    q: np.ndarray  # (B, Hq, T, d) in the element type; T, S: the padded lengths
    k: np.ndarray  # (B, Hkv, S, d)
    v: np.ndarray
    grad_out: np.ndarray  # (B, Hq, T, d)
    key_keep: np.ndarray  # (B, S) uint8
    scale: float
    is_causal: bool = False
    window: tuple[int, int] = (UNBOUNDED, UNBOUNDED)  # causal bounds the right side at 0
    softcap: float = 0.0  # 0: none
    alibi_slopes: np.ndarray | None = None  # (Hq,) or (B, Hq) float32
    query_lens: np.ndarray | None = None  # (B,) int32: T_b (varlen); None: every entry has T
    key_lens: np.ndarray | None = None  # (B,) int32: S_b
    dropout_p: float = 0.0
    dropout_seed: int = 0
    dropout_offset: int = 0

    @property
    def lengths(self) -> tuple[np.ndarray, np.ndarray]:
        """(T_b, S_b) as int32 (B,) arrays."""
        B, _, T, _ = self.q.shape
        S = self.k.shape[2]
        full = (np.full(B, length, dtype=np.int32) for length in (T, S))
        given = (self.query_lens, self.key_lens)
        return tuple(np.asarray(x, dtype=np.int32) if x is not None else f for x, f in zip(given, full))

    @property
    def bounds(self) -> tuple[int, int]:
        """(left, right) of the window, right 0 when causal."""
        return self.window[0], 0 if self.is_causal else self.window[1]

    def distance(self) -> np.ndarray:
        """(B, 1, T, S): j minus the absolute position i + S_b - T_b of query i."""
        query_lens, key_lens = self.lengths
        offset = (key_lens - query_lens)[:, None, None, None]
        T, S = self.q.shape[2], self.k.shape[2]
        return np.arange(S)[None, :] - (np.arange(T)[:, None] + offset)

    @property
    def visible(self) -> np.ndarray:
        """(B, 1, T, S) bool: key j is visible to query i."""
        query_lens, key_lens = self.lengths
        T, S = self.q.shape[2], self.k.shape[2]
        distance = self.distance()
        left, right = self.bounds
        visible = (self.key_keep.astype(bool)[:, None, None, :]
                   & (np.arange(T)[:, None] < query_lens[:, None, None, None])
                   & (np.arange(S)[None, :] < key_lens[:, None, None, None]))
        if left != UNBOUNDED:
            visible = visible & (distance >= -left)
        if right != UNBOUNDED:
            visible = visible & (distance <= right)
        return visible

    def slopes(self) -> np.ndarray:
        """(B, Hq) float32: the ALiBi slope of each (batch, query head), zeros when there is no ALiBi."""
        B, Hq = self.q.shape[:2]
        slopes = np.zeros(Hq, dtype=np.float32) if self.alibi_slopes is None else self.alibi_slopes
        return np.ascontiguousarray(np.broadcast_to(slopes, (B, Hq)), dtype=np.float32)

    @property
    def features(self) -> dict:
        """The launcher's keywords for the features of issue 17."""
        return dict(window=self.window, softcap=self.softcap or None, alibi_slopes=self.alibi_slopes,
                    query_lens=self.query_lens, key_lens=self.key_lens, dropout_p=self.dropout_p,
                    dropout_seed=self.dropout_seed, dropout_offset=self.dropout_offset)

    def repeated(self, x: np.ndarray) -> np.ndarray:
        """K or V repeated over the query heads that read it: (B, Hq, S, d)."""
        return np.repeat(x, self.q.shape[1] // x.shape[1], axis=1)

    def capped_scores(self, dtype) -> np.ndarray:
        """softcap tanh(scale q k^T / softcap) (or scale q k^T without softcap), (B, Hq, T, S) in dtype."""
        q, k = self.q.astype(dtype), self.repeated(self.k).astype(dtype)
        scores = q @ k.swapaxes(-1, -2) * dtype(self.scale)
        return dtype(self.softcap) * np.tanh(scores / dtype(self.softcap)) if self.softcap else scores

    def logits(self, dtype) -> np.ndarray:
        """The softmax's input: capped scores minus slope |i + S_b - T_b - j|, -inf where not visible."""
        bias = self.slopes().astype(dtype)[..., None, None] * -np.abs(self.distance()).astype(dtype)
        return np.where(self.visible, self.capped_scores(dtype) + bias, -np.inf).astype(dtype)

    def dropout_factors(self, dtype) -> np.ndarray:
        """(B, Hq, T, S): 0 for a dropped weight, 1 / (1 - p) for a kept one (all 1 without dropout)."""
        B, Hq, T, _ = self.q.shape
        S = self.k.shape[2]
        if not self.dropout_p:
            return np.ones((B, Hq, T, S), dtype=dtype)
        batch_heads = np.arange(B * Hq).reshape(B, Hq, 1, 1)
        counter = (np.arange(S).reshape(1, 1, 1, S), np.arange(T).reshape(1, 1, T, 1), batch_heads,
                   self.dropout_offset)
        u = philox(counter, (self.dropout_seed & LOW_WORD, self.dropout_seed >> 32))[0]
        kept = u >= math.floor(self.dropout_p * 2**32)
        return np.where(kept, dtype(1 / (1 - self.dropout_p)), dtype(0))


def backward_case(T: int, S: int, head_dim: int, is_causal: bool, dtype: str, *, batch: int = 1,
                  n_query_heads: int = 2, n_kv_heads: int = 1, hidden_keys: tuple[int, ...] = (), seed: int = 0,
                  **features) -> TensorCoreCase:
    """Random normal inputs in `dtype`; batch entry b hides its last hidden_keys[b] keys; features: the other fields
    of TensorCoreCase (window, softcap, alibi_slopes, query_lens, key_lens, dropout_*)."""
    rng = np.random.default_rng(seed)
    element = ELEMENT_TYPES[dtype]

    def normal(*shape):
        return rng.standard_normal(shape, dtype=np.float32).astype(element)

    key_keep = np.ones((batch, S), dtype=np.uint8)
    for entry, hidden in enumerate(hidden_keys):
        key_keep[entry, S - hidden:] = 0
    return TensorCoreCase(
        q=normal(batch, n_query_heads, T, head_dim), k=normal(batch, n_kv_heads, S, head_dim),
        v=normal(batch, n_kv_heads, S, head_dim), grad_out=normal(batch, n_query_heads, T, head_dim),
        key_keep=key_keep, scale=1.0 / math.sqrt(head_dim), is_causal=is_causal, **features,
    )


def element_case(T: int, S: int, head_dim: int, is_causal: bool, element_type: np.dtype, *, batch: int = 1,
                 hidden_keys: int = 0, **options) -> TensorCoreCase:
    """backward_case with flash_cases.make_case's padding argument: the last batch entry hides `hidden_keys` keys."""
    dtype = next(name for name, element in ELEMENT_TYPES.items() if element == element_type)
    hidden = (0,) * (batch - 1) + (hidden_keys,)
    return backward_case(T, S, head_dim, is_causal, dtype, batch=batch, hidden_keys=hidden, **options)


# name -> (T, S, causal, backward_case options): each feature of issue 17 alone, on lengths that are not multiples of
# any tile, then all of them together with grouped-query heads and key padding.
SLOPES = np.array([[0.5, 0.25, 0.125, 0.0625], [1.0, 0.3, 0.05, 0.0]], dtype=np.float32)  # (B, Hq)
FEATURE_CASES = {
    "sliding window": (97, 130, False, dict(window=(20, 5))),
    "causal window, T > S": (130, 97, True, dict(window=(24, UNBOUNDED))),  # the first 33 queries see no key
    "softcap": (70, 97, True, dict(softcap=2.0)),
    "ALiBi per batch and head": (70, 97, True, dict(batch=2, n_query_heads=4, n_kv_heads=2, alibi_slopes=SLOPES)),
    "varlen": (70, 130, True, dict(batch=3, query_lens=(17, 70, 1), key_lens=(40, 130, 97))),
    "dropout": (97, 97, True, dict(dropout_p=0.3, dropout_seed=0x0123456789ABCDEF, dropout_offset=7)),
    "all together": (70, 97, False, dict(batch=2, n_query_heads=4, n_kv_heads=1, hidden_keys=(0, 10),
                                         window=(30, 10), softcap=3.0, alibi_slopes=SLOPES[0],
                                         query_lens=(50, 70), key_lens=(97, 60), dropout_p=0.2,
                                         dropout_seed=2**64 - 3, dropout_offset=3)),
}


def padding_poisoned(case: TensorCoreCase) -> tuple[np.ndarray, ...]:
    """(q, k, v, grad_out) with NaN in the rows past each batch entry's T_b (q, grad_out) and S_b (k, v): what a
    padded varlen layout may hold there, and what a kernel must never read."""
    query_lens, key_lens = case.lengths
    arrays = tuple(x.copy() for x in (case.q, case.k, case.v, case.grad_out))
    for batch, (query_len, key_len) in enumerate(zip(query_lens, key_lens)):
        for x, length in zip(arrays, (query_len, key_len, key_len, query_len)):
            x[batch, :, length:] = np.nan
    return arrays


# ---- launching the kernels: tinytf.attention.cuda's launcher, on the emulator's modules ------------------------
def launcher(module, case: TensorCoreCase) -> FlashAttentionKernels:
    """The launcher on one module (the forward's, or the backward's, whose kernels it looks up in its last module)."""
    return FlashAttentionKernels((module,), tensor_core_variant(case.q.shape[-1], case.q.dtype))


def launch_forward(module, case: TensorCoreCase, inputs=None):
    """(out (B, Hq, T, d) in the element type, logsumexp (B, Hq, T) float32) from the forward kernel; `inputs`:
    (q, k, v) to launch with instead of the case's (the references still see the case's)."""
    q, k, v = inputs or (case.q, case.k, case.v)
    return launcher(module, case).forward(q, k, v, case.key_keep, case.scale, case.is_causal, **case.features)


def launch_backward(module, case: TensorCoreCase, out, logsumexp, inputs=None):
    """(dq, dk, dv) from the three backward kernels; `inputs`: (q, k, v, grad_out) instead of the case's."""
    q, k, v, grad_out = inputs or (case.q, case.k, case.v, case.grad_out)
    return launcher(module, case).backward(q, k, v, case.key_keep, out, logsumexp, grad_out, case.scale,
                                           case.is_causal, **case.features)


# ---- the forward ----------------------------------------------------------------------------------------------------
def softmax_rows(scores: np.ndarray) -> np.ndarray:
    """Softmax over the last axis in the scores' dtype; a row of -inf (no visible key) gives zeros."""
    peak = np.max(scores, axis=-1, keepdims=True)
    weights = np.exp(scores - np.where(np.isfinite(peak), peak, 0))
    total = weights.sum(axis=-1, keepdims=True)
    return weights / np.where(total > 0, total, 1)


def row_logsumexp(logits: np.ndarray) -> np.ndarray:
    """log sum_j exp over the last axis, -inf for a row that sees no key."""
    peak = np.max(logits, axis=-1, keepdims=True)
    peak = np.where(np.isfinite(peak), peak, 0)
    with np.errstate(divide="ignore"):
        return (peak + np.log(np.exp(logits - peak).sum(axis=-1, keepdims=True)))[..., 0]


def exact_forward(case: TensorCoreCase) -> tuple[np.ndarray, np.ndarray]:
    """float64 (O = dropout(P) V (B, Hq, T, d), L (B, Hq, T), -inf where a query sees no key)."""
    logits = case.logits(np.float64)
    weights = softmax_rows(logits) * case.dropout_factors(np.float64)
    return weights @ case.repeated(case.v).astype(np.float64), row_logsumexp(logits)


def forward_as_the_gpu_saves_it(case: TensorCoreCase) -> tuple[np.ndarray, np.ndarray]:
    """(O in the element type, L in float32), from the float64 forward."""
    out, logsumexp = exact_forward(case)
    return out.astype(case.q.dtype), logsumexp.astype(np.float32)


def naive_rounded_attention(case: TensorCoreCase) -> np.ndarray:
    """Attention rounded where the kernels round: logits and softmax in float32, the dropped P rounded to the element
    type before P V, float32 accumulation, the output rounded to the element type. (B, Hq, T, d) float32.

    The forward kernel rounds the unnormalized P = exp(S - m) (at most 1, like softmax's P) and divides by l after
    P V; rounding the normalized P here costs the same relative error per element."""
    P = rounded(softmax_rows(case.logits(np.float32)) * case.dropout_factors(np.float32), case.q.dtype)
    return rounded(P @ case.repeated(case.v).astype(np.float32), case.q.dtype)


def logsumexp_tolerance(case: TensorCoreCase, logsumexp: np.ndarray) -> np.ndarray:
    """A first-order bound on the float32 error of L_i = m_i + log(l_i), per row: (B, Hq, T).

    Each score is a d-term dot product of exact bf16/fp16 products summed in float32: error at most
    (d + 1) u scale sum_k |q_ik k_jk| (u = 2^-24); the softcap's tanh has slope at most 1 and adds a few u of the cap;
    the ALiBi bias adds u |bias|. exp2 and the log2(e) multiply add a few u relative to each term of l, the sum of
    S terms adds (S - 1) u, and log(l) turns l's relative error into an absolute one; the final m + log(l) adds about
    u |L|. Hence u ((d + 2) max_j scale sum_k |q_ik k_jk| + 4 softcap + 2 max_j |bias| + S + 8 + 8 |L_i|).
    """
    u = np.float64(2.0**-24)
    head_dim, key_len = case.q.shape[-1], case.k.shape[-2]
    keys = np.abs(case.repeated(case.k)).astype(np.float64)
    magnitudes = np.abs(case.q).astype(np.float64) @ keys.swapaxes(-1, -2)
    dot_bound = case.scale * magnitudes.max(axis=-1)
    bias_bound = case.slopes().astype(np.float64)[..., None] * np.abs(case.distance()).max(axis=-1)
    return u * ((head_dim + 2) * dot_bound + 4 * case.softcap + 2 * bias_bound + key_len + 8 + 8 * np.abs(logsumexp))


def assert_forward_matches_float64(case: TensorCoreCase, element: str, out: np.ndarray, logsumexp: np.ndarray) -> None:
    """The forward kernel's out (as float32) within ERROR_MULTIPLE of the naive rounded error, L within its bound;
    rows that see no key: zeros and L = -inf."""
    out = np.asarray(out, dtype=np.float32)
    assert case.q.dtype == ELEMENT_TYPES[element], f"the case holds {case.q.dtype}, not {element}"
    assert np.isfinite(out).all(), f"out: {np.count_nonzero(~np.isfinite(out))} elements unwritten or not finite"
    exact, expected = exact_forward(case)
    error = np.abs(out - exact).max()
    naive_error = np.abs(naive_rounded_attention(case) - exact).max()
    assert error <= ERROR_MULTIPLE * naive_error, (
        f"out: max error {error:.3g} > {ERROR_MULTIPLE} x naive {element} attention's {naive_error:.3g}")

    assert np.array_equal(logsumexp == -np.inf, expected == -np.inf), "L: the rows that see no key differ"
    assert not out[expected == -np.inf].any(), "out: a row that sees no key is not 0"
    finite = np.isfinite(expected)
    excess = np.abs(logsumexp[finite] - expected[finite]) - logsumexp_tolerance(case, expected)[finite]
    assert excess.max(initial=0.0) <= 0, f"L: off the float32 bound by {excess.max():.3g}"


# ---- the backward -------------------------------------------------------------------------------------------------
def gradients(case: TensorCoreCase, out: np.ndarray, logsumexp: np.ndarray, dtype, element=None,
              delta_from_output: bool = True) -> tuple[np.ndarray, ...]:
    """(dq, dk, dv) of softmax attention with the case's features, computed in `dtype` from the saved O and L.

    With Z the dropout factors and c the softcap: P = exp(logits - L), dV = (Z P)^T dO, dP = Z (dO V^T),
    dS = P (dP - D) c'(scale q k^T) with D = rowsum(dO * O) (as the kernels take it) or rowsum(P * dP) (whose
    error cancels against dP's where the exact gradient is 0), dQ = scale dS K, dK = scale dS^T Q. `element`: round
    Z P and dS to it before their products, and the results, as the kernels do."""
    q, k, v, grad_out = (x.astype(dtype) for x in (case.q, case.k, case.v, case.grad_out))
    k, v = case.repeated(k), case.repeated(v)
    with np.errstate(invalid="ignore", over="ignore"):
        P = np.where(case.visible, np.exp(case.logits(dtype) - logsumexp.astype(dtype)[..., None]), dtype(0))
    factors = case.dropout_factors(dtype)
    grad_p = factors * (grad_out @ v.swapaxes(-1, -2))
    D = (grad_out * out.astype(dtype) if delta_from_output else P * grad_p).sum(axis=-1, keepdims=True)
    cap_slope = 1 - (case.capped_scores(dtype) / dtype(case.softcap)) ** 2 if case.softcap else dtype(1)
    grad_scores = np.where(case.visible, P * (grad_p - D) * cap_slope, dtype(0))
    dropped = P * factors
    if element is not None:
        dropped, grad_scores = (x.astype(element).astype(dtype) for x in (dropped, grad_scores))
    B, Hkv, S, d = case.k.shape
    group = case.q.shape[1] // Hkv
    dq = dtype(case.scale) * (grad_scores @ k)
    dk = dtype(case.scale) * (grad_scores.swapaxes(-1, -2) @ q).reshape(B, Hkv, group, S, d).sum(axis=2)
    dv = (dropped.swapaxes(-1, -2) @ grad_out).reshape(B, Hkv, group, S, d).sum(axis=2)
    grads = (dq, dk, dv)
    return grads if element is None else tuple(x.astype(element) for x in grads)


def exact_gradients(case: TensorCoreCase) -> tuple[np.ndarray, ...]:
    """float64 (dq, dk, dv) at the element-type inputs."""
    return gradients(case, *exact_forward(case), np.float64)


def gradient_errors(case: TensorCoreCase, out, logsumexp, grads) -> dict[str, tuple[float, float]]:
    """{name: (kernel's max error, allowed)} for dq, dk, dv against float64; the naive backward rounds where the
    kernels round, from the same saved O and L, with either form of D."""
    exact = exact_gradients(case)
    naive = [gradients(case, out, logsumexp, np.float32, case.q.dtype, by_output) for by_output in (True, False)]
    errors = {}
    for index, name in enumerate(("dq", "dk", "dv")):
        naive_error = max(np.abs(n[index].astype(np.float64) - exact[index]).max() for n in naive)
        error = np.abs(grads[index].astype(np.float64) - exact[index]).max()
        errors[name] = (error, ERROR_MULTIPLE * naive_error)
    return errors


def assert_gradients_match(case: TensorCoreCase, out, logsumexp, grads) -> None:
    for name, grad in zip(("dq", "dk", "dv"), grads):
        finite = np.isfinite(grad.astype(np.float32))
        assert finite.all(), f"{name}: {finite.size - finite.sum()} elements unwritten or not finite"
    for name, (error, allowed) in gradient_errors(case, out, logsumexp, grads).items():
        assert error <= allowed, f"{name}: max error {error:.3g} > allowed {allowed:.3g}"
