"""The float32 CUDA kernels' windows, softcap, ALiBi, dropout and variable lengths (issue 17), run on the CPU emulator,
against kernels.flash_cases.feature_reference: the issue's semantics in plain NumPy, Philox included."""

from __future__ import annotations

import numpy as np
import pytest

from kernels.flash_cases import (
    ERROR_FLOOR,
    ERROR_MULTIPLE,
    assert_matches_feature_reference,
    feature_inputs,
    feature_reference,
)
from tinytf.attention.cuda import emulated_attention, emulated_varlen_attention
from tinytf.tensor import Tensor

def run_kernels(kernels, q, k, v, grad_out, key_keep=None, **features):
    key_keep = np.ones((q.shape[0], k.shape[2]), dtype=np.uint8) if key_keep is None else key_keep
    out, L = kernels.forward(q, k, v, key_keep, **features)
    return (out, L, *kernels.backward(q, k, v, key_keep, out, L, grad_out, **features))


FEATURE_CASES = {
    # T > S causal with a window: the first T - S queries see nothing, the rest at most 9 keys
    "causal-T>S-window": dict(shape=(1, 2, 1, 40, 24), window=(8, -1), is_causal=True),
    "window-softcap-alibi": dict(shape=(2, 4, 2, 50, 70), window=(20, 5), softcap=2.0, alibi=(4,)),
    "alibi-per-batch-dropout": dict(shape=(2, 4, 1, 33, 33), alibi=(2, 4), dropout_p=0.3, is_causal=True),
    # and key padding on top: the second batch entry hides its last 9 keys
    "all-features": dict(shape=(2, 2, 2, 70, 50), window=(30, 7), softcap=1.5, alibi=(2,), dropout_p=0.2,
                         hidden_keys=9),
}


@pytest.mark.parametrize("name", list(FEATURE_CASES))
def test_features_match_the_reference(emulated_flash_kernels, name):
    case = FEATURE_CASES[name]
    B, Hq, Hkv, T, S = case["shape"]
    arrays = feature_inputs(B, Hq, Hkv, T, S, 16, seed=len(name))
    slopes = None if "alibi" not in case else np.random.default_rng(1).uniform(0.05, 0.5, case["alibi"])
    slopes = None if slopes is None else slopes.astype(np.float32)
    key_keep = np.ones((B, S), dtype=np.uint8)
    key_keep[-1, S - case.get("hidden_keys", 0):] = 0
    window, is_causal = case.get("window", (-1, -1)), case.get("is_causal", False)
    features = dict(window=window, softcap=case.get("softcap"), alibi_slopes=slopes,
                    dropout_p=case.get("dropout_p", 0.0), dropout_seed=2**40 + 7, dropout_offset=3)
    results = run_kernels(emulated_flash_kernels(16, "warps-random"), *arrays, key_keep=key_keep, scale=0.3,
                          is_causal=is_causal, **features)
    assert_matches_feature_reference(results, arrays, scale=0.3, key_keep=key_keep,
                                     window=(window[0], 0 if is_causal else window[1]), softcap=features["softcap"],
                                     alibi=slopes, dropout_p=features["dropout_p"], seed=2**40 + 7, offset=3)


@pytest.mark.parametrize("head_dim", [160, 256])
def test_head_dims_past_128_refill_one_column_tile(emulated_flash_kernels, head_dim):
    """Past d = 128 one shared column tile takes K then V (V then K in dQ; Q, dO, Q in dK/dV); one warp at a time in
    a random order shows a refill that races the warps still reading the old operand."""
    arrays = feature_inputs(2, 2, 1, 37, 45, head_dim, seed=head_dim)
    slopes = np.array([0.2, 0.1], dtype=np.float32)
    features = dict(window=(12, 3), softcap=2.5, alibi_slopes=slopes, dropout_p=0.2, dropout_seed=99)
    results = run_kernels(emulated_flash_kernels(head_dim, "warps-random"), *arrays, scale=0.1, **features)
    assert_matches_feature_reference(results, arrays, scale=0.1, window=(12, 3), softcap=2.5, alibi=slopes,
                                     dropout_p=0.2, seed=99)


def test_tiles_outside_the_window_are_never_read(emulated_flash_kernels):
    """NaN where no row of a 32-row block looks: a block that read such a tile would carry the NaN (0 * NaN) into its
    rows. Causal with window (16, 0), T = S = 256, query i sees keys i - 16 to i. In K and V: query rows 0-127 never
    need keys 128-255, and rows 160-255 never need keys 0-127 (rows 160-191 start at key 144, in the tile from 128).
    In Q and dO: key rows 0-95 are seen by queries up to 111 only, so dK/dV never need queries 128-255."""
    arrays = feature_inputs(1, 1, 1, 256, 256, 16, seed=9)
    exact = feature_reference(*arrays, scale=0.25, window=(16, 0), dtype=np.float64)
    kernels = emulated_flash_kernels(16, "lockstep")
    cases = (((1, 2), slice(128, 256), (0, 2), slice(0, 128)), ((1, 2), slice(0, 128), (0, 2), slice(160, 256)),
             ((0, 3), slice(128, 256), (3, 4), slice(0, 96)))
    for hidden_inputs, hidden, checked_results, checked in cases:
        poisoned = [x.copy() for x in arrays]
        for index in hidden_inputs:
            poisoned[index][:, :, hidden] = np.nan
        results = run_kernels(kernels, *poisoned, scale=0.25, is_causal=True, window=(16, 0))
        for index in checked_results:
            assert np.abs(results[index][:, :, checked] - exact[index][:, :, checked]).max() < 1e-4, (hidden, index)


def test_varlen_matches_each_sequence_alone():
    """Three packed sequences of different lengths, causal aligned to each one's own end, through autograd."""
    query_lens, key_lens = np.array([5, 33, 17]), np.array([9, 33, 40])
    Hq, Hkv, d = 2, 1, 16
    rng = np.random.default_rng(11)
    packed = [rng.standard_normal((int(n.sum()), heads, d), dtype=np.float32)
              for n, heads in ((query_lens, Hq), (key_lens, Hkv), (key_lens, Hkv), (query_lens, Hq))]
    cu_q, cu_k = (np.concatenate([[0], np.cumsum(n)]).astype(np.int32) for n in (query_lens, key_lens))
    slopes = np.array([[0.1, 0.2], [0.3, 0.05], [0.0, 0.4]], dtype=np.float32)
    q, k, v = (Tensor(x, requires_grad=True) for x in packed[:3])
    out = emulated_varlen_attention(q, k, v, cu_q, cu_k, 33, 40, is_causal=True, scale=0.25, softcap=3.0,
                                    alibi_slopes=slopes, dropout_p=0.25, dropout_seed=5, schedule="warps-reverse")
    out.backward(Tensor(packed[3]))

    def padded(x, cu, length):  # (total, H, d) -> (N, H, length, d)
        result = np.zeros((3, x.shape[1], length, d), dtype=x.dtype)
        for n in range(3):
            result[n, :, :cu[n + 1] - cu[n]] = x[cu[n]:cu[n + 1]].transpose(1, 0, 2)
        return result

    def packed_rows(x, cu):  # (N, H, length, d) -> (total, H, d)
        return np.concatenate([x[n, :, :cu[n + 1] - cu[n]].transpose(1, 0, 2) for n in range(3)])

    arrays = [padded(packed[0], cu_q, 33), padded(packed[1], cu_k, 40), padded(packed[2], cu_k, 40),
              padded(packed[3], cu_q, 33)]
    options = dict(scale=0.25, query_lens=query_lens, key_lens=key_lens, window=(-1, 0), softcap=3.0, alibi=slopes,
                   dropout_p=0.25, seed=5)
    exact = feature_reference(*arrays, dtype=np.float64, **options)
    naive = feature_reference(*arrays, dtype=np.float32, **options)
    for result, index, cu in ((out.data, 0, cu_q), (q.grad, 2, cu_q), (k.grad, 3, cu_k), (v.grad, 4, cu_k)):
        want, baseline = packed_rows(exact[index], cu), packed_rows(naive[index], cu)
        assert result.shape == want.shape
        allowed = ERROR_MULTIPLE * np.abs(baseline - want).max() + ERROR_FLOOR
        assert np.abs(result - want).max() <= allowed


def test_feature_arguments_are_checked():
    q = Tensor(np.zeros((1, 2, 4, 16), dtype=np.float32))
    with pytest.raises(ValueError, match="window"):
        emulated_attention(q, q, q, is_causal=False, scale=1.0, window=(-2, 3))
    with pytest.raises(ValueError, match="softcap"):
        emulated_attention(q, q, q, is_causal=False, scale=1.0, softcap=-1.0)
    with pytest.raises(ValueError, match="alibi_slopes"):
        emulated_attention(q, q, q, is_causal=False, scale=1.0, alibi_slopes=np.zeros(3, dtype=np.float32))
    with pytest.raises(ValueError, match="dropout_p"):
        emulated_attention(q, q, q, is_causal=False, scale=1.0, dropout_p=1.0)
    with pytest.raises(ValueError, match="max_seqlen_q"):
        emulated_varlen_attention(Tensor(np.zeros((6, 2, 16), dtype=np.float32)), *[Tensor(np.zeros((6, 2, 16),
                                  dtype=np.float32))] * 2, np.array([0, 6], dtype=np.int32),
                                  np.array([0, 6], dtype=np.int32), 4, 6, is_causal=False, scale=1.0)
