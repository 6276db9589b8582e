import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from op_check import check_op, random_array

import tinytf
from devices import DEVICES_AND_SECOND_GPU
from tinytf.functional.indexing import (
    gather,
    index_add,
    index_select,
    masked_select,
    nonzero,
    scatter,
    scatter_add,
    scatter_reduce,
    take_along_dim,
)

seeds = st.integers(0, 2**32 - 1)
few_examples = settings(max_examples=8)  # every example runs two ops' gradchecks on every device


def numpy_coordinates(index: np.ndarray, dim: int) -> tuple:
    """The reference's reading of torch's gather/scatter index: position p addresses p with p[dim] = index[p]."""
    return tuple(index if axis == dim else np.indices(index.shape)[axis] for axis in range(index.ndim))


def numpy_scatter_reduce(a, dim, index, src, reduce, include_self=True):
    """torch.scatter_reduce, one element at a time."""
    out = a.copy()
    targets = list(zip(*(c.reshape(-1) for c in numpy_coordinates(index, dim))))
    values = src[tuple(slice(0, n) for n in index.shape)].reshape(-1)
    groups: dict[tuple, list] = {}
    for target, value in zip(targets, values):
        groups.setdefault(target, [] if not include_self else [a[target]]).append(value)
    combine = {"sum": np.sum, "prod": np.prod, "mean": np.mean, "amax": np.max, "amin": np.min}[reduce]
    for target, members in groups.items():
        out[target] = combine(members)
    return out


@st.composite
def gather_case(draw, min_dims=1):
    """An input shape, a dim (maybe negative) and an index shape that fits it: equal rank, at most the input's size
    outside `dim`, any length (also 0) along it."""
    shape = draw(st.lists(st.integers(1, 4), min_size=min_dims, max_size=3).map(tuple))
    dim = draw(st.integers(-len(shape), len(shape) - 1))
    index_shape = tuple(draw(st.integers(0, 5)) if axis == dim % len(shape) else draw(st.integers(1, n))
                        for axis, n in enumerate(shape))
    return shape, dim, index_shape


@few_examples
@given(case=gather_case(), seed=seeds)
def test_gather_and_take_along_dim_match_numpy_and_accumulate_repeats(case, seed):
    shape, dim, index_shape = case
    axis = dim % len(shape)
    a = random_array(seed, shape)
    index = np.random.default_rng(seed).integers(0, shape[dim], index_shape)
    check_op(lambda x: gather(x, dim, tinytf.tensor(index, device=x.device)),
             lambda x: x[numpy_coordinates(index, axis)], a)
    full_index = np.random.default_rng(seed).integers(0, shape[dim], shape[:axis] + (3,) + shape[axis + 1:])
    check_op(lambda x: take_along_dim(x, tinytf.tensor(full_index, device=x.device), dim),
             lambda x: np.take_along_axis(x, full_index, dim), a)


def test_take_along_dim_broadcasts_and_flattens():
    a = random_array(0, (2, 3))
    check_op(lambda x: take_along_dim(x, tinytf.tensor([[0, 2]], device=x.device), 1),
             lambda x: np.take_along_axis(x, np.array([[0, 2], [0, 2]]), 1), a)
    check_op(lambda x: take_along_dim(x, tinytf.tensor([5, 0, 5], device=x.device)),
             lambda x: x.reshape(-1)[[5, 0, 5]], a)


@pytest.mark.parametrize("reduce", ["sum", "prod", "mean", "amax", "amin"])
@pytest.mark.parametrize("include_self", [True, False])
def test_scatter_reduce_matches_reference_with_repeated_indices(reduce, include_self):
    a, src = random_array(1, (3, 4)), random_array(2, (3, 5))
    index = np.array([[0, 2, 2, 0], [2, 2, 0, 1]])  # repeats in every column but one; src is larger than index
    check_op(lambda x, s: scatter_reduce(x, 0, tinytf.tensor(index, device=x.device), s, reduce,
                                         include_self=include_self),
             lambda x, s: numpy_scatter_reduce(x, 0, index, s, reduce, include_self), a, src)


def test_scatter_reduce_prod_gradient_is_exact_with_zero_factors():
    index = np.array([0, 0, 1, 1, 1, 2])
    src = np.array([2.0, 0.0, 0.0, 3.0, 0.0, 5.0])  # target 0: one zero; target 1: two zeros
    check_op(lambda x, s: scatter_reduce(x, 0, tinytf.tensor(index, device=x.device), s, "prod"),
             lambda x, s: numpy_scatter_reduce(x, 0, index, s, "prod"), np.array([1.5, 2.0, -1.0, 4.0]), src)


def test_scatter_reduce_amax_splits_the_gradient_between_ties():
    x = tinytf.tensor([1.0, 2.0, 2.0], requires_grad=True)
    out = scatter_reduce(tinytf.zeros(1), 0, tinytf.tensor([0, 0, 0]), x, "amax")
    out.sum().backward()
    np.testing.assert_array_equal(x.grad, [0.0, 0.5, 0.5])


def test_integer_scatter_reduce_mean_floors_as_pytorch():
    out = scatter_reduce(tinytf.tensor([1, 1]), 0, tinytf.tensor([0, 0, 1]), tinytf.tensor([-3, -3, 4]), "mean")
    np.testing.assert_array_equal(out.numpy(), [-2, 2])


@few_examples
@given(case=gather_case(), seed=seeds)
def test_scatter_add_accumulates_repeats_and_scatter_writes_distinct_targets(case, seed):
    shape, dim, index_shape = case
    rng = np.random.default_rng(seed)
    a, src = random_array(seed, shape), random_array(seed + 1, index_shape)
    index = rng.integers(0, shape[dim], index_shape)
    check_op(lambda x, s: scatter_add(x, dim, tinytf.tensor(index, device=x.device), s),
             lambda x, s: numpy_scatter_reduce(x, dim % len(shape), index, s, "sum"), a, src)
    # Plain scatter with distinct targets along dim: a permutation's first entries.
    length = min(index_shape[dim], shape[dim])
    distinct = np.argsort(rng.random(shape[:dim % len(shape)] + (shape[dim],) + shape[dim % len(shape) + 1:]), axis=dim)
    distinct = distinct[tuple(slice(0, length) if axis == dim % len(shape) else slice(0, n)
                              for axis, n in enumerate(index_shape))]
    src = src[tuple(slice(0, n) for n in distinct.shape)]

    def reference(x, s):
        out = x.copy()
        out[numpy_coordinates(distinct, dim % len(shape))] = s
        return out

    check_op(lambda x, s: scatter(x, dim, tinytf.tensor(distinct, device=x.device), s), reference, a, src)


def test_scatter_takes_a_scalar_value():
    out = scatter(tinytf.zeros(3), 0, tinytf.tensor([1]), 2.5)
    np.testing.assert_array_equal(out.numpy(), [0, 2.5, 0])
    np.testing.assert_array_equal(scatter(tinytf.zeros(2, 2), 1, [[1], [0]], value=7.0).numpy(), [[0, 7], [7, 0]])


@few_examples
@given(seed=seeds, dim=st.integers(-3, 2), count=st.integers(0, 5))
def test_index_select_and_index_add_accumulate_repeats(seed, dim, count):
    shape = (2, 3, 4)
    a = random_array(seed, shape)
    index = np.random.default_rng(seed).integers(0, shape[dim], count)
    check_op(lambda x: index_select(x, dim, tinytf.tensor(index, device=x.device)), lambda x: np.take(x, index, dim), a)
    source = random_array(seed + 1, tuple(count if axis == dim % 3 else n for axis, n in enumerate(shape)))

    def reference(x, s):
        out = x.copy()
        np.add.at(out, (slice(None),) * (dim % 3) + (index,), -2 * s)
        return out

    check_op(lambda x, s: index_add(x, dim, tinytf.tensor(index, device=x.device), s, alpha=-2), reference, a, source)


def test_zero_dimensional_tensors_count_as_one_element():
    check_op(lambda x: gather(x, -1, tinytf.tensor(0, device=x.device)), lambda x: x, np.array(3.0))
    check_op(lambda x: index_select(x, 0, tinytf.tensor([0], device=x.device)), lambda x: x,
             np.array(3.0))
    check_op(lambda x, s: scatter_add(x, 0, tinytf.tensor(0, device=x.device), s), lambda x, s: x + s,
             np.array(3.0), np.array(2.0))
    assert nonzero(tinytf.tensor(1.0)).shape == (1, 0)
    np.testing.assert_array_equal(nonzero(tinytf.tensor(1.0), as_tuple=True)[0].numpy(), [0])


@pytest.mark.parametrize("mask_shape", [(2, 3), (3,), (2, 1), ()], ids=str)
def test_masked_select_broadcasts_the_mask(mask_shape):
    a = random_array(3, (2, 3))
    mask = np.random.default_rng(4).random(mask_shape) > 0.4
    check_op(lambda x: masked_select(x, tinytf.tensor(mask, device=x.device)),
             lambda x: x[np.broadcast_to(mask, x.shape)], a)


@pytest.mark.parametrize("device", DEVICES_AND_SECOND_GPU)
def test_nonzero_matches_numpy(device):
    a = np.array([[0.0, 1.0, 0.0], [2.0, 0.0, 3.0]])
    positions = nonzero(tinytf.tensor(a, device=device))
    assert positions.dtype == np.int64 and positions.device == tinytf.tensor(a, device=device).device
    np.testing.assert_array_equal(positions.numpy(), np.argwhere(a))
    for got, expected in zip(nonzero(tinytf.tensor(a, device=device), as_tuple=True), np.nonzero(a)):
        np.testing.assert_array_equal(got.numpy(), expected)
    assert nonzero(tinytf.zeros(0, 2, device=device)).shape == (0, 2)


def test_bad_indices_and_dims_are_clear_errors():
    x = tinytf.randn(2, 3)
    with pytest.raises(IndexError, match=r"index 3 is out of range for dimension 1 of size 3 \(expected .* \[0, 2\]\)"):
        gather(x, 1, tinytf.tensor([[0, 3]]))
    with pytest.raises(IndexError, match="index -1 is out of range"):
        index_select(x, 0, tinytf.tensor([-1]))
    with pytest.raises(IndexError, match=r"dimension 2 is out of range .* \[-2, 1\]"):
        scatter_add(x, 2, tinytf.tensor([[0]]), x)
    with pytest.raises(ValueError, match="index has 1 dimensions, the input 2"):
        gather(x, 0, tinytf.tensor([0]))
    with pytest.raises(ValueError, match=r"index of shape \(3, 1\) is larger"):
        gather(x, 1, tinytf.tensor([[0], [0], [0]]))
    with pytest.raises(TypeError, match="integer tensor"):
        gather(x, 0, tinytf.tensor([[0.0]]))
    with pytest.raises(TypeError, match="src has dtype float64"):
        scatter(x, 0, tinytf.tensor([[0]]), tinytf.tensor(np.ones((1, 1))))
    with pytest.raises(ValueError, match="reduce must be one of"):
        scatter_reduce(x, 0, tinytf.tensor([[0]]), x, "max")
    with pytest.raises(ValueError, match=r"source has shape \(2, 3\), expected \(1, 3\)"):
        index_add(x, 0, tinytf.tensor([1]), x)
    with pytest.raises(ValueError, match="does not broadcast"):
        masked_select(x, tinytf.tensor([True, False]))
