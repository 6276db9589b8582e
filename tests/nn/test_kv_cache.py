"""KVCache.reorder: the rows beam search picks carry their keys, values, starts and start bias along."""

import numpy as np

from tinytf import backend
from tinytf.nn import KVCache


def _ragged_cache(device):
    """Sequences of 3 and 1 tokens, right-aligned in a cache of 2 rows, 2 heads, 6 positions, head_dim 4."""
    cache = KVCache(2, 2, 6, 4, "float32", device)
    keys = np.arange(4 * 2 * 4, dtype=np.float32).reshape(4, 2, 4)
    cache.store_sequences(backend.to_device(keys, device), backend.to_device(-keys, device),
                          np.array([0, 3, 4]))
    return cache, keys


def test_reorder_moves_each_rows_keys_values_and_start(device):
    cache, keys = _ragged_cache(device)
    cache.reorder(np.array([1, 0, 0, 1, 1]))  # the expansion to beams: a different number of rows
    expected = np.zeros((2, 2, 3, 4), dtype=np.float32)  # (row, head, position, dim), right-aligned
    expected[0] = keys[:3].transpose(1, 0, 2)
    expected[1, :, 2] = keys[3]
    rows = [1, 0, 0, 1, 1]
    cached_keys, cached_values = (backend.to_numpy(array[:, :, :3]) for array in (cache.keys, cache.values))
    np.testing.assert_array_equal(cached_keys, expected[rows])
    np.testing.assert_array_equal(cached_values, -expected[rows])
    np.testing.assert_array_equal(backend.to_numpy(cache.positions()), [1, 3, 3, 1, 1])
    hidden = np.isinf(backend.to_numpy(cache.start_bias())[:, 0, 0])  # (5, 3): keys before each row's start
    np.testing.assert_array_equal(hidden, [[True, True, False], [False] * 3, [False] * 3, [True, True, False],
                                           [True, True, False]])

    new = np.full((5, 2, 1, 4), 7.0, dtype=np.float32)
    new[:, :, 0, 0] = np.arange(5)[:, None]
    cached_keys, _ = cache.store(backend.to_device(new, device), backend.to_device(new, device))
    stored = backend.to_numpy(cached_keys)
    assert stored.shape == (5, 2, 4, 4) and cache.length == 4
    np.testing.assert_array_equal(stored[:, :, 3], new[:, :, 0])
    np.testing.assert_array_equal(stored[:, :, :3], expected[rows])
    assert cache.start_bias().shape == (5, 1, 1, 4)


def test_reorder_of_a_cache_whose_rows_all_start_at_zero(device):
    cache = KVCache(3, 1, 4, 2, "float32", device)
    keys = np.arange(3 * 2 * 2, dtype=np.float32).reshape(3, 1, 2, 2)
    cache.store(backend.to_device(keys, device), backend.to_device(keys + 100, device))
    cache.reorder(np.array([2, 2, 0]))
    np.testing.assert_array_equal(backend.to_numpy(cache.keys[:, :, :2]), keys[[2, 2, 0]])
    np.testing.assert_array_equal(backend.to_numpy(cache.values[:, :, :2]), keys[[2, 2, 0]] + 100)
    assert cache.starts is None and cache.start_bias() is None and cache.positions() == 2
