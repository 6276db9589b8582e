import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from op_check import check_op, random_array

import tinytf
import tinytf.functional as F

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


def test_reduction_errors_name_the_axis_and_shape():
    x = tinytf.randn(2, 3)
    with pytest.raises(ValueError, match=r"axis 2 is out of range for a tensor of shape \(2, 3\)"):
        x.sum(axis=2)
    with pytest.raises(TypeError, match="either axis= or dim="):
        x.sum(axis=0, dim=0)
    with pytest.raises(ValueError, match="empty"):
        tinytf.zeros(0).max()
