"""PyTorch's type promotion, as a table: every row is what torch 2.x gives for the same expression (the rules are in
tinytf/functional/common.py's docstring). NumPy's own rules differ in the rows marked *: they would give float64."""

import numpy as np
import pytest

import tinytf
import tinytf.functional as F


def _t(values, dtype):
    return tinytf.tensor(np.array(values, dtype=dtype))


INTS, FLOATS32, FLOATS64 = _t([1, 2, 3], np.int64), _t([0.5, 1.5, 2.5], np.float32), _t([0.5, 1.5, 2.5], np.float64)
BOOLS, INT8, UINT8 = _t([True, False, True], bool), _t([1, -2, 3], np.int8), _t([1, 2, 3], np.uint8)
FLOAT16 = _t([0.5, 1.5, 2.5], np.float16)

PROMOTION = [
    ("int64 + Python float *", lambda: INTS + 0.5, "float32"),
    ("Python float * int64 *", lambda: 1.5 * INTS, "float32"),
    ("int64 / int64 *", lambda: INTS / INTS, "float32"),
    ("int64 / Python int *", lambda: INTS / 2, "float32"),
    ("exp(int64) *", lambda: F.exp(INTS), "float32"),
    ("sqrt(int64) *", lambda: F.sqrt(INTS), "float32"),
    ("sin(bool) *", lambda: F.sin(BOOLS), "float32"),
    ("logsumexp(int64) *", lambda: F.logsumexp(INTS, dim=0), "float32"),
    ("bool ** Python int", lambda: BOOLS**2, "int64"),
    ("int64 ** Python float *", lambda: INTS**0.5, "float32"),
    ("int64 + float32 *", lambda: INTS + FLOATS32, "float32"),
    ("float32 + 0-d float64 *", lambda: FLOATS32 + tinytf.tensor(np.float64(2.0)), "float32"),
    ("int64 + 0-d float64", lambda: INTS + tinytf.tensor(np.float64(2.0)), "float64"),
    ("float16 + int64", lambda: FLOAT16 + INTS, "float16"),
    ("float32 + float64", lambda: FLOATS32 + FLOATS64, "float64"),
    ("float32 + Python float", lambda: FLOATS32 + 0.1, "float32"),
    ("float16 * Python float", lambda: FLOAT16 * 3.0, "float16"),
    ("int64 + Python int", lambda: INTS + 7, "int64"),
    ("int64 ** Python int", lambda: INTS**2, "int64"),
    ("int8 + uint8", lambda: INT8 + UINT8, "int16"),
    ("int8 + Python int", lambda: INT8 + 1, "int8"),
    ("bool + Python int", lambda: BOOLS + 1, "int64"),
    ("bool + Python float", lambda: BOOLS + 1.5, "float32"),
    ("bool * bool", lambda: BOOLS * BOOLS, "bool"),
    ("maximum(int64, float32)", lambda: F.maximum(INTS, FLOATS32), "float32"),
    ("where(bool, int64, Python float)", lambda: F.where(BOOLS, INTS, 0.5), "float32"),
    ("int64 < Python float", lambda: INTS < 2.5, "bool"),
]


@pytest.mark.parametrize("expression, result, dtype", PROMOTION, ids=[row[0] for row in PROMOTION])
def test_promotion_follows_pytorch(expression, result, dtype):
    assert result().dtype == np.dtype(dtype)


def test_promoted_values_are_computed_in_the_promoted_dtype():
    np.testing.assert_array_equal((INTS / 2).numpy(), np.array([0.5, 1.0, 1.5], np.float32))
    np.testing.assert_array_equal((INTS + 0.1).numpy(), np.array([1, 2, 3], np.float32) + np.float32(0.1))


def test_a_float_input_keeps_its_gradient_through_a_promoted_op():
    x = tinytf.tensor([1.0, 2.0], requires_grad=True)
    (x * tinytf.tensor([3, 4])).sum().backward()
    assert x.grad.dtype == np.float32
    np.testing.assert_array_equal(x.grad, [3.0, 4.0])


# --- x ** y at the points where the calculus is undefined: PyTorch's conventions --------------------------------
def test_the_gradient_of_x_to_the_zero_is_zero_at_zero():
    x = tinytf.tensor([0.0, 2.0], requires_grad=True)
    (x**0).sum().backward()
    np.testing.assert_array_equal(x.grad, [0.0, 0.0])
    x, y = tinytf.tensor([0.0, 2.0], requires_grad=True), tinytf.tensor([0.0, 0.0], requires_grad=True)
    (x**y).sum().backward()
    np.testing.assert_array_equal(x.grad, [0.0, 0.0])
    np.testing.assert_allclose(y.grad, [0.0, np.log(2.0)], rtol=1e-6)


def test_the_gradient_of_x_to_the_zero_stays_zero_under_an_infinite_upstream_gradient():
    for exponent in (0, tinytf.tensor([0.0, 0.0])):
        x = tinytf.tensor([0.0, 2.0], requires_grad=True)
        (x**exponent).backward(np.array([np.inf, 1.0], dtype=np.float32))
        np.testing.assert_array_equal(x.grad, [0.0, 0.0])


def test_zero_and_negative_bases_follow_pytorch():
    x = tinytf.tensor([0.0, 0.0, -1.0, -2.0], requires_grad=True)
    y = tinytf.tensor([2.0, -1.0, 0.5, 2.0], requires_grad=True)
    (x**y).sum().backward()
    # torch 2.x: x.grad = [0, -inf, nan, -4], y.grad = [0, -inf, nan, nan] (log of a negative base)
    np.testing.assert_array_equal(x.grad, [0.0, -np.inf, np.nan, -4.0])
    np.testing.assert_array_equal(y.grad, [0.0, -np.inf, np.nan, np.nan])
