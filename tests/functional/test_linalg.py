import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from op_check import check_op, random_array

import tinytf
import tinytf.functional as F

seeds = st.integers(0, 2**32 - 1)


@st.composite
def matmul_shapes(draw):
    """Operand shapes NumPy's matmul accepts: 1-D vectors, matrices, and broadcast batches."""
    n, k, m = draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(st.integers(1, 4))
    batch = draw(st.lists(st.integers(1, 3), max_size=2))
    batch_a = [n_ if draw(st.booleans()) else 1 for n_ in batch][draw(st.integers(0, len(batch))):]
    batch_b = [n_ if draw(st.booleans()) else 1 for n_ in batch][draw(st.integers(0, len(batch))):]
    a = (k,) if draw(st.booleans()) and not batch_a else (*batch_a, n, k)
    b = (k,) if draw(st.booleans()) and not batch_b else (*batch_b, k, m)
    return a, b


@given(shapes=matmul_shapes(), seed=seeds)
def test_matmul_matches_numpy_including_vectors_and_batches(shapes, seed):
    a, b = random_array(seed, shapes[0]), random_array(seed + 1, shapes[1])
    check_op(lambda x, y: x @ y, np.matmul, a, b)


@given(seed=seeds, leading=st.lists(st.integers(1, 3), max_size=2), bias=st.booleans())
def test_linear_matches_numpy(seed, leading, bias):
    x = random_array(seed, (*leading, 5))
    w = random_array(seed + 1, (3, 5))
    if bias:
        b = random_array(seed + 2, (3,))
        check_op(F.linear, lambda x, w, b: x @ w.T + b, x, w, b)
    else:
        check_op(F.linear, lambda x, w: x @ w.T, x, w)


def test_matmul_error_names_both_shapes():
    with pytest.raises(ValueError, match=r"matmul: \(2, 3\) @ \(4, 5\): inner dimensions 3 and 4 differ"):
        tinytf.randn(2, 3) @ tinytf.randn(4, 5)
    with pytest.raises(ValueError, match="batch dimensions"):
        tinytf.randn(2, 2, 3) @ tinytf.randn(3, 3, 4)
    with pytest.raises(ValueError, match="at least one dimension"):
        tinytf.tensor(2.0) @ tinytf.randn(3)


def test_linear_error_names_shapes():
    with pytest.raises(ValueError, match=r"input of shape \(2, 4\) does not fit weight of shape \(3, 5\)"):
        F.linear(tinytf.randn(2, 4), tinytf.randn(3, 5))
