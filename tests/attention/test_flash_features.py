"""The flash backend's features against the naive reference: sliding windows, softcap, ALiBi, dropout, T > S causal.

Both run in float64, where two correct orders of the same sums agree to ~1e-12, so a wrong mask, bias, cap
derivative or dropout counter shows as an error of order one. The naive backend (tinytf.attention.naive) states each
feature the plain way over the whole (T, S) score matrix and differentiates it with autograd; flash tiles it and has
a hand-written backward. Tiles are small (Br, Bc from 1 to past the sequence), so windows skip and cut tiles.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tinytf
from tinytf.backend import canonical_device, device_scope, to_device, to_numpy
from tinytf.attention.flash import FlashAttention, Tiling, flash_attention_backward, flash_attention_forward
from tinytf.attention.naive import naive_attention


@st.composite
def windows(draw, T: int, S: int):
    """None, or (left, right) with each bound unbounded (-1), 0, or anywhere up to past the sequence."""
    if draw(st.booleans()):
        return None
    bound = st.one_of(st.just(-1), st.just(0), st.integers(1, T + S))
    return draw(bound), draw(bound)


@st.composite
def feature_problems(draw):
    Hkv, G = draw(st.integers(1, 2)), draw(st.sampled_from([1, 2, 3]))
    B, T, S = draw(st.integers(1, 2)), draw(st.integers(1, 13)), draw(st.integers(1, 13))
    Hq = Hkv * G
    slopes_shape = draw(st.sampled_from([None, (Hq,), (B, Hq)]))
    return dict(
        B=B, Hq=Hq, Hkv=Hkv, T=T, S=S, D=draw(st.sampled_from([1, 3, 8])),
        Br=draw(st.integers(1, T + 2)), Bc=draw(st.integers(1, S + 2)),
        scale=draw(st.sampled_from([0.3, 1.0, 3.0])),
        is_causal=draw(st.booleans()),  # with T > S, the first T - S queries see no key
        window=draw(windows(T, S)),
        softcap=draw(st.sampled_from([None, None, 0.7, 5.0])),
        slopes_shape=slopes_shape,
        dropout_p=draw(st.sampled_from([0.0, 0.0, 0.2, 0.6])),
        dropout_seed=draw(st.integers(0, 2**64 - 1)), dropout_offset=draw(st.integers(0, 2**32 - 1)),
        key_padding=draw(st.booleans()), seed=draw(st.integers(0, 2**32 - 1)),
    )


def make_inputs(B, Hq, Hkv, T, S, D, seed, slopes_shape=None, key_padding=False, **_):
    rng = np.random.default_rng(seed)
    q, dO = rng.standard_normal((2, B, Hq, T, D))
    k, v = rng.standard_normal((2, B, Hkv, S, D))
    slopes = None if slopes_shape is None else rng.uniform(0.05, 1.5, slopes_shape)
    key_mask = None
    if key_padding:
        key_mask = rng.random((B, S)) < 0.7
        key_mask[0, : rng.integers(0, S + 1)] = False  # hide a prefix: with a window, some rows see nothing
    return q, k, v, dO, slopes, key_mask


def feature_options(problem, slopes):
    return dict(window=problem["window"], softcap=problem["softcap"], alibi_slopes=slopes,
                dropout_p=problem["dropout_p"], dropout_seed=problem["dropout_seed"],
                dropout_offset=problem["dropout_offset"])


def run_naive(q, k, v, dO, key_mask, is_causal, scale, alibi_slopes=None, **options):
    """The naive backend's O, dq, dk, dv, with the slopes given as (B, Hq) as it takes them."""
    if alibi_slopes is not None:
        alibi_slopes = np.broadcast_to(alibi_slopes, (q.shape[0], q.shape[1]))
    tensors = [tinytf.tensor(x, requires_grad=True) for x in (q, k, v)]
    mask = None if key_mask is None else key_mask[:, None, None, :]
    O = naive_attention(*tensors, attn_mask=mask, is_causal=is_causal, scale=scale, alibi_slopes=alibi_slopes,
                        **options)
    O.backward(dO)
    return (O.data, *(t.grad.data if t.grad is not None else np.zeros_like(t.data) for t in tensors))


def assert_close(got, want, names=("O", "dq", "dk", "dv")):
    for name, g, w in zip(names, got, want):
        assert g.shape == w.shape, name
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-10 * max(1.0, float(np.abs(w).max(initial=0.0))),
                                   err_msg=name)


@settings(max_examples=max(150, settings.default.max_examples), deadline=None)
@given(problem=feature_problems())
def test_flash_matches_naive_for_every_feature(problem):
    q, k, v, dO, slopes, key_mask = make_inputs(**problem)
    options = feature_options(problem, slopes)
    scale, is_causal, Br, Bc = problem["scale"], problem["is_causal"], problem["Br"], problem["Bc"]
    O, L = flash_attention_forward(q, k, v, scale, is_causal, key_mask, Br, Bc, **options)
    grads = flash_attention_backward(dO, q, k, v, O, L, scale, is_causal, key_mask, Br, Bc, **options)
    assert np.isfinite(O).all() and all(np.isfinite(g).all() for g in grads)
    assert_close((O, *grads), run_naive(q, k, v, dO, key_mask, is_causal, scale, **options))


@pytest.mark.parametrize("window", [(-1, 0), (2, 0), (1, 1)])
def test_rows_that_see_no_key_give_zeros_and_minus_infinity(window):
    """T > S: queries t < T - S sit before the first key, so causal attention (which makes any window's right
    bound 0) gives them nothing."""
    B, Hq, Hkv, T, S, D = 1, 4, 2, 11, 4, 5
    q, k, v, dO, slopes, _ = make_inputs(B, Hq, Hkv, T, S, D, seed=4, slopes_shape=(Hq,))
    options = dict(window=window, softcap=2.0, alibi_slopes=slopes, dropout_p=0.3, dropout_seed=9)
    O, L = flash_attention_forward(q, k, v, 0.5, True, None, 3, 2, **options)
    dq, dk, dv = flash_attention_backward(dO, q, k, v, O, L, 0.5, True, None, 3, 2, **options)
    first_row_seen = T - S
    assert not O[:, :, :first_row_seen].any() and not dq[:, :, :first_row_seen].any()
    assert np.isneginf(L[:, :, :first_row_seen]).all() and np.isfinite(L[:, :, first_row_seen:]).all()
    assert_close((O, dq, dk, dv), run_naive(q, k, v, dO, None, True, 0.5, **options))


@settings(max_examples=max(100, settings.default.max_examples), deadline=None)
@given(T=st.integers(1, 40), S=st.integers(1, 40), Br=st.integers(1, 9), Bc=st.integers(1, 9), G=st.integers(1, 3),
       left=st.integers(-1, 45), right=st.integers(-1, 45))
def test_window_tiling_skips_exactly_the_tiles_outside_the_band(T, S, Br, Bc, G, left, right):
    tiling = Tiling(T, S, G, Br, Bc, window=(left, right))
    for i in range(tiling.n_row_tiles):
        for j in range(tiling.n_col_tiles):
            hidden = tiling.hidden_keys(i, j, np)
            assert tiling.is_visible(i, j) == (not hidden.all())  # skipped exactly when nothing is visible
            assert tiling.crosses_window(i, j) == hidden.any()  # masked exactly when something is hidden
        assert tiling.visible_cols(i) == [j for j in range(tiling.n_col_tiles) if tiling.is_visible(i, j)]


def test_a_sliding_window_visits_only_the_tiles_along_the_diagonal():
    """T = S = 256 in 8 x 8 tiles of 32 and a window of 40 keys back: each row tile sees its own column tile and the
    two before it (fewer at the start), 3 * 8 - 3 = 21 of the 64 tiles, which is what forward and backward visit."""
    tiling = Tiling(256, 256, 1, 32, 32, window=(40, 0))
    assert [tiling.visible_cols(i) for i in range(3)] == [[0], [0, 1], [0, 1, 2]]
    assert [tiling.visible_cols(i) for i in range(6, 8)] == [[4, 5, 6], [5, 6, 7]]
    assert sum(len(tiling.visible_cols(i)) for i in range(8)) == 21
    assert sum(len(tiling.visible_rows(j)) for j in range(8)) == 21


def test_flash_attention_node_takes_the_features_and_matches_naive():
    q, k, v, dO, slopes, key_mask = make_inputs(2, 4, 2, 9, 12, 6, seed=11, slopes_shape=(2, 4), key_padding=True)
    options = dict(window=(3, 0), softcap=1.5, alibi_slopes=slopes, dropout_p=0.25, dropout_seed=2**40 + 5,
                   dropout_offset=7)
    tensors = [tinytf.tensor(x, requires_grad=True) for x in (q, k, v)]
    O = FlashAttention.apply(*tensors, scale=0.4, is_causal=True, key_mask=key_mask, block_q=4, block_k=5,
                             **options)
    O.backward(dO)
    got = (O.data, *(t.grad.data for t in tensors))
    assert_close(got, run_naive(q, k, v, dO, key_mask, True, 0.4, **options))


def test_dropout_drops_about_p_of_the_weights_and_keeps_the_mean():
    """With values all 1, each output is (kept weights) / (1 - p) summed: 1 on average, spread as dropout spreads it."""
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((2, 1, 2, 64, 8))
    v = np.ones((1, 2, 64, 8))
    O, _ = flash_attention_forward(q, k, v, 0.3, False, None, 16, 16, dropout_p=0.5, dropout_seed=123)
    assert abs(O.mean() - 1) < 0.05 and O.std() > 0.05
    O_again, _ = flash_attention_forward(q, k, v, 0.3, False, None, 7, 9, dropout_p=0.5, dropout_seed=123)
    np.testing.assert_allclose(O_again, O, rtol=1e-12)  # the mask follows the positions, not the tiling


def test_every_feature_runs_on_every_device(device):
    """The same call on the device's arrays (CuPy, or the strict stand-in) gives the CPU's naive result."""
    q, k, v, dO, slopes, key_mask = make_inputs(2, 4, 2, 10, 7, 5, seed=6, slopes_shape=(2, 4), key_padding=True)
    options = dict(window=(4, 2), softcap=3.0, alibi_slopes=slopes, dropout_p=0.3, dropout_seed=77, dropout_offset=1)
    with device_scope(canonical_device(device)):
        on_device = [to_device(x, device) for x in (q, k, v, dO, slopes, key_mask)]
        q_d, k_d, v_d, dO_d, slopes_d, mask_d = on_device
        O, L = flash_attention_forward(q_d, k_d, v_d, 0.5, True, mask_d, 3, 4, **{**options, "alibi_slopes": slopes_d})
        grads = flash_attention_backward(dO_d, q_d, k_d, v_d, O, L, 0.5, True, mask_d, 3, 4,
                                         **{**options, "alibi_slopes": slopes_d})
        got = [to_numpy(x) for x in (O, *grads)]
    assert_close(got, run_naive(q, k, v, dO, key_mask, True, 0.5, **options))


def test_threads_split_the_feature_work_without_changing_results():
    q, k, v, dO, slopes, key_mask = make_inputs(1, 4, 2, 40, 50, 8, seed=8, slopes_shape=(4,), key_padding=True)
    options = dict(window=(12, 3), softcap=5.0, alibi_slopes=slopes, dropout_p=0.2, dropout_seed=3)
    results = []
    for num_threads in (1, 3):
        O, L = flash_attention_forward(q, k, v, 0.3, True, key_mask, 8, 8, num_threads, **options)
        grads = flash_attention_backward(dO, q, k, v, O, L, 0.3, True, key_mask, 8, 8, num_threads, **options)
        results.append((O, L, *grads))
    (O1, L1, *grads1), (O3, L3, *grads3) = results
    np.testing.assert_array_equal(O1, O3)  # each row tile is computed the same way on any thread
    np.testing.assert_array_equal(L1, L3)
    for g1, g3 in zip(grads1, grads3):  # dQ sums per-thread shares, so only rounding may differ
        np.testing.assert_allclose(g1, g3, rtol=1e-12, atol=1e-14)
