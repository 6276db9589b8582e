"""backend="cuda": tinytf's FlashAttention-2 kernels, launched through CuPy.

    out = cuda_attention(q, k, v, is_causal=True, scale=0.125)    # tensors on a CUDA device in, one out
    out = launch_varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, is_causal=True, scale=0.125)

Two builds, chosen by the inputs' dtype: float32 runs tinytf/kernels/flash_attention.cu on CUDA cores (sm_70+);
bfloat16 and float16 run the tensor-core kernels of flash_attention_tc.cu and flash_attention_tc_backward.cu
(mma.sync, sm_80+), with float32 accumulation, softmax state and log-sum-exp, and O and the gradients in the inputs'
dtype. One autograd Function: forward runs the forward kernel and saves O and the row log-sum-exp L; backward runs the
delta pre-pass, then the dQ kernel and the dK/dV kernel (the kernel files' headers say why dQ has a pass of its own).
cupy.RawModule compiles a build's kernels on first use, cached per (head dim, dtype, device), with the options of
tinytf.kernels.FlashAttentionVariant or TensorCoreVariant: the compile gate checks exactly those builds.

Both builds take one argument list (tinytf/kernels/attention_mask.cuh): per-batch lengths, a sliding window (causal
is right = 0), softcap, ALiBi slopes and Philox dropout, with tinytf.attention's meaning (bottom-right aligned).
Packed variable-length sequences (total, H, d) are scattered into padded (N, H, max_len, d) for the kernels, which
read each sequence's own lengths, and gathered back (PackedLayout).

emulated_attention() and emulated_varlen_attention() run the same Function on NumPy tensors, with the kernels built
for the CPU by tinytf.kernels.emulator: slow, and the way to study and test the CUDA code without a GPU.

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
from ..tensor import Function, Tensor, array_of
from .dropout import dropout_threshold
from .masks import normalized_window

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


def unsupported_reason(q: Tensor, k: Tensor, device_kind: str = "cuda", dropout_p: float = 0.0) -> str | None:
    """Why the kernels cannot take q (B, Hq, T, d) and k (B, Hkv, S, d), or None when they can.

    For inputs that are already valid attention inputs (scaled_dot_product_attention checked shapes, dtypes and
    devices): only what the kernels add, their dtype, device, head dims and grid. Windows, softcap, ALiBi and dropout
    (dropout_p < 1) run in every build.
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
    if not 0 <= dropout_p < 1:
        return f"dropout_p must be in [0, 1), got {dropout_p}"
    return None


def cuda_attention(q: Tensor, k: Tensor, v: Tensor, *, is_causal: bool, scale: float, key_padding_mask=None,
                   **features) -> Tensor:
    """softmax(scale q k^T, masked) v on a CUDA GPU: (B, Hq, T, d), (B, Hkv, S, d), (B, Hkv, S, d) -> (B, Hq, T, d).

    is_causal: query i sees keys j <= i + S - T (aligned bottom-right). key_padding_mask: bool (B, S) or (1, S), array
    or Tensor, True where the key may be attended. features: window, softcap, alibi_slopes, dropout_p, dropout_seed,
    dropout_offset, as launch_attention takes them. A query that sees no key gives zeros and zero gradients.
    """
    _check_inputs(q, k, v, key_padding_mask, device_kind="cuda", **features)
    return launch_attention(q, k, v, is_causal=is_causal, scale=scale, key_padding_mask=key_padding_mask, **features)


def launch_attention(q: Tensor, k: Tensor, v: Tensor, *, is_causal: bool, scale: float, key_padding_mask=None,
                     window=None, softcap=None, alibi_slopes=None, dropout_p: float = 0.0, dropout_seed: int = 0,
                     dropout_offset: int = 0) -> Tensor:
    """cuda_attention for inputs already checked (scaled_dot_product_attention and unsupported_reason did).

    window: (left, right), -1 unbounded, or None; is_causal makes right 0. softcap: > 0 or None. alibi_slopes: (Hq,)
    or (B, Hq), array or Tensor, never differentiated. dropout_seed: a 64-bit int; dropout_offset: Philox counter
    word 3.
    """
    kernels = _cupy_kernels(q.shape[-1], q.dtype.name, int(q.device.split(":")[1]))
    return _apply(kernels, DenseLayout(), q, k, v, key_padding_mask, _features(
        is_causal, scale, window, softcap, alibi_slopes, dropout_p, dropout_seed, dropout_offset))


def launch_varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int,
                            max_seqlen_k: int, *, is_causal: bool, scale: float, window=None, softcap=None,
                            alibi_slopes=None, dropout_p: float = 0.0, dropout_seed: int = 0,
                            dropout_offset: int = 0) -> Tensor:
    """Attention of N packed sequences: q (total_q, Hq, d), k and v (total_k, Hkv, d) -> (total_q, Hq, d).

    Sequence n is rows cu_seqlens_q[n]:cu_seqlens_q[n + 1] of q against rows cu_seqlens_k[n]:cu_seqlens_k[n + 1] of
    k and v (cu_seqlens: int32 (N + 1,), from 0), causal and window aligned to each sequence's own lengths.
    alibi_slopes: (Hq,) or (N, Hq). The other keywords as launch_attention's.
    """
    layout = PackedLayout(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, get_array_module(q.data))
    kernels = _cupy_kernels(q.shape[-1], q.dtype.name, int(q.device.split(":")[1]))
    return _apply(kernels, layout, q, k, v, None, _features(
        is_causal, scale, window, softcap, alibi_slopes, dropout_p, dropout_seed, dropout_offset))


def emulated_attention(q: Tensor, k: Tensor, v: Tensor, *, is_causal: bool, scale: float, key_padding_mask=None,
                       schedule: str = "lockstep", window=None, softcap=None, alibi_slopes=None,
                       dropout_p: float = 0.0, dropout_seed: int = 0, dropout_offset: int = 0) -> Tensor:
    """cuda_attention on CPU tensors: the same kernels and launches, run by tinytf.kernels.emulator (needs g++)."""
    features = _features(is_causal, scale, window, softcap, alibi_slopes, dropout_p, dropout_seed, dropout_offset)
    _check_inputs(q, k, v, key_padding_mask, device_kind="cpu", **features)
    kernels = _emulated_kernels(q.shape[-1], q.dtype.name, schedule)
    return _apply(kernels, DenseLayout(), q, k, v, key_padding_mask, features)


def emulated_varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int,
                              max_seqlen_k: int, *, is_causal: bool, scale: float, schedule: str = "lockstep",
                              window=None, softcap=None, alibi_slopes=None, dropout_p: float = 0.0,
                              dropout_seed: int = 0, dropout_offset: int = 0) -> Tensor:
    """launch_varlen_attention on CPU tensors, run by tinytf.kernels.emulator."""
    layout = PackedLayout(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, np)
    features = _features(is_causal, scale, window, softcap, alibi_slopes, dropout_p, dropout_seed, dropout_offset)
    _check_packed_inputs(q, k, v, layout, "cpu", **features)
    kernels = _emulated_kernels(q.shape[-1], q.dtype.name, schedule)
    return _apply(kernels, layout, q, k, v, None, features)


class FlashAttentionKernels:
    """The kernels of one build and how to launch them, on CuPy arrays (a GPU) or NumPy arrays (the emulator).

    `modules`: one cupy.RawModule or tinytf.kernels.emulator.EmulatedModule per file of `variant.sources`, built with
    `variant.options`; the forward kernel comes from the first, the backward kernels from the last. `variant` is a
    FlashAttentionVariant (float32) or a TensorCoreVariant (bf16/fp16): both builds take the same arguments in the
    same order (tinytf/kernels/attention_mask.cuh). `device` makes the context the launches run in (the modules' GPU;
    backward runs later, outside the caller's context).

    forward and backward take `features`, the keywords of _kernel_arguments: query_lens and key_lens (int (B,), the
    lengths of each batch entry within the padded T and S), window, softcap, alibi_slopes, dropout_p, dropout_seed,
    dropout_offset.
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

    def forward(self, q, k, v, key_keep, scale: float, is_causal: bool = False, **features):
        """-> out (B, Hq, T, d), logsumexp (B, Hq, T) float32 (-inf for a row that sees no key)."""
        self._check_launch_arrays(key_keep, q=q, k=k, v=v)
        xp = get_array_module(q)
        B, Hq, T, _ = q.shape
        with self.device():
            trailing = _kernel_arguments(q, k, scale, is_causal, **features)
            out = xp.empty_like(q)
            logsumexp = xp.empty((B, Hq, T), dtype=STATS_DTYPE)
            grid = (_ceil_div(T, self.variant.forward_block_rows), B * Hq)
            self.kernel("forward")(grid, (THREADS_PER_BLOCK,), (q, k, v, key_keep, out, logsumexp, *trailing))
        return out, logsumexp

    def backward(self, q, k, v, key_keep, out, logsumexp, grad_out, scale: float, is_causal: bool = False,
                 **features):
        """-> grad_q, grad_k, grad_v, shaped like q, k, v."""
        self._check_launch_arrays(key_keep, q=q, k=k, v=v, out=out, grad_out=grad_out)
        xp = get_array_module(q)
        B, Hq, T, _ = q.shape
        Hkv, S = k.shape[1], k.shape[2]
        rows = B * Hq * T
        rows_per_block = self.variant.backward_block_rows
        with self.device():
            trailing = _kernel_arguments(q, k, scale, is_causal, **features)
            delta = xp.empty((B, Hq, T), dtype=STATS_DTYPE)
            self.kernel("backward_delta")((_ceil_div(rows, THREADS_PER_BLOCK // 32),), (THREADS_PER_BLOCK,),
                                          (out, grad_out, delta, np.int32(rows)))
            grad_q, grad_k, grad_v = xp.empty_like(q), xp.empty_like(k), xp.empty_like(v)
            self.kernel("backward_dq")((_ceil_div(T, rows_per_block), B * Hq), (THREADS_PER_BLOCK,),
                                       (q, k, v, key_keep, grad_out, logsumexp, delta, grad_q, *trailing))
            self.kernel("backward_dkdv")((_ceil_div(S, rows_per_block), B * Hkv), (THREADS_PER_BLOCK,),
                                         (q, k, v, key_keep, grad_out, logsumexp, delta, grad_k, grad_v, *trailing))
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


class DenseLayout:
    """Inputs already (B, H, L, d), as the kernels take them: only copied when not contiguous."""

    batch_lengths: dict = {}  # every batch entry has the full T and S

    def to_kernel(self, x, side: str):
        return get_array_module(x).ascontiguousarray(x)

    def from_kernel(self, x, side: str):
        return x


class PackedLayout:
    """Packed rows (total, H, d) of N sequences, and the kernels' padded (N, H, max_len, d) with per-sequence lengths.

    side "query" follows cu_seqlens_q and max_seqlen_q, side "key" cu_seqlens_k and max_seqlen_k. Padding rows are
    zeros going in and dropped coming out, so gradients flow back to the packed rows only.
    """

    def __init__(self, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int, xp):
        self.lengths, self.max_lengths, self._rows = {}, {"query": int(max_seqlen_q), "key": int(max_seqlen_k)}, {}
        for side, cu_seqlens in (("query", cu_seqlens_q), ("key", cu_seqlens_k)):
            starts = backend.to_numpy(array_of(cu_seqlens)).astype(np.int64)
            lengths = np.diff(starts)
            if starts.ndim != 1 or len(starts) < 2 or starts[0] != 0 or (lengths < 0).any():
                raise ValueError(f"cuda attention: cu_seqlens_{side[0]} must be (N + 1,) cumulative lengths from 0, "
                                 f"got {starts.tolist()}")
            if lengths.max() > self.max_lengths[side]:
                raise ValueError(f"cuda attention: a sequence of {lengths.max()} {side} rows exceeds "
                                 f"max_seqlen_{side[0]} = {self.max_lengths[side]}")
            sequence = np.repeat(np.arange(len(lengths)), lengths)
            position = np.arange(starts[-1]) - np.repeat(starts[:-1], lengths)
            self.lengths[side] = lengths
            self._rows[side] = (xp.asarray(sequence), xp.asarray(position))
        if len(self.lengths["query"]) != len(self.lengths["key"]):
            raise ValueError(f"cuda attention: cu_seqlens_q has {len(self.lengths['query']) + 1} entries and "
                             f"cu_seqlens_k {len(self.lengths['key']) + 1}; one per sequence boundary in both")
        self.batch = len(self.lengths["query"])

    @property
    def batch_lengths(self) -> dict:
        return {"query_lens": self.lengths["query"], "key_lens": self.lengths["key"]}

    def total_rows(self, side: str) -> int:
        return len(self._rows[side][0])

    def to_kernel(self, packed, side: str):
        """(total, H, d) -> (N, H, max_len, d), zeros past each sequence's end."""
        xp = get_array_module(packed)
        sequence, position = self._rows[side]
        padded = xp.zeros((self.batch, packed.shape[1], self.max_lengths[side], packed.shape[2]), dtype=packed.dtype)
        padded[sequence, :, position] = packed
        return padded

    def from_kernel(self, padded, side: str):
        """(N, H, max_len, d) -> (total, H, d)."""
        sequence, position = self._rows[side]
        return padded[sequence, :, position]


class CudaFlashAttention(Function):
    """Forward saves Q, K, V, O and L in the kernels' layout; backward recomputes P from them, tile by tile."""

    def forward(self, q, k, v, kernels: FlashAttentionKernels, layout, key_padding_mask, features: dict):
        q, k, v = layout.to_kernel(q, "query"), layout.to_kernel(k, "key"), layout.to_kernel(v, "key")
        key_keep = _key_keep(key_padding_mask, q.shape[0], k.shape[2], get_array_module(q))
        # The lengths and slopes go to the device once, for the forward and the backward launches.
        arrays = _device_arrays(q, k, *(features.get(name) for name in ("query_lens", "key_lens", "alibi_slopes")))
        features = dict(features, **arrays)
        self.kernels, self.layout, self.key_keep, self.features = kernels, layout, key_keep, features
        out, logsumexp = kernels.forward(q, k, v, key_keep, **features)
        self.save_for_backward(q, k, v, out, logsumexp)
        return layout.from_kernel(out, "query")

    def backward(self, grad_out):
        q, k, v, out, logsumexp = self.saved_tensors
        grad_out = self.layout.to_kernel(get_array_module(grad_out).asarray(grad_out, dtype=q.dtype), "query")
        grads = self.kernels.backward(q, k, v, self.key_keep, out, logsumexp, grad_out, **self.features)
        grads = [self.layout.from_kernel(grad, side) for grad, side in zip(grads, ("query", "key", "key"))]
        return tuple(grad if needed else None for grad, needed in zip(grads, self.needs_input_grad))


def _features(is_causal, scale, window, softcap, alibi_slopes, dropout_p, dropout_seed, dropout_offset) -> dict:
    """The keywords of FlashAttentionKernels.forward/backward, alibi_slopes as an array."""
    return dict(scale=float(scale), is_causal=bool(is_causal), window=window, softcap=softcap,
                alibi_slopes=array_of(alibi_slopes), dropout_p=float(dropout_p),
                dropout_seed=int(dropout_seed), dropout_offset=int(dropout_offset))


def _apply(kernels, layout, q, k, v, key_padding_mask, features: dict) -> Tensor:
    return CudaFlashAttention.apply(q, k, v, kernels=kernels, layout=layout, key_padding_mask=key_padding_mask,
                                    features=dict(features, **layout.batch_lengths))


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
    mask = array_of(key_padding_mask)
    return xp.ascontiguousarray(xp.broadcast_to(mask, (batch, key_len)), dtype=np.uint8)


def _kernel_arguments(q, k, scale: float, is_causal: bool = False, *, query_lens=None, key_lens=None, window=None,
                      softcap=None, alibi_slopes=None, dropout_p: float = 0.0, dropout_seed: int = 0,
                      dropout_offset: int = 0) -> tuple:
    """The trailing kernel arguments of attention_mask.cuh, as the exact C types (CuPy would pass Python ints as 64
    bits) and arrays on q's device. query_lens, key_lens: int (B,), None for the full T and S."""
    _, Hq, T, _ = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    arrays = _device_arrays(q, k, query_lens, key_lens, alibi_slopes)
    slopes = arrays["alibi_slopes"]
    left, right = normalized_window(window, is_causal)
    threshold = dropout_threshold(dropout_p)
    return (np.int32(Hq), np.int32(Hkv), np.int32(T), np.int32(S), arrays["query_lens"], arrays["key_lens"],
            np.float32(scale), np.int32(left), np.int32(right), np.float32(softcap or 0.0), slopes,
            np.int32(0 if slopes.ndim == 1 else Hq), np.uint32(threshold), np.float32(1.0 / (1.0 - dropout_p)),
            np.uint64(dropout_seed & (2**64 - 1)), np.uint32(dropout_offset & (2**32 - 1)))


def _device_arrays(q, k, query_lens=None, key_lens=None, alibi_slopes=None) -> dict:
    """query_lens, key_lens (int32 (B,); the full T and S when None) and alibi_slopes (float32 (Hq,) or (B, Hq); zeros
    when None) as the kernels read them, on q's device. Arrays that already are so pass through uncopied."""
    xp = get_array_module(q)
    B, Hq, T, _ = q.shape
    lengths = {name: xp.asarray(np.full(B, full) if given is None else given, dtype=np.int32)
               for name, given, full in (("query_lens", query_lens, T), ("key_lens", key_lens, k.shape[2]))}
    slopes = xp.zeros(Hq, dtype=np.float32) if alibi_slopes is None else xp.asarray(alibi_slopes)
    return dict(lengths, alibi_slopes=xp.ascontiguousarray(slopes, dtype=np.float32))


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _check_inputs(q, k, v, key_padding_mask, device_kind: str, **features) -> None:
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
    (B, Hq, _, d), (Bk, Hkv, S, dk) = q.shape, k.shape
    if v.shape != k.shape:
        raise ValueError(f"cuda attention: k and v must have one shape, got {k.shape} and {v.shape}")
    if Bk != B or dk != d:
        raise ValueError(f"cuda attention: q {q.shape} and k {k.shape} must agree on batch and head dim")
    if Hq % Hkv != 0:
        raise ValueError(f"cuda attention: {Hq} query heads are not a multiple of {Hkv} K/V heads")
    reason = unsupported_reason(q, k, device_kind, features.get("dropout_p", 0.0))
    if reason is not None:
        raise ValueError(f"cuda attention: {reason}")
    _check_features(B, Hq, **features)
    if key_padding_mask is not None:
        mask = array_of(key_padding_mask)
        if mask.dtype != bool or mask.ndim != 2 or mask.shape[1] != S or mask.shape[0] not in (1, B):
            raise ValueError(f"cuda attention: key_padding_mask must be bool (B, S) or (1, S) = ({B} or 1, {S}), "
                             f"got {mask.dtype} {tuple(mask.shape)}")
        if backend.device_of(mask) != q.device:
            raise RuntimeError(f"cuda attention: key_padding_mask is on {backend.device_of(mask)}, q on {q.device}")


def _check_packed_inputs(q, k, v, layout: PackedLayout, device_kind: str, **features) -> None:
    """The packed (total, H, d) inputs of the varlen calls: rows against cu_seqlens, then what _check_inputs checks."""
    for name, x, side in (("q", q, "query"), ("k", k, "key"), ("v", v, "key")):
        if not isinstance(x, Tensor) or x.ndim != 3 or x.shape[0] != layout.total_rows(side):
            raise ValueError(f"cuda attention: packed {name} must be a Tensor (total, H, d) with total = "
                             f"{layout.total_rows(side)} rows (cu_seqlens), got {getattr(x, 'shape', type(x))}")
    as_heads = (Tensor(x.data[None].swapaxes(1, 2)) for x in (q, k, v))  # (1, H, total, d) views
    _check_inputs(*as_heads, None, device_kind=device_kind, **dict(features, alibi_slopes=None))  # checked below
    if layout.batch * q.shape[1] > MAX_GRID_Y:
        raise ValueError(f"cuda attention: sequences x query heads = {layout.batch * q.shape[1]} exceeds the grid's "
                         f"{MAX_GRID_Y}")
    alibi_slopes = features.get("alibi_slopes")
    if alibi_slopes is not None and tuple(alibi_slopes.shape) not in ((q.shape[1],), (layout.batch, q.shape[1])):
        raise ValueError(f"cuda attention: alibi_slopes must be (Hq,) or (N, Hq) = ({q.shape[1]},) or "
                         f"({layout.batch}, {q.shape[1]}), got {tuple(alibi_slopes.shape)}")


def _check_features(batch: int, n_query_heads: int, *, window=None, softcap=None, alibi_slopes=None,
                    is_causal=False, **_) -> None:
    normalized_window(window, is_causal)  # raises ValueError naming a bad window
    if softcap is not None and not softcap > 0:
        raise ValueError(f"cuda attention: softcap must be > 0 or None, got {softcap}")
    if alibi_slopes is not None:
        shape = tuple(alibi_slopes.shape)
        if shape not in ((n_query_heads,), (batch, n_query_heads)):
            raise ValueError(f"cuda attention: alibi_slopes must be (Hq,) or (B, Hq) = ({n_query_heads},) or "
                             f"({batch}, {n_query_heads}), got {shape}")
