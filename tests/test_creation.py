import numpy as np
import pytest

import tinytf


def test_tensor_dtypes_follow_pytorch():
    assert tinytf.tensor([1.0, 2.0]).dtype == np.float32
    assert tinytf.tensor([1, 2]).dtype == np.int64
    assert tinytf.tensor([True]).dtype == np.bool_
    assert tinytf.tensor(np.ones(2)).dtype == np.float64
    assert tinytf.tensor([1, 2], dtype="float64").dtype == np.float64


def test_tensor_copies_its_input():
    data = np.ones(3)
    x = tinytf.tensor(data)
    data[0] = 5
    assert x.numpy()[0] == 1


def test_filled_and_range_constructors():
    assert tinytf.zeros(2, 3).shape == (2, 3) and tinytf.zeros((2, 3)).dtype == np.float32
    np.testing.assert_array_equal(tinytf.ones(2).numpy(), [1, 1])
    np.testing.assert_array_equal(tinytf.full((2,), 7.0).numpy(), [7, 7])
    np.testing.assert_array_equal(tinytf.arange(4).numpy(), [0, 1, 2, 3])
    assert tinytf.arange(4).dtype == np.int64 and tinytf.arange(0.0, 1.0, 0.5).dtype == np.float32
    like = tinytf.zeros_like(tinytf.tensor(np.ones((2, 2))))
    assert like.shape == (2, 2) and like.dtype == np.float64
    assert tinytf.ones_like(like).numpy().sum() == 4
    assert tinytf.full_like(like, 3.0).numpy().sum() == 12


def test_random_draws_are_reproducible_with_manual_seed():
    tinytf.manual_seed(0)
    a, b = tinytf.randn(3, 4), tinytf.rand(5)
    tinytf.manual_seed(0)
    np.testing.assert_array_equal(a.numpy(), tinytf.randn(3, 4).numpy())
    np.testing.assert_array_equal(b.numpy(), tinytf.rand(5).numpy())
    assert a.dtype == np.float32 and 0 <= b.numpy().min() and b.numpy().max() < 1
    assert tinytf.randn_like(a).shape == a.shape and tinytf.rand_like(a).shape == a.shape


def test_bad_data_and_dtypes_are_refused():
    with pytest.raises(TypeError, match="numeric tensor"):
        tinytf.tensor(["a", "b"])
    with pytest.raises(TypeError, match="unknown dtype"):
        tinytf.zeros(2, dtype="float33")
