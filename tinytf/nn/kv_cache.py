"""KVCache: one attention layer's keys and values for incremental decoding."""

from __future__ import annotations

import numpy as np

from .. import backend
from ..creation import zeros
from ..tensor import Tensor


class KVCache:
    """One layer's keys and values for incremental decoding, preallocated up to `max_length` positions.

    Decoding appends the keys and values of the new tokens; the prefix is never recomputed. Prompts of different
    lengths (store_sequences) sit right-aligned, each row's keys from its own start: `starts` (B,) on the device, None
    while every row starts at index 0, which costs decoding nothing.
    """

    def __init__(self, batch_size: int, n_kv_head: int, max_length: int, head_dim: int, dtype, device: str = "cpu"):
        shape = (batch_size, n_kv_head, max_length, head_dim)
        self.keys = zeros(shape, dtype=dtype, device=device).data
        self.values = zeros(shape, dtype=dtype, device=device).data
        self.device = backend.canonical_device(device)
        self.max_length = max_length
        self.length = 0
        self.starts = None
        self._start_bias = None  # (B, 1, 1, max_length) float32: -inf before each row's start, 0 from it on

    def positions(self):
        """The position of each row's next token, its cache index less the row's start: an int while every row
        starts at 0, else an integer array (B,) on the cache's device."""
        if self.starts is None:
            return self.length
        with backend.device_scope(self.device):
            return self.length - self.starts

    def start_bias(self, first: int = 0):
        """The scores' bias (B, 1, 1, length - first) that hides keys first..length-1 lying before their row's
        start, or None when no row has such keys."""
        return None if self.starts is None else self._start_bias[..., first : self.length]

    def append(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Store keys/values (B, Hkv, T, D) after the cached ones; returns all cached (B, Hkv, length, D)."""
        cached_keys, cached_values = self.store(keys.data, values.data)
        return Tensor(cached_keys), Tensor(cached_values)

    def store(self, keys, values) -> tuple:
        """append on raw arrays (decoding): keys/values (B, Hkv, T, D) -> the cached arrays (B, Hkv, length, D)."""
        start, new = self.length, keys.shape[2]
        if start + new > self.max_length:
            raise ValueError(f"KV cache holds {self.max_length} positions; {start} are used and {new} more do not fit")
        if keys.shape[:2] != self.keys.shape[:2] or keys.shape[3] != self.keys.shape[3]:
            raise ValueError(f"KV cache of shape {self.keys.shape} cannot take keys of shape {keys.shape}")
        with backend.device_scope(self.device):  # the copy is a kernel on the cache's device
            self.keys[:, :, start : start + new] = keys
            self.values[:, :, start : start + new] = values
        self.length = start + new
        return self.keys[:, :, : self.length], self.values[:, :, : self.length]

    def reorder(self, rows) -> None:
        """Make row i of the cache a copy of row rows[i], for rows (N,) integers, N any size: beam search expands
        each prompt's row to its beams after the prefill and, each step, gives every beam the cache of the beam it
        continues. Each row keeps its start; the positions from `length` on are left to be written."""
        rows = backend.to_device(backend.to_numpy(rows).astype(np.int64, copy=False), self.device)
        xp = backend.get_array_module(self.keys)
        with backend.device_scope(self.device):
            for name in ("keys", "values"):
                cached = getattr(self, name)
                reordered = xp.empty((len(rows),) + cached.shape[1:], dtype=cached.dtype)
                reordered[:, :, : self.length] = cached[rows, :, : self.length]
                setattr(self, name, reordered)
            if self.starts is not None:
                self.starts, self._start_bias = self.starts[rows], self._start_bias[rows]

    def store_sequences(self, keys, values, cu_seqlens) -> None:
        """Fill an empty cache with N sequences packed as rows of keys/values (total, Hkv, D), cu_seqlens (N + 1,)
        as varlen attention takes them: sequence n goes to row n, right-aligned, so that every sequence's last key
        sits at index L - 1 (L the longest length) and the next token of every row at L. The indices before a row's
        start are set to zero, and start_bias hides them."""
        cu_seqlens = backend.to_numpy(cu_seqlens).astype(np.int64)
        lengths = np.diff(cu_seqlens)
        batch_size = self.keys.shape[0]
        if self.length:
            raise ValueError(f"KV cache: sequences are stored into an empty cache; this one holds {self.length} "
                             f"positions")
        if len(lengths) != batch_size or keys.shape[1:] != self.keys.shape[1:2] + self.keys.shape[3:]:
            raise ValueError(f"KV cache of shape {self.keys.shape} cannot take {len(lengths)} sequences of keys "
                             f"{tuple(keys.shape)}")
        longest = int(lengths.max())
        if longest > self.max_length:
            raise ValueError(f"KV cache holds {self.max_length} positions; a sequence of {longest} does not fit")
        starts = longest - lengths
        rows = np.repeat(np.arange(batch_size), lengths)
        indices = np.arange(len(rows)) + np.repeat(starts - cu_seqlens[:-1], lengths)  # a row's start + position
        rows, indices = (backend.to_device(index, self.device) for index in (rows, indices))
        with backend.device_scope(self.device):
            for cached, new in ((self.keys, keys), (self.values, values)):
                cached[:, :, :longest] = 0
                cached[rows, :, indices] = new  # (total, Hkv, D): the index arrays' axis comes first
        self.length = longest
        if starts.any():
            self.starts = backend.to_device(starts, self.device)
            hidden = np.arange(self.max_length) < starts[:, None]  # (B, max_length)
            bias = np.where(hidden, -np.inf, 0.0).astype(np.float32)[:, None, None]
            self._start_bias = backend.to_device(bias, self.device)
