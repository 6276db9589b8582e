"""Attention dropout: Philox4x32-10 against the published known answers, the keep mask's counter layout and
statistics, and scaled_dot_product_attention's dropout built from it."""

from __future__ import annotations

import numpy as np
import pytest

import tinytf
from attention.attention_reference import reference_attention
from tinytf import backend
from tinytf.attention import scaled_dot_product_attention
from tinytf.attention import dropout
from tinytf.attention.dropout import dropout_keep, philox4x32
from tinytf.testing import gradcheck

# Random123's kat_vectors, philox4x32 with 10 rounds: (counter, key) -> output.
PHILOX_KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def array_module(device):
    return backend.get_array_module(backend.to_device(np.zeros(1), device))


def test_philox_matches_the_random123_known_answers(device):
    xp = array_module(device)
    with backend.device_scope(backend.canonical_device(device)):
        for counter, key, expected in PHILOX_KNOWN_ANSWERS:
            words = philox4x32(*(xp.asarray([c], dtype=np.uint32) for c in counter), *key, xp)
            assert [int(w[0]) for w in words] == list(expected)
            assert all(w.dtype == np.uint32 for w in words)


def test_philox_broadcasts_its_counter_words():
    """A batch of counters gives, element by element, what one counter at a time gives."""
    c0, c1, c2 = np.arange(3)[:, None, None], np.arange(4)[None, :, None] + 7, np.arange(5)[None, None, :] * 1000
    batched = philox4x32(c0, c1, c2, 9, 0x12345678, 0x9ABCDEF0, np)
    assert batched[0].shape == (3, 4, 5)
    for index in [(0, 0, 0), (2, 3, 4), (1, 2, 3)]:
        one = philox4x32(c0[index[0], 0, 0], c1[0, index[1], 0], c2[0, 0, index[2]], 9, 0x12345678, 0x9ABCDEF0, np)
        assert [int(w[index]) for w in batched] == [int(w) for w in one]


def test_dropout_keep_reads_word_zero_of_the_spec_counter_layout():
    seed, offset, p = (7 << 32) | 123, 5, 0.4
    keep = dropout_keep(seed, offset, np.arange(6)[:, None, None], np.arange(3)[None, :, None],
                        np.arange(4)[None, None, :], p, np)
    assert keep.shape == (6, 3, 4) and keep.dtype == bool
    threshold = int(np.floor(p * 2**32))
    for bh in range(6):
        for i in range(3):
            for j in range(4):
                u = int(philox4x32(j, i, bh, offset, 123, 7, np)[0])
                assert keep[bh, i, j] == (u >= threshold)


def test_dropout_keep_in_blocks_equals_philox_on_the_whole_array():
    """dropout_keep runs the rounds block by block (several blocks here)."""
    bh, i, j = np.arange(3)[:, None, None] + 5, np.arange(200)[None, :, None], np.arange(300)[None, None, :]
    u = philox4x32(j, i, bh, 11, 0xDEADBEEF, 0x12345, np)[0]
    np.testing.assert_array_equal(dropout_keep((0x12345 << 32) | 0xDEADBEEF, 11, bh, i, j, 0.7, np),
                                  u >= np.uint32(int(0.7 * 2**32)))


# (batch_heads, query_positions, key_positions) shapes: the naive backend's, flash's key-major tile, and others
LAYOUTS = [((5, 1, 1), (1, 7, 1), (1, 1, 9)), ((1, 3, 8), (1, 1, 8), (6, 1, 1)), ((4, 1), (4, 1), (1, 5)),
           ((2, 1, 3, 1), (1, 1, 3, 4), (1, 5, 1, 1)), ((7,), (7,), (7,)), ((), (), ()), ((3, 1), (1,), (3, 4))]


def random_dropout_case(rng, shapes):
    """Positions of all 32 bits, a 64-bit seed (its high word a key word too), an offset and a probability."""
    bh, i, j = (rng.integers(0, 2**32, shape, dtype=np.uint64) for shape in shapes)
    return int(rng.integers(0, 2**64, dtype=np.uint64)), int(rng.integers(0, 2**32)), bh, i, j, rng.random()


def philox_keep(seed, offset, bh, i, j, p):
    """The study version's mask: word 0 of philox4x32 at counter (j, i, bh, offset) against the threshold."""
    return philox4x32(j, i, bh, offset, seed & 0xFFFFFFFF, seed >> 32, np)[0] >= np.uint32(np.floor(p * 2**32))


@pytest.mark.parametrize("shapes", LAYOUTS)
def test_dropout_keep_equals_philox_on_random_counters_keys_and_shapes(shapes):
    rng = np.random.default_rng(LAYOUTS.index(shapes))
    for _ in range(3):
        seed, offset, bh, i, j, p = random_dropout_case(rng, shapes)
        keep = dropout_keep(seed, offset, bh, i, j, p, np)
        assert keep.dtype == bool and keep.shape == np.broadcast_shapes(*shapes)
        np.testing.assert_array_equal(keep, philox_keep(seed, offset, bh, i, j, p))


@pytest.mark.parametrize("block_elements, shapes", [
    (12, ((4, 1, 1), (1, 6, 1), (1, 1, 5))),  # runs along the middle axis, the leading axis one index at a time
    (7, ((3, 1, 1), (1, 2, 1), (1, 1, 11))),  # a row of the last axis longer than a block: runs along it
    (80, ((1, 5, 8), (1, 1, 8), (9, 1, 1))),  # flash's layout: runs of two keys, the last one short
])
def test_dropout_keep_in_small_and_ragged_blocks_equals_philox(monkeypatch, block_elements, shapes):
    monkeypatch.setattr(dropout, "_BLOCK_ELEMENTS", block_elements)
    seed, offset, bh, i, j, p = random_dropout_case(np.random.default_rng(block_elements), shapes)
    np.testing.assert_array_equal(dropout_keep(seed, offset, bh, i, j, p, np), philox_keep(seed, offset, bh, i, j, p))


def test_dropout_keep_on_random_counters_is_the_same_on_every_device(device):
    xp = array_module(device)
    seed, offset, bh, i, j, p = random_dropout_case(np.random.default_rng(5), LAYOUTS[1])
    with backend.device_scope(backend.canonical_device(device)):
        keep = dropout_keep(seed, offset, *(xp.asarray(x) for x in (bh, i, j)), p, xp)
    np.testing.assert_array_equal(backend.to_numpy(keep), philox_keep(seed, offset, bh, i, j, p))


def test_dropout_keep_fraction_is_within_a_binomial_bound():
    p, n = 0.3, 64 * 64 * 16
    keep = dropout_keep(2**64 - 1, 0, np.arange(16)[:, None, None], np.arange(64)[None, :, None],
                        np.arange(64)[None, None, :], p, np)
    # 5 standard deviations of a binomial(n, 1 - p) count: a correct generator fails this once in ~3.5 million runs
    assert abs(keep.sum() - n * (1 - p)) <= 5 * np.sqrt(n * p * (1 - p))


def test_same_seed_same_mask_and_a_new_offset_or_seed_a_new_mask():
    positions = np.arange(8)[:, None, None], np.arange(32)[None, :, None], np.arange(32)[None, None, :]
    first = dropout_keep(42, 0, *positions, 0.5, np)
    np.testing.assert_array_equal(first, dropout_keep(42, 0, *positions, 0.5, np))
    for other in (dropout_keep(42, 1, *positions, 0.5, np), dropout_keep(43, 0, *positions, 0.5, np),
                  dropout_keep(42 + (1 << 32), 0, *positions, 0.5, np)):
        assert 0.4 < (other != first).mean() < 0.6  # independent masks differ in about half the places


def test_dropout_keep_is_the_same_on_every_device(device):
    xp = array_module(device)
    with backend.device_scope(backend.canonical_device(device)):
        keep = dropout_keep(2**40 + 3, 2, xp.arange(4)[:, None, None], xp.arange(9)[None, :, None],
                            xp.arange(11)[None, None, :], 0.25, xp)
    np.testing.assert_array_equal(backend.to_numpy(keep), dropout_keep(
        2**40 + 3, 2, np.arange(4)[:, None, None], np.arange(9)[None, :, None], np.arange(11)[None, None, :], 0.25, np))


@pytest.mark.parametrize("p", [0.0, 2**-33])
def test_a_probability_below_one_draw_keeps_everything(p):
    assert dropout_keep(1, 0, np.arange(4)[:, None], np.arange(4)[None, :], np.arange(1), p, np).all()


# --- through scaled_dot_product_attention ---------------------------------------------------------------------------


def spec_keep(seed, offset, B, Hq, T, S, p):
    """The keep mask (B, Hq, T, S) of the issue's counter layout: counter (j, i, b * Hq + h, offset)."""
    keep = dropout_keep(seed, offset, np.arange(B * Hq)[:, None, None], np.arange(T)[None, :, None],
                        np.arange(S)[None, None, :], p, np)
    return keep.reshape(B, Hq, T, S)


def inputs(B=2, Hq=4, Hkv=2, T=6, S=9, D=5, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape) for shape in ((B, Hq, T, D), (B, Hkv, S, D), (B, Hkv, S, D), (B, Hq, T, D))]


def test_naive_dropout_drops_the_weights_the_counter_layout_names():
    q, k, v, dO = inputs()
    seed, offset, p = 2**63 + 11, 3, 0.3
    tensors = [tinytf.tensor(x, requires_grad=True) for x in (q, k, v)]
    out = scaled_dot_product_attention(*tensors, dropout_p=p, is_causal=True, dropout_seed=seed,
                                       dropout_offset=offset, backend="naive")
    out.backward(dO)
    want = reference_attention(q, k, v, dO, is_causal=True, dropout_keep=spec_keep(seed, offset, 2, 4, 6, 9, p),
                               dropout_p=p)
    for got, expected in zip((out.numpy(), *(t.grad for t in tensors)), want):
        np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ["naive", "flash"])
def test_dropout_is_reproducible_from_its_seed_and_offset(backend):
    q, k, v, _ = (tinytf.tensor(x) for x in inputs(seed=1))

    def attention(**options):
        return scaled_dot_product_attention(q, k, v, dropout_p=0.5, backend=backend, **options).numpy()

    first = attention(dropout_seed=5)
    np.testing.assert_array_equal(first, attention(dropout_seed=5))
    assert not np.array_equal(first, attention(dropout_seed=5, dropout_offset=1))
    assert not np.array_equal(first, attention(dropout_seed=6))
    tinytf.manual_seed(0)
    drawn = attention()
    tinytf.manual_seed(0)
    np.testing.assert_array_equal(drawn, attention())  # no seed given: drawn from tinytf's seeded generator
    assert not np.array_equal(drawn, attention())


def test_gradcheck_through_dropout_with_a_fixed_seed():
    q, k, v, _ = inputs(B=1, Hq=2, Hkv=1, T=3, S=4, D=3, seed=2)
    assert gradcheck(lambda q, k, v: scaled_dot_product_attention(q, k, v, dropout_p=0.4, dropout_seed=9,
                                                                  softcap=2.0, backend="naive"),
                     *(tinytf.tensor(x, requires_grad=True) for x in (q, k, v)))


def test_dropout_gives_the_same_attention_on_every_device(device):
    """The mask is a function of the position, so each device's "auto" backend draws the CPU naive one."""
    q, k, v, _ = (x.astype(np.float32) for x in inputs(seed=3))
    options = dict(dropout_p=0.25, dropout_seed=77, dropout_offset=2, is_causal=True, window=(3, 0),
                   alibi_slopes=np.array([0.1, 0.2, 0.3, 0.4], np.float32))
    got = scaled_dot_product_attention(*(tinytf.tensor(x, device=device) for x in (q, k, v)), **options)
    want = reference_attention(q, k, v, is_causal=True, window=(3, 0), alibi_slopes=options["alibi_slopes"],
                               dropout_keep=spec_keep(77, 2, 2, 4, 6, 9, 0.25), dropout_p=0.25)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)
