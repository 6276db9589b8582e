"""An encoder-decoder transformer: BART and the original Transformer ("Attention Is All You Need"), config, model and
generation.

The encoder reads the source with bidirectional self-attention; the decoder reads the target so far with causal
self-attention and the encoder's output through cross-attention (nn.block.DecoderBlock with cross_attn). BART:
post-norm, learned positions offset by 2, an embedding LayerNorm, a final_logits_bias. The 2017 Transformer:
sinusoidal positions, embeddings scaled by sqrt(d_model); its pre-norm variant ends each stack with a final norm.

Generation encodes the sources once, computes each decoder layer's cross-attention keys and values once (ContextKV)
and feeds the decoder one token per step through DecoderBlock.decode with the self-attention KV caches; beam search
(models.beam) reorders the caches and the ContextKV rows together.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from .. import backend
from .. import functional as F
from ..nn import (
    ContextKV,
    DecoderBlock,
    Dropout,
    Embedding,
    EncoderBlock,
    KVCache,
    LayerNorm,
    Linear,
    Module,
    ModuleList,
    MultiHeadAttention,
)
from ..nn.layers import DecodeLayouts
from ..tensor import Tensor, array_of, no_grad
from .beam import beam_search
from .encoder import check_common, check_positive_ints, checked_ids, feed_forward, init_bert_style
from .sampling import sample_next_token

_POSITIONS = ("learned", "sinusoidal")


@dataclasses.dataclass
class EncoderDecoderConfig:
    vocab_size: int = 64
    max_positions: int = 128
    d_model: int = 64
    n_head: int = 4
    encoder_layers: int = 2
    decoder_layers: int = 2
    ffn_dim: int = 256
    dropout: float = 0.0
    activation: str = "gelu"  # "gelu": the exact erf form (BART); "gelu_tanh"
    norm_first: bool = False  # BART's post-norm; True (with final_norm) for the pre-norm Transformer
    positions: str = "learned"  # or "sinusoidal" (the 2017 paper)
    position_offset: int = 0  # position p reads row p + offset of the table (BART: 2)
    scale_embedding: bool = False  # token embeddings times sqrt(d_model)
    layernorm_embedding: bool = True  # a LayerNorm after the embeddings (BART)
    final_norm: bool = False  # a LayerNorm after each stack's last block (pre-norm)
    share_embeddings: bool = True  # one token table for both stacks (BART's shared); False: one table each
    tie_word_embeddings: bool = True  # lm_head's weight is the decoder's token table
    norm_eps: float = 1e-5
    pad_token_id: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 2
    decoder_start_token_id: int = 2
    forced_bos_token_id: int | None = None  # generate makes it the first token (BART's generation setting)
    forced_eos_token_id: int | None = None  # and this one the last, at max_new_tokens

    def __post_init__(self):
        check_positive_ints(self, ("vocab_size", "max_positions", "d_model", "n_head", "encoder_layers",
                                   "decoder_layers", "ffn_dim"))
        check_common(self, self.d_model, self.n_head)
        if self.positions not in _POSITIONS:
            raise ValueError(f"EncoderDecoderConfig.positions must be one of {_POSITIONS}, got {self.positions!r}")
        if not isinstance(self.position_offset, int) or self.position_offset < 0:
            raise ValueError(f"EncoderDecoderConfig.position_offset must be an integer >= 0, got "
                             f"{self.position_offset!r}")
        for key in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "forced_bos_token_id",
                    "forced_eos_token_id"):
            if key.startswith("forced") and getattr(self, key) is None:
                continue
            if not 0 <= getattr(self, key) < self.vocab_size:
                raise ValueError(f"EncoderDecoderConfig.{key} must be a token id below vocab_size={self.vocab_size}, "
                                 f"got {getattr(self, key)!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class TransformerStack(Module):
    """One side of the model, encoder or decoder: positions added to token embeddings, layernorm_embedding (or
    None), drop, blocks (EncoderBlocks; DecoderBlocks with cross_attn and cross_norm when cross=True), final_norm (or
    None). Positions: embed_positions (an Embedding of max_positions + position_offset rows) when learned, else
    None and a buffer position_table (sinusoidal). embed_tokens: the stack's own token table, or None where the
    model's `shared` serves both stacks (share_embeddings)."""

    def __init__(self, config: EncoderDecoderConfig, n_layer: int, cross: bool):
        super().__init__()
        self.config = config
        C, rows = config.d_model, config.max_positions + config.position_offset
        self.embed_tokens = None if config.share_embeddings else Embedding(config.vocab_size, C)
        self.embed_positions = Embedding(rows, C) if config.positions == "learned" else None
        if config.positions == "sinusoidal":
            self.register_buffer("position_table", F.sinusoidal_table(rows, C), persistent=False)
        self.layernorm_embedding = LayerNorm(C, config.norm_eps) if config.layernorm_embedding else None
        self.drop = Dropout(config.dropout)
        self.blocks = ModuleList(self._block(config, cross) for _ in range(n_layer))
        self.final_norm = LayerNorm(C, config.norm_eps) if config.final_norm else None

    @staticmethod
    def _block(config: EncoderDecoderConfig, cross: bool) -> DecoderBlock:
        C = config.d_model

        def attention(**kind) -> MultiHeadAttention:
            return MultiHeadAttention(C, config.n_head, max_length=config.max_positions, bias=True,
                                      dropout=config.dropout, **kind)

        norm1, norm2 = LayerNorm(C, config.norm_eps), LayerNorm(C, config.norm_eps)
        mlp = feed_forward(C, config.ffn_dim, config.dropout, config.activation)
        if not cross:
            return EncoderBlock(norm1, attention(causal=False), norm2, mlp, norm_first=config.norm_first)
        return DecoderBlock(norm1, attention(causal=True), norm2, mlp, norm_first=config.norm_first,
                            cross_attn=attention(cross=True), cross_norm=LayerNorm(C, config.norm_eps))

    def _positions(self, length: int) -> Tensor:
        """The vectors of positions 0..length-1 (length, C), rows offset..offset+length-1 of the table."""
        rows = slice(self.config.position_offset, self.config.position_offset + length)
        if self.embed_positions is not None:
            return self.embed_positions.weight[rows]
        return Tensor(self.position_table[rows])

    def forward(self, tokens: Tensor, padding_mask=None, context=None) -> Tensor:
        """tokens: the token embeddings (B, T, C); padding_mask (B, T) bool, True = a token; context (decoder): a
        list of one ContextKV per block -> hidden states (B, T, C)."""
        T = tokens.shape[1]
        if T > self.config.max_positions:
            raise ValueError(f"EncoderDecoder: {T} tokens are more than max_positions {self.config.max_positions}")
        x = tokens + self._positions(T)
        if self.layernorm_embedding is not None:
            x = self.layernorm_embedding(x)
        x = self.drop(x)
        for layer, block in enumerate(self.blocks):
            if context is None:
                x = block(x, padding_mask=padding_mask)
            else:
                x = block(x, padding_mask=padding_mask, context=context[layer])
        return x if self.final_norm is None else self.final_norm(x)

    def decode(self, tokens, position: int, kv_caches: list[KVCache], contexts: list[ContextKV],
               layouts: DecodeLayouts):
        """forward in inference for one token per row on raw arrays: token embeddings (B, C) at `position` ->
        (B, C), their keys and values appended to kv_caches."""
        offset = self.config.position_offset
        table = self.position_table if self.embed_positions is None else self.embed_positions.weight.data
        x = tokens + table[position + offset]
        if self.layernorm_embedding is not None:
            x = self.layernorm_embedding.decode(x)
        for block, kv_cache, context in zip(self.blocks, kv_caches, contexts):
            x = block.decode(x, kv_cache, layouts, context)
        return x if self.final_norm is None else self.final_norm.decode(x)


class EncoderDecoder(Module):
    """BART / the Transformer. Modules: shared (the token embeddings of both stacks; None without
    share_embeddings, when each stack has its embed_tokens), encoder and decoder (TransformerStack), lm_head (Linear
    without bias, its weight the decoder's token table when tie_word_embeddings); buffer final_logits_bias
    (1, vocab_size), added to the logits (BART's; zeros)."""

    def __init__(self, config: EncoderDecoderConfig):
        super().__init__()
        self.config = config
        self.shared = Embedding(config.vocab_size, config.d_model) if config.share_embeddings else None
        self.encoder = TransformerStack(config, config.encoder_layers, cross=False)
        self.decoder = TransformerStack(config, config.decoder_layers, cross=True)
        self.lm_head = Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.token_table(self.decoder).weight
        self.register_buffer("final_logits_bias", np.zeros((1, config.vocab_size), dtype=np.float32))
        init_bert_style(self)

    # --- forward ------------------------------------------------------------------------------------------------
    def token_table(self, stack: TransformerStack) -> Embedding:
        """The token embeddings `stack` (self.encoder or self.decoder) reads."""
        return self.shared if self.shared is not None else stack.embed_tokens

    def _embedding_scale(self) -> float:
        return math.sqrt(self.config.d_model) if self.config.scale_embedding else 1.0

    def _tokens(self, ids, stack: TransformerStack) -> Tensor:
        """Token ids (B, T) -> their scaled embeddings (B, T, C) in `stack`'s table."""
        x = self.token_table(stack)(ids)
        return x * self._embedding_scale() if self.config.scale_embedding else x

    def encode(self, src_ids, src_padding_mask=None) -> Tensor:
        """Source ids (B, S), padding mask (B, S) bool (True = a token; None: all are) -> the encoder's output
        (B, S, C)."""
        return self.encoder(self._tokens(self._ids(src_ids, "src_ids"), self.encoder), src_padding_mask)

    def contexts(self, memory: Tensor, src_padding_mask=None) -> list[ContextKV]:
        """Each decoder layer's cross-attention keys and values of the encoder's output (B, S, C)."""
        return [block.cross_attn.context_keys_values(memory, src_padding_mask) for block in self.decoder.blocks]

    def decode_hidden(self, tgt_ids, contexts: list[ContextKV], tgt_padding_mask=None) -> Tensor:
        """Target ids (B, T) read against the sources' contexts -> the decoder's hidden states (B, T, C)."""
        return self.decoder(self._tokens(self._ids(tgt_ids, "tgt_ids"), self.decoder), tgt_padding_mask, contexts)

    def logits(self, hidden: Tensor) -> Tensor:
        return self.lm_head(hidden) + Tensor(self.final_logits_bias)

    def forward(self, src_ids, tgt_ids, src_padding_mask=None, tgt_padding_mask=None,
                targets=None) -> tuple[Tensor, Tensor | None]:
        """Sources (B, S) and targets so far (B, T) -> logits (B, T, vocab_size), and the mean cross-entropy against
        `targets` (B, T) over the positions whose target is not pad_token_id (None without targets).
        The padding masks are bool, True = a token; the target's hides padding keys from the decoder's queries."""
        memory = self.encode(src_ids, src_padding_mask)
        logits = self.logits(self.decode_hidden(tgt_ids, self.contexts(memory, src_padding_mask), tgt_padding_mask))
        if targets is None:
            return logits, None
        targets = self._ids(targets, "targets")
        if tuple(targets.shape) != tuple(logits.shape[:2]):
            raise ValueError(f"EncoderDecoder: targets must have the shape of tgt_ids {tuple(logits.shape[:2])}, "
                             f"got {tuple(targets.shape)}")
        logits_float = F.cast(logits, backend.compute_dtype(logits.dtype)).reshape(-1, logits.shape[-1])
        return logits, F.cross_entropy(logits_float, targets.reshape(-1), ignore_index=self.config.pad_token_id)

    def _ids(self, ids, name: str):
        return checked_ids(ids, self.lm_head.weight.device, f"EncoderDecoder: {name}")

    # --- generation ---------------------------------------------------------------------------------------------
    def padded_sources(self, sources) -> tuple[np.ndarray, np.ndarray]:
        """A list of 1-D id arrays (or a 2-D array, its rows) -> ids (B, S) right-padded with pad_token_id and the
        padding mask (B, S) bool, True = a token, on the host."""
        rows = [np.asarray(backend.to_numpy(array_of(row))) for row in sources]
        if not rows or any(row.ndim != 1 or row.size == 0 or row.dtype.kind not in "iu" for row in rows):
            raise ValueError(f"EncoderDecoder.generate: sources must be a list of 1-D integer id arrays with at least "
                             f"one token each, got {[(row.dtype, row.shape) for row in rows]}")
        longest = max(row.size for row in rows)
        ids = np.full((len(rows), longest), self.config.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(rows), longest), dtype=bool)
        for row, source in enumerate(rows):
            ids[row, : source.size], mask[row, : source.size] = source, True
        return ids, mask

    def decode_step(self, ids, kv_caches: list[KVCache], contexts: list[ContextKV], layouts: DecodeLayouts):
        """The logits (B, vocab_size), an array, after one new target token per row, ids (B,) on the host, whose
        self-attention keys and values are appended to kv_caches: decode_hidden and logits with T = 1 in inference
        on raw arrays (TransformerStack.decode)."""
        device = self.lm_head.weight.device
        with backend.device_scope(device):
            x = self.token_table(self.decoder).weight.data[backend.to_device(ids, device)]  # (B, C)
            if self.config.scale_embedding:
                x = x * x.dtype.type(self._embedding_scale())
            x = self.decoder.decode(x, kv_caches[0].length, kv_caches, contexts, layouts)
            return layouts.linear(x, self.lm_head) + self.final_logits_bias

    @no_grad()
    def generate(self, sources, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, rng=None, num_beams: int | None = None, length_penalty: float = 1.0,
                 early_stopping: bool | str = False, eos_token_id: int | None = None, use_cache: bool = True,
                 num_return_sequences: int = 1) -> list[np.ndarray]:
        """Each source's generated ids (a list of 1-D int64 host arrays, without the start token): the decoder
        starts from decoder_start_token_id and stops at eos_token_id (kept; default config.eos_token_id) or after
        max_new_tokens. sources: a list of 1-D id arrays of any lengths (or a 2-D array of equal-length rows).

        temperature 0 is greedy; otherwise sampling with top_k / top_p and rng. num_beams (an int) chooses beam
        search with length_penalty and early_stopping (models.beam), returning each source's num_return_sequences best
        sequences, source after source, best first. use_cache=False recomputes the decoder over the
        whole prefix at each step (the reference the cache is tested against).

        config.forced_bos_token_id and forced_eos_token_id (when not None) force the first token and the token at
        step max_new_tokens, as transformers' ForcedBOS/ForcedEOSTokenLogitsProcessor do: every other token's logit
        becomes -inf and the forced one's 0 (in beam search, a forced step adds nothing to a beam's score)."""
        if not isinstance(max_new_tokens, int) or not 1 <= max_new_tokens <= self.config.max_positions:
            raise ValueError(f"EncoderDecoder.generate: max_new_tokens must be an integer in [1, max_positions="
                             f"{self.config.max_positions}], got {max_new_tokens!r}")
        if num_beams is None and num_return_sequences != 1:
            raise ValueError("EncoderDecoder.generate: num_return_sequences is beam search's setting; pass num_beams")
        eos = self.config.eos_token_id if eos_token_id is None else eos_token_id
        src_ids, src_mask = self.padded_sources(sources)
        was_training = self.training
        self.eval()
        try:
            mask = backend.to_device(src_mask, self.lm_head.weight.device)
            contexts = self.contexts(self.encode(src_ids, mask), mask)
            forced = self._forced_tokens(max_new_tokens)
            decoder = _IncrementalDecoder(self, contexts, max_new_tokens, use_cache, forced)
            if num_beams is not None:
                start = np.full(len(src_ids), self.config.decoder_start_token_id, dtype=np.int64)
                sequences, _ = beam_search(decoder.advance(start), decoder.advance, decoder.reorder, max_new_tokens,
                                           num_beams, length_penalty, early_stopping, eos, num_return_sequences)
                return sequences
            return self._sample(decoder, len(src_ids), max_new_tokens, temperature, top_k, top_p, rng, eos)
        finally:
            self.train(was_training)

    def _forced_tokens(self, max_new_tokens: int) -> dict[int, int]:
        """{step: the token generate forces there}; EOS after BOS, so EOS wins where both fall on step 0, as in
        transformers' order of the two processors."""
        forced = {}
        if self.config.forced_bos_token_id is not None:
            forced[0] = self.config.forced_bos_token_id
        if self.config.forced_eos_token_id is not None:
            forced[max_new_tokens - 1] = self.config.forced_eos_token_id
        return forced

    def _sample(self, decoder: _IncrementalDecoder, batch_size: int, max_new_tokens: int, temperature: float,
                top_k, top_p, rng, eos: int) -> list[np.ndarray]:
        """Greedy decoding or sampling, row by row until eos: a finished row is fed pad_token_id (its logits
        unread) until every row has finished."""
        ids = np.full(batch_size, self.config.decoder_start_token_id, dtype=np.int64)
        generated, finished = [], np.zeros(batch_size, dtype=bool)
        for _ in range(max_new_tokens):
            ids = sample_next_token(decoder.advance(ids), temperature, top_k, top_p, rng)
            ids = np.where(finished, self.config.pad_token_id, ids)
            generated.append(ids)
            finished |= ids == eos
            if finished.all():
                break
        columns = np.stack(generated, axis=1)
        lengths = np.where(finished, np.argmax(columns == eos, axis=1) + 1, columns.shape[1])
        return [row[:length] for row, length in zip(columns, lengths)]


class _IncrementalDecoder:
    """The decoder's state during generation, one row per sequence: the cross-attention contexts (ContextKV per
    layer), the self-attention KV caches (use_cache) or the target so far (recomputed at each step), and the tokens
    forced at some steps ({step: token id}; step 0 is the first generated token)."""

    def __init__(self, model: EncoderDecoder, contexts: list[ContextKV], max_length: int, use_cache: bool,
                 forced: dict[int, int]):
        self.model, self.contexts, self.forced = model, contexts, forced
        config, weight = model.config, model.lm_head.weight
        batch_size, head_dim = contexts[0].keys.shape[0], config.d_model // config.n_head
        self.kv_caches = [KVCache(batch_size, config.n_head, max_length, head_dim, weight.dtype, weight.device)
                          for _ in range(config.decoder_layers)] if use_cache else None
        self.layouts = DecodeLayouts()
        self.prefix = np.zeros((batch_size, 0), dtype=np.int64)

    def advance(self, ids: np.ndarray):
        """Feed one token per row, ids (B,) -> the next token's logits (B, vocab_size), an array."""
        self.prefix = np.concatenate([self.prefix, ids[:, None]], axis=1)
        if self.kv_caches is not None:
            logits = self.model.decode_step(ids, self.kv_caches, self.contexts, self.layouts)
        else:
            logits = self.model.logits(self.model.decode_hidden(self.prefix, self.contexts)[:, -1]).data
        forced = self.forced.get(self.prefix.shape[1] - 1)
        if forced is None:
            return logits
        with backend.device_scope(self.model.lm_head.weight.device):
            only = backend.get_array_module(logits).full_like(logits, -np.inf)
            only[:, forced] = 0
        return only

    def reorder(self, rows: np.ndarray) -> None:
        """Row i becomes a copy of row rows[i]: the prefix, the KV caches and the contexts (beam search)."""
        self.prefix = self.prefix[rows]
        for kv_cache in self.kv_caches or ():
            kv_cache.reorder(rows)
        device = self.model.lm_head.weight.device
        on_device = backend.to_device(rows, device)
        with backend.device_scope(device):
            self.contexts = [ContextKV(Tensor(context.keys.data[on_device]), Tensor(context.values.data[on_device]),
                                       None if context.key_padding_mask is None
                                       else context.key_padding_mask[on_device])
                             for context in self.contexts]
