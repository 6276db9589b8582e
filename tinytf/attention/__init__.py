"""scaled_dot_product_attention: one entry point, several backends that compute the same thing.

    "naive"  materializes the (B, Hq, T, S) scores with tinytf ops; any mask; the reference (naive.py)
    "flash"  FlashAttention-2 tiles on NumPy/CuPy arrays, memory linear in T; key-padding masks only (flash.py)
    "cuda"   tinytf/kernels/flash_attention.cu through CuPy on a GPU; key-padding masks only (cuda.py)
    "auto"   the fastest backend that supports the call, by a size threshold measured with bench/attention.py

varlen_attention (varlen.py) is the same attention on sequences of different lengths packed one after another.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace

import numpy as np

from .. import functional as F
from ..backend import device_scope, generator, get_array_module, is_floating, to_device
from ..creation import zeros
from ..tensor import Tensor, array_of
from . import cuda
from .flash import FlashAttention, flash_attention_backward, flash_attention_forward
from .masks import (
    UNBOUNDED,
    causal_visibility,
    effective_window,
    is_key_padding_mask,
    key_padding_mask,
    normalized_window,
)
from .naive import naive_attention
from .varlen import checked_cu_seqlens, cu_seqlens_from_positions, one_batch, sequence, unbatched

BACKENDS = ("auto", "naive", "flash", "cuda")

# "auto" takes flash on the CPU once a head's score matrix has this many entries (T * S): naive, whose softmax is
# one fused, cache-blocked op, is faster below it, flash above (`python bench/attention.py --auto` measures where;
# the measurements are in bench/NOTES.md). Flash keeps memory linear in T whatever the threshold.
AUTO_FLASH_MIN_SCORES = 300 * 300
# Unmeasured guard for a GPU without the cuda backend: beyond this many bytes of scores, naive risks running out.
AUTO_NAIVE_MAX_BYTES = 1 << 30


def scaled_dot_product_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask=None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: float | None = None, backend: str = "auto", *,
                                 window=None, softcap: float | None = None, alibi_slopes=None,
                                 dropout_seed: int | None = None, dropout_offset: int = 0) -> Tensor:
    """Attention of T queries over S keys: q (B, Hq, T, D), k and v (B, Hkv, S, D) -> (B, Hq, T, D).

    For batch b, query head h, query i (0..T-1) and key j (0..S-1), every backend computes

        s_ij = (q_i . k_j) * scale                          scale: default 1 / sqrt(D)
        s_ij = softcap * tanh(s_ij / softcap)               if softcap (a float > 0)
        s_ij = s_ij - slope[b, h] * |i + S - T - j|         if alibi_slopes (ALiBi)
        s_ij = s_ij + attn_mask (additive float mask), or -inf where a key is hidden (boolean attn_mask False,
               outside the window, after the query under is_causal)
        P_i = softmax(s_i);  O_i = sum_j dropout(P_ij) v_j

    in that order. Queries are aligned bottom-right: query i sits at position i + S - T, as when T new queries follow
    S - T cached keys, so the last query is level with the last key, and for T > S the first T - S queries come
    before every key.

    Hq must be a multiple of Hkv: query head h reads K/V head h // (Hq // Hkv) (grouped-query attention; MQA when
    Hkv = 1).
    attn_mask: bool (True = attend) or additive float, broadcastable to (B, Hq, T, S); applies with the others.
    window: (left, right), ints >= -1, -1 = unbounded (None: both): key j is visible to query i when
        i + S - T - left <= j <= i + S - T + right. is_causal is right = 0 (given a window too, left is kept).
    softcap: a float > 0, squashing the scaled scores into (-softcap, softcap) before the bias and the masks.
    alibi_slopes: (Hq,) or (B, Hq), array or Tensor, float32; never differentiated.
    A row that sees no key (causal with T > S, a window, padding) gives zeros and zero gradients, never NaN; the
    flash and cuda backends store its log-sum-exp as -inf.
    dropout_p: each attention weight P_ij (after the softmax, which stays undropped in the log-sum-exp) is dropped
        with this probability and the rest divided by 1 - dropout_p. The tiled backends (flash, cuda) regenerate
        the forward's mask in the backward, so their keep mask is a function of the position: with Philox4x32-10
        (tinytf.attention.dropout), P_ij is kept when word 0 of
            philox(counter = (j, i, b * Hq + h, dropout_offset), key = (seed & 0xFFFFFFFF, seed >> 32))
        is >= floor(dropout_p * 2**32). dropout_seed: a 64-bit int; given, every backend (naive too) draws exactly
        that mask. None (the default): the tiled backends draw a seed from tinytf's generator (tinytf.manual_seed
        seeds it), and naive, which keeps its mask for the backward anyway, draws the mask from that generator
        directly (F.dropout: several times cheaper on the CPU than ten Philox rounds per weight).
        dropout_offset: counter word 3, a 32-bit int (a new value per step gives new masks under one seed).
    backend: "auto", "naive", "flash" or "cuda" (see the module docstring).
    """
    if attn_mask is not None and not isinstance(attn_mask, Tensor) and not hasattr(attn_mask, "shape"):
        attn_mask = to_device(attn_mask, q.device)  # nested lists, onto q's device
    _check_backend_name("scaled_dot_product_attention", backend)
    _check_qkv("scaled_dot_product_attention", q, k, v, "(B, H, L, D)")
    if attn_mask is not None:
        _check_mask(attn_mask, q, k)
    options = AttentionOptions.checked(q, window, is_causal, softcap, alibi_slopes, dropout_p, dropout_seed,
                                       dropout_offset, batch=q.shape[0])
    return attend(q, k, v, attn_mask, scale, backend, options)


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int,
                     max_seqlen_k: int, *, dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                     window=None, softcap: float | None = None, alibi_slopes=None, dropout_seed: int | None = None,
                     dropout_offset: int = 0, backend: str = "auto") -> Tensor:
    """Attention of N packed sequences: q (total_q, Hq, D), k and v (total_k, Hkv, D) -> (total_q, Hq, D).

    Sequence n is rows cu_seqlens_q[n]:cu_seqlens_q[n + 1] of q against rows cu_seqlens_k[n]:cu_seqlens_k[n + 1] of
    k and v (cu_seqlens: int arrays (N + 1,), cumulative lengths from 0; no sequence longer than its max_seqlen).
    Each sequence is attention as scaled_dot_product_attention computes it, with T, S and the bottom-right alignment
    of causal, window and ALiBi its own. alibi_slopes: (Hq,) or (N, Hq). In the dropout counter, b is the sequence
    index n and i, j the positions inside the sequence. The other keywords as scaled_dot_product_attention's.
    backend "cuda" runs the packed tensors in one launch; the others run sequence by sequence (varlen.py).
    """
    _check_backend_name("varlen_attention", backend)
    _check_qkv("varlen_attention", q, k, v, "(total, H, D)")
    starts_q = checked_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q)
    starts_k = checked_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k)
    if len(starts_q) != len(starts_k):
        raise ValueError(f"varlen_attention: cu_seqlens_q and cu_seqlens_k must count the same sequences, got "
                         f"{len(starts_q) - 1} and {len(starts_k) - 1}")
    N = len(starts_q) - 1
    options = AttentionOptions.checked(q, window, is_causal, softcap, alibi_slopes, dropout_p, dropout_seed,
                                       dropout_offset, batch=N)
    features = _features(options, options.window, 0)
    whole = [one_batch(x) for x in (q, k)]  # (1, H, total, D): the kernels' limits are those of the packed rows
    if backend == "cuda":
        _check_backend_takes(backend, *whole, None, features)
    if backend == "cuda" or (backend == "auto" and _choose_backend(*whole, None, features) == "cuda"):
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        cu_q, cu_k = (to_device(starts.astype(np.int32), q.device) for starts in (starts_q, starts_k))
        with device_scope(q.device):
            return cuda.launch_varlen_attention(q, k, v, cu_q, cu_k, int(max_seqlen_q), int(max_seqlen_k),
                                                is_causal=options.window[1] == 0, scale=scale, **features)
    outputs = []
    for n in range(N):
        (q_start, q_stop), (k_start, k_stop) = starts_q[n:n + 2].tolist(), starts_k[n:n + 2].tolist()
        if q_start == q_stop or k_start == k_stop:  # no queries, or queries that see no key: zero rows
            outputs.append(zeros(q_stop - q_start, *q.shape[1:], dtype=q.dtype, device=q.device))
            continue
        out = attend(sequence(q, q_start, q_stop), sequence(k, k_start, k_stop), sequence(v, k_start, k_stop), None,
                     scale, backend, options.for_batch(n, n + 1), dropout_first_batch=n)
        outputs.append(unbatched(out))
    return F.cat(outputs, dim=0)


@dataclass(frozen=True)
class AttentionOptions:
    """The checked score and dropout options of one call (scaled_dot_product_attention's docstring): window
    normalized, alibi_slopes (batch, Hq) float32 on the inputs' device, a dropout seed drawn when none was given."""

    window: tuple[int, int]
    softcap: float | None
    alibi_slopes: object
    dropout_p: float
    dropout_seed: int | None
    dropout_offset: int

    @classmethod
    def checked(cls, q: Tensor, window, is_causal: bool, softcap, alibi_slopes, dropout_p, dropout_seed,
                dropout_offset, batch: int) -> AttentionOptions:
        """The options, or a ValueError/TypeError naming the bad value. batch: the rows alibi_slopes may have."""
        if not (isinstance(dropout_p, numbers.Real) and 0 <= dropout_p < 1):
            raise ValueError(f"attention: dropout_p must be in [0, 1), got {dropout_p!r}")
        if softcap is not None and not (isinstance(softcap, numbers.Real) and not isinstance(softcap, bool)
                                        and 0 < softcap < math.inf):
            raise ValueError(f"attention: softcap must be None or a finite number > 0, got {softcap!r}")
        if dropout_seed is not None:
            _check_int("dropout_seed", dropout_seed, 64)
        _check_int("dropout_offset", dropout_offset, 32)
        return cls(window=normalized_window(window, is_causal),
                   softcap=None if softcap is None else float(softcap),
                   alibi_slopes=None if alibi_slopes is None else _checked_slopes(alibi_slopes, batch, q),
                   dropout_p=float(dropout_p), dropout_seed=None if dropout_seed is None else int(dropout_seed),
                   dropout_offset=int(dropout_offset))

    def for_batch(self, first: int, stop: int) -> AttentionOptions:
        """The options of batch rows first:stop (alibi_slopes sliced)."""
        slopes = None if self.alibi_slopes is None else self.alibi_slopes[first:stop]
        return replace(self, alibi_slopes=slopes)


def attend(q: Tensor, k: Tensor, v: Tensor, attn_mask, scale: float | None, backend: str, options: AttentionOptions,
           dropout_first_batch: int = 0) -> Tensor:
    """scaled_dot_product_attention on checked inputs: picks the backend and calls it. dropout_first_batch: the batch
    index of q's first row in the dropout counter (varlen_attention runs sequence n as a batch of one from n)."""
    T, S = q.shape[2], k.shape[2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    window = effective_window(options.window, T, S)  # a causal decoding step (T = 1) needs no mask at all
    features = _features(options, window, dropout_first_batch)
    if backend == "auto":
        backend = _choose_backend(q, k, attn_mask, features)
    elif backend != "naive":
        _check_backend_takes(backend, q, k, attn_mask, features)
    with device_scope(q.device):  # the masks are built on q's device, which CuPy must have current
        if backend == "naive":
            return naive_attention(q, k, v, attn_mask=attn_mask, scale=scale, dropout_p=options.dropout_p,
                                   window=window, softcap=options.softcap, alibi_slopes=options.alibi_slopes,
                                   dropout_seed=options.dropout_seed, dropout_offset=options.dropout_offset,
                                   dropout_first_batch=dropout_first_batch)
        key_mask = None if attn_mask is None else key_padding_mask(attn_mask, S, q.device)
        is_causal = window[1] == 0
        if backend == "flash":
            return FlashAttention.apply(q, k, v, scale=scale, is_causal=is_causal, key_mask=key_mask, **features)
        return cuda.launch_attention(q, k, v, is_causal=is_causal, scale=scale, key_padding_mask=key_mask,
                                     **features)


def _features(options: AttentionOptions, window: tuple[int, int], dropout_first_batch: int) -> dict:
    """The keyword arguments of the score and dropout features a call uses, as the backends take them; a feature
    left at its default is not passed, so a backend sees only what it must implement. The causal window (-1, 0) is
    is_causal alone."""
    features = {}
    if window not in ((UNBOUNDED, UNBOUNDED), (UNBOUNDED, 0)):
        features["window"] = window
    if options.softcap is not None:
        features["softcap"] = options.softcap
    if options.alibi_slopes is not None:
        features["alibi_slopes"] = options.alibi_slopes
    if options.dropout_p > 0:
        features.update(dropout_p=options.dropout_p, dropout_seed=_tiled_dropout_seed(options),
                        dropout_offset=options.dropout_offset)
        if dropout_first_batch:
            features["dropout_first_batch"] = dropout_first_batch
    return features


def _tiled_dropout_seed(options: AttentionOptions) -> int:
    """The Philox seed of the tiled backends: the given one, else one drawn from tinytf's generator."""
    if options.dropout_seed is not None:
        return options.dropout_seed
    return int(generator("cpu").integers(0, 2**64, dtype=np.uint64))


def _checked_slopes(alibi_slopes, batch: int, q: Tensor):
    """alibi_slopes (Hq,) or (batch, Hq) as a contiguous float32 (batch, Hq) array on q's device."""
    slopes = array_of(alibi_slopes)
    slopes = to_device(slopes if hasattr(slopes, "shape") else np.asarray(slopes), q.device)
    Hq = q.shape[1]
    if tuple(slopes.shape) not in ((Hq,), (batch, Hq)):
        raise ValueError(f"attention: alibi_slopes must have shape ({Hq},) or ({batch}, {Hq}) (one slope per query "
                         f"head), got shape {tuple(slopes.shape)}")
    if slopes.dtype.kind not in "iuf" and not is_floating(slopes.dtype):
        raise TypeError(f"attention: alibi_slopes must be real numbers, got dtype {slopes.dtype}")
    xp = get_array_module(slopes)
    with device_scope(q.device):
        return xp.ascontiguousarray(xp.broadcast_to(slopes.astype(np.float32), (batch, Hq)))


def _check_int(name: str, value, bits: int) -> None:
    if not (isinstance(value, numbers.Integral) and not isinstance(value, bool) and 0 <= value < 2**bits):
        raise ValueError(f"attention: {name} must be an int in [0, 2**{bits}), got {value!r}")


def _choose_backend(q: Tensor, k: Tensor, attn_mask, features: dict | None = None) -> str:
    """Naive for general masks (the tiled backends take only key padding); on a GPU, cuda where its kernels take
    the call; otherwise flash or naive by size."""
    B, Hq, T, _ = q.shape
    S = k.shape[2]
    if attn_mask is not None and not is_key_padding_mask(attn_mask):
        return "naive"
    if q.device != "cpu":
        if _cuda_unsupported_reason(q, k, features or {}) is None:
            return "cuda"
        fits = B * Hq * T * S * np.dtype(np.result_type(q.dtype, np.float32)).itemsize <= AUTO_NAIVE_MAX_BYTES
        return "naive" if fits else "flash"
    return "flash" if T * S >= AUTO_FLASH_MIN_SCORES else "naive"


def _cuda_unsupported_reason(q: Tensor, k: Tensor, features: dict) -> str | None:
    """cuda.unsupported_reason for this call. A sequence that varlen_attention runs on its own (dropout_first_batch)
    is not for the kernels, which number dropout's batches from 0: varlen_attention gives them all sequences at
    once."""
    if "dropout_first_batch" in features:
        return "one sequence of a packed batch with dropout is run by varlen_attention's single launch"
    return cuda.unsupported_reason(q, k, dropout_p=features.get("dropout_p", 0.0))


def _check_backend_takes(backend: str, q: Tensor, k: Tensor, attn_mask, features: dict) -> None:
    """A ValueError (RuntimeError for CPU tensors given to cuda) naming what the flash or cuda backend cannot take."""
    if attn_mask is not None and not is_key_padding_mask(attn_mask):
        raise ValueError(
            f"the flash and cuda backends support is_causal and boolean key-padding masks of shape (B, 1, 1, S); "
            f"got a {attn_mask.dtype} mask of shape {tuple(attn_mask.shape)}: use backend='naive' for general masks"
        )
    if backend == "cuda":
        if q.device == "cpu":
            raise RuntimeError("backend='cuda' needs tensors on a CUDA device, got tensors on the CPU; move them "
                               "with .to('cuda') or use backend='flash' or 'naive'")
        reason = _cuda_unsupported_reason(q, k, features)
        if reason is not None:
            raise ValueError(f"backend='cuda' cannot take these inputs: {reason}; use backend='flash' or 'naive'")


def _check_backend_name(caller: str, backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"{caller}: unknown backend {backend!r}; choose one of {BACKENDS}")


def _check_qkv(caller: str, q, k, v, layout: str) -> None:
    """Raise a ValueError/TypeError that names the problem, before any backend sees the inputs. layout: the shape
    q, k, v must have, "(B, H, L, D)" (batched) or "(total, H, D)" (packed)."""
    ndim = layout.count(",") + 1
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{caller}: {name} must be a Tensor, got {type(x).__name__}")
        if x.ndim != ndim:
            raise ValueError(f"{caller}: {name} must have {ndim} dimensions {layout}, got shape {x.shape}")
        if not is_floating(x.dtype):
            raise TypeError(f"{caller}: {name} must be floating point, got {x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{caller}: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise RuntimeError(f"{caller}: q, k, v are on different devices ({q.device}, {k.device}, {v.device})")
    if k.shape != v.shape:
        raise ValueError(f"{caller}: k and v must have the same shape, got {k.shape} and {v.shape}")
    batched = ndim == 4
    if q.shape[-1] != k.shape[-1] or (batched and q.shape[0] != k.shape[0]):
        raise ValueError(f"{caller}: q {q.shape} and k {k.shape} must agree on {'batch (dim 0) and ' * batched}"
                         f"head size (dim {ndim - 1})")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"{caller}: the {q.shape[1]} query heads must be a multiple of the {k.shape[1]} key/value "
                         f"heads (grouped-query attention)")


def _check_mask(attn_mask, q: Tensor, k: Tensor) -> None:
    (B, Hq, T, _), S = q.shape, k.shape[2]
    mask_shape = tuple(attn_mask.shape)
    try:
        if len(mask_shape) > 4 or np.broadcast_shapes(mask_shape, (B, Hq, T, S)) != (B, Hq, T, S):
            raise ValueError
    except ValueError:
        raise ValueError(f"scaled_dot_product_attention: attn_mask of shape {mask_shape} does not broadcast "
                         f"to (B, Hq, T, S) = {(B, Hq, T, S)}") from None


__all__ = ["scaled_dot_product_attention", "varlen_attention", "cu_seqlens_from_positions", "naive_attention",
           "flash_attention_forward", "flash_attention_backward", "FlashAttention", "causal_visibility",
           "is_key_padding_mask", "key_padding_mask", "BACKENDS"]
