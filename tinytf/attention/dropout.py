"""Attention dropout from a counter-based generator, so a backward can regenerate the forward's mask.

A stateful generator hands out numbers in call order; the tiled backends (flash, cuda) visit the attention weights
in a different order in the backward than in the forward, and keep no (T, S) mask. Philox4x32-10 (Salmon et al.,
"Parallel Random Numbers: As Easy as 1, 2, 3", SC 2011; the generator of Random123, cuRAND and PyTorch) is a
function instead: the bits of weight (b, h, i, j) are philox(counter, key) with

    counter = (j, i, b * Hq + h, offset)     key = (seed & 0xFFFFFFFF, seed >> 32)

so any backend, in any order, on any device, computes the same mask. Word 0 of the output, u, keeps the weight when
u >= floor(p * 2**32), which happens with probability 1 - p (to within 2**-32).

philox4x32 is the generator as the paper writes it, the study version; dropout_keep is the tuned one, tested equal
to it (its docstring lists the tricks).
"""

from __future__ import annotations

import math

import numpy as np

from .. import backend
from ..functional.common import BLOCK_BYTES

PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57  # the round multipliers
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85  # the key schedule's increments (golden ratio, sqrt(3) - 1)
PHILOX_ROUNDS = 10
_LOW_32 = np.uint64(0xFFFFFFFF)
_32 = np.uint64(32)


def philox_round(c0, c1, c2, c3, k0, k1):
    """One Philox4x32 round on uint64 arrays holding 32-bit words (broadcast against each other): the two
    32 x 32 -> 64-bit products, exact in uint64, their high halves mixed with the other words and the round key."""
    product0 = c0 * np.uint64(PHILOX_M0)
    product1 = c2 * np.uint64(PHILOX_M1)
    return ((product1 >> _32) ^ c1 ^ k0, product1 & _LOW_32, (product0 >> _32) ^ c3 ^ k1, product0 & _LOW_32)


def philox4x32(c0, c1, c2, c3, k0, k1, xp):
    """Philox4x32-10 of the counter (c0, c1, c2, c3) under the key (k0, k1): four uint32 arrays.

    Arguments are uint32-valued integer arrays or ints, broadcast against each other; xp is numpy or cupy. The
    32 x 32 -> 64-bit products are computed in uint64, which holds them exactly, so only plain array ops are used.
    """
    c0, c1, c2, c3, k0, k1 = (xp.asarray(x, dtype=np.uint64) for x in (c0, c1, c2, c3, k0, k1))
    for round_index in range(PHILOX_ROUNDS):
        if round_index:
            k0 = (k0 + np.uint64(PHILOX_W0)) & _LOW_32
            k1 = (k1 + np.uint64(PHILOX_W1)) & _LOW_32
        c0, c1, c2, c3 = philox_round(c0, c1, c2, c3, k0, k1)
    return tuple(word.astype(np.uint32) for word in xp.broadcast_arrays(c0, c1, c2, c3))


def round_keys(k0: int, k1: int) -> list[tuple[np.uint64, np.uint64]]:
    """The key of each of the ten rounds, as philox4x32 steps it: (k0, k1), then plus (W0, W1) a round, mod 2**32."""
    return [(np.uint64((k0 + r * PHILOX_W0) & 0xFFFFFFFF), np.uint64((k1 + r * PHILOX_W1) & 0xFFFFFFFF))
            for r in range(PHILOX_ROUNDS)]


def dropout_threshold(dropout_p: float) -> int:
    """floor(dropout_p * 2**32): a weight is kept when its uint32 draw is at least this."""
    return math.floor(dropout_p * 2**32)


# dropout_keep's blocks: its three uint64 buffers of two words per element (48 bytes) stay in the L2 cache.
_BLOCK_ELEMENTS = BLOCK_BYTES // 8


def dropout_keep(seed: int, offset: int, batch_heads, query_positions, key_positions, dropout_p: float, xp):
    """bool array, True where the attention weight is kept (the broadcast shape of the three position arrays).

    batch_heads holds b * Hq + h, query_positions i, key_positions j: integer arrays broadcast against each other,
    e.g. shapes (B*Hq, 1, 1), (1, T, 1), (1, 1, S). seed: a 64-bit int; offset: counter word 3 (a 32-bit int).

    philox4x32's ten rounds, bit for bit, with these tricks:
    - the early rounds on the position arrays: each counter word is a function of one position array (or a
      constant), and round 1's words and round 2's products are functions of at most two; words fill the block
      only from round 2 on (_rounds_two_and_three);
    - blocks (_blocks) of at most _BLOCK_ELEMENTS, whose buffers stay in the L2 cache through all rounds;
    - words 0 and 2 stacked (_stacked_round): one ufunc call multiplies, shifts, mixes both; words 1 and 3, the
      low halves of the products, are never extracted: the next round's xor reads the products, and a mask drops
      their high halves;
    - in-place ufuncs (out=) on three reused buffers: no temporaries of the block's size;
    - the ninth round computes word 2 only, the last round word 0 only, tested in the high half of a uint64 with
      no shift back (_last_round_keeps).
    """
    positions = [xp.asarray(x, dtype=np.uint64) for x in (key_positions, query_positions, batch_heads)]
    result_shape = np.broadcast_shapes(*(x.shape for x in positions))
    shape = result_shape or (1,)  # at least 1-d: a block of a 0-d array would be a scalar, not a view
    positions = [x.reshape((1,) * (len(shape) - x.ndim) + x.shape) for x in positions]
    keep = xp.empty(shape, dtype=bool)
    if keep.size == 0:
        return keep.reshape(result_shape)
    keys = round_keys(seed & 0xFFFFFFFF, seed >> 32)
    first_round = philox_round(*positions, np.uint64(offset), *keys[0])
    stacked = (2,) + (1,) * len(shape)  # a constant for each stacked word (word 0, word 2)
    multipliers = xp.asarray([PHILOX_M0, PHILOX_M1], dtype=np.uint64).reshape(stacked)
    stacked_keys = [xp.asarray(key, dtype=np.uint64).reshape(stacked) for key in keys]
    threshold = np.uint64(dropout_threshold(dropout_p) << 32)
    blocks = [(slice(None),) * len(shape)] if backend.is_cupy_array(keep) else _blocks(shape, _BLOCK_ELEMENTS)
    buffers = [xp.empty((2,) + keep[blocks[0]].shape, dtype=np.uint64) for _ in range(3)]  # the largest block's
    for block in blocks:
        words, products, products_before = (b[(slice(None),) + tuple(slice(0, n) for n in keep[block].shape)]
                                            for b in buffers)
        _rounds_two_and_three([_cut(word, block) for word in first_round], keys, words, products_before, multipliers)
        for round_index in range(3, PHILOX_ROUNDS - 1):
            # The ninth round computes only word 2: the last round reads it and word 1, a low half kept anyway.
            mixed = slice(1, 2) if round_index == PHILOX_ROUNDS - 2 else slice(0, 2)
            _stacked_round(words, products, products_before, multipliers, stacked_keys[round_index], mixed)
            products, products_before = products_before, products
        _last_round_keeps(words[1], products_before[1], products[1], stacked_keys[-1][0], keep[block], threshold)
    return keep.reshape(result_shape)


def _blocks(shape: tuple[int, ...], elements: int) -> list[tuple[slice, ...]]:
    """Slices cutting an array of `shape` into blocks of at most `elements` (or one row of the last axis, when that
    is longer), in C order: the trailing axes whole, runs along one axis, the leading axes one index at a time."""
    axis, inner = len(shape), 1
    while axis > 0 and inner * shape[axis - 1] <= elements:
        axis -= 1
        inner *= shape[axis]
    if axis == 0:
        return [(slice(None),) * len(shape)]
    run = max(1, elements // inner)
    return [tuple(slice(k, k + 1) for k in outer) + (slice(start, start + run),) + (slice(None),) * (len(shape) - axis)
            for outer in np.ndindex(*shape[: axis - 1]) for start in range(0, shape[axis - 1], run)]


def _cut(word, block: tuple[slice, ...]):
    """A word of round 1 (a broadcast array) cut to the block: sliced along the axes it varies on."""
    return word[tuple(s if n > 1 else slice(None) for s, n in zip(block, word.shape))]


def _rounds_two_and_three(first_round, keys, words, products, multipliers) -> None:
    """Rounds 2 and 3 into the buffers: afterwards words = (word 0, word 2) and products = (the product whose low
    half is word 3, the one for word 1), as _stacked_round reads them.

    Round 1 gave the words (bh, i), (bh), (j), (j) for the counter (j, i, bh, offset): round 2's products are of
    single position arrays, and its words 1 and 3, mixed with round 3's keys on the spot, of at most two."""
    a0, a1, a2, a3 = first_round
    xp = backend.get_array_module(words)
    (key0_2, key1_2), (key0_3, key1_3) = keys[1], keys[2]
    product0, product1 = a0 * np.uint64(PHILOX_M0), a2 * np.uint64(PHILOX_M1)
    xp.bitwise_xor(product1 >> _32, a1 ^ key0_2, out=words[0])  # broadcast to the block
    xp.bitwise_xor(product0 >> _32, a3 ^ key1_2, out=words[1])
    xp.multiply(words, multipliers, out=products)
    xp.right_shift(products[::-1], _32, out=words)
    xp.bitwise_xor(words[0], (product1 & _LOW_32) ^ key0_3, out=words[0])
    xp.bitwise_xor(words[1], (product0 & _LOW_32) ^ key1_3, out=words[1])


def _stacked_round(words, products, products_before, multipliers, stacked_key, mixed: slice) -> None:
    """One round on the stacked words (word 0, word 2), in place; `mixed` picks which new words to compute.
    products_before holds the last round's products, whose low halves are words 3 and 1; products is overwritten."""
    xp = backend.get_array_module(words)
    xp.multiply(words, multipliers, out=products)
    # word 0 = hi(product1) ^ word 1 ^ key0, word 2 = hi(product0) ^ word 3 ^ key1: the stacks reversed
    xp.right_shift(products[::-1][mixed], _32, out=words[mixed])
    xp.bitwise_xor(words[mixed], products_before[::-1][mixed], out=words[mixed])  # high half: hi(products_before)
    xp.bitwise_xor(words[mixed], stacked_key[mixed], out=words[mixed])
    xp.bitwise_and(words[mixed], _LOW_32, out=words[mixed])


def _last_round_keeps(word2, product1_before, scratch, key0, keep, threshold) -> None:
    """keep = (word 0 of round 10 >= threshold), with threshold given shifted into the high half: word 0 is built
    there, as the high half of product1 ^ (word 1 << 32) ^ (key0 << 32), whose low half (lo(product1)) cannot
    change the test."""
    xp = backend.get_array_module(word2)
    xp.multiply(word2, np.uint64(PHILOX_M1), out=scratch)
    xp.left_shift(product1_before, _32, out=product1_before)  # word 1, its low half, into the high half
    xp.bitwise_xor(scratch, product1_before, out=scratch)
    xp.bitwise_xor(scratch, key0 << _32, out=scratch)
    xp.greater_equal(scratch, threshold, out=keep)
