"""A decoder-only transformer that covers GPT-2, Llama, Mistral, Qwen2 and Gemma 2: config, model, generation.

GPT-2 style: learned positions, LayerNorm, GELU MLP, biases. Llama style: RoPE, RMSNorm, SwiGLU MLP, grouped-query
attention, no biases. Mistral adds a sliding window, Qwen2 biases on q, k, v; Gemma 2 a GeGLU MLP, RMSNorm scaling
by 1 + weight, norms after attention and MLP as well, embeddings scaled by sqrt(n_embd), a sliding window on some
layers and softcapped attention scores and logits. All are this one class with a different `GPTConfig`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import numpy as np

from .. import backend
from .. import functional as F
from ..attention.masks import softcapped
from ..nn import (
    DecoderBlock,
    Dropout,
    Embedding,
    GatedMLP,
    GELUMLP,
    KVCache,
    LayerNorm,
    Linear,
    Module,
    ModuleList,
    MultiHeadAttention,
    RMSNorm,
    init_skipped,
)
from ..nn.layers import DecodeLayouts
from ..tensor import Tensor, array_of, no_grad
from .beam import beam_search
from .sampling import sample_next_token

_CHOICES = {"norm": ("layernorm", "rmsnorm"), "mlp": ("gelu", "swiglu", "geglu"),
            "pos": ("learned", "sinusoidal", "rope")}
_GATE_ACTIVATION = {"swiglu": "silu", "geglu": "gelu_tanh"}


@dataclasses.dataclass
class GPTConfig:
    vocab_size: int = 65
    block_size: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None  # None: as many as n_head (plain multi-head attention)
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True
    norm: str = "layernorm"
    mlp: str = "gelu"
    pos: str = "learned"
    tie_weights: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    mlp_hidden: int | None = None  # None: 4 * n_embd for GELU, 8/3 * n_embd (to a multiple of 32) for gated MLPs
    head_dim: int | None = None  # None: n_embd // n_head
    qkv_bias: bool | None = None  # biases on the q, k, v projections; None: as `bias` (Qwen2: True with bias=False)
    sliding_window: int | None = None  # a query sees this many keys, its own included (Hugging Face's meaning)
    full_attention_layers: tuple[int, ...] = ()  # the layers without the sliding window
    attn_softcap: float | None = None  # attention scores become cap * tanh(scores / cap) (Gemma 2)
    final_softcap: float | None = None  # the same on the logits
    query_pre_attn_scalar: float | None = None  # scores scaled by its -1/2 power; None: head_dim's (Gemma 2)
    norm_weight_offset: float = 0.0  # RMSNorm scales by offset + weight (Gemma: 1)
    scale_embeddings: bool = False  # token embeddings times sqrt(n_embd) (Gemma)
    sandwich_norm: bool = False  # a norm after attention and after the MLP too, before the residual add (Gemma 2)

    def __post_init__(self):
        for key, allowed in _CHOICES.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"GPTConfig.{key} must be one of {allowed}, got {getattr(self, key)!r}")
        for key in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ValueError(f"GPTConfig.{key} must be a positive integer, got {getattr(self, key)!r}")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.n_kv_head < 1 or self.n_head % self.n_kv_head:
            raise ValueError(f"GPTConfig: n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if self.head_dim is None and self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.mlp_hidden is not None and (not isinstance(self.mlp_hidden, int) or self.mlp_hidden < 1):
            raise ValueError(f"GPTConfig.mlp_hidden must be a positive integer, got {self.mlp_hidden!r}")
        if self.mlp_hidden is None:
            self.mlp_hidden = 4 * self.n_embd if self.mlp == "gelu" else 32 * math.ceil(8 * self.n_embd / 3 / 32)
        if self.qkv_bias is None:
            self.qkv_bias = self.bias
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window < 1):
            raise ValueError(
                f"GPTConfig.sliding_window must be None or a positive integer, got {self.sliding_window!r}"
            )
        self.full_attention_layers = tuple(self.full_attention_layers)  # a list after a JSON round trip
        if not all(isinstance(layer, int) and 0 <= layer < self.n_layer for layer in self.full_attention_layers):
            raise ValueError(f"GPTConfig.full_attention_layers must be layer indices below n_layer={self.n_layer}, "
                             f"got {self.full_attention_layers!r}")
        for key in ("attn_softcap", "final_softcap", "query_pre_attn_scalar"):
            if getattr(self, key) is not None and not getattr(self, key) > 0:
                raise ValueError(f"GPTConfig.{key} must be None or a positive number, got {getattr(self, key)!r}")

    def window(self, layer: int) -> int | None:
        """How many keys before its own a query of `layer` sees (the attention's window), None for all."""
        if self.sliding_window is None or layer in self.full_attention_layers:
            return None
        return self.sliding_window - 1

    @classmethod
    def from_preset(cls, name: str, **overrides) -> GPTConfig:
        """"gpt2": learned positions, LayerNorm, GELU, biases. "llama": RoPE, RMSNorm, SwiGLU, GQA, no biases."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        settings = dict(PRESETS[name])
        if name != "gpt2" and overrides.get("n_kv_head") is None:  # the RoPE families share K/V heads in pairs
            settings["n_kv_head"] = max(1, overrides.get("n_head", cls.n_head) // 2)
        settings.update({key: value for key, value in overrides.items() if value is not None})
        return cls(**settings)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS = {
    "gpt2": dict(norm="layernorm", mlp="gelu", pos="learned", bias=True, norm_eps=1e-5),
    "llama": dict(norm="rmsnorm", mlp="swiglu", pos="rope", bias=False, norm_eps=1e-6),
    # Gemma 2's architecture with its released models' caps; its sliding window only where a config asks for one
    "gemma2": dict(norm="rmsnorm", mlp="geglu", pos="rope", bias=False, norm_eps=1e-6, norm_weight_offset=1.0,
                   scale_embeddings=True, sandwich_norm=True, attn_softcap=50.0, final_softcap=30.0),
}


class GPT(Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        C = config.n_embd
        self.wte = Embedding(config.vocab_size, C)
        if config.pos == "learned":
            self.wpe = Embedding(config.block_size, C)
        elif config.pos == "sinusoidal":
            self.register_buffer("position_table", F.sinusoidal_table(config.block_size, C), persistent=False)
        self.drop = Dropout(config.dropout)
        self.blocks = ModuleList(self._block(config, layer) for layer in range(config.n_layer))
        self.ln_f = self._norm(config)
        self.lm_head = Linear(C, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.wte.weight  # one matrix embeds tokens and scores them
        self._init_weights()

    @staticmethod
    def _norm(config: GPTConfig) -> Module:
        if config.norm == "layernorm":
            return LayerNorm(config.n_embd, config.norm_eps, bias=config.bias)
        return RMSNorm(config.n_embd, config.norm_eps, config.norm_weight_offset)

    @classmethod
    def _block(cls, config: GPTConfig, layer: int) -> DecoderBlock:
        attention = MultiHeadAttention(
            config.n_embd, config.n_head, config.n_kv_head, config.block_size, config.bias, config.dropout,
            rope=config.pos == "rope", rope_theta=config.rope_theta, head_dim=config.head_dim,
            qkv_bias=config.qkv_bias, window=config.window(layer),
            softcap=config.attn_softcap,
            scale=None if config.query_pre_attn_scalar is None else config.query_pre_attn_scalar ** -0.5,
        )
        if config.mlp == "gelu":
            mlp = GELUMLP(config.n_embd, config.mlp_hidden, config.bias, config.dropout)
        else:
            mlp = GatedMLP(config.n_embd, config.mlp_hidden, config.bias, config.dropout, _GATE_ACTIVATION[config.mlp])
        sandwich = (cls._norm(config), cls._norm(config)) if config.sandwich_norm else (None, None)
        return DecoderBlock(cls._norm(config), attention, cls._norm(config), mlp, *sandwich)

    def _init_weights(self) -> None:
        """GPT-2's init: N(0, 0.02) for weights and embeddings, zero biases; the projections that write into the
        residual stream (`c_proj`) get std 0.02 / sqrt(2 n_layer), since 2 n_layer of them add up there."""
        if init_skipped():
            return
        rng = backend.generator("cpu")
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, parameter in self.named_parameters():
            if name.endswith("bias"):
                parameter.data = np.zeros_like(parameter.data)
            elif parameter.ndim == 2:
                std = residual_std if name.endswith("c_proj.weight") else 0.02
                parameter.data = (rng.standard_normal(parameter.shape, dtype=np.float32) * np.float32(std))

    # --- forward ------------------------------------------------------------------------------------------------
    def hidden_states(self, idx, kv_caches: list[KVCache] | None = None, position_ids=None) -> Tensor:
        """Token ids (B, T) -> final normalized hidden states (B, T, C). position_ids: see forward; with kv_caches
        too (empty ones), the packed sequences are prompts whose keys and values fill the caches, one row each,
        right-aligned (KVCache.store_sequences): a ragged batch's prefill."""
        ids = idx.data if isinstance(idx, Tensor) else backend.to_device(idx, self.wte.weight.device)
        if ids.ndim != 2:
            raise ValueError(f"GPT expects token ids of shape (batch, time), got shape {ids.shape}")
        B, T = ids.shape
        start = kv_caches[0].length if kv_caches else 0
        if position_ids is None and start + T > self.config.block_size:  # packed rows: each sequence is checked
            raise ValueError(
                f"sequence of {start + T} tokens is longer than the model's block_size {self.config.block_size}"
            )
        x = self.wte(ids)  # (B, T, C)
        if self.config.scale_embeddings:
            x = x * self._embedding_scale()
        if position_ids is not None:
            position_ids = self._checked_positions(position_ids, B, T)
            if self.config.pos == "learned":
                x = x + self.wpe(position_ids)
            elif self.config.pos == "sinusoidal":
                x = x + Tensor(self.position_table[position_ids])
        elif self.config.pos == "learned":
            x = x + self.wpe.weight[start : start + T]  # positions start..start+T-1: a slice, no gather needed
        elif self.config.pos == "sinusoidal":
            x = x + Tensor(self.position_table[start : start + T])
        x = self.drop(x)
        for layer, block in enumerate(self.blocks):
            x = block(x, kv_caches[layer] if kv_caches else None, position_ids)
        return self.ln_f(x)

    def _checked_positions(self, position_ids, B: int, T: int):
        """position_ids as an integer array (B, T) on the model's device, or a ValueError naming what is wrong."""
        positions = array_of(position_ids)
        positions = backend.to_device(positions, self.wte.weight.device)
        if tuple(positions.shape) != (B, T) or positions.dtype.kind not in "iu":
            raise ValueError(f"GPT: position_ids must be integers of the ids' shape {(B, T)}, got {positions.dtype} "
                             f"{tuple(positions.shape)}")
        if T:
            with backend.device_scope(self.wte.weight.device):
                low, high = int(positions.min()), int(positions.max())
            if not 0 <= low <= high < self.config.block_size:
                raise ValueError(f"GPT: position_ids must lie in [0, block_size={self.config.block_size}), got "
                                 f"{low}..{high}")
        return positions

    def forward(self, idx, targets=None, position_ids=None) -> tuple[Tensor, Tensor | None]:
        """Token ids (B, T) -> logits (B, T, vocab_size) in the model's dtype, and the mean cross-entropy against
        `targets` (B, T) in float32 at least.

        position_ids (B, T) (optional): for rows that pack several documents, each token's position in its document
        (data.document_positions makes them). A document starts at each row's first token and at every position 0;
        attention stays inside documents (varlen attention) and positions restart with each."""
        logits = self.logits(self.hidden_states(idx, position_ids=position_ids))
        if targets is None:
            return logits, None
        # A half-precision model's loss is float32, as under PyTorch's autocast (cross_entropy is on its float32
        # list): bfloat16 would round a loss near 2 to steps of 1/128, and float16 loss scaling would overflow.
        logits_float = F.cast(logits, backend.compute_dtype(logits.dtype)).reshape(-1, logits.shape[-1])  # classes last
        return logits, F.cross_entropy(logits_float, targets.reshape(-1))

    def _embedding_scale(self) -> float:
        """sqrt(n_embd) rounded to the embeddings' dtype, as Gemma multiplies by it (sqrt(3072) is 55.5 in bfloat16)."""
        return float(np.asarray(math.sqrt(self.config.n_embd), dtype=self.wte.weight.dtype))

    def logits(self, hidden: Tensor) -> Tensor:
        """lm_head, then the final softcap if the config has one: hidden states (..., C) -> logits (..., vocab)."""
        logits = self.lm_head(hidden)
        return logits if self.config.final_softcap is None else softcapped(logits, self.config.final_softcap, F)

    # --- generation ---------------------------------------------------------------------------------------------
    def make_kv_caches(self, batch_size: int) -> list[KVCache]:
        config = self.config
        head_dim = config.head_dim or config.n_embd // config.n_head
        dtype, device = self.wte.weight.dtype, self.wte.weight.device
        return [KVCache(batch_size, config.n_kv_head, config.block_size, head_dim, dtype, device)
                for _ in range(config.n_layer)]

    @no_grad()
    def stream(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
               top_p: float | None = None, use_cache: bool = True, rng=None) -> Iterator[np.ndarray]:
        """Yield the next token ids (B,) one step at a time, continuing the context `idx`: an array (B, T), or a list
        of B prompts of any lengths >= 1 (lists or 1-D arrays of ids).

        With the KV cache each step feeds only the new token; once the context outgrows block_size, the window
        slides and the cache is refilled from the last block_size tokens, exactly as full recomputation would.
        Prompts of different lengths are prefilled together as packed sequences (no padding computed), right-aligned
        in the caches so that every row's next token has the same cache index; each row keeps its own positions.
        temperature=0 picks the most likely token (greedy).
        """
        was_training = self.training
        self.eval()
        try:
            context, starts = _right_aligned(idx)
            block = self.config.block_size
            caches, layouts = None, DecodeLayouts()
            for _ in range(max_new_tokens):
                if not use_cache:
                    logits = self._last_logits(context, starts)
                elif caches is None or caches[0].length == block:  # the window slides: refill the cache
                    caches = self.make_kv_caches(context.shape[0])
                    logits = self._last_logits(context, starts, caches)
                else:
                    logits = self.decode_step(context[:, -1], caches, layouts)
                next_ids = sample_next_token(logits, temperature, top_k, top_p, rng)
                context = np.concatenate([context, next_ids[:, None]], axis=1)
                yield next_ids
        finally:
            self.train(was_training)

    def _last_logits(self, context: np.ndarray, starts: np.ndarray | None, kv_caches: list[KVCache] | None = None):
        """The logits array (B, vocab) after each row's last block_size tokens of context (B, W), whose row b begins
        at column starts[b] (None: all at 0): only a row's last position predicts its next token. Rows of different
        lengths run as packed sequences (position_ids), the columns before their starts never computed."""
        block, width = self.config.block_size, context.shape[1]
        if starts is None or starts.max() <= width - block:  # every row fills the window
            return self.logits(self.hidden_states(self._on_device(context[:, -block:]), kv_caches)[:, -1, :]).data
        first = np.maximum(starts, width - block)[:, None]
        columns = np.arange(width)
        kept = columns >= first  # (B, W), row after row: the packed order
        positions = (columns - first)[kept][None]  # (1, total)
        hidden = self.hidden_states(self._on_device(context[kept][None]), kv_caches, self._on_device(positions))
        last = np.cumsum(width - first[:, 0]) - 1
        return self.logits(hidden[0, self._on_device(last)]).data

    def decode_step(self, ids, kv_caches: list[KVCache], layouts: DecodeLayouts):
        """Logits (B, vocab_size), an array, of the token after one new token per sequence, ids (B,), whose keys and
        values are appended to kv_caches: hidden_states and lm_head with T = 1 in inference, on raw arrays in fewer and
        cheaper ops (DecoderBlock.decode). `layouts` keeps the weights laid out for decoding: one per generation."""
        position = kv_caches[0].positions()  # an int, or one per row (B,) when the rows start at different indices
        with backend.device_scope(self.wte.weight.device):
            x = self.wte.weight.data[self._on_device(ids)]  # (B, C)
            if self.config.scale_embeddings:
                x = x * x.dtype.type(self._embedding_scale())
            if self.config.pos == "learned":
                x = x + self.wpe.weight.data[position]
            elif self.config.pos == "sinusoidal":
                x = x + self.position_table[position]
            for block, kv_cache in zip(self.blocks, kv_caches):
                x = block.decode(x, kv_cache, layouts)
            logits = layouts.linear(self.ln_f.decode(x), self.lm_head)
            if self.config.final_softcap is None:
                return logits
            return softcapped(logits, self.config.final_softcap, backend.get_array_module(logits))

    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, use_cache: bool = True, rng=None, num_beams: int | None = None,
                 length_penalty: float = 1.0, early_stopping: bool | str = False, eos_token_id: int | None = None,
                 num_return_sequences: int = 1) -> Tensor | list[np.ndarray]:
        """The context (B, T) followed by `max_new_tokens` sampled tokens: (B, T + max_new_tokens) int64 on the
        model's device. Of a list of prompts (stream), a list of 1-D int64 arrays: each prompt and its new tokens.

        num_beams (an int) chooses beam search instead of sampling, with the remaining settings: see beam_search."""
        if num_beams is not None:
            return self.beam_search(idx, max_new_tokens, num_beams, length_penalty, early_stopping, eos_token_id,
                                    num_return_sequences, use_cache)
        if eos_token_id is not None or num_return_sequences != 1:
            raise ValueError("generate: eos_token_id and num_return_sequences are beam search's settings; "
                             "pass num_beams")
        if isinstance(idx, (list, tuple)):
            new = list(self.stream(idx, max_new_tokens, temperature, top_k, top_p, use_cache, rng))
            rows = np.stack(new, axis=1) if new else np.zeros((len(idx), 0), dtype=np.int64)
            return [np.concatenate([_prompt_ids(prompt), row]) for prompt, row in zip(idx, rows)]
        context = backend.to_numpy(idx.data if isinstance(idx, Tensor) else np.asarray(idx)).astype(np.int64)
        new = list(self.stream(context, max_new_tokens, temperature, top_k, top_p, use_cache, rng))
        columns = [context] + [ids[:, None] for ids in new]
        return Tensor(self._on_device(np.concatenate(columns, axis=1)))

    @no_grad()
    def beam_search(self, idx, max_new_tokens: int, num_beams: int, length_penalty: float = 1.0,
                    early_stopping: bool | str = False, eos_token_id: int | None = None,
                    num_return_sequences: int = 1, use_cache: bool = True) -> Tensor | list[np.ndarray]:
        """Beam search as transformers' generate(num_beams=..., do_sample=False) runs it (models.beam): the best
        `num_return_sequences` continuations of each prompt, prompt after prompt, best first.

        idx as for generate. Of an array (B, T): (B * num_return_sequences, T + L) int64 on the model's device, L
        the longest continuation returned, the shorter ones (they ended with eos_token_id) padded with
        eos_token_id. Of a list of prompts: a list of 1-D int64 arrays, each prompt and its continuation. The KV
        caches are expanded to B * num_beams rows after the (ragged) prefill and reordered by beam each step.
        Prompt and continuation must fit in block_size (no sliding window).
        """
        context, starts = _right_aligned(idx)
        is_list = isinstance(idx, (list, tuple))
        prompts = [_prompt_ids(prompt) for prompt in idx] if is_list else list(context)
        if context.shape[1] + max_new_tokens > self.config.block_size:
            raise ValueError(f"beam search: the longest prompt ({context.shape[1]} tokens) and max_new_tokens "
                             f"({max_new_tokens}) must fit in block_size {self.config.block_size}")
        was_training = self.training
        self.eval()
        caches = self.make_kv_caches(context.shape[0]) if use_cache else None
        layouts = DecodeLayouts()

        def reorder(rows):
            nonlocal context, starts
            context, starts = context[rows], (None if starts is None else starts[rows])
            for cache in caches or ():
                cache.reorder(rows)

        def advance(ids):
            nonlocal context
            context = np.concatenate([context, ids[:, None]], axis=1)
            return self.decode_step(ids, caches, layouts) if use_cache else self._last_logits(context, starts)

        try:
            continuations, _ = beam_search(self._last_logits(context, starts, caches), advance, reorder,
                                           max_new_tokens, num_beams, length_penalty, early_stopping, eos_token_id,
                                           num_return_sequences)
        finally:
            self.train(was_training)
        prompts = [prompt for prompt in prompts for _ in range(num_return_sequences)]
        if is_list:
            return [np.concatenate([prompt, new]) for prompt, new in zip(prompts, continuations)]
        longest = max(len(new) for new in continuations)
        padded = np.zeros((len(continuations), longest), dtype=np.int64) + (eos_token_id or 0)  # only eos ends early
        for row, new in zip(padded, continuations):
            row[: len(new)] = new
        return Tensor(self._on_device(np.concatenate([np.stack(prompts), padded], axis=1)))

    def _on_device(self, ids: np.ndarray):
        device = self.wte.weight.device
        return ids if device == "cpu" else backend.to_device(ids, device)


def _prompt_ids(prompt) -> np.ndarray:
    """One prompt of a list as a 1-D int64 host array."""
    return np.asarray(backend.to_numpy(array_of(prompt)), dtype=np.int64)


def _right_aligned(idx) -> tuple[np.ndarray, np.ndarray | None]:
    """Generation's context: (ids (B, W) int64 on the host, starts (B,) or None). An array (B, T) is the context as
    it is (starts None); a list of B prompts is laid out right-aligned, row b's tokens from column starts[b] on and
    zeros before them, starts None when the prompts have one length. A ValueError names an ill-shaped context."""
    if not isinstance(idx, (list, tuple)):
        context = np.array(backend.to_numpy(array_of(idx)), dtype=np.int64)
        if context.ndim != 2 or context.shape[1] == 0:
            raise ValueError(f"generation needs a context of shape (batch, time) with time >= 1, got {context.shape}")
        return context, None
    prompts = [_prompt_ids(prompt) for prompt in idx]
    if not prompts or any(prompt.ndim != 1 or prompt.size == 0 for prompt in prompts):
        shapes = [prompt.shape for prompt in prompts]
        raise ValueError(f"generation needs a list of prompts, each 1-D with at least one token, got shapes {shapes}")
    lengths = np.array([prompt.size for prompt in prompts])
    starts = lengths.max() - lengths
    context = np.zeros((len(prompts), lengths.max()), dtype=np.int64)
    for row, (prompt, start) in enumerate(zip(prompts, starts)):
        context[row, start:] = prompt
    return context, (starts if starts.any() else None)
