import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from op_check import check_op, random_array, shape_and_dim, shapes_with_empty

import tinytf
from tinytf.functional.scan import cummax, cummin, cumprod, cumsum, logcumsumexp

seeds = st.integers(0, 2**32 - 1)


def along(reference):
    """A NumPy scan along `dim` that treats a 0-d array as one element, as the tinytf ops do (`reference` returns an
    array or a tuple of arrays)."""

    def scan(x, dim):
        if x.ndim > 0:
            return reference(x, dim)
        result = reference(x.reshape(1), 0)
        return tuple(r.reshape(()) for r in result) if isinstance(result, tuple) else result.reshape(())

    return scan


SCANS = {
    "cumsum": (cumsum, along(lambda x, dim: np.cumsum(x, axis=dim))),
    "cumprod": (cumprod, along(lambda x, dim: np.cumprod(x, axis=dim))),
    "logcumsumexp": (logcumsumexp, along(lambda x, dim: np.logaddexp.accumulate(x, axis=dim))),
}


@pytest.mark.parametrize("name", sorted(SCANS))
@given(shape_dim=shape_and_dim(), seed=seeds, zeros=st.integers(0, 2))
def test_scan_matches_numpy(name, shape_dim, seed, zeros):
    op, reference = SCANS[name]
    shape, dim = shape_dim
    values = random_array(seed, shape, low=0.5, high=1.5)
    values.reshape(-1)[:zeros] = 0.0  # cumprod's gradient must stay exact with one zero, or two in one row
    check_op(lambda x: op(x, dim), lambda x: reference(x, dim), values)


@pytest.mark.parametrize("name", sorted(SCANS))
@given(shape_dim=shape_and_dim(shapes_with_empty))
def test_scans_keep_the_shape_of_empty_tensors(name, shape_dim):
    op, reference = SCANS[name]
    shape, dim = shape_dim
    values = np.ones(shape)
    np.testing.assert_allclose(op(tinytf.tensor(values), dim=dim).numpy(), reference(values, dim))


def test_logcumsumexp_is_stable_far_from_zero():
    x = tinytf.tensor([-1000.0, 0.0, 1000.0, 1000.0], requires_grad=True)
    out = logcumsumexp(x, 0)
    np.testing.assert_allclose(out.numpy(), [-1000.0, 0.0, 1000.0, 1000.0 + np.log(2.0)], rtol=1e-6)
    out.backward(np.array([1.0, -2.0, 3.0, 4.0], dtype=np.float32))
    np.testing.assert_allclose(x.grad, [1.0, -2.0, 5.0, 2.0], rtol=1e-4)


def test_cumsum_and_cumprod_of_integers_and_bools_are_int64_as_pytorch():
    assert cumsum(tinytf.tensor([200, 100], dtype="uint8"), 0).tolist() == [200, 300]
    assert cumsum(tinytf.tensor([True, True]), dim=0).dtype == np.int64
    assert cumprod(tinytf.tensor([[2, 3]], dtype="int32"), axis=1).tolist() == [[2, 6]]
    assert logcumsumexp(tinytf.tensor([0, 0]), 0).dtype == np.float32


def running_extreme_reference(x, dim, take_max):
    """Values and the last index of each running extreme, by a loop over `dim`."""
    moved = np.moveaxis(x, dim, -1)
    values, indices = np.empty_like(moved), np.empty(moved.shape, dtype=np.int64)
    for position in np.ndindex(moved.shape[:-1]):
        best = 0
        for i, value in enumerate(moved[position]):
            if (value >= moved[position][best]) if take_max else (value <= moved[position][best]):
                best = i
            values[position + (i,)], indices[position + (i,)] = moved[position][best], best
    return np.moveaxis(values, -1, dim), np.moveaxis(indices, -1, dim)


@pytest.mark.parametrize("take_max", [True, False])
@settings(max_examples=15)
@given(shape_dim=shape_and_dim(), seed=seeds)
def test_cummax_and_cummin_match_a_loop_and_pass_gradients_to_the_extremes(take_max, shape_dim, seed):
    op = cummax if take_max else cummin
    shape, dim = shape_dim
    # Distinct values: the gradient goes to one element per output. Ties are tested below.
    values = np.random.default_rng(seed).permutation(int(np.prod(shape))).reshape(shape) / 7.0
    expected_values, expected_indices = along(lambda x, d: running_extreme_reference(x, d, take_max))(values, dim)
    indices = op(tinytf.tensor(values), dim).indices
    assert indices.dtype == np.int64
    np.testing.assert_array_equal(indices.numpy(), expected_indices)
    check_op(lambda x: op(x, dim).values, lambda x: expected_values, values)


def test_cummax_reports_the_last_of_equal_maxima_and_sticks_at_nan_as_pytorch():
    values, indices = cummax(tinytf.tensor([1.0, 3.0, 3.0, 2.0, np.nan, 5.0]), 0)
    np.testing.assert_array_equal(values.numpy(), [1.0, 3.0, 3.0, 3.0, np.nan, np.nan])
    np.testing.assert_array_equal(indices.numpy(), [0, 1, 2, 2, 4, 4])
    assert cummin(tinytf.tensor([3.0, 1.0, 1.0]), dim=-1).indices.tolist() == [0, 1, 2]


def test_cummax_sums_the_gradient_of_a_repeated_maximum():
    x = tinytf.tensor([[1.0, 3.0, 2.0, 5.0]], requires_grad=True)
    cummax(x, 1).values.sum().backward()
    np.testing.assert_array_equal(x.grad, [[1.0, 2.0, 0.0, 1.0]])


def test_scan_errors_name_the_dimension():
    x = tinytf.randn(2, 3)
    for op in (cumsum, cumprod, logcumsumexp, cummax, cummin):
        with pytest.raises(IndexError, match=r"dimension 2 is out of range for a tensor of 2 dimensions"):
            op(x, 2)
        with pytest.raises(TypeError, match="dim must be one int, got None"):
            op(x)
        with pytest.raises(TypeError, match="either axis= or dim="):
            op(x, 0, axis=0)
