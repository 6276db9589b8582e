"""A bidirectional transformer encoder in BERT's style: config, model, and its masked-LM and classification heads.

Token, position and token-type embeddings are summed and normalized (embedding_norm), then run through EncoderBlocks
(bidirectional self-attention with key-padding masks, the GELU MLP), post-norm as BERT (norm_first=False) or pre-norm
with a final norm. The blocks are the decoder models' blocks (nn.block), their attention built with causal=False.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .. import backend
from .. import functional as F
from ..nn import (
    Dropout,
    Embedding,
    EncoderBlock,
    GELUMLP,
    LayerNorm,
    MaskedLMHead,
    Module,
    ModuleList,
    MultiHeadAttention,
    SequenceClassificationHead,
    init_skipped,
    mean_pool,
)
from ..tensor import Tensor

# The MLP's activation: "gelu" is the exact erf form (BERT, BART), "gelu_tanh" GPT-2's tanh approximation.
ACTIVATIONS = {"gelu": "none", "gelu_tanh": "tanh"}


def feed_forward(dim: int, hidden: int, dropout: float, activation: str) -> GELUMLP:
    return GELUMLP(dim, hidden, True, dropout, ACTIVATIONS[activation])


def check_positive_ints(config, keys) -> None:
    """A ValueError naming the first of config's `keys` that is not a positive integer."""
    for key in keys:
        value = getattr(config, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{type(config).__name__}.{key} must be a positive integer, got {value!r}")


def check_common(config, dim: int, n_head: int) -> None:
    """The checks every transformer config shares: the width splits into heads, dropout is a probability, the
    activation is known."""
    if dim % n_head:
        raise ValueError(f"{type(config).__name__}: the model width ({dim}) must be divisible by n_head ({n_head})")
    if not 0 <= config.dropout < 1:
        raise ValueError(f"{type(config).__name__}.dropout must be in [0, 1), got {config.dropout}")
    if config.activation not in ACTIVATIONS:
        raise ValueError(f"{type(config).__name__}.activation must be one of {tuple(ACTIVATIONS)}, got "
                         f"{config.activation!r}")


def init_bert_style(model: Module) -> None:
    """BERT's and BART's init: N(0, 0.02) for weight matrices and embedding tables, zero biases; norms keep their
    ones and zeros."""
    if init_skipped():
        return
    rng = backend.generator("cpu")
    for name, parameter in model.named_parameters():
        if name.endswith("bias") and parameter.ndim == 1:
            parameter.data = np.zeros_like(parameter.data)
        elif parameter.ndim == 2:
            parameter.data = rng.standard_normal(parameter.shape, dtype=np.float32) * np.float32(0.02)


@dataclasses.dataclass
class EncoderConfig:
    vocab_size: int = 30522
    max_positions: int = 512
    type_vocab_size: int = 2
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    mlp_hidden: int = 512
    dropout: float = 0.0
    norm_eps: float = 1e-12
    activation: str = "gelu"
    norm_first: bool = False  # BERT is post-norm; a pre-norm encoder ends with a final norm
    pad_token_id: int = 0

    def __post_init__(self):
        check_positive_ints(self, ("vocab_size", "max_positions", "type_vocab_size", "n_layer", "n_head", "n_embd",
                                   "mlp_hidden"))
        check_common(self, self.n_embd, self.n_head)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class Encoder(Module):
    """BERT's encoder: token ids (B, T) -> hidden states (B, T, n_embd).

    Modules: word_embeddings, position_embeddings, token_type_embeddings, embedding_norm (LayerNorm), drop, blocks
    (EncoderBlocks: attn with c_attn (fused q, k, v) and c_proj, norm1, mlp with c_fc and c_proj, norm2), and
    final_norm (a LayerNorm when norm_first, else None).
    """

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        C = config.n_embd
        self.word_embeddings = Embedding(config.vocab_size, C)
        self.position_embeddings = Embedding(config.max_positions, C)
        self.token_type_embeddings = Embedding(config.type_vocab_size, C)
        self.embedding_norm = LayerNorm(C, config.norm_eps)
        self.drop = Dropout(config.dropout)
        self.blocks = ModuleList(
            EncoderBlock(LayerNorm(C, config.norm_eps),
                         MultiHeadAttention(C, config.n_head, max_length=config.max_positions, bias=True,
                                            dropout=config.dropout, causal=False),
                         LayerNorm(C, config.norm_eps),
                         feed_forward(C, config.mlp_hidden, config.dropout, config.activation),
                         norm_first=config.norm_first)
            for _ in range(config.n_layer))
        self.final_norm = LayerNorm(C, config.norm_eps) if config.norm_first else None
        init_bert_style(self)

    def forward(self, ids, token_type_ids=None, padding_mask=None) -> Tensor:
        """ids (B, T) ints; token_type_ids (B, T) ints (None: all 0); padding_mask (B, T) bool, True = a token
        (None: all are) -> hidden states (B, T, C). Padding positions get values too, which nothing should read."""
        device = self.word_embeddings.weight.device
        ids = checked_ids(ids, device, "Encoder: ids")
        B, T = ids.shape
        if T > self.config.max_positions:
            raise ValueError(f"Encoder: {T} tokens are more than max_positions {self.config.max_positions}")
        types = np.zeros((B, T), dtype=np.int64) if token_type_ids is None else token_type_ids
        types = checked_ids(types, device, "Encoder: token_type_ids")
        if tuple(types.shape) != (B, T):
            raise ValueError(f"Encoder: token_type_ids must have the ids' shape {(B, T)}, got {tuple(types.shape)}")
        x = self.word_embeddings(ids) + self.position_embeddings.weight[:T] + self.token_type_embeddings(types)
        x = self.drop(self.embedding_norm(x))  # (B, T, C)
        for block in self.blocks:
            x = block(x, padding_mask=padding_mask)
        return x if self.final_norm is None else self.final_norm(x)

    def embed(self, ids, padding_mask=None, token_type_ids=None) -> Tensor:
        """Sentence embeddings (B, C): the hidden states averaged over each row's tokens (mean_pool)."""
        return mean_pool(self.forward(ids, token_type_ids, padding_mask), padding_mask)


class EncoderForMaskedLM(Module):
    """Encoder + BERT's masked-LM head (MaskedLMHead: dense, GELU, LayerNorm, then scores tied to word_embeddings).
    Modules: encoder, head."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.head = MaskedLMHead(config.n_embd, config.vocab_size, tied_to=self.encoder.word_embeddings,
                                 eps=config.norm_eps)
        init_bert_style(self.head)

    def forward(self, ids, token_type_ids=None, padding_mask=None, targets=None) -> tuple[Tensor, Tensor | None]:
        """-> logits (B, T, vocab_size) and the mean cross-entropy over targets (B, T) that are not -100 (the tokens
        left unmasked), or None without targets."""
        logits = self.head(self.encoder(ids, token_type_ids, padding_mask))
        if targets is None:
            return logits, None
        targets = checked_ids(targets, logits.device, "EncoderForMaskedLM: targets")
        return logits, F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


class EncoderForSequenceClassification(Module):
    """Encoder + BERT's pooler and classifier (SequenceClassificationHead on the first token). Modules: encoder,
    head."""

    def __init__(self, config: EncoderConfig, n_classes: int):
        super().__init__()
        if not isinstance(n_classes, int) or n_classes < 1:
            raise ValueError(f"EncoderForSequenceClassification: n_classes must be a positive integer, got "
                             f"{n_classes!r}")
        self.config, self.n_classes = config, n_classes
        self.encoder = Encoder(config)
        self.head = SequenceClassificationHead(config.n_embd, n_classes, config.dropout)
        init_bert_style(self.head)

    def forward(self, ids, token_type_ids=None, padding_mask=None, labels=None) -> tuple[Tensor, Tensor | None]:
        """-> logits (B, n_classes) and the mean cross-entropy against labels (B,), or None without labels."""
        logits = self.head(self.encoder(ids, token_type_ids, padding_mask))
        if labels is None:
            return logits, None
        labels = checked_ids(labels, logits.device, "EncoderForSequenceClassification: labels", ndim=1)
        return logits, F.cross_entropy(logits, labels)


def checked_ids(ids, device: str, name: str, ndim: int = 2):
    """Integer ids (a Tensor, an array or nested lists) of `ndim` dimensions as an array on `device`, or a
    ValueError naming them."""
    array = ids.data if isinstance(ids, Tensor) else np.asarray(ids) if isinstance(ids, (list, tuple)) else ids
    array = backend.to_device(array, device)
    if array.dtype.kind not in "iu" or array.ndim != ndim:
        shape = "(batch, time)" if ndim == 2 else f"{ndim} dimensions"
        raise ValueError(f"{name} must be integers of shape {shape}, got {array.dtype} of shape {tuple(array.shape)}")
    return array
