"""The study version of FlashAttention-2 (tinytf.attention.flash_study) against a float64 softmax(Q K^T) V, and the
tuned version (tinytf.attention.flash) against the study version.

Both comparisons run in float64, where any two correct orders of the same sums agree to ~1e-14, so the tolerances
are tight and a wrong mask, max or rescale shows as an error of order one. How accurate the tuned version is in
float32 is test_flash_arrays.py's question.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from attention.attention_reference import reference_attention, reference_scores
from attention.test_flash_arrays import attention_problems, make_inputs, run_flash
from tinytf.attention import flash_study


def assert_close(got, want, rtol=1e-10):
    """Equal to rtol of the largest |want| (entries near zero carry the rounding of the large ones)."""
    np.testing.assert_allclose(got, want, rtol=0, atol=rtol * max(1.0, float(np.abs(want).max(initial=0.0))))


def assert_same_log_sum_exp(L, want, rtol=1e-10):
    """-inf in the same rows (those that see no key), the finite ones close as in assert_close."""
    np.testing.assert_array_equal(np.isneginf(L), np.isneginf(want))
    seen = np.isfinite(want)
    assert_close(L[seen], want[seen], rtol)


def run_study(q, k, v, dO, key_mask, is_causal, Br=64, Bc=64, scale=None):
    scale = 1 / np.sqrt(q.shape[-1]) if scale is None else scale
    O, L = flash_study.flash_attention_forward(q, k, v, scale, is_causal, key_mask, Br, Bc)
    grads = flash_study.flash_attention_backward(dO, q, k, v, O, L, scale, is_causal, key_mask, Br, Bc)
    return O, L, grads


@st.composite
def tiny_problems(draw):
    """Shapes small enough to read a failure: T, S up to 9, tiles from 1 to past the sequence, any scale."""
    Hkv, G = draw(st.integers(1, 2)), draw(st.sampled_from([1, 2, 3]))
    T, S = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    return dict(
        B=draw(st.integers(1, 2)), Hq=Hkv * G, Hkv=Hkv, T=T, S=S, D=draw(st.sampled_from([1, 3, 8])),
        is_causal=draw(st.booleans()), Br=draw(st.integers(1, T + 2)), Bc=draw(st.integers(1, S + 2)),
        scale=draw(st.sampled_from([0.1, 0.5, 2.0])), dtype=np.float64,
        key_padding=draw(st.booleans()), seed=draw(st.integers(0, 2**32 - 1)),
    )


@given(problem=tiny_problems())
def test_study_version_matches_float64_softmax_and_its_gradients(problem):
    q, k, v, dO, key_mask = make_inputs(**problem)
    is_causal, scale = problem["is_causal"], problem["scale"]
    O, L, grads = run_study(q, k, v, dO, key_mask, is_causal, problem["Br"], problem["Bc"], scale)
    mask = None if key_mask is None else key_mask[:, None, None, :]
    want = reference_attention(q, k, v, dO, scale=scale, is_causal=is_causal, attn_mask=mask)
    for name, got, expected in zip(("O", "dQ", "dK", "dV"), (O, *grads), want):
        assert got.shape == expected.shape, name
        assert_close(got, expected, rtol=1e-12)
    assert_same_log_sum_exp(L, log_sum_exp(q, k, key_mask, is_causal, scale), rtol=1e-12)


def test_study_version_gives_rows_without_keys_zeros_and_minus_infinite_log_sum_exp():
    q, k, v, dO, _ = make_inputs(B=2, Hq=2, Hkv=1, T=6, S=4, D=3, dtype=np.float64, seed=4)
    key_mask = np.array([[True] * 4, [False] * 4])  # batch 1 sees nothing; causal T > S: batch 0's first 2 rows too
    O, L, (dQ, dK, dV) = run_study(q, k, v, dO, key_mask, True, 4, 3)
    assert not O[1].any() and not dQ[1].any() and not dK[1].any() and not dV[1].any()
    assert not O[0, :, :2].any() and not dQ[0, :, :2].any() and O[0, :, 2:].all()
    assert np.isneginf(L[1]).all() and np.isneginf(L[0, :, :2]).all() and np.isfinite(L[0, :, 2:]).all()


@settings(max_examples=max(40, settings.default.max_examples))
@given(problem=attention_problems())
def test_tuned_flash_matches_study_version(problem):
    """The grid of test_flash_arrays in float64: lengths 1, 17, 97 and ragged ones, T != S either way under the causal
    mask, GQA, key padding that hides whole rows, tiles smaller than, equal to and larger than the sequence."""
    problem = {**problem, "dtype": np.float64}
    q, k, v, dO, key_mask = make_inputs(**problem)
    O, L, grads = run_flash(q, k, v, dO, key_mask, problem["is_causal"], problem["Br"], problem["Bc"])
    O_study, L_study, grads_study = run_study(q, k, v, dO, key_mask, problem["is_causal"])
    assert_close(O, O_study)
    assert_same_log_sum_exp(L, L_study)
    for grad, grad_study in zip(grads, grads_study):
        assert_close(grad, grad_study)


def log_sum_exp(q, k, key_mask, is_causal, scale):
    """log(sum_s exp(q_t k_s * scale)) over the keys s each query t sees, materialized: (B, Hq, T); -inf for a row
    that sees no key, as the forward saves it."""
    T, S = q.shape[2], k.shape[2]
    visible = np.arange(S)[None, :] <= np.arange(T)[:, None] + (S - T) if is_causal else np.ones((T, S), bool)
    if key_mask is not None:
        visible = visible & key_mask[:, None, None, :]
    sums = np.where(visible, np.exp(reference_scores(q, k, scale)), 0).sum(axis=-1)
    return np.log(sums, out=np.full_like(sums, -np.inf), where=sums > 0)
