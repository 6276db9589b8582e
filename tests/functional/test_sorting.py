import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from op_check import check_op, shape_and_dim, shapes_with_empty, small_shapes

import tinytf
from tinytf.functional.sorting import argsort, median, sort, topk

seeds = st.integers(0, 2**32 - 1)


def distinct_values(seed, shape):
    """No ties, so each output takes one well-defined element and gradcheck's nudges change no order."""
    return np.random.default_rng(seed).permutation(int(np.prod(shape))).reshape(shape) / 7.0 - 1.0


def stable_order(x, dim, descending):
    """The order PyTorch's stable sort gives: equal elements keep their positions, in both directions."""
    if x.ndim == 0:
        return np.zeros((), dtype=np.int64)
    return np.argsort(-x if descending else x, axis=dim, kind="stable")


@pytest.mark.parametrize("descending", [False, True])
@given(shape_dim=shape_and_dim(), seed=seeds)
def test_sort_matches_numpy_and_passes_gradients_to_the_sorted_elements(descending, shape_dim, seed):
    shape, dim = shape_dim
    values = distinct_values(seed, shape)
    order = stable_order(values, dim, descending)
    result = sort(tinytf.tensor(values), dim, descending=descending)
    np.testing.assert_array_equal(result.indices.numpy(), order)
    np.testing.assert_array_equal(argsort(tinytf.tensor(values), dim=dim, descending=descending).numpy(), order)
    check_op(lambda x: sort(x, dim, descending).values,
             lambda x: np.take_along_axis(x, order, dim) if x.ndim else x, values)


@given(shape_dim=shape_and_dim(shapes_with_empty), seed=seeds, descending=st.booleans())
def test_sort_keeps_ties_in_order_in_both_directions(shape_dim, seed, descending):
    shape, dim = shape_dim
    values = np.random.default_rng(seed).integers(0, 3, size=shape).astype(np.float64)  # many ties, empty dims too
    values_out, indices = sort(tinytf.tensor(values), dim=dim, descending=descending)
    np.testing.assert_array_equal(indices.numpy(), stable_order(values, dim, descending))
    np.testing.assert_array_equal(values_out.numpy(), np.take_along_axis(values, indices.numpy(), dim))


def test_sort_puts_nan_last_ascending_and_first_descending_as_pytorch():
    x = tinytf.tensor([2.0, np.nan, 1.0])
    assert sort(x).indices.tolist() == [2, 0, 1]
    assert sort(x, descending=True).indices.tolist() == [1, 0, 2]
    assert sort(tinytf.tensor([1, 2], dtype="uint8"), descending=True).values.tolist() == [2, 1]


@pytest.mark.parametrize("largest", [True, False])
@settings(max_examples=15)
@given(shape_dim=shape_and_dim(), seed=seeds, data=st.data())
def test_topk_matches_numpy(largest, shape_dim, seed, data):
    shape, dim = shape_dim
    k = data.draw(st.integers(0, shape[dim]) if shape else st.just(1))
    values = distinct_values(seed, shape)
    chosen = stable_order(values, dim, descending=largest)[(slice(None),) * (dim % len(shape)) + (slice(0, k),)] \
        if shape else np.zeros((), dtype=np.int64)
    result = topk(tinytf.tensor(values), k, dim=dim, largest=largest)
    np.testing.assert_array_equal(result.indices.numpy(), chosen)
    if k > 0:
        check_op(lambda x: topk(x, k, dim, largest).values,
                 lambda x: np.take_along_axis(x, chosen, dim) if x.ndim else x, values)


def lower_median(x, dim):
    if x.ndim == 0:
        return x, np.zeros((), dtype=np.int64)
    order = np.argsort(x, axis=dim, kind="stable")
    middle = np.take(order, [(x.shape[dim] - 1) // 2], axis=dim)
    return np.take_along_axis(x, middle, dim), middle


@pytest.mark.parametrize("keepdim", [False, True])
@settings(max_examples=15)
@given(shape_dim=shape_and_dim(), seed=seeds)
def test_median_along_a_dim_is_the_lower_median_with_its_index(keepdim, shape_dim, seed):
    shape, dim = shape_dim
    values = distinct_values(seed, shape)
    expected_values, expected_indices = lower_median(values, dim)
    if not keepdim and values.ndim:
        expected_values, expected_indices = expected_values.squeeze(dim), expected_indices.squeeze(dim)
    result = median(tinytf.tensor(values), dim, keepdim=keepdim)
    np.testing.assert_array_equal(result.indices.numpy(), expected_indices)
    check_op(lambda x: median(x, dim=dim, keepdim=keepdim).values, lambda x: expected_values, values)


@settings(max_examples=15)
@given(shape=small_shapes, seed=seeds)
def test_median_of_all_elements_is_the_lower_median(shape, seed):
    values = distinct_values(seed, shape)
    check_op(median, lambda x: np.sort(x.reshape(-1))[(x.size - 1) // 2], values)


def test_median_is_nan_with_a_nan_and_shares_the_gradient_of_ties_as_pytorch():
    assert np.isnan(median(tinytf.tensor([1.0, np.nan, 2.0])).item())
    assert np.isnan(median(tinytf.zeros(0)).item())
    values, indices = median(tinytf.tensor([[3.0, 1.0, 2.0, 2.0], [np.nan, 0.0, 5.0, -1.0]]), dim=1)
    np.testing.assert_array_equal(values.numpy(), [2.0, np.nan])
    assert indices.tolist() == [2, 0]
    x = tinytf.tensor([1.0, 2.0, 2.0, 3.0, 0.0], requires_grad=True)
    median(x).backward()
    np.testing.assert_array_equal(x.grad, [0.0, 0.5, 0.5, 0.0, 0.0])
    assert median(tinytf.tensor([3, 1, 2])).item() == 2


def test_sorting_errors_are_clear():
    x = tinytf.randn(2, 3)
    for op in (sort, argsort, lambda x, dim: topk(x, 1, dim), median):
        with pytest.raises(IndexError, match=r"dimension 2 is out of range for a tensor of 2 dimensions"):
            op(x, 2)
    with pytest.raises(ValueError, match=r"topk: k=4 is out of range for dimension -1 of size 3"):
        topk(x, 4)
    with pytest.raises(ValueError, match=r"topk: k=0 is out of range"):
        topk(tinytf.tensor(1.0), 0)
    with pytest.raises(ValueError, match="empty dimension"):
        median(tinytf.zeros(3, 0), dim=1)
    with pytest.raises(TypeError, match="dim must be one int"):
        sort(x, dim=(0, 1))
