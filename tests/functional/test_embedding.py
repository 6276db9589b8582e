import importlib

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from op_check import check_op, random_array

import tinytf
import tinytf.functional as F

embedding_module = importlib.import_module("tinytf.functional.embedding")  # F.embedding is the function

seeds = st.integers(0, 2**32 - 1)


@given(seed=seeds, ids_shape=st.lists(st.integers(1, 4), min_size=1, max_size=2).map(tuple), vocab=st.integers(1, 6))
def test_embedding_gathers_rows_and_accumulates_repeated_ids(seed, ids_shape, vocab):
    ids = np.random.default_rng(seed).integers(0, vocab, size=ids_shape)
    check_op(lambda w: F.embedding(ids, w), lambda w: w[ids], random_array(seed, (vocab, 3)))


def test_embedding_gradient_touches_only_used_rows():
    w = tinytf.randn(5, 2, requires_grad=True)
    F.embedding(tinytf.tensor([[1, 1], [3, 1]]), w).sum().backward()
    np.testing.assert_array_equal(w.grad[:, 0], [0, 3, 0, 1, 0])


def test_embedding_errors_name_the_id_and_vocabulary():
    w = tinytf.randn(5, 2)
    with pytest.raises(IndexError, match="id 7 is out of range for a vocabulary of size 5"):
        F.embedding(tinytf.tensor([1, 7]), w)
    with pytest.raises(IndexError, match="id -1"):
        F.embedding(tinytf.tensor([-1]), w)
    with pytest.raises(TypeError, match="integers"):
        F.embedding(tinytf.tensor([1.0]), w)


def test_one_hot_matches_numpy():
    ids = np.array([[0, 2], [1, 2]])
    np.testing.assert_array_equal(F.one_hot(tinytf.tensor(ids), 4).numpy(), np.eye(4, dtype=np.int64)[ids])
    assert F.one_hot(tinytf.tensor([0, 3])).shape == (2, 4)
    with pytest.raises(IndexError, match=r"\[0, 3\)"):
        F.one_hot(tinytf.tensor([3]), 3)


@pytest.mark.parametrize("max_rows, chunk", [(0, 1 << 22), (1 << 20, 1 << 22), (1 << 20, 7)],
                         ids=["scatter-add", "one-hot", "one-hot in chunks"])
def test_embedding_backward_sums_repeated_ids_either_way(monkeypatch, max_rows, chunk):
    monkeypatch.setattr(embedding_module, "ONE_HOT_MAX_ROWS", max_rows)
    monkeypatch.setattr(embedding_module, "ONE_HOT_CHUNK", chunk)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 9, size=(5, 11))
    upstream = rng.standard_normal((5, 11, 4))
    w = tinytf.tensor(rng.standard_normal((9, 4)), requires_grad=True)
    F.embedding(ids, w).backward(upstream)
    expected = np.zeros((9, 4))
    np.add.at(expected, ids.reshape(-1), upstream.reshape(-1, 4))
    np.testing.assert_allclose(w.grad, expected, rtol=1e-12, atol=1e-12)
