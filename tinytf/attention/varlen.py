"""Packed variable-length sequences (FlashAttention's varlen layout): the bookkeeping of varlen_attention.

A batch of N sequences of different lengths is stored without padding, one after another:

    q (total_q, Hq, D), k and v (total_k, Hkv, D)      cu_seqlens_q, cu_seqlens_k: int (N + 1,), 0 first, total last

Sequence n is rows cu_seqlens_q[n]:cu_seqlens_q[n + 1] of q, attending to rows cu_seqlens_k[n]:cu_seqlens_k[n + 1]
of k and v, with T, S and the bottom-right alignment taken per sequence. tinytf.attention.varlen_attention runs each
sequence as a batch of one, a (1, H, L, D) view made here by tinytf ops, so its gradient flows back into the packed
tensors; the cuda backend takes the packed tensors whole (cuda.launch_varlen_attention).
"""

from __future__ import annotations

import numpy as np

from ..backend import to_numpy
from ..tensor import Tensor, array_of


def checked_cu_seqlens(name: str, cu_seqlens, total: int, max_seqlen: int) -> np.ndarray:
    """cu_seqlens as a host int64 array, or a ValueError/TypeError naming what is wrong with it: it must be a 1-D
    integer array (or Tensor) of at least two entries, 0 first and `total` last, non-decreasing, with no sequence
    longer than max_seqlen."""
    data = array_of(cu_seqlens)
    host = to_numpy(data) if hasattr(data, "shape") else np.asarray(data)
    if host.dtype.kind not in "iu":
        raise TypeError(f"varlen_attention: {name} must hold integers, got dtype {host.dtype}")
    if host.ndim != 1 or host.shape[0] < 2:
        raise ValueError(f"varlen_attention: {name} must be 1-D with N + 1 >= 2 entries, got shape {host.shape}")
    host = host.astype(np.int64)
    lengths = np.diff(host)
    if host[0] != 0 or host[-1] != total or (lengths < 0).any():
        raise ValueError(f"varlen_attention: {name} must rise from 0 to the {total} packed rows, got "
                         f"{host.tolist()}")
    if lengths.max() > max_seqlen:
        raise ValueError(f"varlen_attention: {name} holds a sequence of {lengths.max()} rows, longer than its "
                         f"max_seqlen {max_seqlen}")
    return host


def cu_seqlens_from_positions(position_ids) -> tuple[np.ndarray, int]:
    """(cu_seqlens int32 (N + 1,), the longest length) of the sequences packed in rows of position ids (B, T),
    flattened row after row: a sequence starts at each row's first token and at every position 0 (Hugging Face's
    rule for packed batches: data.document_positions numbers documents so)."""
    positions = to_numpy(array_of(position_ids))
    if positions.ndim != 2 or positions.dtype.kind not in "iu":
        raise ValueError(f"position_ids must be integers of shape (B, T), got {positions.dtype} {positions.shape}")
    starts = positions == 0
    starts[:, 0] = True
    cu_seqlens = np.append(np.flatnonzero(starts), positions.size).astype(np.int32)
    return cu_seqlens, int(np.diff(cu_seqlens).max())


def sequence(packed: Tensor, start: int, stop: int) -> Tensor:
    """Rows start:stop of a packed (total, H, D) tensor as a batch of one, (1, H, stop - start, D)."""
    return packed[start:stop].transpose(0, 1).unsqueeze(0)


def one_batch(packed: Tensor) -> Tensor:
    """All rows of a packed (total, H, D) tensor as one sequence (1, H, total, D), a view outside the graph: the
    shape on which the backends' limits (dtype, head size, grid) are checked."""
    return Tensor(packed.data[None].swapaxes(1, 2))


def unbatched(x: Tensor) -> Tensor:
    """A batch of one (1, H, L, D) back to packed rows (L, H, D)."""
    return x[0].transpose(0, 1)
