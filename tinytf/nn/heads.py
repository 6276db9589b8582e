"""Heads on a transformer's hidden states: language modelling, BERT's masked language modelling, sequence
classification through BERT's pooler, and mean pooling over the tokens (sentence embeddings)."""

from __future__ import annotations

import numpy as np

from .. import backend
from ..tensor import Tensor, array_of
from . import functional as F
from .layers import DecodeLayouts, Dropout, Embedding, LayerNorm, Linear
from .module import Module


class LMHead(Module):
    """Hidden states (..., C) -> logits (..., vocab_size) = x W^T (+ b). tied_to: an Embedding whose table is W
    (one matrix embeds tokens and scores them)."""

    def __init__(self, dim: int, vocab_size: int, bias: bool = False, tied_to: Embedding | None = None):
        super().__init__()
        if tied_to is not None and tuple(tied_to.weight.shape) != (vocab_size, dim):
            raise ValueError(f"LMHead: the tied embedding's table must have the shape (vocab_size, dim) = "
                             f"{(vocab_size, dim)}, got {tuple(tied_to.weight.shape)}")
        self.decoder = Linear(dim, vocab_size, bias)
        if tied_to is not None:
            self.decoder.weight = tied_to.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(x)

    def decode(self, x, layouts: DecodeLayouts):
        """forward in inference on raw arrays (no graph): x (N, C) -> (N, vocab_size)."""
        return layouts.linear(x, self.decoder)


class MaskedLMHead(Module):
    """BERT's masked-LM head: the transform dense -> GELU (exact) -> LayerNorm, then an LMHead with a bias, its
    weights tied to the token embeddings when tied_to is given: (..., C) -> (..., vocab_size)."""

    def __init__(self, dim: int, vocab_size: int, tied_to: Embedding | None = None, eps: float = 1e-12):
        super().__init__()
        self.dense = Linear(dim, dim)
        self.norm = LayerNorm(dim, eps)
        self.lm_head = LMHead(dim, vocab_size, bias=True, tied_to=tied_to)

    def forward(self, x: Tensor) -> Tensor:
        return self.lm_head(self.norm(F.gelu(self.dense(x))))


class SequenceClassificationHead(Module):
    """BERT's pooler and classifier: the first token's hidden state (B, T, C) -> tanh(dense(h_0)) (the pooled output)
    -> dropout -> linear -> logits (B, n_classes)."""

    def __init__(self, dim: int, n_classes: int, dropout: float = 0.0):
        super().__init__()
        self.pooler = Linear(dim, dim)
        self.dropout = Dropout(dropout)
        self.classifier = Linear(dim, n_classes)

    def pooled(self, x: Tensor) -> Tensor:
        """The pooled output (B, C) of hidden states (B, T, C)."""
        return F.tanh(self.pooler(x[:, 0]))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.dropout(self.pooled(x)))


def mean_pool(x: Tensor, padding_mask=None) -> Tensor:
    """The mean of hidden states (B, T, C) over each row's tokens -> (B, C): padding_mask (B, T) bool, True = a
    token (None: all are); a row without tokens gives zeros (sentence embeddings)."""
    B, T, _ = x.shape
    if padding_mask is None:
        return x.mean(dim=1)
    mask = backend.to_device(array_of(padding_mask), x.device)
    if tuple(mask.shape) != (B, T) or mask.dtype != np.bool_:
        raise ValueError(f"mean_pool: padding_mask must be bool of shape (B, T) = {(B, T)}, got {mask.dtype} of "
                         f"shape {tuple(mask.shape)}")
    xp = backend.get_array_module(mask)
    with backend.device_scope(x.device):
        weights = mask.astype(x.dtype)
        counts = xp.maximum(weights.sum(axis=1, keepdims=True), 1)  # (B, 1); an empty row divides zeros by 1
    return (x * Tensor(weights[:, :, None])).sum(dim=1) / Tensor(counts)
