"""tinytf.attention.cuda: which build takes which inputs, and the tensor-core build through autograd.

The kernels' accuracy is tested in tests/kernels; here the launcher: bf16/fp16 tensors reach the tensor-core kernels
(on the CuPy stand-in, which runs them through the emulator, or on a GPU), gradients come back in the inputs' dtype,
and the result on "cuda" is the emulated kernels' result on the CPU: bit for bit on the stand-in, which runs the same
emulator; within a few units in the last place on a GPU, whose expf and tensor-core accumulation order are not the
host's (measured on an H100: float32 outputs apart by about 1e-7 relative).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import tinytf
from attention.attention_reference import reference_attention
from devices import CUDA
from tinytf import backend
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
    assert_matches_the_emulator(out.numpy(), emulated.numpy(), "out")
    for name, on_cuda, on_cpu in zip("qkv", (q, k, v), cpu_inputs):
        assert_matches_the_emulator(tinytf.Tensor(on_cuda.grad).numpy(), tinytf.Tensor(on_cpu.grad).numpy(), name)

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


def assert_matches_the_emulator(on_cuda: np.ndarray, emulated: np.ndarray, what: str = "") -> None:
    """Bit for bit on the stand-in; on a GPU within 4 units of the dtype's precision times the largest magnitude, far
    below what a wrong argument, mask or dropout draw moves (whole units)."""
    if backend.uses_cuda_standin():
        assert np.array_equal(on_cuda, emulated, equal_nan=True), what
        return
    reference = emulated.astype(np.float64)
    bound = 4 * float(ml_dtypes.finfo(emulated.dtype).eps) * np.abs(reference).max()
    assert np.abs(on_cuda.astype(np.float64) - reference).max() <= bound, what


def test_the_kernels_refuse_inputs_of_two_dtypes():
    q = tinytf.zeros(1, 2, 4, 64, dtype=tinytf.bfloat16)
    k = tinytf.zeros(1, 2, 4, 64, dtype=tinytf.float16)
    with pytest.raises(TypeError, match="one dtype, but q is bfloat16 and k float16"):
        cuda.emulated_attention(q, k, k, is_causal=False, scale=0.125)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device or the CuPy stand-in (TINYTF_CUDA_STANDIN=1)")
def test_features_on_cuda_equal_the_emulated_kernels():
    """Window, softcap, ALiBi (B, Hq) and dropout, dense and packed, reach the float32 kernels through autograd on
    "cuda" as on the emulator (their meaning is tested in tests/kernels/test_attention_mask_cuda.py)."""
    rng = np.random.default_rng(3)
    q, k, v, grad_out = (rng.standard_normal(shape, dtype=np.float32)
                         for shape in ((2, 4, 21, 16), (2, 2, 30, 16), (2, 2, 30, 16), (2, 4, 21, 16)))
    slopes = rng.uniform(0, 0.5, (2, 4)).astype(np.float32)
    features = dict(is_causal=True, scale=0.25, window=(9, -1), softcap=2.0, dropout_p=0.3, dropout_seed=2**33 + 1,
                    dropout_offset=4)
    packed = [x.transpose(0, 2, 1, 3).reshape(-1, *x.shape[1::2]) for x in (q, k, v, grad_out)]  # (B * L, H, d)
    cu_seqlens_q, cu_seqlens_k = np.array([0, 5, 42], dtype=np.int32), np.array([0, 30, 60], dtype=np.int32)
    calls = {
        "dense": ((q, k, v, grad_out), lambda *x, **f: cuda.launch_attention(*x, **f),
                  lambda *x, **f: cuda.emulated_attention(*x, **f), dict(alibi_slopes=slopes)),
        "packed": (packed, lambda *x, **f: cuda.launch_varlen_attention(*x, cu_seqlens_q, cu_seqlens_k, 37, 30, **f),
                   lambda *x, **f: cuda.emulated_varlen_attention(*x, cu_seqlens_q, cu_seqlens_k, 37, 30, **f),
                   dict(alibi_slopes=slopes[0])),
    }
    for name, (arrays, on_cuda, emulated, alibi) in calls.items():
        results = []
        for device, attention in (("cuda", on_cuda), ("cpu", emulated)):
            tensors = [tinytf.tensor(x, device=device, requires_grad=True) for x in arrays[:3]]
            slopes_on_device = {key: tinytf.tensor(value, device=device) for key, value in alibi.items()}
            out = attention(*tensors, **features, **slopes_on_device)
            out.backward(tinytf.tensor(arrays[3], device=device))
            results.append([out.numpy(), *(tinytf.Tensor(x.grad).numpy() for x in tensors)])
        for what, on_cuda_result, on_cpu_result in zip(("out", "dq", "dk", "dv"), *results):
            assert_matches_the_emulator(on_cuda_result, on_cpu_result, f"{name} {what}")


def test_dropout_p_of_one_is_named():
    q = tinytf.zeros(1, 2, 4, 64)
    assert cuda.unsupported_reason(q, q, device_kind="cpu", dropout_p=1.0) == "dropout_p must be in [0, 1), got 1.0"
    assert cuda.unsupported_reason(q, q, device_kind="cpu", dropout_p=0.5) is None
