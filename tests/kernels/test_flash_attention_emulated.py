"""tinytf/kernels/flash_attention.cu run on the CPU by tinytf.kernels.emulator, against a float64 reference.

Every launch goes through FlashAttentionKernels, the code that launches the kernels on a GPU, with outputs filled
with NaN before each launch, so an element a kernel fails to write shows. Lockstep covers the whole grid; the three
one-warp-at-a-time schedules, which expose missing barriers between warps, cover the lengths and head dims that
exercise partial tiles, several tiles, and T != S both ways. Windows, softcap, ALiBi, dropout, variable lengths and
head dims past 128 are tested in test_attention_mask_cuda.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from kernels.flash_cases import HEAD_DIMS, LENGTH_PAIRS, assert_matches_reference, make_case
from tinytf.attention.cuda import emulated_attention, is_supported
from tinytf.tensor import Tensor

ONE_WARP_AT_A_TIME = ("warps-forward", "warps-reverse", "warps-random")
ONE_WARP_PAIRS = ((17, 97), (97, 17), (256, 256))


def run_kernels(kernels, case):
    out, logsumexp = kernels.forward(case.q, case.k, case.v, case.key_keep, case.scale, case.is_causal)
    grads = kernels.backward(case.q, case.k, case.v, case.key_keep, out, logsumexp, case.grad_out, case.scale,
                             case.is_causal)
    return out, logsumexp, grads


@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("T, S", LENGTH_PAIRS)
def test_lockstep_matches_reference(emulated_flash_kernels, T, S, head_dim, is_causal):
    case = make_case(T, S, head_dim, is_causal)  # two query heads share one K/V head
    out, logsumexp, grads = run_kernels(emulated_flash_kernels(head_dim, "lockstep"), case)
    assert_matches_reference(case, out, logsumexp, grads)


@pytest.mark.parametrize("schedule", ONE_WARP_AT_A_TIME)
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("T, S", ONE_WARP_PAIRS)
def test_one_warp_at_a_time_matches_reference(emulated_flash_kernels, T, S, head_dim, is_causal, schedule):
    case = make_case(T, S, head_dim, is_causal, seed=1)
    out, logsumexp, grads = run_kernels(emulated_flash_kernels(head_dim, schedule), case)
    assert_matches_reference(case, out, logsumexp, grads)


@pytest.mark.parametrize("n_query_heads, n_kv_heads", [(4, 4), (4, 2), (4, 1)], ids=["MHA", "GQA", "MQA"])
def test_head_groups_and_key_padding_match_reference(emulated_flash_kernels, n_query_heads, n_kv_heads):
    case = make_case(33, 70, 64, is_causal=True, batch=2, n_query_heads=n_query_heads, n_kv_heads=n_kv_heads,
                     hidden_keys=40, seed=2)
    out, logsumexp, grads = run_kernels(emulated_flash_kernels(64, "warps-random"), case)
    assert_matches_reference(case, out, logsumexp, grads)


def test_results_are_identical_under_every_schedule(emulated_flash_kernels):
    """No atomics: every output element is summed in one fixed order, whatever order the warps run in."""
    case = make_case(97, 97, 16, is_causal=True, seed=3)
    first, *others = [run_kernels(emulated_flash_kernels(16, schedule), case)
                      for schedule in ("lockstep", *ONE_WARP_AT_A_TIME)]
    for other in others:
        for a, b in zip((first[0], first[1], *first[2]), (other[0], other[1], *other[2])):
            np.testing.assert_array_equal(a, b)


def test_queries_that_see_no_key_give_zeros_and_zero_gradients():
    """Causal with T > S: query i sees keys j <= i - (T - S), so the first T - S queries see none."""
    case = make_case(40, 24, 16, is_causal=True, seed=4)
    q, k, v = (Tensor(x, requires_grad=True) for x in (case.q, case.k, case.v))
    out = emulated_attention(q, k, v, is_causal=True, scale=case.scale, schedule="warps-reverse")
    out.backward(Tensor(case.grad_out))
    blind = slice(0, 40 - 24)
    assert not out.data[:, :, blind].any() and not q.grad[:, :, blind].any()
    assert_matches_reference(case, out.data, grads=(q.grad, k.grad, v.grad))


def test_emulated_attention_is_one_autograd_op_on_strided_inputs():
    """Inputs as a model makes them, (B, T, H, d) transposed to (B, H, T, d): copied once, gradients flow back."""
    case = make_case(17, 30, 64, is_causal=False, batch=2, n_query_heads=4, n_kv_heads=2, hidden_keys=7, seed=5)
    q, k, v = (Tensor(np.ascontiguousarray(x.transpose(0, 2, 1, 3)), requires_grad=True)
               for x in (case.q, case.k, case.v))
    q_heads, k_heads, v_heads = (x.transpose(1, 2) for x in (q, k, v))
    assert not q_heads.data.flags.c_contiguous
    out = emulated_attention(q_heads, k_heads, v_heads, is_causal=False, scale=case.scale,
                             key_padding_mask=case.key_keep.astype(bool))
    assert out.grad_fn is not None
    out.backward(Tensor(case.grad_out))
    grads = tuple(x.grad.transpose(0, 2, 1, 3) for x in (q, k, v))
    assert_matches_reference(case, out.data, grads=grads)


def test_inputs_the_kernels_cannot_take_are_refused_with_the_reason():
    case = make_case(8, 8, 64, is_causal=False)
    q, k, v = (Tensor(x) for x in (case.q, case.k, case.v))
    with pytest.raises(TypeError, match="float32"):
        emulated_attention(Tensor(case.q.astype(np.float64)), k, v, is_causal=False, scale=1.0)
    with pytest.raises(ValueError, match="head dim 40"):
        emulated_attention(*(Tensor(x[..., :40].copy()) for x in (case.q, case.k, case.v)), is_causal=False,
                           scale=1.0)
    with pytest.raises(ValueError, match="multiple"):
        emulated_attention(Tensor(case.q[:, :1].copy()), Tensor(np.concatenate([case.k, case.k], axis=1)),
                           Tensor(np.concatenate([case.v, case.v], axis=1)), is_causal=False, scale=1.0)
    with pytest.raises(ValueError, match="key_padding_mask"):
        emulated_attention(q, k, v, is_causal=False, scale=1.0, key_padding_mask=np.ones((1, 9), dtype=bool))
    with pytest.raises(ValueError, match="schedule"):
        emulated_attention(q, k, v, is_causal=False, scale=1.0, schedule="sideways")
    assert not is_supported(q, k, v), "the GPU backend must not claim CPU tensors"
