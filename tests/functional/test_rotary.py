import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from devices import DEVICES
from op_check import check_op, random_array

import tinytf
import tinytf.functional as F
from tinytf import backend
from tinytf.functional import rotary

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


@given(seed=seeds, B=st.integers(1, 3), half=st.integers(1, 3))
def test_rotary_takes_a_table_row_per_decoded_row(seed, B, half):
    # Decoding: one new token per row, each row at its own position: x (B, H, 1, D), tables (B, 1, 1, D).
    cos, sin = random_array(seed + 1, (B, 1, 1, 2 * half)), random_array(seed + 2, (B, 1, 1, 2 * half))
    check_op(lambda x: F.apply_rotary(x, cos, sin), lambda x: _rope_reference(x, cos, sin),
             random_array(seed, (B, 3, 1, 2 * half)))


@pytest.mark.parametrize("fused", [False, True])
def test_rotary_of_a_strided_input(fused, monkeypatch):
    # The heads of a (B, T, H, D) projection, transposed to (B, H, T, D) without a copy, as attention does; through
    # the study version (small arrays on the host) and the fused expression, forward and backward.
    if fused:
        monkeypatch.setattr(rotary, "FUSED_MIN_BYTES", 0)
    cos, sin = random_array(1, (5, 6)), random_array(2, (5, 6))
    check_op(lambda x: F.apply_rotary(x.transpose(1, 2), cos, sin),
             lambda x: _rope_reference(x.transpose(0, 2, 1, 3), cos, sin), random_array(0, (2, 5, 3, 6)))


# (x's shape, the tables' shape): training (B, H, T, D) and (T, D), packed (total, H, D) and (total, 1, D), decode
# (B, H, 1, D) and (B, 1, 1, D)
LAYOUTS = [((3, 4, 9, 8), (9, 8)), ((7, 3, 6), (7, 1, 6)), ((2, 5, 1, 4), (2, 1, 1, 4)), ((2, 3, 4, 2), (4, 2))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("x_shape, table_shape", LAYOUTS)
def test_tuned_rotation_and_its_transpose_equal_the_study_version(device, dtype, x_shape, table_shape, monkeypatch):
    monkeypatch.setattr(rotary, "FUSED_MIN_BYTES", 0)  # the fused expression at every size
    rng = np.random.default_rng(9)
    x = rng.standard_normal((*x_shape[:-1], 3 * x_shape[-1])).astype(dtype)[..., x_shape[-1]: 2 * x_shape[-1]]
    cos, sin = (rng.standard_normal(table_shape).astype(np.float32) for _ in range(2))
    half = x_shape[-1] // 2
    transposed_sin = -np.concatenate([sin[..., half:], sin[..., :half]], axis=-1)
    with backend.device_scope(backend.canonical_device(device)):
        x_on, cos_on, sin_on = (backend.to_device(array, device) for array in (x, cos, sin))
        transposed_on = backend.to_device(transposed_sin, device)
        tuned = [backend.to_numpy(rotary.rotate(x_on, cos_on, sin_on)),
                 backend.to_numpy(rotary.rotate(x_on, cos_on, transposed_on))]
    study = [rotary.rotate_study(x, cos, sin), rotary.rotate_study(x, cos, transposed_sin)]
    for result, reference in zip(tuned, study):
        assert result.dtype == dtype
        if device == "cpu":  # the same float operations in the same order
            np.testing.assert_array_equal(result, reference)
        else:  # a GPU compiler may fuse a multiply and an add: one rounding of a product less
            largest_product = np.abs(x).max() * max(np.abs(cos).max(), np.abs(sin).max())
            np.testing.assert_allclose(result, reference, rtol=2 * np.finfo(dtype).eps,
                                       atol=np.finfo(dtype).eps * largest_product)
