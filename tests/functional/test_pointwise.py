import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from op_check import broadcastable_shapes, check_op, random_array, shapes_with_empty, small_shapes

import tinytf
from tinytf import backend
from tinytf.functional.pointwise import (
    acos,
    asin,
    atan,
    atan2,
    bitwise_and,
    bitwise_left_shift,
    bitwise_not,
    bitwise_or,
    bitwise_right_shift,
    bitwise_xor,
    ceil,
    cosh,
    exp2,
    expm1,
    floor,
    floor_divide,
    frac,
    isclose,
    isfinite,
    isinf,
    isnan,
    log1p,
    log2,
    log10,
    logical_and,
    logical_not,
    logical_or,
    logical_xor,
    remainder,
    round,
    sign,
    sinh,
    tan,
    trunc,
    trunc_divide,
)

seeds = st.integers(0, 2**32 - 1)
# Each example runs forward and gradcheck on every device; fewer examples keep the file fast.
few_examples = settings(max_examples=10)

FLOATING = {
    "log2": (log2, np.log2, {"low": 0.2, "high": 3.0}),
    "log10": (log10, np.log10, {"low": 0.2, "high": 3.0}),
    "log1p": (log1p, np.log1p, {"low": -0.8, "high": 3.0}),
    "exp2": (exp2, np.exp2, {}),
    "expm1": (expm1, np.expm1, {}),
    "tan": (tan, np.tan, {"low": -1.2, "high": 1.2}),
    "sinh": (sinh, np.sinh, {}),
    "cosh": (cosh, np.cosh, {}),
    "asin": (asin, np.arcsin, {"low": -0.9, "high": 0.9}),
    "acos": (acos, np.arccos, {"low": -0.9, "high": 0.9}),
    "atan": (atan, np.arctan, {}),
    "frac": (frac, lambda a: a - np.trunc(a), {"low": -3.0, "high": 3.0}),
}


@pytest.mark.parametrize("name", sorted(FLOATING))
@few_examples
@given(shape=small_shapes, seed=seeds)
def test_floating_op_matches_numpy(name, shape, seed):
    op, reference, domain = FLOATING[name]
    check_op(op, reference, random_array(seed, shape, low=domain.get("low"), high=domain.get("high")))


STEPWISE = {
    "floor": (floor, np.floor),
    "ceil": (ceil, np.ceil),
    "trunc": (trunc, np.trunc),
    "round": (round, np.round),
    "round_decimals": (lambda a: round(a, decimals=1), lambda a: np.round(a, 1)),
    "round_tens": (lambda a: round(a, decimals=-1), lambda a: np.round(a, -1)),
    "sign": (sign, np.sign),
}


@pytest.mark.parametrize("name", sorted(STEPWISE))
@few_examples
@given(shape=small_shapes, seed=seeds)
def test_stepwise_op_matches_numpy(name, shape, seed):
    op, reference = STEPWISE[name]
    check_op(op, reference, random_array(seed, shape) * 30, grad=False)


@pytest.mark.parametrize("op", [floor, ceil, trunc, round, sign, lambda a: floor_divide(a, 0.7),
                                lambda a: trunc_divide(a, -1.3)], ids=["floor", "ceil", "trunc", "round", "sign",
                                                                      "floor_divide", "trunc_divide"])
def test_stepwise_op_has_zero_gradient_even_at_steps(op, device):
    x = tinytf.tensor([-1.5, -1.0, 0.0, 0.5, 2.0, 2.7], requires_grad=True, device=device)
    op(x).backward(tinytf.tensor([1.0, 2.0, np.inf, 3.0, 4.0, 5.0], device=device))  # zeros, not inf * 0 = NaN
    np.testing.assert_array_equal(backend.to_numpy(x.grad), np.zeros(6, dtype=np.float32))


def test_rounding_keeps_rounded_dtypes(device):
    ints = tinytf.tensor([-3, 0, 7], device=device)
    flags = tinytf.tensor([True, False], device=device)
    for op in (floor, ceil, trunc, round):
        for tensor in (ints, flags):
            result = op(tensor)
            assert result.dtype == tensor.dtype and result.device == tensor.device
            np.testing.assert_array_equal(result.numpy(), tensor.numpy())
    np.testing.assert_array_equal(round(tinytf.tensor([14, 15, 25, -15]), decimals=-1).numpy(), [10, 20, 20, -20])
    assert sign(ints).dtype == np.int64 and sign(ints).tolist() == [-1, 0, 1]
    assert sign(flags).tolist() == [True, False]


@pytest.mark.parametrize("name", sorted(set(FLOATING) - {"frac"}))
def test_floating_op_of_integers_computes_in_float32(name, device):
    op, reference, _ = FLOATING[name]
    values = {"asin": [-1, 0, 1], "acos": [-1, 0, 1], "log2": [1, 2, 8], "log10": [1, 10, 100], "log1p": [0, 1, 9]}
    ints = np.array(values.get(name, [-2, 0, 3]))
    for data in (ints, ints > 0):
        result = op(tinytf.tensor(data, device=device))
        assert result.dtype == np.float32
        np.testing.assert_allclose(result.numpy(), reference(data.astype(np.float64)), rtol=1e-6, atol=1e-6)


def test_frac_needs_a_floating_tensor():
    with pytest.raises(TypeError, match="frac: needs a floating tensor, got dtype int64"):
        frac(tinytf.tensor([1, 2]))


@few_examples
@given(shapes=broadcastable_shapes(), seed=seeds)
def test_atan2_matches_numpy_with_broadcasting(shapes, seed):
    check_op(atan2, np.arctan2, random_array(seed, shapes[0]), random_array(seed + 1, shapes[1], away_from=0.0))


def test_atan2_takes_python_scalars_and_integers_without_float64(device):
    x = tinytf.tensor([-2.0, 0.5, 3.0], device=device)
    n = tinytf.tensor([-2, 1, 3], device=device)
    for result, expected in [(atan2(x, 2.0), np.arctan2([-2.0, 0.5, 3.0], 2.0)),
                             (atan2(1, x), np.arctan2(1.0, [-2.0, 0.5, 3.0])),
                             (atan2(n, n), np.arctan2([-2, 1, 3], [-2, 1, 3])),
                             (atan2(n, 0.5), np.arctan2([-2, 1, 3], 0.5))]:
        assert result.dtype == np.float32 and result.device == x.device
        np.testing.assert_allclose(result.numpy(), expected, rtol=1e-6)
    double_scalar = tinytf.tensor(2.0, dtype="float64", device=device)
    assert atan2(x, double_scalar).dtype == np.float32  # a 0-d operand does not promote a float32 tensor


@few_examples
@given(shapes=broadcastable_shapes(), seed=seeds)
def test_remainder_matches_numpy_with_broadcasting(shapes, seed):
    # gradients: 1 for a and -floor(a / b) for b, as in PyTorch
    check_op(remainder, np.remainder, random_array(seed, shapes[0]) * 3,
             random_array(seed + 1, shapes[1], away_from=0.0))


@few_examples
@given(shapes=broadcastable_shapes(), seed=seeds)
def test_rounding_divisions_match_numpy(shapes, seed):
    a, b = random_array(seed, shapes[0]) * 3, random_array(seed + 1, shapes[1], away_from=0.0)
    check_op(floor_divide, np.floor_divide, a, b, grad=False)
    check_op(trunc_divide, lambda x, y: np.trunc(x / y), a, b, grad=False)


def test_integer_division_rounds_like_python_and_c(device):
    pairs = [(a, b) for a in range(-7, 8) for b in (-3, -2, -1, 1, 2, 3)]
    a = tinytf.tensor([a for a, _ in pairs], device=device)
    b = tinytf.tensor([b for _, b in pairs], device=device)
    for result, expected in [(floor_divide(a, b), [a // b for a, b in pairs]),
                             (trunc_divide(a, b), [math.trunc(a / b) for a, b in pairs]),
                             (remainder(a, b), [a % b for a, b in pairs])]:
        assert result.dtype == np.int64
        assert result.tolist() == expected
    assert floor_divide(-7, tinytf.tensor([2], device=device)).tolist() == [-4]
    assert remainder(tinytf.tensor([-7.5], device=device), 2).tolist() == [0.5]


def test_integer_and_float_operands_promote_like_pytorch():
    n = tinytf.tensor([7, -7], dtype="int32")
    assert floor_divide(n, 2).dtype == np.int32
    assert floor_divide(n, 2.0).dtype == np.float32
    assert remainder(n, tinytf.tensor([2.0])).tolist() == [1.0, 1.0]
    assert trunc_divide(n, tinytf.tensor([2], dtype="int64")).dtype == np.int64


@given(shape=shapes_with_empty, seed=seeds)
@few_examples
def test_ops_accept_size_zero_dimensions(shape, seed):
    a = random_array(seed, shape)
    check_op(lambda x: atan2(expm1(x), floor(x) + 2) + log1p(x * x), lambda x: np.arctan2(np.expm1(x), np.floor(x) + 2)
             + np.log1p(x * x), a)


def test_floating_point_tests(device):
    values = np.array([1.0, np.nan, np.inf, -np.inf, 0.0], dtype=np.float32)
    x = tinytf.tensor(values, device=device)
    for op, reference in [(isnan, np.isnan), (isinf, np.isinf), (isfinite, np.isfinite)]:
        assert op(x).dtype == np.bool_ and not op(tinytf.tensor(values, requires_grad=True)).requires_grad
        np.testing.assert_array_equal(op(x).numpy(), reference(values))
        np.testing.assert_array_equal(op(tinytf.tensor([3, 0], device=device)).numpy(), reference(np.array([3, 0])))
        assert op(tinytf.tensor(np.inf, device=device)).shape == ()


@given(shape=small_shapes, seed=seeds, equal_nan=st.booleans())
@few_examples
def test_isclose_matches_numpy(shape, seed, equal_nan):
    a = random_array(seed, shape)
    distance = 10.0 ** np.random.default_rng(seed).integers(-9, -2, size=shape)  # some pairs close, some not
    b = np.where(random_array(seed + 1, shape) > 1.5, np.nan, a + distance)
    a = np.where(random_array(seed + 2, shape) > 1.5, np.nan, a)
    expected = np.isclose(a, b, rtol=1e-5, atol=1e-6, equal_nan=equal_nan)
    result = isclose(tinytf.tensor(a), tinytf.tensor(b), atol=1e-6, equal_nan=equal_nan)
    assert result.dtype == np.bool_
    np.testing.assert_array_equal(result.numpy(), expected)


def test_isclose_takes_python_scalars_and_mixed_dtypes(device):
    x = tinytf.tensor([1.0, 1.000005, 1.1], device=device)
    assert isclose(x, 1).tolist() == [True, True, False]
    assert isclose(tinytf.tensor([1, 2], device=device), tinytf.tensor([1.0, 2.5], device=device)).tolist() == [True,
                                                                                                               False]


LOGICAL = {"and": (logical_and, np.logical_and), "or": (logical_or, np.logical_or),
           "xor": (logical_xor, np.logical_xor)}


@pytest.mark.parametrize("name", sorted(LOGICAL))
def test_logical_ops_give_bool_for_any_dtypes(name, device):
    op, reference = LOGICAL[name]
    operands = [np.array([[0.0, 2.5, -1.0]]), np.array([[0], [3]]), np.array([True, False, True])]
    for a in operands:
        for b in operands:
            result = op(tinytf.tensor(a, device=device), tinytf.tensor(b, device=device))
            assert result.dtype == np.bool_ and result.device == tinytf.tensor(a, device=device).device
            np.testing.assert_array_equal(result.numpy(), reference(a, b))
    np.testing.assert_array_equal(op(tinytf.tensor([0.0, 1.0], device=device), True).numpy(), reference([0, 1], True))
    np.testing.assert_array_equal(logical_not(tinytf.tensor([0.0, 2.0], device=device)).numpy(), [True, False])


BITWISE = {"and": (bitwise_and, np.bitwise_and), "or": (bitwise_or, np.bitwise_or),
           "xor": (bitwise_xor, np.bitwise_xor)}


@pytest.mark.parametrize("name", sorted(BITWISE))
def test_bitwise_ops_on_integers_and_bools(name, device):
    op, reference = BITWISE[name]
    ints, flags = np.array([[5, -3, 0, 12]]), np.array([[True], [False]])
    for a, b, dtype in [(ints, ints[:, ::-1], np.int64), (flags, flags.T, np.bool_), (flags, ints, np.int64)]:
        result = op(tinytf.tensor(a, device=device), tinytf.tensor(b, device=device))
        assert result.dtype == dtype
        np.testing.assert_array_equal(result.numpy(), reference(a, b))
    small = tinytf.tensor([1, 6], dtype="int8", device=device)
    assert op(small, 3).dtype == np.int8  # a Python int takes the tensor's dtype
    assert op(small, tinytf.tensor([3, 3], dtype="int16", device=device)).dtype == np.int16
    with pytest.raises(TypeError, match=f"bitwise_{name}: needs integer or bool tensors, got dtype float32"):
        op(small, tinytf.tensor([1.0], device=device))


def test_bitwise_not_and_shifts(device):
    ints = tinytf.tensor([5, -3, 0], device=device)
    assert bitwise_not(ints).tolist() == [-6, 2, -1]
    assert bitwise_not(tinytf.tensor([True, False], device=device)).tolist() == [False, True]
    assert bitwise_left_shift(ints, 2).tolist() == [20, -12, 0]
    assert bitwise_right_shift(ints, tinytf.tensor([1, 1, 3], device=device)).tolist() == [2, -2, 0]  # sign-extending
    with pytest.raises(TypeError, match="bitwise_not: needs integer or bool tensors, got dtype float32"):
        bitwise_not(tinytf.tensor([1.0]))
    with pytest.raises(TypeError, match="bitwise_left_shift: needs integer tensors, got dtype bool"):
        bitwise_left_shift(tinytf.tensor([True]), 1)
    with pytest.raises(TypeError, match="bitwise_right_shift: needs integer tensors, got dtype float32"):
        bitwise_right_shift(ints, 1.0)
