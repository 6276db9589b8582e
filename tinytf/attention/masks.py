"""What every attention backend shares about the scores: which keys a query may see, and how scores are shaped.

All positions are bottom-right aligned: with T queries and S keys, query i sits at absolute position i + S - T, as
when T new queries follow S - T cached keys (the last query is level with the last key).

    normalized_window(window, is_causal)       (left, right), -1 = unbounded; causal makes right 0
    effective_window(window, T, S)             the same visibility, with -1 for bounds that hide no key
    visibility(i, j, T, S, window)             key j visible to query i: i + S-T - left <= j <= i + S-T + right
    causal_visibility(i, j, T, S)              visibility with window (-1, 0): j <= i + S - T
    alibi_bias(slopes, i, j, T, S, xp)         -slope * |i + S - T - j|, added to the scores (ALiBi)
    softcapped(scores, softcap, xp)            softcap * tanh(scores / softcap) (Gemma 2, Grok)
    key_padding_mask(attn_mask, ...)           a boolean (B, 1, 1, S) attn_mask as the flash and cuda backends take it
"""

from __future__ import annotations

import numbers

from ..backend import get_array_module, to_device
from ..tensor import array_of

UNBOUNDED = -1


def normalized_window(window, is_causal: bool) -> tuple[int, int]:
    """(left, right) from `window` (None or two ints >= -1; -1 = no bound on that side) and is_causal.

    is_causal bounds the right side at 0 (no key after the query's own position) and keeps the left bound, as
    FlashAttention does when given both. Raises ValueError naming a window that is not two ints >= -1.
    """
    if window is None:
        window = (UNBOUNDED, UNBOUNDED)
    if (not isinstance(window, (tuple, list)) or len(window) != 2
            or not all(isinstance(b, numbers.Integral) and not isinstance(b, bool) and b >= UNBOUNDED
                       for b in window)):
        raise ValueError(f"window must be None or (left, right), two ints >= -1 (-1 = unbounded), got {window!r}")
    left, right = int(window[0]), int(window[1])
    return left, 0 if is_causal else right


def effective_window(window: tuple[int, int], T: int, S: int) -> tuple[int, int]:
    """The normalized `window` with -1 for each bound that hides no key from any of T queries over S keys, so a
    backend builds no mask it does not need (a causal decoding step, T = 1, sees every key).

    The left bound hides nothing when even the last query reaches key 0 (left >= S - 1), the right bound when even
    the first query reaches key S - 1 (right >= T - 1).
    """
    left, right = window
    return (UNBOUNDED if left >= S - 1 else left), (UNBOUNDED if right >= T - 1 else right)


def visibility(query_positions, key_positions, T: int, S: int, window: tuple[int, int]):
    """bool (len(query_positions), len(key_positions)): True where query i may see key j under `window`
    (normalized: (left, right), -1 unbounded): i + S - T - left <= j <= i + S - T + right.

    Positions are integer arrays (NumPy or CuPy), in any order or with repeats.
    """
    left, right = window
    distance = key_positions[None, :] - (query_positions[:, None] + (S - T))  # j minus the query's own position
    visible = get_array_module(distance).ones(distance.shape, dtype=bool)
    if left != UNBOUNDED:
        visible &= distance >= -left
    if right != UNBOUNDED:
        visible &= distance <= right
    return visible


def causal_visibility(query_positions, key_positions, T: int, S: int):
    """visibility with window (-1, 0): query i sees keys j <= i + S - T; the last query sees every key."""
    return visibility(query_positions, key_positions, T, S, (UNBOUNDED, 0))


def alibi_bias(slopes, query_positions, key_positions, T: int, S: int, xp):
    """ALiBi (Press et al. 2022): -slope * |i + S - T - j|, in the slopes' dtype.

    slopes (..., Hq), e.g. (B, Hq), -> (..., Hq, len(query_positions), len(key_positions)).
    """
    distance = xp.abs(query_positions[:, None] + (S - T) - key_positions[None, :]).astype(slopes.dtype)
    return slopes[..., None, None] * -distance


def softcapped(scores, softcap: float, xp):
    """softcap * tanh(scores / softcap): scores squashed smoothly into (-softcap, softcap).

    xp: numpy or cupy for arrays, or tinytf.functional for Tensors (then the result is differentiated too).
    """
    return xp.tanh(scores / softcap) * softcap


def is_key_padding_mask(attn_mask) -> bool:
    """True for a boolean mask that varies only over keys and the batch: shape (..., B or 1, 1, 1, S)."""
    if attn_mask is None:
        return False
    shape = (1,) * (4 - attn_mask.ndim) + tuple(attn_mask.shape)
    return attn_mask.dtype == bool and shape[1] == 1 and shape[2] == 1


def key_padding_mask(attn_mask, S: int, device: str):
    """A key-padding attn_mask (see is_key_padding_mask; Tensor or array) as bool (B or 1, S) on `device`."""
    mask = array_of(attn_mask)
    shape = (1,) * (4 - mask.ndim) + tuple(mask.shape)
    mask = to_device(mask, device)
    return get_array_module(mask).broadcast_to(mask.reshape(shape[0], shape[3]), (shape[0], S))
