import numpy as np
import pytest

import tinytf
from devices import DEVICES_AND_SECOND_GPU
from tinytf.creation import eye, linspace, tril_indices, triu_indices


def test_tensor_dtypes_follow_pytorch():
    assert tinytf.tensor([1.0, 2.0]).dtype == np.float32
    assert tinytf.tensor([1, 2]).dtype == np.int64
    assert tinytf.tensor([True]).dtype == np.bool_
    assert tinytf.tensor(np.ones(2)).dtype == np.float64
    assert tinytf.tensor([1, 2], dtype="float64").dtype == np.float64
    # a Python float asked for in float64 keeps its 53 bits, not float32's 24 (PyTorch's behaviour)
    assert tinytf.tensor(0.8813735870195432, dtype=tinytf.float64).item() == 0.8813735870195432
    assert tinytf.tensor([0.1], dtype="float16").item() == np.float16(0.1)  # rounded once, to float16


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


@pytest.mark.parametrize("device", DEVICES_AND_SECOND_GPU)
def test_eye_and_linspace_match_numpy_on_each_device(device):
    identity = eye(3, device=device)
    assert identity.dtype == np.float32 and identity.device == tinytf.zeros(1, device=device).device
    np.testing.assert_array_equal(identity.numpy(), np.eye(3))
    np.testing.assert_array_equal(eye(2, 4, dtype="int64", device=device).numpy(), np.eye(2, 4, dtype=np.int64))
    assert eye(0, 2).shape == (0, 2)
    values = linspace(-1, 2, 7, device=device)
    assert values.dtype == np.float32
    np.testing.assert_allclose(values.numpy(), np.linspace(-1, 2, 7), rtol=1e-6)
    np.testing.assert_array_equal(linspace(0, 10, 4, dtype="int64", device=device).numpy(), [0, 3, 6, 10])
    assert linspace(0, 1, 0).shape == (0,) and linspace(3, 5, 1).numpy().tolist() == [3.0]
    assert linspace(0.0, 1.0, 3, requires_grad=True).requires_grad
    with pytest.raises(ValueError, match="steps must be non-negative"):
        linspace(0, 1, -1)


@pytest.mark.parametrize("row, col, offset", [(3, 3, 0), (3, 4, 1), (4, 3, -1), (2, 5, -3), (0, 0, 0)])
def test_triangle_indices_match_numpy(row, col, offset):
    for device in DEVICES_AND_SECOND_GPU:
        lower, upper = tril_indices(row, col, offset, device=device), triu_indices(row, col, offset, device=device)
        assert lower.dtype == np.int64 and lower.shape[0] == 2
        np.testing.assert_array_equal(lower.numpy(), np.stack(np.tril_indices(row, offset, col)).reshape(2, -1))
        np.testing.assert_array_equal(upper.numpy(), np.stack(np.triu_indices(row, offset, col)).reshape(2, -1))
    assert tril_indices(3, 3, dtype="int32").dtype == np.int32
    with pytest.raises(TypeError, match="integer type"):
        triu_indices(3, 3, dtype="float32")
