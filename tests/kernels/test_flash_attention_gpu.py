"""backend="cuda" on a real GPU: the grid of the emulated tests, through cuda_attention and autograd, on CuPy; and the
bf16/fp16 tensor-core kernels through their launcher against the references of their emulated tests.

Skipped where CuPy finds no CUDA device; there the compile gate and the emulator check the same kernels.
"""

from __future__ import annotations

import numpy as np
import pytest

from devices import STANDIN
from kernels.flash_cases import HEAD_DIMS, LENGTH_PAIRS, assert_matches_reference, make_case
from kernels.tensor_core_reference import (
    ELEMENT_TYPES,
    assert_forward_matches_float64,
    assert_gradients_match,
    backward_case,
    element_case,
    forward_as_the_gpu_saves_it,
)
from tinytf import backend
from tinytf.attention import cuda
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


# On the CuPy stand-in the kernels run on the emulator, which tests/kernels/test_flash_attention_tc*.py already drive
# over this grid: there one case checks the launch path, and a real GPU runs them all.
TENSOR_CORE_CASES = [(17, 97, True, 64)] if STANDIN else [
    (T, S, is_causal, head_dim)
    for T, S, is_causal in ((1, 256, True), (17, 97, True), (97, 17, False), (256, 256, True)) for head_dim in (64, 128)
]


@pytest.mark.parametrize("element", ELEMENT_TYPES)
@pytest.mark.parametrize("T, S, is_causal, head_dim", TENSOR_CORE_CASES)
def test_gpu_tensor_core_kernels_match_float64(T, S, is_causal, head_dim, element):
    """The bf16/fp16 kernels on the GPU, held to the emulated tests' rule: at most ERROR_MULTIPLE times the error of
    a naive path that rounds where they round. Grouped-query heads, and keys hidden in the second batch entry."""
    kernels = cuda._cupy_kernels(head_dim, element, 0)
    case = element_case(T, S, head_dim, is_causal, ELEMENT_TYPES[element], batch=2, n_query_heads=4, n_kv_heads=2,
                        hidden_keys=5)
    q, k, v = (backend.to_device(x.astype(ELEMENT_TYPES[element]), "cuda") for x in (case.q, case.k, case.v))
    out, logsumexp = kernels.forward(q, k, v, backend.to_device(case.key_keep, "cuda"), case.scale, is_causal)
    assert_forward_matches_float64(case, element, backend.to_numpy(out).astype(np.float32),
                                   backend.to_numpy(logsumexp))

    case = backward_case(T, S, head_dim, is_causal, element, batch=2, n_query_heads=4, n_kv_heads=2, hidden_keys=(0, 5))
    out, logsumexp = forward_as_the_gpu_saves_it(case)
    on_gpu_arrays = (backend.to_device(x, "cuda") for x in (case.q, case.k, case.v, case.key_keep, out, logsumexp,
                                                            case.grad_out))
    grads = kernels.backward(*on_gpu_arrays, case.scale, is_causal)
    assert_gradients_match(case, out, logsumexp, [backend.to_numpy(grad) for grad in grads])
