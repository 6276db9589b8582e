"""The masks every attention backend shares: which keys a query may see.

    causal_visibility(t, s, T, S)    query t sees key s when s <= t + S - T (bottom-right aligned causal mask)
    key_padding_mask(attn_mask, ...) a boolean (B, 1, 1, S) attn_mask as the flash and cuda backends take it
"""

from __future__ import annotations

from ..backend import get_array_module, to_device


def causal_visibility(query_positions, key_positions, T: int, S: int):
    """bool (len(query_positions), len(key_positions)): True where the query may see the key.

    Aligned bottom-right: query t of T sees keys s <= t + S - T, as when T new queries follow S - T cached keys; the
    last query sees every key. Positions are integer arrays (NumPy or CuPy), in any order or with repeats.
    """
    return key_positions[None, :] <= query_positions[:, None] + (S - T)


def is_key_padding_mask(attn_mask) -> bool:
    """True for a boolean mask that varies only over keys and the batch: shape (..., B or 1, 1, 1, S)."""
    if attn_mask is None:
        return False
    shape = (1,) * (4 - attn_mask.ndim) + tuple(attn_mask.shape)
    return attn_mask.dtype == bool and shape[1] == 1 and shape[2] == 1


def key_padding_mask(attn_mask, S: int, device: str):
    """A key-padding attn_mask (see is_key_padding_mask; Tensor or array) as bool (B or 1, S) on `device`."""
    mask = getattr(attn_mask, "data", attn_mask)
    shape = (1,) * (4 - mask.ndim) + tuple(mask.shape)
    mask = to_device(mask, device)
    return get_array_module(mask).broadcast_to(mask.reshape(shape[0], shape[3]), (shape[0], S))
