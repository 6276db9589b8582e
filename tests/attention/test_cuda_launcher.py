"""tinytf.attention.cuda: which build takes which inputs, and the tensor-core build through autograd.

The kernels' accuracy is tested in tests/kernels; here the launcher: bf16/fp16 tensors reach the tensor-core kernels
(on the CuPy stand-in, which runs them through the emulator, or on a GPU), gradients come back in the inputs' dtype,
and the result on "cuda" is the emulated kernels' result on the CPU, bit for bit.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import tinytf
from attention.attention_reference import reference_attention
from devices import CUDA
from tinytf.attention import cuda, scaled_dot_product_attention
from tinytf.kernels import HEAD_DIMS, TENSOR_CORE_HEAD_DIMS

HALF_TYPES = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def half_inputs(dtype: str, device: str, shape=(2, 4, 33, 64), kv_heads: int = 2, seed: int = 0):
    rng = np.random.default_rng(seed)
    B, Hq, T, d = shape
    arrays = [rng.standard_normal((B, heads, T, d)).astype(HALF_TYPES[dtype]) for heads in (Hq, kv_heads, kv_heads)]
    grad_out = rng.standard_normal(shape).astype(HALF_TYPES[dtype])
    tensors = [tinytf.tensor(x, device=device, requires_grad=True) for x in arrays]
    return arrays, tensors, tinytf.tensor(grad_out, device=device)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device or the CuPy stand-in (TINYTF_CUDA_STANDIN=1)")
@pytest.mark.parametrize("dtype", list(HALF_TYPES))
def test_half_precision_on_cuda_runs_the_tensor_core_kernels_through_autograd(dtype):
    arrays, (q, k, v), grad_out = half_inputs(dtype, "cuda")
    keep = np.ones((2, 33), dtype=bool)
    keep[1, 20:] = False
    out = scaled_dot_product_attention(q, k, v, is_causal=True, backend="cuda",
                                       attn_mask=tinytf.tensor(keep[:, None, None, :], device="cuda"))
    out.backward(grad_out)
    assert out.dtype == q.dtype and all(x.grad.dtype == q.dtype for x in (q, k, v))

    cpu_inputs = [tinytf.tensor(x, requires_grad=True) for x in arrays]
    emulated = cuda.emulated_attention(*cpu_inputs, is_causal=True, scale=1 / 8, key_padding_mask=keep)
    emulated.backward(tinytf.tensor(grad_out.numpy()))
    assert np.array_equal(out.numpy(), emulated.numpy(), equal_nan=True)
    for on_cuda, on_cpu in zip((q, k, v), cpu_inputs):
        assert np.array_equal(tinytf.Tensor(on_cuda.grad).numpy(), tinytf.Tensor(on_cpu.grad).numpy())

    # A gross check of the kernels' meaning (their accuracy is tested in tests/kernels): each output is a convex
    # combination of rows of V, so rounding P to the dtype (relative 2^-8 for bf16, 2^-11 for fp16) and the output once
    # moves it by at most about twice the unit roundoff times max |V|.
    expected = reference_attention(*arrays, is_causal=True, attn_mask=keep[:, None, None, :])
    roundoff = float(ml_dtypes.finfo(HALF_TYPES[dtype]).eps)
    bound = 2 * roundoff * np.abs(arrays[2].astype(np.float64)).max()
    assert np.abs(out.numpy().astype(np.float64) - expected).max() <= bound


def test_each_dtype_goes_to_its_build():
    assert cuda.kernel_variant(64, "float32").kernel_prefix == "flash_attention_"
    assert cuda.kernel_variant(64, "bfloat16").kernel_prefix == "flash_attention_tc_"
    assert cuda.kernel_variant(128, "float16").dtype == "float16"


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device or the CuPy stand-in (TINYTF_CUDA_STANDIN=1)")
def test_half_precision_needs_an_ampere_gpu(monkeypatch):
    """bf16/fp16 need sm_80's tensor-core instructions: an older GPU gets a reason, and the automatic backend choice
    goes to another backend."""
    monkeypatch.setattr(cuda, "_compute_capability", lambda device_index: 75)
    q = tinytf.zeros(1, 2, 4, 64, dtype=tinytf.bfloat16, device="cuda")
    reason = cuda.unsupported_reason(q, q)
    assert "sm_80" in reason and "sm_75" in reason and ".float()" in reason
    assert cuda.unsupported_reason(q.float(), q.float()) is None
    with pytest.raises(ValueError, match="sm_75"):
        scaled_dot_product_attention(q, q, q, backend="cuda")
    assert scaled_dot_product_attention(q, q, q).dtype == tinytf.bfloat16


@pytest.mark.parametrize("dtype, head_dims", [("float32", HEAD_DIMS), ("bfloat16", TENSOR_CORE_HEAD_DIMS)])
def test_head_dims_without_a_kernel_are_named(dtype, head_dims):
    q = tinytf.zeros(1, 2, 4, 48, dtype=dtype)
    assert cuda.unsupported_reason(q, q, device_kind="cpu") == f"head dim 48 has no {dtype} kernel; supported: " \
                                                              f"{head_dims}"


def test_the_kernels_refuse_inputs_of_two_dtypes():
    q = tinytf.zeros(1, 2, 4, 64, dtype=tinytf.bfloat16)
    k = tinytf.zeros(1, 2, 4, 64, dtype=tinytf.float16)
    with pytest.raises(TypeError, match="one dtype, but q is bfloat16 and k float16"):
        cuda.emulated_attention(q, k, k, is_causal=False, scale=0.125)
