import numpy as np
import pytest
from devices import DEVICES_AND_SECOND_GPU
from hypothesis import given, settings
from hypothesis import strategies as st
from op_check import check_op, random_array

import tinytf
import tinytf.functional as F
from tinytf.functional import reduction
from tinytf.functional.reduction import argmin, norm, prod, std, std_mean, var_mean

seeds = st.integers(0, 2**32 - 1)


@st.composite
def shape_and_axes(draw, allow_none=True):
    """A shape and a reduction axis: None, an int (negative too) or a tuple of distinct axes."""
    shape = draw(st.lists(st.integers(1, 4), min_size=1, max_size=4).map(tuple))
    choice = draw(st.sampled_from(["none", "int", "tuple"] if allow_none else ["int", "tuple"]))
    if choice == "none":
        return shape, None
    if choice == "int":
        return shape, draw(st.integers(-len(shape), len(shape) - 1))
    axes = draw(st.lists(st.integers(0, len(shape) - 1), min_size=1, max_size=len(shape), unique=True))
    return shape, tuple(axes)


REDUCTIONS = {
    "sum": (F.sum, np.sum),
    "mean": (F.mean, np.mean),
    "max": (F.max, np.max),
    "min": (F.min, np.min),
    "logsumexp": (F.logsumexp, lambda x, axis, keepdims: np.log(np.exp(x).sum(axis=axis, keepdims=keepdims))),
    "var": (lambda x, axis, keepdims: F.var(x, axis, keepdims, correction=0), np.var),
    "norm": (lambda x, axis, keepdims: norm(x, dim=axis, keepdim=keepdims),
             lambda x, axis, keepdims: np.sqrt((x * x).sum(axis=axis, keepdims=keepdims))),
}


@pytest.mark.parametrize("name", sorted(REDUCTIONS))
@given(shape_axes=shape_and_axes(), keepdims=st.booleans(), seed=seeds)
def test_reduction_matches_numpy(name, shape_axes, keepdims, seed):
    op, reference = REDUCTIONS[name]
    shape, axis = shape_axes
    # A permutation of distinct values: max/min have no ties, so their gradient is well defined.
    values = np.random.default_rng(seed).permutation(int(np.prod(shape))).reshape(shape) / 7.0
    check_op(lambda x: op(x, axis, keepdims), lambda x: reference(x, axis=axis, keepdims=keepdims), values)


@given(shape_axes=shape_and_axes(allow_none=False), seed=seeds)
def test_pytorch_and_numpy_spellings_agree(shape_axes, seed):
    shape, axis = shape_axes
    x = tinytf.tensor(random_array(seed, shape))
    for name in ("sum", "mean", "max", "min", "var", "logsumexp"):
        numpy_style = getattr(x, name)(axis=axis, keepdims=True)
        torch_style = getattr(x, name)(dim=axis, keepdim=True)
        np.testing.assert_array_equal(numpy_style.numpy(), torch_style.numpy())


def test_var_defaults_to_the_unbiased_estimate():
    x = tinytf.tensor([1.0, 2.0, 3.0, 4.0], dtype="float64")
    np.testing.assert_allclose(x.var().item(), np.var([1, 2, 3, 4], ddof=1))
    np.testing.assert_allclose(x.var(ddof=0).item(), np.var([1, 2, 3, 4]))


def test_max_shares_gradient_between_ties():
    x = tinytf.tensor([[3.0, 1.0, 3.0]], requires_grad=True)
    x.max(dim=1).sum().backward()
    np.testing.assert_array_equal(x.grad, [[0.5, 0.0, 0.5]])


def test_argmax_matches_numpy():
    x = np.random.default_rng(0).standard_normal((3, 4, 5))
    for axis in (None, 0, 1, -1):
        np.testing.assert_array_equal(tinytf.tensor(x).argmax(axis).numpy(), np.argmax(x, axis))
    np.testing.assert_array_equal(tinytf.tensor(x).argmax(dim=1, keepdim=True).numpy(), np.argmax(x, 1, keepdims=True))


def test_reduction_errors_name_the_dimension_and_range():
    x = tinytf.randn(2, 3)
    for op in (F.sum, F.mean, F.max, F.logsumexp, F.var, std, prod, norm, argmin, reduction.any, reduction.all):
        with pytest.raises(IndexError, match=r"dimension 2 is out of range for a tensor of 2 dimensions"):
            op(x, dim=2)
    with pytest.raises(IndexError, match=r"expected a value in \[-1, 0\]"):
        F.sum(tinytf.tensor(1.0), dim=1)
    with pytest.raises(TypeError, match="either axis= or dim="):
        x.sum(axis=0, dim=0)
    with pytest.raises(ValueError, match="empty"):
        tinytf.zeros(0).max()
    with pytest.raises(ValueError, match="empty axis"):
        argmin(tinytf.zeros(2, 0), dim=1)
    with pytest.raises(TypeError, match="floating-point"):
        F.mean(tinytf.tensor([1, 2]))
    with pytest.raises(TypeError, match="only one of correction=, unbiased= and ddof="):
        F.var(x, correction=1, unbiased=True)
    with pytest.raises(ValueError, match="p must be a number"):
        norm(x, p="nuc")


@pytest.mark.parametrize("name", ["sum", "mean", "max", "min", "logsumexp", "norm", "prod"])
@pytest.mark.parametrize("dim", [0, -1, None])
def test_a_0d_tensor_reduces_over_dims_0_and_minus_1_as_pytorch(name, dim):
    op = prod if name == "prod" else REDUCTIONS[name][0]
    for keepdims in (False, True):
        check_op(lambda x: op(x, dim, keepdims), lambda x: x, np.array(0.7))  # each is the identity on one element
    assert std(tinytf.tensor(0.7), dim=dim, correction=0).item() == 0.0
    assert argmin(tinytf.tensor(0.7), dim=dim).item() == 0
    assert reduction.any(tinytf.tensor(0.7), dim=dim).item() is True
    assert reduction.all(tinytf.tensor(0.7), dim=dim).shape == ()


@pytest.mark.parametrize("name", ["sum", "logsumexp"])
def test_backward_through_a_0d_reduction_over_dim_0(name):
    # Regression: expand_reduced divided by the rank of a 0-d input (ZeroDivisionError).
    x = tinytf.tensor(np.float32(0.5), requires_grad=True)
    getattr(x, name)(axis=0).backward()
    assert x.grad.shape == () and x.grad == 1.0


def test_var_without_enough_elements_for_the_correction_is_inf_or_nan_as_pytorch():
    assert tinytf.tensor([1.0, 2.0]).var(correction=3).item() == np.inf
    assert np.isnan(tinytf.tensor([1.0, 1.0]).var(correction=2).item())
    assert np.isnan(tinytf.zeros(0).var().item())
    np.testing.assert_array_equal(tinytf.zeros(0, 3).var(dim=0).numpy(), [np.nan] * 3)


def test_var_and_std_accept_unbiased_and_share_the_mean():
    values = random_array(0, (3, 5))
    x = tinytf.tensor(values)
    np.testing.assert_allclose(x.var(dim=1, unbiased=False).numpy(), values.var(axis=1))
    variance, mean = var_mean(x, dim=1, keepdim=True)
    np.testing.assert_allclose(variance.numpy(), values.var(axis=1, ddof=1, keepdims=True))
    np.testing.assert_allclose(mean.numpy(), values.mean(axis=1, keepdims=True))
    deviation, mean = std_mean(x, dim=(0, 1))
    np.testing.assert_allclose(deviation.numpy(), values.std(ddof=1))
    assert mean.shape == () and np.isclose(mean.item(), values.mean())


@settings(max_examples=10)
@given(shape_axes=shape_and_axes(), keepdims=st.booleans(), seed=seeds)
def test_var_mean_and_std_mean_match_numpy(shape_axes, keepdims, seed):
    shape, axis = shape_axes
    values = random_array(seed, shape + (2,))  # the added axis, always reduced, keeps the variance away from 0
    chosen = () if axis is None else (axis,) if isinstance(axis, int) else axis
    axis = tuple(a % len(shape) for a in chosen) + (len(shape),)
    for op, deviation in ((var_mean, np.var), (std_mean, np.std)):
        check_op(lambda x: F.add(*op(x, axis, keepdims, correction=0)),
                 lambda x: deviation(x, axis=axis, keepdims=keepdims) + x.mean(axis=axis, keepdims=keepdims), values)


@given(shape_axes=shape_and_axes(), keepdims=st.booleans(), seed=seeds, zeros=st.integers(0, 2))
def test_prod_gradient_is_exact_with_zeros(shape_axes, keepdims, seed, zeros):
    shape, axis = shape_axes
    values = random_array(seed, shape, low=0.5, high=1.5)
    values.reshape(-1)[:zeros] = 0.0  # one zero, or two in the same product
    check_op(lambda x: prod(x, dim=axis, keepdim=keepdims),
             lambda x: np.prod(x, axis=axis, keepdims=keepdims), values)


def test_sum_and_prod_of_integers_and_bools_are_int64_as_pytorch():
    assert F.sum(tinytf.tensor([200, 100], dtype="uint8")).item() == 300
    assert F.sum(tinytf.tensor([True, True])).dtype == np.int64
    assert prod(tinytf.tensor([[2, 3], [4, 5]], dtype="int32"), dim=0).dtype == np.int64
    np.testing.assert_array_equal(prod(tinytf.zeros(2, 0), dim=1).numpy(), [1.0, 1.0])


def norm_reference(x, p, axis, keepdims):
    magnitude = np.abs(x)
    if p == np.inf:
        return magnitude.max(axis=axis, keepdims=keepdims)
    if p == -np.inf:
        return magnitude.min(axis=axis, keepdims=keepdims)
    if p == 0:
        return (x != 0).sum(axis=axis, keepdims=keepdims).astype(x.dtype)
    return (magnitude**p).sum(axis=axis, keepdims=keepdims) ** (1 / p)


@pytest.mark.parametrize("p", [1, 3, 0.5, np.inf, -np.inf, 0])
@settings(max_examples=8)
@given(shape_axes=shape_and_axes(), keepdims=st.booleans(), seed=seeds)
def test_norm_matches_numpy_for_every_p(p, shape_axes, keepdims, seed):
    shape, axis = shape_axes
    # Distinct magnitudes away from 0: |x| is smooth there, and inf/-inf norms have no ties.
    magnitudes = (np.random.default_rng(seed).permutation(int(np.prod(shape))).reshape(shape) + 1) / 7.0
    values = magnitudes * np.where(random_array(seed, shape) < 0, -1, 1)
    check_op(lambda x: norm(x, p, axis, keepdims), lambda x: norm_reference(x, p, axis, keepdims), values)


@pytest.mark.parametrize("p", [2, "fro", 1, 3, 0.5, np.inf, 0])
def test_norm_gradient_at_a_zero_vector_is_zero_as_pytorch(p):
    x = tinytf.zeros(2, 3, requires_grad=True)
    norm(x, p, dim=1).sum().backward()
    np.testing.assert_array_equal(x.grad, np.zeros((2, 3)))


def test_argmin_matches_numpy_and_takes_the_first_of_ties():
    x = np.random.default_rng(0).standard_normal((3, 4, 5))
    for axis in (None, 0, 1, -1):
        np.testing.assert_array_equal(argmin(tinytf.tensor(x), axis).numpy(), np.argmin(x, axis))
    np.testing.assert_array_equal(argmin(tinytf.tensor(x), dim=1, keepdim=True).numpy(), np.argmin(x, 1, keepdims=True))
    assert argmin(tinytf.tensor([2.0, 1.0, 1.0])).item() == 1
    for dim in (0, -1):
        assert argmin(tinytf.tensor(3.0), dim=dim).shape == () and argmin(tinytf.tensor(3.0), dim).item() == 0
    with pytest.raises(TypeError, match="a single int"):
        argmin(tinytf.tensor(x), dim=(0, 1))


@pytest.mark.parametrize("device", DEVICES_AND_SECOND_GPU)
@pytest.mark.parametrize("name", ["any", "all"])
@given(shape_axes=shape_and_axes(), keepdims=st.booleans(), seed=seeds)
def test_any_and_all_match_numpy_with_bool_results(device, name, shape_axes, keepdims, seed):
    shape, axis = shape_axes
    values = np.random.default_rng(seed).choice([0, 0, 1], size=shape)  # mostly zeros: any and all both vary
    x = tinytf.tensor(values, device=device)
    result = getattr(reduction, name)(x, dim=axis, keepdim=keepdims)
    assert result.dtype == np.bool_ and result.device == x.device
    np.testing.assert_array_equal(result.numpy(), getattr(np, name)(values, axis=axis, keepdims=keepdims))
