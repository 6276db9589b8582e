import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from op_check import broadcastable_shapes, check_op, random_array, shapes_with_empty, small_shapes

import tinytf
import tinytf.functional as F
from tinytf import backend

seeds = st.integers(0, 2**32 - 1)

BINARY = {
    "add": (lambda a, b: a + b, np.add, {}),
    "sub": (lambda a, b: a - b, np.subtract, {}),
    "mul": (lambda a, b: a * b, np.multiply, {}),
    "div": (lambda a, b: a / b, np.divide, {"b_away_from": 0.0}),
    "maximum": (F.maximum, np.maximum, {}),
    "minimum": (F.minimum, np.minimum, {}),
    "pow": (lambda a, b: a**b, np.power, {"a_low": 0.5}),
}


@pytest.mark.parametrize("name", sorted(BINARY))
@given(shapes=broadcastable_shapes(), seed=seeds)
def test_binary_op_matches_numpy_with_broadcasting(name, shapes, seed):
    op, reference, options = BINARY[name]
    a = random_array(seed, shapes[0], low=options.get("a_low"), high=2.0 if "a_low" in options else None)
    b = random_array(seed + 1, shapes[1], away_from=options.get("b_away_from"))
    check_op(op, reference, a, b)


UNARY = {
    "neg": (lambda a: -a, np.negative, {}),
    "abs": (abs, np.abs, {"away_from": 0.0}),
    "exp": (F.exp, np.exp, {}),
    "sin": (F.sin, np.sin, {}),
    "cos": (F.cos, np.cos, {}),
    "log": (F.log, np.log, {"low": 0.2, "high": 3.0}),
    "sqrt": (F.sqrt, np.sqrt, {"low": 0.2, "high": 3.0}),
    "rsqrt": (F.rsqrt, lambda a: 1 / np.sqrt(a), {"low": 0.2, "high": 3.0}),
    "pow_scalar": (lambda a: a**3, lambda a: a**3, {}),
    "pow_fraction": (lambda a: a**0.5, lambda a: a**0.5, {"low": 0.2, "high": 3.0}),
    "clamp": (lambda a: a.clamp(-0.5, 0.7), lambda a: np.clip(a, -0.5, 0.7), {"away_from": 0.7}),
    "clamp_min": (lambda a: F.clamp(a, min=-0.5), lambda a: np.maximum(a, -0.5), {"away_from": -0.5}),
}


@pytest.mark.parametrize("name", sorted(UNARY))
@given(shape=small_shapes, seed=seeds)
def test_unary_op_matches_numpy(name, shape, seed):
    op, reference, options = UNARY[name]
    a = random_array(seed, shape, low=options.get("low"), high=options.get("high"), away_from=options.get("away_from"))
    check_op(op, reference, a)


@given(shape=shapes_with_empty, seed=seeds)
def test_elementwise_ops_accept_size_zero_dimensions(shape, seed):
    a = random_array(seed, shape)
    check_op(lambda x: (x * 2 + 1).exp() - x, lambda x: np.exp(x * 2 + 1) - x, a)


@given(shape=small_shapes, seed=seeds)
def test_reflected_operators_with_python_scalars(shape, seed):
    a = random_array(seed, shape, low=0.5, high=2.0)
    check_op(lambda x: 2 - x + 3 * x / 4 - 1 / x + 2**x, lambda x: 2 - x + 3 * x / 4 - 1 / x + 2**x, a)


def test_python_scalars_keep_float32():
    x = tinytf.ones(3)
    for result in (x + 1.5, 2.5 * x, x / 3, 1 - x, x**2.0, 2.0**x):
        assert result.dtype == np.float32


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_python_number_fast_path_equals_the_tensor_operand_path(device, dtype):
    """x + c, c + x, x - c, x * c and c * x with a Python number skip promotion (AddScalar, MulScalar): the values and
    gradients must equal those of the same number given as a 0-d tensor of x's dtype, which takes the general path."""
    x_data = np.random.default_rng(0).uniform(-2, 2, (3, 4)).astype(dtype)
    ops = {
        "x + c": lambda x, c: x + c, "c + x": lambda x, c: c + x, "x - c": lambda x, c: x - c,
        "x * c": lambda x, c: x * c, "c * x": lambda x, c: c * x,
    }
    for name, op in ops.items():
        for number in (0.3, 7, -2.5):
            fast_x = tinytf.tensor(x_data, requires_grad=True, device=device)
            fast = op(fast_x, number)
            general_x = tinytf.tensor(x_data, requires_grad=True, device=device)
            general = op(general_x, tinytf.tensor(np.array(number, dtype=dtype), device=device))
            assert type(fast.grad_fn).__name__ in ("AddScalar", "MulScalar"), name
            assert fast.dtype == np.dtype(dtype), name
            np.testing.assert_array_equal(fast.numpy(), general.numpy(), err_msg=f"{name} with {number}")
            grad = np.random.default_rng(1).standard_normal((3, 4)).astype(dtype)
            fast.backward(grad)
            general.backward(grad)
            np.testing.assert_array_equal(backend.to_numpy(fast_x.grad), backend.to_numpy(general_x.grad))


def test_python_numbers_with_integer_tensors_keep_pytorch_promotion():
    """The fast path is only for floating tensors; integer tensors still promote as PyTorch does."""
    ints = tinytf.tensor(np.array([1, 2, 3], dtype=np.int64))
    assert (ints * 2).dtype == np.int64 and (ints + 1).dtype == np.int64
    assert (ints * 2.5).dtype == np.float32 and (ints - 0.5).dtype == np.float32
    np.testing.assert_array_equal((ints * 2.5).numpy(), np.array([2.5, 5.0, 7.5], dtype=np.float32))


def test_python_number_backward_gives_gradient_of_a_chain():
    x = tinytf.tensor([1.0, -2.0], requires_grad=True, dtype="float64")
    y = ((x * 3 + 1) * -0.5 - 2).sum()  # dy/dx = 3 * -0.5
    y.backward()
    np.testing.assert_array_equal(x.grad, [-1.5, -1.5])


@given(shapes=broadcastable_shapes(num_shapes=3), seed=seeds)
def test_where_routes_gradients_by_condition(shapes, seed):
    condition = random_array(seed, shapes[0]) > 0
    a, b = random_array(seed + 1, shapes[1]), random_array(seed + 2, shapes[2])
    check_op(lambda x, y: F.where(condition, x, y), lambda x, y: np.where(condition, x, y), a, b)


@st.composite
def shape_and_mask_shape(draw):
    """A shape, and a mask shape that broadcasts to it (size-1 dimensions, fewer leading dimensions)."""
    shape = draw(small_shapes)
    mask_shape = tuple(1 if draw(st.booleans()) else n for n in shape)
    return shape, mask_shape[draw(st.integers(0, len(shape))):]


@given(shapes=shape_and_mask_shape(), seed=seeds)
def test_masked_fill_sets_masked_elements(shapes, seed):
    a = random_array(seed, shapes[0])
    mask = random_array(seed + 1, shapes[1]) > 0
    check_op(lambda x: x.masked_fill(mask, -5.0), lambda x: np.where(mask, -5.0, x), a)


def test_maximum_splits_gradient_on_ties():
    a = tinytf.tensor([1.0, 2.0, 3.0], requires_grad=True)
    b = tinytf.tensor([1.0, 5.0, 0.0], requires_grad=True)
    F.maximum(a, b).sum().backward()
    np.testing.assert_array_equal(a.grad, [0.5, 0.0, 1.0])
    np.testing.assert_array_equal(b.grad, [0.5, 1.0, 0.0])


def test_comparisons_give_boolean_tensors_without_grad():
    x = tinytf.tensor([1.0, 2.0, 3.0], requires_grad=True)
    for result, expected in [(x > 2, [0, 0, 1]), (x >= 2, [0, 1, 1]), (x < 2, [1, 0, 0]), (x <= 2, [1, 1, 0]),
                             (x == 2, [0, 1, 0]), (x != 2, [1, 0, 1])]:
        assert result.dtype == np.bool_ and not result.requires_grad
        np.testing.assert_array_equal(result.numpy(), np.array(expected, dtype=bool))


def test_cast_is_differentiable_and_gradient_keeps_input_dtype():
    x = tinytf.tensor([1.0, 2.0], requires_grad=True)
    y = x.double() * 3
    assert y.dtype == np.float64
    y.sum().backward()
    assert x.grad.dtype == np.float32
    np.testing.assert_array_equal(x.grad, [3.0, 3.0])


def test_where_needs_a_boolean_condition():
    with pytest.raises(TypeError, match="boolean"):
        F.where(tinytf.tensor([1.0]), tinytf.tensor([1.0]), 0.0)


def test_clamp_needs_a_bound():
    with pytest.raises(ValueError, match="min and max"):
        tinytf.tensor([1.0]).clamp()
