import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from op_check import check_op, random_array, shapes_with_empty, small_shapes

import tinytf
import tinytf.functional as F
from tinytf.functional.shape import diag, flip, meshgrid, pad, repeat, repeat_interleave, roll, tile, tril, triu

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


def test_squeeze_accepts_dims_0_and_minus_1_on_a_0d_tensor():
    check_op(lambda x: x.squeeze(-1), lambda x: x, np.array(2.0))
    check_op(lambda x: F.squeeze(x, 0), lambda x: x, np.array(2.0))
    with pytest.raises(IndexError, match=r"squeeze: dimension 1 is out of range .* \[-1, 0\]"):
        tinytf.tensor(2.0).squeeze(1)


def test_out_of_range_dims_are_index_errors_naming_the_range():
    x = tinytf.randn(2, 3)
    with pytest.raises(IndexError, match=r"transpose: dimension 2 is out of range .* \[-2, 1\]"):
        x.transpose(0, 2)
    with pytest.raises(IndexError, match=r"unsqueeze: dimension -4 is out of range .* \[-3, 2\]"):
        x.unsqueeze(-4)
    with pytest.raises(IndexError, match="cat: dimension 2"):
        F.cat([x, x], 2)
    with pytest.raises(IndexError, match="flip: dimension 5"):
        flip(x, 5)
    with pytest.raises(IndexError, match="roll: dimension -3"):
        roll(x, 1, -3)


@settings(max_examples=10)
@given(shape=small_shapes, seed=seeds, data=st.data())
def test_flip_and_roll_match_numpy(shape, seed, data):
    a = random_array(seed, shape)
    extent = max(len(shape), 1)  # a 0-d tensor takes the dims 0 and -1
    dims = data.draw(st.lists(st.integers(-extent, extent - 1), max_size=2, unique_by=lambda d: d % extent))
    check_op(lambda x: flip(x, dims), lambda x: np.flip(x, [d % max(x.ndim, 1) for d in dims]) if x.ndim else x, a)
    shifts = [data.draw(st.integers(-7, 7)) for _ in dims]
    check_op(lambda x: roll(x, shifts, dims), lambda x: np.roll(x, shifts, dims) if x.ndim else x, a)
    check_op(lambda x: roll(x, 3), lambda x: np.roll(x, 3), a)


@settings(max_examples=10)
@given(shape=shapes_with_empty, seed=seeds, data=st.data())
def test_repeat_and_tile_follow_pytorch(shape, seed, data):
    a = random_array(seed, shape)
    repeats = data.draw(st.lists(st.integers(0, 3), min_size=len(shape), max_size=len(shape) + 1))
    check_op(lambda x: repeat(x, *repeats), lambda x: np.tile(x, repeats), a)
    check_op(lambda x: tile(x, repeats[:1]), lambda x: np.tile(x, repeats[:1]), a)


def test_repeat_interleave_with_int_and_tensor_repeats():
    a = random_array(0, (2, 3))
    check_op(lambda x: repeat_interleave(x, 2), lambda x: np.repeat(x, 2), a)
    check_op(lambda x: repeat_interleave(x, tinytf.tensor([1, 0, 3], device=x.device), dim=-1),
             lambda x: np.repeat(x, [1, 0, 3], axis=1), a)
    check_op(lambda x: repeat_interleave(x, tinytf.tensor([2]), dim=0), lambda x: np.repeat(x, 2, axis=0), a)
    check_op(lambda x: repeat_interleave(x, 3), lambda x: np.repeat(x, 3), np.array(1.5))
    with pytest.raises(ValueError, match="2 repeats for dimension 1 of size 3"):
        repeat_interleave(tinytf.tensor(a), tinytf.tensor([1, 2]), dim=1)


@pytest.mark.parametrize("diagonal", [-2, 0, 1, 4])
def test_tril_triu_and_diag_match_numpy(diagonal):
    a = random_array(diagonal + 10, (2, 3, 4))
    check_op(lambda x: tril(x, diagonal), lambda x: np.tril(x, diagonal), a)
    check_op(lambda x: triu(x, diagonal), lambda x: np.triu(x, diagonal), a)
    check_op(lambda x: diag(x, diagonal), lambda x: np.diag(x, diagonal), a[0])
    check_op(lambda x: diag(x, diagonal), lambda x: np.diag(x, diagonal), a[0, 0])


def test_triu_of_infinities_keeps_zeros_below_the_diagonal():
    causal = triu(tinytf.full((3, 3), -np.inf), 1).numpy()
    np.testing.assert_array_equal(causal, np.triu(np.full((3, 3), -np.inf), 1))
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        tril(tinytf.ones(3))
    with pytest.raises(ValueError, match="1-D or 2-D"):
        diag(tinytf.tensor(1.0))


PADS = [(1, 2), (0, 1, 2, 0), (2, 2, 1, 1, 0, 1)]
CROPS = [(-1, 2), (1, -2, 0, 0)]  # negative widths crop, in constant mode only


MODES = ("constant", "reflect", "replicate")


@pytest.mark.parametrize("widths, mode", [(w, mode) for w in PADS for mode in MODES] + [(w, "constant") for w in CROPS],
                         ids=str)
def test_pad_matches_numpy_with_pytorch_order(widths, mode):
    a = random_array(5, (2, 3, 4))
    numpy_widths = [(0, 0)] * (3 - len(widths) // 2) + [(widths[2 * k], widths[2 * k + 1])
                                                         for k in reversed(range(len(widths) // 2))]

    def reference(x):
        crop = tuple(slice(max(-before, 0), n - max(-after, 0)) for (before, after), n in zip(numpy_widths, x.shape))
        grow = [(max(before, 0), max(after, 0)) for before, after in numpy_widths]
        if mode == "constant":
            return np.pad(x[crop], grow, constant_values=-1.5)
        return np.pad(x, grow, mode={"reflect": "reflect", "replicate": "edge"}[mode])

    check_op(lambda x: pad(x, widths, mode=mode, value=-1.5), reference, a)


def test_pad_errors_follow_pytorch():
    x = tinytf.randn(2, 3)
    with pytest.raises(ValueError, match="even number of widths"):
        pad(x, (1, 2, 3))
    with pytest.raises(ValueError, match="at most 2 per dimension"):
        pad(x, (1,) * 6)
    with pytest.raises(ValueError, match=r"got \(3, 0\) for dimension 1 of size 3"):
        pad(x, (3, 0), mode="reflect")
    with pytest.raises(ValueError, match="mode must be one of"):
        pad(x, (1, 1), mode="circular")


@pytest.mark.parametrize("indexing", ["ij", "xy"])
def test_meshgrid_matches_numpy_and_is_differentiable(indexing):
    a, b, c = random_array(6, (2,)), random_array(7, (3,)), random_array(8, ())
    check_op(lambda x, y, z: F.stack(meshgrid(x, y, z, indexing=indexing)),
             lambda x, y, z: np.stack(np.meshgrid(x, y, z, indexing=indexing)), a, b, c)
    check_op(lambda x: meshgrid([x], indexing=indexing)[0], lambda x: x, a)
