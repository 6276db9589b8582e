import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from op_check import check_op, random_array

import tinytf
import tinytf.functional as F

seeds = st.integers(0, 2**32 - 1)


def _rope_reference(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


@given(seed=seeds, T=st.integers(1, 6), half=st.integers(1, 4), theta=st.sampled_from([10.0, 10000.0]))
def test_rotary_matches_rotate_half_reference(seed, T, half, theta):
    D = 2 * half
    cos, sin = F.rotary_tables(D, T, theta)
    check_op(lambda x: F.apply_rotary(x, cos, sin), lambda x: _rope_reference(x, cos, sin),
             random_array(seed, (2, 3, T, D)))


@given(seed=seeds, T=st.integers(1, 5), half=st.integers(1, 3))
def test_rotary_follows_the_formula_for_any_tables(seed, T, half):
    # Real tables repeat the same angles in both halves; tables whose halves differ catch a backward that mixes the
    # halves of sin up.
    cos, sin = random_array(seed + 1, (T, 2 * half)), random_array(seed + 2, (T, 2 * half))
    check_op(lambda x: F.apply_rotary(x, cos, sin), lambda x: _rope_reference(x, cos, sin),
             random_array(seed, (2, T, 2 * half)))


@given(seed=seeds, total=st.integers(1, 6), half=st.integers(1, 3))
def test_rotary_takes_a_table_row_per_packed_row(seed, total, half):
    # Packed sequences: x (total, H, D), each row at a position of its own, tables (total, 1, D).
    cos, sin = random_array(seed + 1, (total, 1, 2 * half)), random_array(seed + 2, (total, 1, 2 * half))
    check_op(lambda x: F.apply_rotary(x, cos, sin), lambda x: _rope_reference(x, cos, sin),
             random_array(seed, (total, 3, 2 * half)))


def test_rotary_refuses_tables_that_do_not_broadcast():
    cos = np.ones((4, 2, 8), np.float32)
    with pytest.raises(ValueError, match=r"tables of shape \(4, 2, 8\) do not fit input of shape \(4, 3, 8\)"):
        F.apply_rotary(tinytf.tensor(np.ones((4, 3, 8), np.float32)), cos, cos)


def test_rotary_preserves_norms_and_relative_angles():
    cos, sin = F.rotary_tables(8, 16)
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal(8), rng.standard_normal(8)

    def at(vector, position):
        return _rope_reference(vector, cos[position], sin[position])

    np.testing.assert_allclose(np.linalg.norm(at(q, 5)), np.linalg.norm(q), rtol=1e-6)
    np.testing.assert_allclose(at(q, 7) @ at(k, 3), at(q, 12) @ at(k, 8), rtol=1e-5)


def test_sinusoidal_table_matches_the_paper():
    table = F.sinusoidal_table(50, 6)
    position, i = 17, 2
    np.testing.assert_allclose(table[position, 2 * i], np.sin(position / 10000 ** (2 * i / 6)), rtol=1e-6)
    np.testing.assert_allclose(table[position, 2 * i + 1], np.cos(position / 10000 ** (2 * i / 6)), rtol=1e-6)
