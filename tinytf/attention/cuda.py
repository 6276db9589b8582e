"""backend="cuda": tinytf's FlashAttention-2 kernels, launched through CuPy.

    out = cuda_attention(q, k, v, is_causal=True, scale=0.125)    # tensors on a CUDA device in, one out

Two builds, chosen by the inputs' dtype: float32 runs tinytf/kernels/flash_attention.cu on CUDA cores (sm_70+);
bfloat16 and float16 run the tensor-core kernels of flash_attention_tc.cu and flash_attention_tc_backward.cu
(mma.sync, sm_80+), with float32 accumulation, softmax state and log-sum-exp, and O and the gradients in the inputs'
dtype. One autograd Function: forward runs the forward kernel and saves O and the row log-sum-exp L; backward runs the
delta pre-pass, then the dQ kernel and the dK/dV kernel (the kernel files' headers say why dQ has a pass of its own).
cupy.RawModule compiles a build's kernels on first use, cached per (head dim, dtype, device), with the options of
tinytf.kernels.FlashAttentionVariant or TensorCoreVariant: the compile gate checks exactly those builds.

emulated_attention() runs the same Function on NumPy tensors, with the kernels built for the CPU by
tinytf.kernels.emulator: slow, and the way to study and test the CUDA code without a GPU.

Inputs: q (B, Hq, T, d), k and v (B, Hkv, S, d), one dtype, Hq a multiple of Hkv (grouped-query attention: query
head h reads K/V head h // (Hq // Hkv)); d one of tinytf.kernels.HEAD_DIMS for float32, of TENSOR_CORE_HEAD_DIMS for
bfloat16/float16. Non-contiguous inputs are copied once.
"""

from __future__ import annotations

import contextlib
import functools

import numpy as np

from .. import backend
from ..backend import get_array_module
from ..kernels import (
    HEAD_DIMS,
    TENSOR_CORE_DTYPES,
    TENSOR_CORE_HEAD_DIMS,
    THREADS_PER_BLOCK,
    FlashAttentionVariant,
    kernel_source,
    tensor_core_variant,
)
from ..kernels.emulator import EmulatedModule
from ..tensor import Function, Tensor

STATS_DTYPE = np.dtype(np.float32)  # of the row statistics L and D, whatever the inputs' dtype
SUPPORTED_DTYPES = ("float32", *TENSOR_CORE_DTYPES)
TENSOR_CORE_MIN_ARCH = 80  # mma.sync.m16n8k16 on bf16/fp16 and cp.async arrived with the A100
MAX_GRID_Y = 65535  # batch x heads rides on gridDim.y


def is_supported(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether cuda_attention can take these tensors: float32 on one CUDA device, valid shapes, a supported d."""
    try:
        _check_inputs(q, k, v, None, device_kind="cuda")
    except (TypeError, ValueError, RuntimeError):
        return False
    return True


def unsupported_reason(q: Tensor, k: Tensor, device_kind: str = "cuda") -> str | None:
    """Why the kernels cannot take q (B, Hq, T, d) and k (B, Hkv, S, d), or None when they can.

    For inputs that are already valid attention inputs (scaled_dot_product_attention checked shapes, dtypes and
    devices): only what the kernels add, their dtype, device, head dims and grid.
    """
    (B, Hq, T, d), S = q.shape, k.shape[2]
    if q.dtype.name not in SUPPORTED_DTYPES:
        return f"the kernels take {', '.join(SUPPORTED_DTYPES)}, but the inputs are {q.dtype}; cast with .float()"
    if not q.device.startswith(device_kind):
        return f"the inputs must be on {'a CUDA device' if device_kind == 'cuda' else 'the CPU'}, not {q.device}"
    if T == 0 or S == 0 or B == 0:
        return f"empty inputs (q {q.shape}, k {k.shape})"
    head_dims = HEAD_DIMS if q.dtype.name == "float32" else TENSOR_CORE_HEAD_DIMS
    if d not in head_dims:
        return f"head dim {d} has no {q.dtype} kernel; supported: {head_dims}"
    if q.dtype.name != "float32" and device_kind == "cuda":
        arch = _compute_capability(int(q.device.split(":")[1]))
        if arch < TENSOR_CORE_MIN_ARCH:
            return (f"the {q.dtype} kernels use tensor-core instructions of sm_{TENSOR_CORE_MIN_ARCH} and later, and "
                    f"this GPU is sm_{arch}; cast to float32 with .float()")
    if B * Hq > MAX_GRID_Y:
        return f"batch x query heads = {B * Hq} exceeds the grid's {MAX_GRID_Y}"
    return None


def cuda_attention(q: Tensor, k: Tensor, v: Tensor, *, is_causal: bool, scale: float,
                   key_padding_mask=None) -> Tensor:
    """softmax(scale q k^T, masked) v on a CUDA GPU: (B, Hq, T, d), (B, Hkv, S, d), (B, Hkv, S, d) -> (B, Hq, T, d).

    is_causal: query i sees keys j <= i + S - T (aligned bottom-right). key_padding_mask: bool (B, S) or (1, S), array
    or Tensor, True where the key may be attended. A query that sees no key gives zeros and zero gradients.
    """
    _check_inputs(q, k, v, key_padding_mask, device_kind="cuda")
    return launch_attention(q, k, v, is_causal=is_causal, scale=scale, key_padding_mask=key_padding_mask)


def launch_attention(q: Tensor, k: Tensor, v: Tensor, *, is_causal: bool, scale: float,
                     key_padding_mask=None) -> Tensor:
    """cuda_attention for inputs already checked (scaled_dot_product_attention and unsupported_reason did)."""
    kernels = _cupy_kernels(q.shape[-1], q.dtype.name, int(q.device.split(":")[1]))
    return _apply(kernels, q, k, v, is_causal, scale, key_padding_mask)


def emulated_attention(q: Tensor, k: Tensor, v: Tensor, *, is_causal: bool, scale: float, key_padding_mask=None,
                       schedule: str = "lockstep") -> Tensor:
    """cuda_attention on CPU tensors: the same kernels and launches, run by tinytf.kernels.emulator (needs g++)."""
    _check_inputs(q, k, v, key_padding_mask, device_kind="cpu")
    kernels = _emulated_kernels(q.shape[-1], q.dtype.name, schedule)
    return _apply(kernels, q, k, v, is_causal, scale, key_padding_mask)


class FlashAttentionKernels:
    """The kernels of one build and how to launch them, on CuPy arrays (a GPU) or NumPy arrays (the emulator).

    `modules`: one cupy.RawModule or tinytf.kernels.emulator.EmulatedModule per file of `variant.sources`, built with
    `variant.options`; the forward kernel comes from the first, the backward kernels from the last. `variant` is a
    FlashAttentionVariant (float32) or a TensorCoreVariant (bf16/fp16): both builds take the same arguments in the
    same order. `device` makes the context the launches run in (the modules' GPU; backward runs later, outside the
    caller's context).
    """

    def __init__(self, modules, variant, device=contextlib.nullcontext):
        self.modules, self.variant, self.device = tuple(modules), variant, device
        self.dtype = np.dtype(variant.dtype)
        self._kernels = {}

    def kernel(self, role: str):
        """The kernel named variant.kernel_prefix + role ("forward", "backward_delta", ...), looked up on first use."""
        if role not in self._kernels:
            module = self.modules[0] if role == "forward" else self.modules[-1]
            self._kernels[role] = module.get_function(f"{self.variant.kernel_prefix}{role}")
        return self._kernels[role]

    def forward(self, q, k, v, key_keep, scale: float, is_causal: bool):
        """-> out (B, Hq, T, d), logsumexp (B, Hq, T) float32."""
        self._check_launch_arrays(key_keep, q=q, k=k, v=v)
        xp = get_array_module(q)
        B, Hq, T, _ = q.shape
        with self.device():
            out = xp.empty_like(q)
            logsumexp = xp.empty((B, Hq, T), dtype=STATS_DTYPE)
            grid = (_ceil_div(T, self.variant.forward_block_rows), B * Hq)
            self.kernel("forward")(grid, (THREADS_PER_BLOCK,),
                                   (q, k, v, key_keep, out, logsumexp, *_shape_args(q, k, scale, is_causal)))
        return out, logsumexp

    def backward(self, q, k, v, key_keep, out, logsumexp, grad_out, scale: float, is_causal: bool):
        """-> grad_q, grad_k, grad_v, shaped like q, k, v."""
        self._check_launch_arrays(key_keep, q=q, k=k, v=v, out=out, grad_out=grad_out)
        xp = get_array_module(q)
        B, Hq, T, _ = q.shape
        Hkv, S = k.shape[1], k.shape[2]
        rows = B * Hq * T
        shape_args = _shape_args(q, k, scale, is_causal)
        rows_per_block = self.variant.backward_block_rows
        with self.device():
            delta = xp.empty((B, Hq, T), dtype=STATS_DTYPE)
            self.kernel("backward_delta")((_ceil_div(rows, THREADS_PER_BLOCK // 32),), (THREADS_PER_BLOCK,),
                                          (out, grad_out, delta, np.int32(rows)))
            grad_q, grad_k, grad_v = xp.empty_like(q), xp.empty_like(k), xp.empty_like(v)
            self.kernel("backward_dq")((_ceil_div(T, rows_per_block), B * Hq), (THREADS_PER_BLOCK,),
                                       (q, k, v, key_keep, grad_out, logsumexp, delta, grad_q, *shape_args))
            self.kernel("backward_dkdv")((_ceil_div(S, rows_per_block), B * Hkv), (THREADS_PER_BLOCK,),
                                         (q, k, v, key_keep, grad_out, logsumexp, delta, grad_k, grad_v, *shape_args))
        return grad_q, grad_k, grad_v

    def _check_launch_arrays(self, key_keep, **arrays) -> None:
        """A kernel reads raw pointers: wrong dtypes or strides would be misread silently on a GPU, so refuse them."""
        for name, x in arrays.items():
            if x.dtype != self.dtype or not x.flags.c_contiguous:
                raise ValueError(f"flash attention kernels: {name} must be C-contiguous {self.dtype}, got {x.dtype} "
                                 f"with strides {x.strides}")
            if x.shape[-1] != self.variant.head_dim:
                raise ValueError(f"flash attention kernels: {name} has head dim {x.shape[-1]}, these kernels "
                                 f"{self.variant.head_dim}")
        expected_shape = (arrays["q"].shape[0], arrays["k"].shape[2])
        if key_keep.dtype != np.uint8 or not key_keep.flags.c_contiguous or key_keep.shape != expected_shape:
            raise ValueError(f"flash attention kernels: key_keep must be C-contiguous uint8 (B, S), got "
                             f"{key_keep.dtype} {key_keep.shape}")


class CudaFlashAttention(Function):
    """Forward saves Q, K, V, O and L; backward recomputes P from them, tile by tile, in the kernels."""

    def forward(self, q, k, v, kernels: FlashAttentionKernels, key_keep, scale: float, is_causal: bool):
        xp = get_array_module(q)
        q, k, v = (xp.ascontiguousarray(x) for x in (q, k, v))
        self.kernels, self.key_keep, self.scale, self.is_causal = kernels, key_keep, scale, is_causal
        out, logsumexp = kernels.forward(q, k, v, key_keep, scale, is_causal)
        self.save_for_backward(q, k, v, out, logsumexp)
        return out

    def backward(self, grad_out):
        q, k, v, out, logsumexp = self.saved_tensors
        grad_out = get_array_module(grad_out).ascontiguousarray(grad_out, dtype=q.dtype)
        grads = self.kernels.backward(q, k, v, self.key_keep, out, logsumexp, grad_out, self.scale, self.is_causal)
        return tuple(grad if needed else None for grad, needed in zip(grads, self.needs_input_grad))


def _apply(kernels, q, k, v, is_causal, scale, key_padding_mask) -> Tensor:
    key_keep = _key_keep(key_padding_mask, q.shape[0], k.shape[2], get_array_module(q.data))
    return CudaFlashAttention.apply(q, k, v, kernels=kernels, key_keep=key_keep, scale=float(scale),
                                    is_causal=bool(is_causal))


def kernel_variant(head_dim: int, dtype_name: str):
    """The build that takes inputs of this head dim and dtype."""
    return FlashAttentionVariant(head_dim) if dtype_name == "float32" else tensor_core_variant(head_dim, dtype_name)


@functools.cache
def _cupy_kernels(head_dim: int, dtype_name: str, device_index: int) -> FlashAttentionKernels:
    cupy = backend.cupy_module()
    variant = kernel_variant(head_dim, dtype_name)
    # The source goes in with its headers inlined: CuPy's cache of builds is keyed by the code it is given, so a
    # changed header must change the code.
    modules = [cupy.RawModule(code=kernel_source(source), options=variant.options) for source in variant.sources]
    return FlashAttentionKernels(modules, variant, device=lambda: cupy.cuda.Device(device_index))


@functools.cache
def _emulated_kernels(head_dim: int, dtype_name: str, schedule: str) -> FlashAttentionKernels:
    variant = kernel_variant(head_dim, dtype_name)
    modules = [EmulatedModule(source, variant.options, schedule=schedule) for source in variant.sources]
    return FlashAttentionKernels(modules, variant)


@functools.cache
def _compute_capability(device_index: int) -> int:
    """80 for an A100, 90 for an H100."""
    return int(backend.cupy_module().cuda.Device(device_index).compute_capability)


def _key_keep(key_padding_mask, batch: int, key_len: int, xp):
    """The mask as the kernels read it: uint8 (B, S), 1 where the key may be attended."""
    if key_padding_mask is None:
        return xp.ones((batch, key_len), dtype=np.uint8)
    mask = key_padding_mask.data if isinstance(key_padding_mask, Tensor) else key_padding_mask
    return xp.ascontiguousarray(xp.broadcast_to(mask, (batch, key_len)), dtype=np.uint8)


def _shape_args(q, k, scale: float, is_causal: bool) -> tuple:
    """The trailing kernel arguments, as the exact C types (CuPy would pass Python ints as 64-bit)."""
    _, Hq, T, _ = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    return np.int32(Hq), np.int32(Hkv), np.int32(T), np.int32(S), np.float32(scale), np.int32(is_causal)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _check_inputs(q, k, v, key_padding_mask, device_kind: str) -> None:
    """ValueError/TypeError/RuntimeError naming what the kernels cannot take."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor):
            raise TypeError(f"cuda attention: {name} must be a Tensor, got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(f"cuda attention: {name} must be (B, H, L, d), got shape {x.shape}")
        if x.dtype != q.dtype:
            raise TypeError(f"cuda attention: q, k, v must have one dtype, but q is {q.dtype} and {name} {x.dtype}")
        if not x.device.startswith(device_kind):
            where = "a CUDA device" if device_kind == "cuda" else "the CPU"
            raise RuntimeError(f"cuda attention: {name} must be on {where}, but it is on {x.device}")
    if not q.device == k.device == v.device:
        raise RuntimeError(f"cuda attention: q, k, v are on {q.device}, {k.device}, {v.device}; use one device")
    (B, Hq, T, d), (Bk, Hkv, S, dk) = q.shape, k.shape
    if v.shape != k.shape:
        raise ValueError(f"cuda attention: k and v must have one shape, got {k.shape} and {v.shape}")
    if Bk != B or dk != d:
        raise ValueError(f"cuda attention: q {q.shape} and k {k.shape} must agree on batch and head dim")
    if Hq % Hkv != 0:
        raise ValueError(f"cuda attention: {Hq} query heads are not a multiple of {Hkv} K/V heads")
    reason = unsupported_reason(q, k, device_kind)
    if reason is not None:
        raise ValueError(f"cuda attention: {reason}")
    if key_padding_mask is not None:
        mask = key_padding_mask.data if isinstance(key_padding_mask, Tensor) else key_padding_mask
        if mask.dtype != bool or mask.ndim != 2 or mask.shape[1] != S or mask.shape[0] not in (1, B):
            raise ValueError(f"cuda attention: key_padding_mask must be bool (B, S) or (1, S) = ({B} or 1, {S}), "
                             f"got {mask.dtype} {tuple(mask.shape)}")
        if backend.device_of(mask) != q.device:
            raise RuntimeError(f"cuda attention: key_padding_mask is on {backend.device_of(mask)}, q on {q.device}")
