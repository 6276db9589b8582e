"""backend="cuda" on a real GPU: the grid of the emulated tests, through cuda_attention and autograd, on CuPy.

Skipped where CuPy finds no CUDA device; there the compile gate and the emulator check the same kernels.
"""

from __future__ import annotations

import pytest

from kernels.flash_cases import HEAD_DIMS, LENGTH_PAIRS, assert_matches_reference, make_case
from tinytf import backend
from tinytf.attention.cuda import cuda_attention, is_supported
from tinytf.tensor import Tensor

pytestmark = pytest.mark.skipif(
    not backend.is_available("cuda"),
    reason="no CUDA GPU: CuPy is not installed or finds no device (the compile gate and the emulator still run)",
)


def on_gpu(array, requires_grad: bool = False) -> Tensor:
    return Tensor(backend.to_device(array, "cuda"), requires_grad=requires_grad)


def run_on_gpu(case, key_padding_mask=None):
    q, k, v = (on_gpu(x, requires_grad=True) for x in (case.q, case.k, case.v))
    assert is_supported(q, k, v)
    out = cuda_attention(q, k, v, is_causal=case.is_causal, scale=case.scale, key_padding_mask=key_padding_mask)
    out.backward(on_gpu(case.grad_out))
    return out.data, (q.grad, k.grad, v.grad)


@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("T, S", LENGTH_PAIRS)
def test_gpu_matches_reference(T, S, head_dim, is_causal):
    case = make_case(T, S, head_dim, is_causal)
    out, grads = run_on_gpu(case)
    assert_matches_reference(case, out, grads=grads)


@pytest.mark.parametrize("n_query_heads, n_kv_heads", [(4, 4), (4, 2), (4, 1)], ids=["MHA", "GQA", "MQA"])
def test_gpu_head_groups_and_key_padding_match_reference(n_query_heads, n_kv_heads):
    case = make_case(33, 70, 64, is_causal=True, batch=2, n_query_heads=n_query_heads, n_kv_heads=n_kv_heads,
                     hidden_keys=40, seed=2)
    out, grads = run_on_gpu(case, key_padding_mask=backend.to_device(case.key_keep.astype(bool), "cuda"))
    assert_matches_reference(case, out, grads=grads)
