"""scaled_dot_product_attention: one entry point, several backends that compute the same thing.

    "naive"  materializes the (B, Hq, T, S) scores with tinytf ops; any mask; the reference (naive.py)
    "flash"  FlashAttention-2 tiles on NumPy/CuPy arrays, memory linear in T; causal and key-padding masks (flash.py)
    "cuda"   tinytf/kernels/flash_attention.cu through CuPy on a GPU: float32, causal and key-padding masks (cuda.py)
    "auto"   the fastest backend that supports the call, by a size threshold measured with bench/attention.py
"""

from __future__ import annotations

import math

import numpy as np

from ..backend import device_scope, is_floating, to_device
from ..tensor import Tensor
from . import cuda
from .flash import FlashAttention, flash_attention_backward, flash_attention_forward
from .masks import causal_visibility, is_key_padding_mask, key_padding_mask
from .naive import naive_attention

BACKENDS = ("auto", "naive", "flash", "cuda")

# "auto" takes flash on the CPU once a head's score matrix has this many entries (T * S): naive, whose softmax is
# one fused, cache-blocked op, is faster below it, flash above (`python bench/attention.py --auto` measures where;
# the measurements are in bench/NOTES.md). Flash keeps memory linear in T whatever the threshold.
AUTO_FLASH_MIN_SCORES = 300 * 300
# Unmeasured guard for a GPU without the cuda backend: beyond this many bytes of scores, naive risks running out.
AUTO_NAIVE_MAX_BYTES = 1 << 30


def scaled_dot_product_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask=None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: float | None = None,
                                 backend: str = "auto") -> Tensor:
    """softmax(q k^T * scale + mask) v: q (B, Hq, T, D), k and v (B, Hkv, S, D) -> (B, Hq, T, D).

    Hq must be a multiple of Hkv: each group of Hq // Hkv query heads shares one K/V head (GQA; MQA when Hkv = 1).
    attn_mask: bool (True = attend) or additive float, broadcastable to (B, Hq, T, S).
    dropout_p: drop attention weights with this probability (training; the naive backend only, as "auto" picks).
    is_causal: query t sees keys s <= t + S - T (aligned bottom-right, as when T new queries meet S cached keys);
    needs T <= S; given with attn_mask, both apply. scale: default 1 / sqrt(D). A row that sees no key gives zeros
    and zero gradients.
    backend: "auto", "naive", "flash" or "cuda" (see the module docstring).
    """
    if attn_mask is not None and not isinstance(attn_mask, Tensor) and not hasattr(attn_mask, "shape"):
        attn_mask = to_device(attn_mask, q.device)  # nested lists, onto q's device
    _check_inputs(q, k, v, attn_mask, dropout_p, is_causal, backend)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if is_causal and q.shape[2] == 1:
        is_causal = False  # a single query is the last position and sees every key (a decoding step): no mask to build
    if backend == "auto":
        backend = _choose_backend(q, k, attn_mask, dropout_p)
    elif backend != "naive":
        _check_backend_takes(backend, q, k, attn_mask, dropout_p)
    with device_scope(q.device):  # the masks are built on q's device, which CuPy must have current
        if backend == "naive":
            return naive_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                                   dropout_p=dropout_p)
        key_mask = None if attn_mask is None else key_padding_mask(attn_mask, k.shape[2], q.device)
        if backend == "flash":
            return FlashAttention.apply(q, k, v, scale=scale, is_causal=is_causal, key_mask=key_mask)
        return cuda.launch_attention(q, k, v, is_causal=is_causal, scale=scale, key_padding_mask=key_mask)


def _tiles_take(attn_mask, dropout_p: float) -> bool:
    """Whether the tiled backends (flash, cuda) can compute this call: no mask or a key-padding one, no dropout."""
    return (attn_mask is None or is_key_padding_mask(attn_mask)) and dropout_p == 0


def _choose_backend(q: Tensor, k: Tensor, attn_mask, dropout_p: float = 0.0) -> str:
    B, Hq, T, _ = q.shape
    S = k.shape[2]
    if not _tiles_take(attn_mask, dropout_p):
        return "naive"
    if q.device != "cpu":
        if cuda.unsupported_reason(q, k) is None:
            return "cuda"
        fits = B * Hq * T * S * np.dtype(np.result_type(q.dtype, np.float32)).itemsize <= AUTO_NAIVE_MAX_BYTES
        return "naive" if fits else "flash"
    return "flash" if T * S >= AUTO_FLASH_MIN_SCORES else "naive"


def _check_backend_takes(backend: str, q: Tensor, k: Tensor, attn_mask, dropout_p: float) -> None:
    """A ValueError (RuntimeError for CPU tensors given to cuda) naming what the flash or cuda backend cannot take."""
    if dropout_p > 0:
        raise ValueError(f"scaled_dot_product_attention: backend={backend!r} has no dropout (dropout_p={dropout_p}); "
                         f"use backend='naive' or 'auto'")
    if not _tiles_take(attn_mask, dropout_p):
        raise ValueError(
            f"the flash and cuda backends support is_causal and boolean key-padding masks of shape (B, 1, 1, S); "
            f"got a {attn_mask.dtype} mask of shape {tuple(attn_mask.shape)}: use backend='naive' for general masks"
        )
    if backend == "cuda":
        if q.device == "cpu":
            raise RuntimeError("backend='cuda' needs tensors on a CUDA device, got tensors on the CPU; move them "
                               "with .to('cuda') or use backend='flash' or 'naive'")
        reason = cuda.unsupported_reason(q, k)
        if reason is not None:
            raise ValueError(f"backend='cuda' cannot take these inputs: {reason}; use backend='flash' or 'naive'")


def _check_inputs(q, k, v, attn_mask, dropout_p: float, is_causal: bool, backend: str) -> None:
    """Raise a ValueError/TypeError that names the problem, before any backend sees the inputs."""
    if backend not in BACKENDS:
        raise ValueError(f"scaled_dot_product_attention: unknown backend {backend!r}; choose one of {BACKENDS}")
    if not 0 <= dropout_p < 1:
        raise ValueError(f"scaled_dot_product_attention: dropout_p must be in [0, 1), got {dropout_p}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor):
            raise TypeError(f"scaled_dot_product_attention: {name} must be a Tensor, got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(f"scaled_dot_product_attention: {name} must have 4 dimensions (B, H, L, D), "
                             f"got shape {x.shape}")
        if not is_floating(x.dtype):
            raise TypeError(f"scaled_dot_product_attention: {name} must be floating point, got {x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"scaled_dot_product_attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, "
                        f"{v.dtype}")
    if not (q.device == k.device == v.device):
        raise RuntimeError(f"scaled_dot_product_attention: q, k, v are on different devices ({q.device}, "
                           f"{k.device}, {v.device})")
    (B, Hq, T, D), (Bk, Hkv, S, Dk) = q.shape, k.shape
    if k.shape != v.shape:
        raise ValueError(f"scaled_dot_product_attention: k and v must have the same shape, got {k.shape} and "
                         f"{v.shape}")
    if Bk != B or Dk != D:
        raise ValueError(f"scaled_dot_product_attention: q {q.shape} and k {k.shape} must agree on batch (dim 0) "
                         f"and head size (dim 3)")
    if Hq % Hkv != 0:
        raise ValueError(f"scaled_dot_product_attention: the {Hq} query heads must be a multiple of the {Hkv} "
                         f"key/value heads (grouped-query attention)")
    if is_causal and T > S:
        raise ValueError(f"scaled_dot_product_attention: is_causal needs T <= S (the mask is aligned "
                         f"bottom-right), got T={T} queries and S={S} keys")
    if attn_mask is not None:
        mask_shape = tuple(attn_mask.shape)
        try:
            if len(mask_shape) > 4 or np.broadcast_shapes(mask_shape, (B, Hq, T, S)) != (B, Hq, T, S):
                raise ValueError
        except ValueError:
            raise ValueError(f"scaled_dot_product_attention: attn_mask of shape {mask_shape} does not broadcast "
                             f"to (B, Hq, T, S) = {(B, Hq, T, S)}") from None


__all__ = ["scaled_dot_product_attention", "naive_attention", "flash_attention_forward", "flash_attention_backward",
           "FlashAttention", "causal_visibility", "is_key_padding_mask", "key_padding_mask", "BACKENDS"]
