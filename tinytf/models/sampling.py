"""Choosing the next token from logits: temperature, top-k and top-p (nucleus) filtering, then a draw."""

from __future__ import annotations

import numpy as np

from .. import backend


def filter_logits(logits: np.ndarray, top_k: int | None = None, top_p: float | None = None) -> np.ndarray:
    """Set to -inf every logit outside the `top_k` largest and outside the smallest set whose probability
    reaches `top_p` (the most likely token always stays). logits: (B, V) -> (B, V)."""
    logits = logits.astype(np.float64, copy=True)
    vocab = logits.shape[-1]
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        if top_k < vocab:
            kth_largest = np.partition(logits, vocab - top_k, axis=-1)[:, vocab - top_k : vocab - top_k + 1]
            logits[logits < kth_largest] = -np.inf
    if top_p is not None:
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        order = np.argsort(-logits, axis=-1)
        sorted_logits = np.take_along_axis(logits, order, axis=-1)
        probs = np.exp(sorted_logits - sorted_logits[:, :1])
        probs /= probs.sum(axis=-1, keepdims=True)
        # Drop a token when the tokens before it already reach top_p; the first token is never dropped.
        mass_before = np.cumsum(probs, axis=-1) - probs
        drop = np.zeros_like(logits, dtype=bool)
        np.put_along_axis(drop, order, mass_before >= top_p, axis=-1)
        logits[drop] = -np.inf
    return logits


def sample_next_token(logits, temperature: float = 1.0, top_k: int | None = None,
                      top_p: float | None = None, rng: np.random.Generator | None = None) -> np.ndarray:
    """One token id per row of logits (B, V), a NumPy or CuPy array; temperature 0 takes the argmax. Returns (B,)
    int64 on the host."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:  # on the logits' device: only B ids cross to the host
        with backend.device_scope(backend.device_of(logits)):
            return backend.to_numpy(logits.argmax(axis=-1)).astype(np.int64, copy=False)
    logits = backend.to_numpy(logits)
    filtered = filter_logits(logits / temperature, top_k, top_p)
    probs = np.exp(filtered - filtered.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    rng = rng or backend.generator("cpu")
    # Inverse-CDF draw, one uniform number per row.
    draws = rng.random((probs.shape[0], 1))
    cumulative = np.cumsum(probs, axis=-1)
    return np.minimum((cumulative < draws * cumulative[:, -1:]).sum(axis=-1), probs.shape[-1] - 1).astype(np.int64)
