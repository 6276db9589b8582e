"""References for the bf16/fp16 tensor-core attention kernels: float64 attention and gradients, and the naive
attention and backward that round where the kernels round, whose errors set the kernels' tolerance (as FlashAttention's
tests do: at most ERROR_MULTIPLE times the naive error).

The forward references take an AttentionCase (tests/kernels/flash_cases.py) whose q, k, v already hold values of the
element type (stored as float32, exactly); the backward ones a BackwardCase with arrays in the element type. Either
way every reference sees the inputs the kernel sees.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from attention.attention_reference import reference_attention
from kernels.flash_cases import AttentionCase, make_case, masked_scores, reference_logsumexp

ELEMENT_TYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}
# Twice the naive path's error, as FlashAttention's own tests allow: the kernels round at the same points as the naive
# references, so only the order of the float32 sums (and exp's last bit) differs between them.
ERROR_MULTIPLE = 2


def rounded(x: np.ndarray, element_type: np.dtype) -> np.ndarray:
    """x rounded to nearest even in the element type, returned as float32 (which holds every such value exactly)."""
    return np.asarray(x, dtype=np.float32).astype(element_type).astype(np.float32)


def element_case(T: int, S: int, head_dim: int, is_causal: bool, element_type: np.dtype, **options) -> AttentionCase:
    """make_case with q, k, v rounded to the element type: (B, Hq, T, d) and (B, Hkv, S, d) float32."""
    case = make_case(T, S, head_dim, is_causal, **options)
    case.q, case.k, case.v = (rounded(x, element_type) for x in (case.q, case.k, case.v))
    return case


def softmax_rows(scores: np.ndarray) -> np.ndarray:
    """Softmax over the last axis in the scores' dtype; a row of -inf (no visible key) gives zeros."""
    peak = np.max(scores, axis=-1, keepdims=True)
    weights = np.exp(scores - np.where(np.isfinite(peak), peak, 0))
    total = weights.sum(axis=-1, keepdims=True)
    return weights / np.where(total > 0, total, 1)


def repeated_kv(case: AttentionCase, x: np.ndarray) -> np.ndarray:
    """K or V (B, Hkv, S, d) repeated to (B, Hq, S, d): query head h reads K/V head h // (Hq / Hkv)."""
    return np.repeat(x, case.q.shape[1] // x.shape[1], axis=1)


def exact_attention(case: AttentionCase) -> np.ndarray:
    """softmax(scale Q K^T + mask) V in float64: (B, Hq, T, d)."""
    return softmax_rows(masked_scores(case, np.float64)) @ repeated_kv(case, case.v).astype(np.float64)


def naive_rounded_attention(case: AttentionCase, element_type: np.dtype) -> np.ndarray:
    """Attention rounded where the kernels round: scores and softmax in float32, P rounded to the element type before
    P V, float32 accumulation, the output rounded to the element type. (B, Hq, T, d) float32.

    The forward kernel rounds the unnormalized P = exp(S - m) (at most 1, like softmax's P) and divides by l after
    P V; rounding the normalized P here costs the same relative error per element."""
    P = rounded(softmax_rows(masked_scores(case, np.float32)), element_type)
    return rounded(P @ repeated_kv(case, case.v), element_type)


def logsumexp_tolerance(case: AttentionCase, logsumexp: np.ndarray) -> np.ndarray:
    """A first-order bound on the float32 error of L_i = scale m_i + log(l_i), per row: (B, Hq, T).

    Each score is a d-term dot product of exact bf16/fp16 products summed in float32: error at most
    (d + 1) u scale sum_k |q_ik k_jk| (u = 2^-24). exp2 and the scale log2(e) multiply add a few u relative to each
    term of l, the sum of S terms adds (S - 1) u, and log(l) turns l's relative error into an absolute one; the
    final scale m + log(l) adds about u |L|. Hence u ((d + 2) max_j scale sum_k |q_ik k_jk| + S + 8 + 8 |L_i|).
    """
    u = np.float64(2.0**-24)
    head_dim, key_len = case.q.shape[-1], case.k.shape[-2]
    keys = np.abs(repeated_kv(case, case.k)).astype(np.float64)
    magnitudes = np.abs(case.q).astype(np.float64) @ keys.swapaxes(-1, -2)
    dot_bound = case.scale * magnitudes.max(axis=-1)
    return u * ((head_dim + 2) * dot_bound + key_len + 8 + 8 * np.abs(logsumexp))




def assert_forward_matches_float64(case: AttentionCase, element: str, out: np.ndarray, logsumexp: np.ndarray) -> None:
    """The forward kernel's out (as float32) within ERROR_MULTIPLE of the naive rounded error, L within its bound."""
    assert np.isfinite(out).all(), f"out: {np.count_nonzero(~np.isfinite(out))} elements unwritten or not finite"
    exact = exact_attention(case)
    error = np.abs(out - exact).max()
    naive_error = np.abs(naive_rounded_attention(case, ELEMENT_TYPES[element]) - exact).max()
    assert error <= ERROR_MULTIPLE * naive_error, (
        f"out: max error {error:.3g} > {ERROR_MULTIPLE} x naive {element} attention's {naive_error:.3g}")

    expected = reference_logsumexp(case)
    assert np.array_equal(logsumexp == np.inf, expected == np.inf), "L: the rows that see no key differ"
    finite = np.isfinite(expected)
    excess = np.abs(logsumexp[finite] - expected[finite]) - logsumexp_tolerance(case, expected)[finite]
    assert excess.max(initial=0.0) <= 0, f"L: off the float32 bound by {excess.max():.3g}"


# ---- the backward: its problem, the float64 forward it starts from, and the two references -------------------------
@dataclass
class BackwardCase:
    q: np.ndarray  # (B, Hq, T, d) in the element type
    k: np.ndarray  # (B, Hkv, S, d)
    v: np.ndarray
    grad_out: np.ndarray  # (B, Hq, T, d)
    key_keep: np.ndarray  # (B, S) uint8
    scale: float
    is_causal: bool

    @property
    def visible(self) -> np.ndarray:
        """(B, 1, T, S) bool: key j is visible to query i."""
        T, S = self.q.shape[2], self.k.shape[2]
        visible = self.key_keep.astype(bool)[:, None, None, :] & np.ones((T, S), dtype=bool)
        if self.is_causal:
            visible = visible & (np.arange(S)[None, :] <= np.arange(T)[:, None] + (S - T))
        return visible

    def repeated(self, x: np.ndarray) -> np.ndarray:
        """K or V repeated over the query heads that read it: (B, Hq, S, d)."""
        return np.repeat(x, self.q.shape[1] // x.shape[1], axis=1)


def backward_case(T: int, S: int, head_dim: int, is_causal: bool, dtype: str, *, batch: int = 1, n_query_heads: int = 2,
              n_kv_heads: int = 1, hidden_keys: tuple[int, ...] = (), seed: int = 0) -> BackwardCase:
    """Random normal inputs in `dtype`; batch entry b hides its last hidden_keys[b] keys."""
    rng = np.random.default_rng(seed)
    element = ELEMENT_TYPES[dtype]

    def normal(*shape):
        return rng.standard_normal(shape, dtype=np.float32).astype(element)

    key_keep = np.ones((batch, S), dtype=np.uint8)
    for entry, hidden in enumerate(hidden_keys):
        key_keep[entry, S - hidden:] = 0
    return BackwardCase(
        q=normal(batch, n_query_heads, T, head_dim), k=normal(batch, n_kv_heads, S, head_dim),
        v=normal(batch, n_kv_heads, S, head_dim), grad_out=normal(batch, n_query_heads, T, head_dim),
        key_keep=key_keep, scale=1.0 / math.sqrt(head_dim), is_causal=is_causal,
    )


def forward_as_the_gpu_saves_it(case: BackwardCase) -> tuple[np.ndarray, np.ndarray]:
    """(O in the element type, L in float32, +inf for a query that sees no key), from a float64 forward."""
    q, k, v = (x.astype(np.float64) for x in (case.q, case.k, case.v))
    scores = np.where(case.visible, q @ case.repeated(k).transpose(0, 1, 3, 2) * case.scale, -np.inf)
    peak = scores.max(axis=-1, keepdims=True)
    weights = np.exp(scores - np.where(np.isfinite(peak), peak, 0.0))
    total = weights.sum(axis=-1, keepdims=True)
    out = weights / np.where(total > 0, total, 1.0) @ case.repeated(v)
    with np.errstate(divide="ignore"):
        logsumexp = np.where(total > 0, peak + np.log(total), np.inf)[..., 0]
    return out.astype(case.q.dtype), logsumexp.astype(np.float32)


def exact_gradients(case: BackwardCase) -> tuple[np.ndarray, ...]:
    """float64 (dq, dk, dv) at the element-type inputs."""
    _, *grads = reference_attention(case.q, case.k, case.v, case.grad_out, scale=case.scale,
                                    is_causal=case.is_causal, attn_mask=case.key_keep.astype(bool)[:, None, None, :],
                                    dtype=np.float64)
    return tuple(grads)


def naive_gradients(case: BackwardCase, out: np.ndarray, logsumexp: np.ndarray, delta_from_output: bool):
    """(dq, dk, dv) of a NumPy backward that rounds where the kernels do; D = rowsum(dO * O) as the kernels take it,
    or rowsum(P * dP), whose error cancels against dP's where the exact gradient is 0: both are fair baselines."""
    element = case.q.dtype
    q, k, v, grad_out = (x.astype(np.float32) for x in (case.q, case.k, case.v, case.grad_out))
    k, v = case.repeated(k), case.repeated(v)
    scores = q @ k.transpose(0, 1, 3, 2) * np.float32(case.scale)
    with np.errstate(invalid="ignore"):
        P = np.where(case.visible, np.exp(scores - logsumexp[..., None]), np.float32(0))
    grad_p = grad_out @ v.transpose(0, 1, 3, 2)
    D = (grad_out * out.astype(np.float32) if delta_from_output else P * grad_p).sum(axis=-1, keepdims=True)
    grad_scores = P * (grad_p - D)
    P, grad_scores = (x.astype(element).astype(np.float32) for x in (P, grad_scores))
    B, Hkv, S, d = case.k.shape
    group = case.q.shape[1] // Hkv
    dq = np.float32(case.scale) * (grad_scores @ k)
    dk = np.float32(case.scale) * (grad_scores.transpose(0, 1, 3, 2) @ q).reshape(B, Hkv, group, S, d).sum(axis=2)
    dv = (P.transpose(0, 1, 3, 2) @ grad_out).reshape(B, Hkv, group, S, d).sum(axis=2)
    return tuple(x.astype(element) for x in (dq, dk, dv))


def gradient_errors(case: BackwardCase, out, logsumexp, grads) -> dict[str, tuple[float, float]]:
    """{name: (kernel's max error, allowed)} for dq, dk, dv against float64."""
    exact = exact_gradients(case)
    naive = [naive_gradients(case, out, logsumexp, by_output) for by_output in (True, False)]
    errors = {}
    for index, name in enumerate(("dq", "dk", "dv")):
        naive_error = max(np.abs(n[index].astype(np.float64) - exact[index]).max() for n in naive)
        error = np.abs(grads[index].astype(np.float64) - exact[index]).max()
        errors[name] = (error, ERROR_MULTIPLE * naive_error)
    return errors


def assert_gradients_match(case: BackwardCase, out, logsumexp, grads) -> None:
    for name, grad in zip(("dq", "dk", "dv"), grads):
        finite = np.isfinite(grad.astype(np.float32))
        assert finite.all(), f"{name}: {finite.size - finite.sum()} elements unwritten or not finite"
    for name, (error, allowed) in gradient_errors(case, out, logsumexp, grads).items():
        assert error <= allowed, f"{name}: max error {error:.3g} > allowed {allowed:.3g}"
