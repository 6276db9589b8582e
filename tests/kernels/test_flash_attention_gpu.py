"""backend="cuda" on a real GPU: the grid of the emulated tests, through cuda_attention and autograd, on CuPy; issue
17's features (window, softcap, ALiBi, dropout, T > S causal, head dims past 128); and the bf16/fp16 tensor-core
kernels through their launcher against the references of their emulated tests.

Skipped where CuPy finds no CUDA device; there the compile gate and the emulator check the same kernels.
"""

from __future__ import annotations

import numpy as np
import pytest

from devices import STANDIN
from kernels.flash_cases import (
    HEAD_DIMS,
    LENGTH_PAIRS,
    assert_matches_feature_reference,
    assert_matches_reference,
    feature_inputs,
    make_case,
)
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


# (T, S, head dim, is_causal, window, softcap, ALiBi slopes shape, dropout_p); the stand-in runs one, a GPU all.
FEATURE_CASES = [(40, 24, 64, True, (8, -1), None, (4,), 0.0)] + ([] if STANDIN else [
    (1025, 1025, 64, True, (256, -1), None, None, 0.0),  # a window much shorter than T: most key tiles skipped
    (97, 1025, 128, False, (100, 100), 30.0, (2, 4), 0.1),
    (256, 97, 256, True, (-1, -1), 5.0, (4,), 0.2),  # T > S causal, one column tile
    (17, 256, 192, False, (-1, 3), None, (2, 4), 0.0),
])


@pytest.mark.parametrize("T, S, head_dim, is_causal, window, softcap, alibi, dropout_p", FEATURE_CASES)
def test_gpu_features_match_reference(T, S, head_dim, is_causal, window, softcap, alibi, dropout_p):
    arrays = feature_inputs(2, 4, 2, T, S, head_dim, seed=T + S)
    slopes = None if alibi is None else np.random.default_rng(0).uniform(0.01, 0.3, alibi).astype(np.float32)
    q, k, v = (on_gpu(x, requires_grad=True) for x in arrays[:3])
    out = cuda_attention(q, k, v, is_causal=is_causal, scale=0.125, window=window, softcap=softcap,
                         alibi_slopes=None if slopes is None else backend.to_device(slopes, "cuda"),
                         dropout_p=dropout_p, dropout_seed=7, dropout_offset=1)
    out.backward(on_gpu(arrays[3]))
    assert_matches_feature_reference((out.data, None, q.grad, k.grad, v.grad), arrays, scale=0.125,
                                     window=(window[0], 0 if is_causal else window[1]), softcap=softcap,
                                     alibi=slopes, dropout_p=dropout_p, seed=7, offset=1)


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
