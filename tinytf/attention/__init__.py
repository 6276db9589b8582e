"""scaled_dot_product_attention: one entry point, several backends that compute the same thing.

    "naive"  materializes the (B, Hq, T, S) scores with tinytf ops; any mask; the reference (naive.py)
    "flash"  FlashAttention-2 tiles on NumPy/CuPy arrays, memory linear in T; causal and key-padding masks (flash.py)
    "cuda"   kernels/flash_attention.cu through CuPy on a GPU: float32, causal and key-padding masks (cuda.py)
    "auto"   the fastest backend that supports the call, by a size threshold measured with bench/attention.py
"""

from __future__ import annotations

import math

import numpy as np

from ..backend import get_array_module, to_device
from ..tensor import Tensor
from .flash import FlashAttention, flash_attention_backward, flash_attention_forward
from .naive import naive_attention

BACKENDS = ("auto", "naive", "flash", "cuda")

# "auto" takes flash on the CPU once a head's score matrix has this many entries (T * S). Measured here, causal
# forward + backward, d=64, flash time / naive time, with 1 and 2 BLAS threads (naive's softmax is one fused,
# cache-blocked op, so naive stays ahead longer than its unfused form did):
#     B=1, H=8:   T=128 1.63-1.70   T=192 1.39-1.43   T=256 0.87-0.99   T=320 0.67-0.77   T=512 0.51-0.62
#     B=64, H=6:  T=256 1.39-1.43   (nanoGPT's GPU config: big batched matmuls favour naive)
# So naive up to T = S = 256, flash from 300 on. Flash keeps memory linear in T whatever the threshold.
AUTO_FLASH_MIN_SCORES = 300 * 300
# Unmeasured guard for a GPU without the cuda backend: beyond this many bytes of scores, naive risks running out.
AUTO_NAIVE_MAX_BYTES = 1 << 30


def scaled_dot_product_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask=None, is_causal: bool = False,
                                 scale: float | None = None, backend: str = "auto") -> Tensor:
    """softmax(q k^T * scale + mask) v: q (B, Hq, T, D), k and v (B, Hkv, S, D) -> (B, Hq, T, D).

    Hq must be a multiple of Hkv: each group of Hq // Hkv query heads shares one K/V head (GQA; MQA when Hkv = 1).
    attn_mask: bool (True = attend) or additive float, broadcastable to (B, Hq, T, S).
    is_causal: query t sees keys s <= t + S - T (aligned bottom-right, as when T new queries meet S cached keys);
    needs T <= S; given with attn_mask, both apply. scale: default 1 / sqrt(D). A row that sees no key gives zeros
    and zero gradients.
    backend: "auto", "naive", "flash" or "cuda" (see the module docstring).
    """
    if attn_mask is not None and not isinstance(attn_mask, Tensor) and not hasattr(attn_mask, "shape"):
        attn_mask = get_array_module(q.data).asarray(attn_mask)  # nested lists, onto q's device
    _check_inputs(q, k, v, attn_mask, is_causal, backend)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if is_causal and q.shape[2] == 1:
        is_causal = False  # a single query is the last position and sees every key (a decoding step): no mask to build
    if backend == "auto":
        backend = _choose_backend(q, k, attn_mask)
    if backend == "naive":
        return naive_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale)
    if backend == "flash":
        key_mask = flash_key_mask(attn_mask, q, k)
        return FlashAttention.apply(q, k, v, scale=scale, is_causal=is_causal, key_mask=key_mask)
    cuda = _cuda_backend(q)
    key_mask = flash_key_mask(attn_mask, q, k)
    return cuda.cuda_attention(q, k, v, is_causal=is_causal, scale=scale, key_padding_mask=key_mask)


def flash_key_mask(attn_mask, q: Tensor, k: Tensor):
    """attn_mask as the flash and cuda backends' key-padding mask: bool (B or 1, S) on q's device, or None.

    ValueError, naming the naive backend, for any other mask."""
    if attn_mask is None:
        return None
    mask = attn_mask.data if isinstance(attn_mask, Tensor) else attn_mask
    S = k.shape[2]
    shape = (1,) * (4 - mask.ndim) + tuple(mask.shape)
    if mask.dtype != bool or shape[1] != 1 or shape[2] != 1:
        raise ValueError(
            f"the flash and cuda backends support is_causal and boolean key-padding masks of shape (B, 1, 1, S); "
            f"got a {mask.dtype} mask of shape {tuple(mask.shape)}: use backend='naive' for general masks"
        )
    mask = to_device(mask, q.device)
    return get_array_module(mask).broadcast_to(mask.reshape(shape[0], shape[3]), (shape[0], S))


def _choose_backend(q: Tensor, k: Tensor, attn_mask) -> str:
    B, Hq, T, _ = q.shape
    S = k.shape[2]
    flash_supported = True
    try:
        flash_key_mask(attn_mask, q, k)
    except ValueError:
        flash_supported = False
    if q.device != "cpu":
        cuda = _cuda_backend_or_none()
        if flash_supported and cuda is not None and cuda.is_supported(q, k, v):
            return "cuda"
        fits = B * Hq * T * S * np.dtype(np.result_type(q.dtype, np.float32)).itemsize <= AUTO_NAIVE_MAX_BYTES
        return "naive" if fits or not flash_supported else "flash"
    return "flash" if flash_supported and T * S >= AUTO_FLASH_MIN_SCORES else "naive"


def _cuda_backend_or_none():
    try:
        from . import cuda
    except ImportError:
        return None
    return cuda


def _cuda_backend(q: Tensor):
    cuda = _cuda_backend_or_none()
    if cuda is None:
        raise RuntimeError(
            "backend='cuda' is not available: tinytf.attention.cuda cannot be imported (it needs CuPy and a CUDA "
            "GPU); use backend='flash' or 'naive'"
        )
    if q.device == "cpu":
        raise RuntimeError("backend='cuda' needs tensors on a CUDA device, got tensors on the CPU; move them with "
                           ".to('cuda') or use backend='flash' or 'naive'")
    return cuda


def _check_inputs(q, k, v, attn_mask, is_causal: bool, backend: str) -> None:
    """Raise a ValueError/TypeError that names the problem, before any backend sees the inputs."""
    if backend not in BACKENDS:
        raise ValueError(f"scaled_dot_product_attention: unknown backend {backend!r}; choose one of {BACKENDS}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor):
            raise TypeError(f"scaled_dot_product_attention: {name} must be a Tensor, got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(f"scaled_dot_product_attention: {name} must have 4 dimensions (B, H, L, D), "
                             f"got shape {x.shape}")
        if x.dtype.kind != "f":
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
           "FlashAttention", "flash_key_mask", "BACKENDS"]
