"""Beam search with Hugging Face's semantics (transformers' generate with num_beams, do_sample=False).

Each prompt keeps `num_beams` running beams. A step scores every one-token continuation of every beam by its summed
log-probability, keeps the 2 * num_beams best, retires those that end (the end-of-sequence token, or the last
allowed step) into the prompt's `num_beams` finished slots with the score sum / length ** length_penalty (length:
the new tokens, the end token included), and continues the best num_beams that do not end. When a prompt stops
taking finished beams is `early_stopping`'s choice, as in transformers:
  True     when num_beams sequences have finished;
  False    when the best running beam, scored at its current length, cannot beat the worst finished one;
  "never"  the same, but with a positive length_penalty the running beam is scored at the longest allowed length.

The model is reached through two callables, so that any decoder (decoder-only or encoder-decoder) can use it:
`advance(ids)` feeds one token per beam and returns the next logits, `reorder(rows)` makes state row i a copy of
row rows[i] (the KV caches and whatever else the state holds per row).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .. import backend

# A beam's score when it is no beam at all: the num_beams - 1 copies of each prompt before the first step, so that
# the first step's candidates all continue beam 0, and candidates that may not enter the finished slots.
_NO_BEAM = np.float32(-np.inf)


def beam_search(logits, advance: Callable, reorder: Callable, max_new_tokens: int, num_beams: int,
                length_penalty: float = 1.0, early_stopping: bool | str = False, eos_token_id: int | None = None,
                num_return_sequences: int = 1) -> tuple[list[np.ndarray], np.ndarray]:
    """The best `num_return_sequences` continuations of each of B prompts.

    logits: (B, V) the next token's logits after each prompt (a NumPy or CuPy array), with a state of B rows.
    reorder(rows): rows (N,) int64 on the host; first called with each prompt's row repeated num_beams times.
    advance(ids): ids (B * num_beams,) int64 on the host -> the logits (B * num_beams, V) after them.
    Returns (sequences, scores): B * num_return_sequences 1-D int64 arrays of new tokens, prompt after prompt and
    best first, and their scores (B * num_return_sequences,) float32.
    """
    _check_settings(max_new_tokens, num_beams, early_stopping, num_return_sequences)
    logits = backend.to_numpy(logits)
    B, V, k = logits.shape[0], logits.shape[1], num_beams
    candidates_kept = min(2 * k, k * V)  # with one end token at most k of them end: k remain to continue
    reorder(np.repeat(np.arange(B), k))
    logits = np.repeat(logits, k, axis=0)
    running = np.zeros((B, k, max_new_tokens), dtype=np.int64)
    running_scores = np.full((B, k), _NO_BEAM)
    running_scores[:, 0] = 0
    finished = np.zeros((B, k, max_new_tokens), dtype=np.int64)
    finished_lengths = np.zeros((B, k), dtype=np.int64)
    finished_scores = np.full((B, k), _NO_BEAM)
    improvable = np.ones(B, dtype=bool)  # a prompt still takes finished beams
    for step in range(max_new_tokens):
        scores = (_log_softmax(logits).reshape(B, k, V) + running_scores[:, :, None]).reshape(B, k * V)
        top = _top_indices(scores, candidates_kept)  # (B, 2k), best first
        top_scores = np.take_along_axis(scores, top, axis=1)
        beam, tokens = np.divmod(top, V)
        sequences = np.take_along_axis(running, beam[:, :, None], axis=1)
        sequences[:, :, step] = tokens
        last_step = step == max_new_tokens - 1
        ends = np.full(tokens.shape, last_step) | (eos_token_id is not None and tokens == eos_token_id)

        # Only the best k candidates may finish; a prompt takes none once it is done.
        full = (finished_scores > _NO_BEAM).all(axis=1) & (early_stopping is True)
        admitted = ends & (np.arange(candidates_kept) < k) & (improvable & ~full)[:, None] & (top_scores > _NO_BEAM)
        length_scores = np.where(admitted, top_scores / np.float32((step + 1) ** length_penalty), _NO_BEAM)
        merged = _top_indices(np.concatenate([finished_scores, length_scores], axis=1), k)
        finished = np.take_along_axis(np.concatenate([finished, sequences], axis=1), merged[:, :, None], axis=1)
        finished_lengths = np.take_along_axis(
            np.concatenate([finished_lengths, np.full_like(tokens, step + 1)], axis=1), merged, axis=1)
        finished_scores = np.take_along_axis(np.concatenate([finished_scores, length_scores], axis=1), merged, axis=1)
        if last_step:
            break

        continuing = np.argsort(ends, axis=1, kind="stable")[:, :k]  # the best k that do not end, best first
        running = np.take_along_axis(sequences, continuing[:, :, None], axis=1)
        running_scores = np.take_along_axis(top_scores, continuing, axis=1)
        improvable &= _can_improve(running_scores[:, 0], finished_scores, step + 1, max_new_tokens,
                                   length_penalty, early_stopping)
        all_full = (finished_scores > _NO_BEAM).all() and early_stopping is True
        if not improvable.any() or all_full:
            break
        source_rows = np.take_along_axis(beam, continuing, axis=1) + np.arange(B)[:, None] * k
        reorder(source_rows.reshape(-1))
        logits = backend.to_numpy(advance(running[:, :, step].reshape(-1)))

    best = slice(0, num_return_sequences)
    sequences = [row[:length] for rows, lengths in zip(finished[:, best], finished_lengths[:, best])
                 for row, length in zip(rows, lengths)]
    return sequences, finished_scores[:, best].reshape(-1)


def _can_improve(best_running, finished_scores, generated: int, max_new_tokens: int, length_penalty: float,
                 early_stopping: bool | str) -> np.ndarray:
    """Per prompt (B,): can the best running beam still beat the worst finished one? Always while a finished slot
    is empty. Transformers' heuristic: the running score is taken at the current length, or at the longest allowed
    with early_stopping="never" and a positive length penalty (a longer beam then divides by more)."""
    length = max_new_tokens if early_stopping == "never" and length_penalty > 0 else generated
    best_possible = best_running / np.float32(length ** length_penalty)
    return (finished_scores == _NO_BEAM).any(axis=1) | (best_possible > finished_scores.min(axis=1))


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    """log softmax over the last axis in float32, as transformers scores beams."""
    logits = logits.astype(np.float32, copy=False)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _top_indices(scores: np.ndarray, count: int) -> np.ndarray:
    """The column indices of each row's `count` largest scores, largest first: (B, N) -> (B, count)."""
    if count < scores.shape[1]:
        part = np.argpartition(-scores, count - 1, axis=1)[:, :count]  # the largest, unordered
    else:
        part = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def _check_settings(max_new_tokens: int, num_beams: int, early_stopping, num_return_sequences: int) -> None:
    if not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError(f"beam search: num_beams must be a positive integer, got {num_beams!r}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"beam search: max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"beam search: early_stopping must be True, False or 'never', got {early_stopping!r}")
    if not 1 <= num_return_sequences <= num_beams:
        raise ValueError(f"beam search: num_return_sequences must be in [1, num_beams={num_beams}], got "
                         f"{num_return_sequences!r}")
