import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from op_check import check_op, random_array

import tinytf
import tinytf.functional as F
from tinytf.functional.linalg import einsum, outer

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


EINSUMS = [
    ("ij,jk->ik", [(2, 3), (3, 4)]),  # matmul
    ("bij,bjk->bik", [(2, 2, 3), (2, 3, 1)]),  # batched, with a size-1 dimension
    ("...ij,...jk", [(5, 2, 3), (1, 3, 4)]),  # ellipsis and implicit output, broadcasting a size-1 batch
    ("i,j->ij", [(3,), (2,)]),  # outer
    ("ij->", [(2, 3)]),  # sum of everything
    ("ij->j", [(2, 0)]),  # a size-0 dimension
    ("ii->i", [(3, 3)]),  # diagonal: a repeated subscript
    ("iij->j", [(2, 2, 4)]),  # trace over a repeated pair, with a letter kept
    ("i,i", [(1,), (3,)]),  # a size-1 operand broadcast against another
    ("Ab,bA->", [(2, 3), (3, 2)]),  # upper-case letters
    ("i,ij,jk->ik", [(2,), (2, 3), (3, 2)]),  # three operands
    ("", [()]),  # a 0-d operand
]


@pytest.mark.parametrize("equation, shapes", EINSUMS, ids=[equation or "0-d" for equation, _ in EINSUMS])
def test_einsum_matches_numpy_and_its_gradients_are_einsums(equation, shapes):
    arrays = [random_array(k, shape) for k, shape in enumerate(shapes)]
    check_op(lambda *xs: einsum(equation, *xs), lambda *xs: np.einsum(equation, *xs), *arrays)


def test_einsum_takes_operands_as_a_list_and_outer_is_its_special_case():
    a, b = random_array(0, (3,)), random_array(1, (4,))
    check_op(lambda x, y: einsum("i,j", [x, y]), np.outer, a, b)
    check_op(outer, np.outer, a, b)


def test_einsum_errors_name_the_problem():
    a = tinytf.randn(2, 3)
    with pytest.raises(ValueError, match="names 2 operands, got 1"):
        einsum("ij,jk->ik", a)
    with pytest.raises(ValueError, match=r"subscripts 'ijk' do not fit an operand of shape \(2, 3\)"):
        einsum("ijk->i", a)
    with pytest.raises(ValueError, match="subscript j has sizes 3 and 2"):
        einsum("ij,jk->ik", a, a)
    with pytest.raises(ValueError, match="each output subscript must appear once"):
        einsum("ij->k", a)
    with pytest.raises(ValueError, match="must be letters"):
        einsum("i1->i", a)
    with pytest.raises(ValueError, match="two 1-D tensors"):
        outer(a, a)
