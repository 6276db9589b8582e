import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from op_check import check_op, random_array

import tinytf
import tinytf.functional as F

seeds = st.integers(0, 2**32 - 1)
shapes = st.lists(st.integers(1, 4), min_size=1, max_size=4).map(tuple)


@given(shape=shapes, seed=seeds, data=st.data())
def test_reshape_view_flatten(shape, seed, data):
    a = random_array(seed, shape)
    new_shape = data.draw(st.permutations(shape))
    check_op(lambda x: x.reshape(*new_shape), lambda x: x.reshape(new_shape), a)
    check_op(lambda x: x.view(-1), lambda x: x.reshape(-1), a)
    check_op(lambda x: x.flatten(1) if x.ndim > 1 else x.flatten(), lambda x: x.reshape(x.shape[0], -1) if x.ndim > 1 else x, a)


@given(shape=shapes, seed=seeds, data=st.data())
def test_permute_transpose_swapaxes(shape, seed, data):
    a = random_array(seed, shape)
    axes = data.draw(st.permutations(range(len(shape))))
    check_op(lambda x: x.permute(*axes), lambda x: x.transpose(axes), a)
    i, j = data.draw(st.integers(0, len(shape) - 1)), data.draw(st.integers(0, len(shape) - 1))
    check_op(lambda x: x.transpose(i, j), lambda x: np.swapaxes(x, i, j), a)
    check_op(lambda x: F.swapaxes(x, i, j), lambda x: np.swapaxes(x, i, j), a)


@given(shape=shapes, seed=seeds, data=st.data())
def test_unsqueeze_squeeze_expand(shape, seed, data):
    a = random_array(seed, shape)
    dim = data.draw(st.integers(-len(shape) - 1, len(shape)))
    check_op(lambda x: x.unsqueeze(dim), lambda x: np.expand_dims(x, dim), a)
    check_op(lambda x: x.squeeze(), lambda x: np.squeeze(x), a)
    target = tuple(data.draw(st.integers(1, 3)) if n == 1 else n for n in shape)
    target = (2,) + target
    check_op(lambda x: x.expand(*target), lambda x: np.broadcast_to(x, target), a)


INDICES = [
    (1,), (slice(None, None, 2),), (Ellipsis, 0), (None, slice(1, 3)), (slice(None), None, -1),
    (np.array([0, 2, 2, 1, 0]),), (slice(None), np.array([[1, 1], [0, 2]])), (np.array([True, False, True, True]),),
]


@pytest.mark.parametrize("index", INDICES, ids=repr)
@given(seed=seeds)
def test_getitem_gathers_and_scatters_with_accumulation(index, seed):
    a = random_array(seed, (4, 3, 2))
    check_op(lambda x: x[index], lambda x: x[index], a)


def test_getitem_with_tensor_index_repeats_accumulate():
    x = tinytf.tensor([1.0, 2.0, 3.0], requires_grad=True)
    x[tinytf.tensor([0, 0, 2, 0])].sum().backward()
    np.testing.assert_array_equal(x.grad, [3.0, 0.0, 1.0])


@given(seed=seeds, dim=st.integers(-3, 2), sizes=st.lists(st.integers(0, 3), min_size=1, max_size=4))
def test_cat_and_split_are_inverse(seed, dim, sizes):
    arrays = []
    for k, size in enumerate(sizes):
        shape = [2, 3, 2]
        shape[dim] = size
        arrays.append(random_array(seed + k, tuple(shape)))
    check_op(lambda *xs: F.cat(xs, dim=dim), lambda *xs: np.concatenate(xs, axis=dim), *arrays)
    joined = F.cat([tinytf.tensor(a) for a in arrays], dim)
    for piece, array in zip(F.split(joined, sizes, dim), arrays):
        np.testing.assert_array_equal(piece.numpy(), array)


@given(seed=seeds, count=st.integers(1, 4), dim=st.integers(-3, 2))
def test_stack_matches_numpy(seed, count, dim):
    arrays = [random_array(seed + k, (2, 3)) for k in range(count)]
    check_op(lambda *xs: F.stack(xs, dim), lambda *xs: np.stack(xs, axis=dim), *arrays)


@given(seed=seeds, length=st.integers(1, 9), size=st.integers(1, 4))
def test_split_by_size_and_chunk_follow_pytorch(seed, length, size):
    x = tinytf.tensor(random_array(seed, (length, 2)), requires_grad=True)
    pieces = x.split(size)
    assert [p.shape[0] for p in pieces] == [min(size, length - s) for s in range(0, length, size)]
    chunks = x.chunk(size)
    assert sum(c.shape[0] for c in chunks) == length and len(chunks) <= size
    F.cat([p * (k + 1) for k, p in enumerate(pieces)], 0).sum().backward()
    expected = np.repeat(np.arange(1, len(pieces) + 1), [p.shape[0] for p in pieces])[:, None] * np.ones((1, 2))
    np.testing.assert_array_equal(x.grad, expected)


def test_shape_errors_name_the_shapes():
    x = tinytf.randn(2, 3)
    with pytest.raises(ValueError, match=r"shape \(2, 3\) \(6 elements\) into \(4, 2\)"):
        x.reshape(4, 2)
    with pytest.raises(ValueError, match="not a permutation"):
        x.permute(0, 0)
    with pytest.raises(ValueError, match=r"cannot expand shape \(2, 3\)"):
        x.expand(2, 4)
    with pytest.raises(ValueError, match=r"differ outside dimension 0"):
        F.cat([x, tinytf.randn(2, 4)])
    with pytest.raises(ValueError, match="one shape"):
        F.stack([x, tinytf.randn(3, 2)])
    with pytest.raises(ValueError, match="add up to 4"):
        x.split([2, 2], dim=1)
    with pytest.raises(IndexError, match=r"shape \(2, 3\)"):
        x[5]
