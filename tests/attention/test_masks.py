"""The shared score helpers of tinytf.attention.masks against the issue's definitions, written out per element."""

from __future__ import annotations

import re

import numpy as np
import pytest

from tinytf import backend
from tinytf.attention.masks import (
    alibi_bias,
    causal_visibility,
    effective_window,
    normalized_window,
    softcapped,
    visibility,
)


def visible_by_definition(T, S, left, right):
    """Key j visible to query i when i + S - T - left <= j <= i + S - T + right, a bound of -1 dropped."""
    visible = np.zeros((T, S), dtype=bool)
    for i in range(T):
        for j in range(S):
            position = i + S - T
            visible[i, j] = (left == -1 or j >= position - left) and (right == -1 or j <= position + right)
    return visible


@pytest.mark.parametrize("T, S", [(1, 1), (3, 7), (7, 3), (5, 5)])
@pytest.mark.parametrize("window", [(-1, -1), (-1, 0), (0, 0), (2, 0), (1, 3), (-1, 2), (4, -1), (20, 20)])
def test_visibility_follows_the_bottom_right_aligned_window(device, T, S, window):
    xp = backend.get_array_module(backend.to_device(np.zeros(1), device))
    with backend.device_scope(backend.canonical_device(device)):
        got = visibility(xp.arange(T), xp.arange(S), T, S, window)
    np.testing.assert_array_equal(backend.to_numpy(got), visible_by_definition(T, S, *window))


def test_causal_visibility_is_the_window_unbounded_left_and_zero_right():
    for T, S in ((4, 6), (6, 4), (1, 5)):
        np.testing.assert_array_equal(causal_visibility(np.arange(T), np.arange(S), T, S),
                                      visible_by_definition(T, S, -1, 0))
    # query positions in any order, with repeats: rows follow them
    np.testing.assert_array_equal(visibility(np.array([2, 0, 2]), np.arange(4), 3, 4, (1, 0)),
                                  visible_by_definition(3, 4, 1, 0)[[2, 0, 2]])


@pytest.mark.parametrize("window, is_causal, expected", [
    (None, False, (-1, -1)), (None, True, (-1, 0)), ((3, 2), True, (3, 0)), ([0, 5], False, (0, 5)),
    ((np.int64(4), -1), False, (4, -1)),
])
def test_normalized_window_makes_causal_bound_the_right_side(window, is_causal, expected):
    assert normalized_window(window, is_causal) == expected


@pytest.mark.parametrize("window", [(3,), (1, 2, 3), (-2, 0), (0, 1.5), (True, 0), "ab", 4])
def test_normalized_window_names_a_bad_window(window):
    with pytest.raises(ValueError, match=r"window must be .*got " + re.escape(repr(window))):
        normalized_window(window, False)


def test_effective_window_drops_exactly_the_bounds_that_hide_nothing():
    bounds = [-1, 0, 1, 2, 3, 5, 8]
    for T in range(1, 6):
        for S in range(1, 6):
            for window in ((left, right) for left in bounds for right in bounds):
                effective = effective_window(window, T, S)
                np.testing.assert_array_equal(visible_by_definition(T, S, *effective),
                                              visible_by_definition(T, S, *window))
                for side in (0, 1):  # a bound kept hides some key: dropping it would change the mask
                    if effective[side] != -1:
                        wider = tuple(-1 if n == side else b for n, b in enumerate(effective))
                        assert (visible_by_definition(T, S, *wider) != visible_by_definition(T, S, *effective)).any()
    assert effective_window((-1, 0), 1, 9) == (-1, -1)  # a causal decoding step sees every key


def test_alibi_bias_is_minus_slope_times_distance_to_the_aligned_position():
    slopes = np.array([[0.5, 0.25], [1.0, 2.0]], dtype=np.float32)  # (B, Hq)
    T, S = 3, 5
    got = alibi_bias(slopes, np.arange(T), np.arange(S), T, S, np)
    assert got.shape == (2, 2, T, S) and got.dtype == np.float32
    for b in range(2):
        for h in range(2):
            for i in range(T):
                for j in range(S):
                    assert got[b, h, i, j] == -slopes[b, h] * abs(i + 2 - j)


def test_softcapped_squashes_into_the_cap_and_keeps_small_scores():
    scores = np.array([-1e4, -3.0, 0.0, 1e-3, 3.0, 1e4])
    got = softcapped(scores, 5.0, np)
    np.testing.assert_allclose(got, 5.0 * np.tanh(scores / 5.0), rtol=1e-15)
    assert np.all(np.abs(got) <= 5.0) and abs(got[3] - 1e-3) < 1e-9
