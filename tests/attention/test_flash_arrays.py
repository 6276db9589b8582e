"""The tuned flash algorithm on raw arrays (tinytf.attention.flash): its accuracy, its tricks, its edge cases.

Accuracy is measured the FlashAttention way, against a materialized higher-precision reference: the error may be at
most a small multiple of the naive algorithm's in the same precision. Where the question is only "the same result as
the paper's algorithm", the reference is the study version, flash_study.py (test_flash_study.py checks the two on
the same grid in float64).

The grid follows the cases that break minimal kernels: lengths 1, 17, 97, 1025 and random ones (not multiples of
the tile), T != S with the causal mask aligned bottom-right, odd head sizes, grouped-query heads, tiles smaller than,
equal to and larger than the sequence, float32 and float64, key-padding masks with rows that see no key.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attention.attention_reference import assert_as_accurate_as_naive
from tinytf.attention import flash_study
from tinytf.attention.flash import Tiling, flash_attention_backward, flash_attention_forward

lengths = st.one_of(st.sampled_from([1, 17, 97]), st.integers(1, 48))


@st.composite
def tile_size(draw, length: int) -> int:
    """A tile smaller than (at most 4 tiles, to keep examples fast), equal to, or larger than `length`."""
    kind = draw(st.sampled_from(["smaller", "equal", "larger"] if length > 1 else ["equal", "larger"]))
    if kind == "smaller":
        return draw(st.integers(max(1, -(-length // 4)), length - 1))
    return length if kind == "equal" else draw(st.integers(length + 1, length + 64))


@st.composite
def attention_problems(draw):
    B, Hkv, G = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.sampled_from([1, 2, 3]))
    T, S = draw(lengths), draw(lengths)
    is_causal = draw(st.booleans())  # with T > S, the first T - S queries see no key
    return dict(
        B=B, Hq=Hkv * G, Hkv=Hkv, T=T, S=S, D=draw(st.sampled_from([1, 8, 16, 59, 64])),
        is_causal=is_causal, Br=draw(tile_size(T)), Bc=draw(tile_size(S)),
        dtype=draw(st.sampled_from([np.float32, np.float64])),
        key_padding=draw(st.booleans()), seed=draw(st.integers(0, 2**32 - 1)),
    )


def make_inputs(B, Hq, Hkv, T, S, D, dtype, seed, key_padding=False, **_):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, Hq, T, D)).astype(dtype)
    k = rng.standard_normal((B, Hkv, S, D)).astype(dtype)
    v = rng.standard_normal((B, Hkv, S, D)).astype(dtype)
    dO = rng.standard_normal((B, Hq, T, D)).astype(dtype)
    key_mask = None
    if key_padding:
        key_mask = rng.random((B, S)) < 0.7
        key_mask[0, : rng.integers(0, S + 1)] = False  # hide a prefix: with causal, early queries see nothing
    return q, k, v, dO, key_mask


def run_flash(q, k, v, dO, key_mask, is_causal, Br, Bc, num_threads=None):
    scale = 1 / np.sqrt(q.shape[-1])
    O, L = flash_attention_forward(q, k, v, scale, is_causal, key_mask, Br, Bc, num_threads)
    grads = flash_attention_backward(dO, q, k, v, O, L, scale, is_causal, key_mask, Br, Bc, num_threads)
    return O, L, grads


@settings(max_examples=max(40, settings.default.max_examples))
@given(problem=attention_problems())
def test_flash_matches_reference_for_ragged_shapes(problem):
    q, k, v, dO, key_mask = make_inputs(**problem)
    O, L, grads = run_flash(q, k, v, dO, key_mask, problem["is_causal"], problem["Br"], problem["Bc"])
    assert O.dtype == q.dtype and all(g.dtype == q.dtype for g in grads)
    assert O.shape == q.shape and tuple(g.shape for g in grads) == (q.shape, k.shape, v.shape)
    mask = None if key_mask is None else key_mask[:, None, None, :]
    assert_as_accurate_as_naive((O, *grads), q, k, v, dO, is_causal=problem["is_causal"], attn_mask=mask)


@pytest.mark.parametrize("is_causal, Hq, Hkv", [(True, 2, 1), (False, 2, 2)])
def test_flash_matches_reference_at_1025(is_causal, Hq, Hkv):
    q, k, v, dO, _ = make_inputs(B=1, Hq=Hq, Hkv=Hkv, T=1025, S=1025, D=16, dtype=np.float32, seed=1025)
    O, _, grads = run_flash(q, k, v, dO, None, is_causal, None, None)
    assert_as_accurate_as_naive((O, *grads), q, k, v, dO, is_causal=is_causal)


@settings(max_examples=max(10, settings.default.max_examples // 2))
@given(problem=attention_problems())
def test_rows_without_visible_keys_give_zeros_and_zero_gradients(problem):
    problem = {**problem, "key_padding": True, "is_causal": True}
    q, k, v, dO, key_mask = make_inputs(**problem)
    key_mask[-1, :] = False  # the last batch element sees nothing at all
    O, L, (dq, dk, dv) = run_flash(q, k, v, dO, key_mask, problem["is_causal"], problem["Br"], problem["Bc"])
    assert np.isfinite(O).all() and np.isfinite(dq).all() and np.isfinite(dk).all() and np.isfinite(dv).all()
    assert not O[-1].any() and not dq[-1].any() and not dk[-1].any() and not dv[-1].any()
    assert np.isneginf(L[-1]).all()
    hidden = ~key_mask  # keys no query may see get no gradient
    assert not dk.transpose(0, 2, 1, 3)[hidden].any() and not dv.transpose(0, 2, 1, 3)[hidden].any()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_extreme_logits_stay_finite(dtype):
    rng = np.random.default_rng(7)
    q, k, v, dO = (1e3 * rng.standard_normal((1, 2, 33, 8)).astype(dtype) for _ in range(4))
    O, L = flash_attention_forward(q, k, v, 100.0, True, None, 8, 8)  # logits up to ~1e8
    grads = flash_attention_backward(dO, q, k, v, O, L, 100.0, True, None, 8, 8)
    assert np.isfinite(O).all() and np.isfinite(L).all() and all(np.isfinite(g).all() for g in grads)
    # Each output row is a convex combination of value rows.
    assert (O <= v.max(axis=2, keepdims=True) * (1 + 1e-5)).all()
    if dtype == np.float64:  # the lazy max must end where the paper's running max does
        expected, _ = flash_study.flash_attention_forward(q, k, v, 100.0, True, None, 8, 8)
        np.testing.assert_allclose(O, expected, rtol=1e-6, atol=1e-6 * np.abs(v).max())


@pytest.mark.parametrize("dtype, scale", [(np.float32, 30.0), (np.float64, 120.0)])
def test_scores_far_below_zero_move_m_down(dtype, scale):
    """Every score is far below 0 (exp underflows to 0 in `dtype`), so m, which starts at 0 as a placeholder, must step
    down to the first keys' max, as the paper's m = -inf would."""
    rng = np.random.default_rng(9)
    q = (1 + 0.1 * rng.standard_normal((1, 2, 21, 8))).astype(dtype)
    k = (-1 + 0.1 * rng.standard_normal((1, 2, 21, 8))).astype(dtype)  # scores about -8 * scale
    v = rng.standard_normal((1, 2, 21, 8)).astype(dtype)
    O, L = flash_attention_forward(q, k, v, scale, True, None, 4, 8)
    expected, L_expected = flash_study.flash_attention_forward(q, k, v, scale, True, None, 4, 8)
    np.testing.assert_allclose(O, expected, rtol=1e-3, atol=1e-3 * np.abs(v).max())
    np.testing.assert_allclose(L, L_expected, rtol=1e-5)


def test_grouped_query_gradients_sum_over_the_group():
    q, k, v, dO, _ = make_inputs(B=2, Hq=6, Hkv=2, T=19, S=23, D=7, dtype=np.float64, seed=3)
    O, _, (dq, dk, dv) = run_flash(q, k, v, dO, None, True, 5, 6)
    k_rep, v_rep = np.repeat(k, 3, axis=1), np.repeat(v, 3, axis=1)
    O_rep, _, (dq_rep, dk_rep, dv_rep) = run_flash(q, k_rep, v_rep, dO, None, True, 5, 6)
    np.testing.assert_allclose(O, O_rep, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(dq, dq_rep, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(dk, dk_rep.reshape(2, 2, 3, 23, 7).sum(axis=2), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(dv, dv_rep.reshape(2, 2, 3, 23, 7).sum(axis=2), rtol=1e-12, atol=1e-13)


def test_threads_split_the_work_without_changing_results():
    q, k, v, dO, key_mask = make_inputs(B=1, Hq=2, Hkv=1, T=70, S=90, D=16, dtype=np.float32, seed=5,
                                        key_padding=True)
    O1, L1, grads1 = run_flash(q, k, v, dO, key_mask, True, 16, 16, num_threads=1)
    O3, L3, grads3 = run_flash(q, k, v, dO, key_mask, True, 16, 16, num_threads=3)
    np.testing.assert_array_equal(O1, O3)  # each row tile is computed the same way on any thread
    np.testing.assert_array_equal(L1, L3)
    for g1, g3 in zip(grads1, grads3):  # dQ sums per-thread shares, so only rounding may differ
        np.testing.assert_allclose(g1, g3, rtol=1e-5, atol=1e-6)


def test_half_precision_is_computed_in_float32():
    q, k, v, dO, _ = make_inputs(B=1, Hq=2, Hkv=2, T=9, S=9, D=8, dtype=np.float16, seed=2)
    O, L, grads = run_flash(q, k, v, dO, None, True, 4, 4)
    assert O.dtype == np.float16 and all(g.dtype == np.float16 for g in grads)
    assert L.dtype == np.float64  # L is never rounded: the backward's P = exp(S - L) would carry it
    q32, k32, v32, dO32 = (x.astype(np.float32) for x in (q, k, v, dO))
    scale = 1 / np.sqrt(8)
    O32, L32 = flash_study.flash_attention_forward(q32, k32, v32, scale, True)
    # The backward takes the O the forward returned, in float16, as its caller saves it.
    grads32 = flash_study.flash_attention_backward(dO32, q32, k32, v32, O.astype(np.float32), L32, scale, True)
    for got, want in zip((O, *grads), (O32, *grads32)):  # the float32 result, rounded once to float16
        np.testing.assert_allclose(got, want, rtol=2**-10, atol=1e-6 * np.abs(want).max())


@pytest.mark.parametrize("T, S, Br, Bc", [(5, 9, 2, 3), (64, 64, 64, 64), (3, 200, 1, 64)])
def test_causal_tiling_skips_tiles_above_the_diagonal(T, S, Br, Bc):
    tiling = Tiling(T, S, G=1, Br=Br, Bc=Bc, window=(-1, 0))
    for i in range(tiling.n_row_tiles):
        for j in range(tiling.n_col_tiles):
            future = tiling.hidden_keys(i, j, np)
            assert tiling.is_visible(i, j) == (not future.all())  # skipped exactly when nothing is visible
            assert tiling.crosses_window(i, j) == future.any()  # masked exactly when something is hidden


def test_flash_memory_grows_linearly_with_length():
    """Peak NumPy memory of forward + backward (traced by tracemalloc) doubles with T, while the scores quadruple."""
    import tracemalloc

    def peak(T):
        q, k, v, dO, _ = make_inputs(B=1, Hq=1, Hkv=1, T=T, S=T, D=8, dtype=np.float32, seed=0)
        tracemalloc.start()
        try:
            run_flash(q, k, v, dO, None, True, None, None)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    small, large = peak(2048), peak(4096)
    assert large < 2.5 * small
    assert large < 0.05 * 4096 * 4096 * 4  # under 5% of one float32 score matrix


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_scores_that_grow_along_the_keys_move_m_and_rescale(dtype):
    """Later key tiles score far above the first (by up to ~200 in log2 units), so the forward must re-do tiles with
    the paper's update instead of keeping the m it took from the first keys."""
    rng = np.random.default_rng(12)
    B, H, T, d = 1, 2, 40, 8
    q = rng.standard_normal((B, H, T, d)) + 4.0
    k = rng.standard_normal((B, H, T, d)) + np.linspace(0, 12, T)[:, None]  # scores grow with the key position
    v, dO = rng.standard_normal((B, H, T, d)), rng.standard_normal((B, H, T, d))
    q, k, v, dO = (x.astype(dtype) for x in (q, k, v, dO))
    O, _, grads = run_flash(q, k, v, dO, None, False, 8, 8)
    assert_as_accurate_as_naive((O, *grads), q, k, v, dO)
