"""A decoder-only transformer that covers GPT-2 and Llama: config, model, generation.

GPT-2 style: learned positions, LayerNorm, GELU MLP, biases. Llama style: RoPE, RMSNorm, SwiGLU MLP, grouped-query
attention, no biases. Both are this one class with a different `GPTConfig`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import numpy as np

from .. import backend
from .. import functional as F
from ..nn import (
    DecoderBlock,
    Dropout,
    Embedding,
    GELUMLP,
    KVCache,
    LayerNorm,
    Linear,
    Module,
    ModuleList,
    MultiHeadAttention,
    RMSNorm,
    SwiGLUMLP,
    init_skipped,
)
from ..nn.layers import DecodeLayouts
from ..tensor import Tensor, no_grad
from .sampling import sample_next_token

_CHOICES = {"norm": ("layernorm", "rmsnorm"), "mlp": ("gelu", "swiglu"), "pos": ("learned", "sinusoidal", "rope")}


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
    mlp_hidden: int | None = None  # None: 4 * n_embd for GELU, 8/3 * n_embd (to a multiple of 32) for SwiGLU
    head_dim: int | None = None  # None: n_embd // n_head

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

    @classmethod
    def from_preset(cls, name: str, **overrides) -> GPTConfig:
        """"gpt2": learned positions, LayerNorm, GELU, biases. "llama": RoPE, RMSNorm, SwiGLU, GQA, no biases."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        settings = dict(PRESETS[name])
        if name == "llama" and overrides.get("n_kv_head") is None:
            settings["n_kv_head"] = max(1, overrides.get("n_head", cls.n_head) // 2)
        settings.update({key: value for key, value in overrides.items() if value is not None})
        return cls(**settings)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS = {
    "gpt2": dict(norm="layernorm", mlp="gelu", pos="learned", bias=True, norm_eps=1e-5),
    "llama": dict(norm="rmsnorm", mlp="swiglu", pos="rope", bias=False, norm_eps=1e-6),
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
        self.blocks = ModuleList(self._block(config) for _ in range(config.n_layer))
        self.ln_f = self._norm(config)
        self.lm_head = Linear(C, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.wte.weight  # one matrix embeds tokens and scores them
        self._init_weights()

    @staticmethod
    def _norm(config: GPTConfig) -> Module:
        if config.norm == "layernorm":
            return LayerNorm(config.n_embd, config.norm_eps, bias=config.bias)
        return RMSNorm(config.n_embd, config.norm_eps)

    @classmethod
    def _block(cls, config: GPTConfig) -> DecoderBlock:
        attention = MultiHeadAttention(
            config.n_embd, config.n_head, config.n_kv_head, config.block_size, config.bias, config.dropout,
            rope=config.pos == "rope", rope_theta=config.rope_theta, head_dim=config.head_dim,
        )
        mlp_class = GELUMLP if config.mlp == "gelu" else SwiGLUMLP
        mlp = mlp_class(config.n_embd, config.mlp_hidden, config.bias, config.dropout)
        return DecoderBlock(cls._norm(config), attention, cls._norm(config), mlp)

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
    def hidden_states(self, idx, kv_caches: list[KVCache] | None = None) -> Tensor:
        """Token ids (B, T) -> final normalized hidden states (B, T, C)."""
        ids = idx.data if isinstance(idx, Tensor) else backend.to_device(idx, self.wte.weight.device)
        if ids.ndim != 2:
            raise ValueError(f"GPT expects token ids of shape (batch, time), got shape {ids.shape}")
        B, T = ids.shape
        start = kv_caches[0].length if kv_caches else 0
        if start + T > self.config.block_size:
            raise ValueError(
                f"sequence of {start + T} tokens is longer than the model's block_size {self.config.block_size}"
            )
        x = self.wte(ids)  # (B, T, C)
        if self.config.pos == "learned":
            x = x + self.wpe.weight[start : start + T]  # positions start..start+T-1: a slice, no gather needed
        elif self.config.pos == "sinusoidal":
            x = x + Tensor(self.position_table[start : start + T])
        x = self.drop(x)
        for layer, block in enumerate(self.blocks):
            x = block(x, kv_caches[layer] if kv_caches else None)
        return self.ln_f(x)

    def forward(self, idx, targets=None) -> tuple[Tensor, Tensor | None]:
        """Token ids (B, T) -> logits (B, T, vocab_size) in the model's dtype, and the mean cross-entropy against
        `targets` (B, T) in float32 at least."""
        logits = self.lm_head(self.hidden_states(idx))
        if targets is None:
            return logits, None
        # A half-precision model's loss is float32, as under PyTorch's autocast (cross_entropy is on its float32
        # list): bfloat16 would round a loss near 2 to steps of 1/128, and float16 loss scaling would overflow.
        logits_float = F.cast(logits, backend.compute_dtype(logits.dtype)).reshape(-1, logits.shape[-1])  # classes last
        return logits, F.cross_entropy(logits_float, targets.reshape(-1))

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
        """Yield the next token ids (B,) one step at a time, continuing the context `idx` (B, T).

        With the KV cache each step feeds only the new token; once the context outgrows block_size, the window
        slides and the cache is refilled from the last block_size tokens, exactly as full recomputation would.
        temperature=0 picks the most likely token (greedy).
        """
        was_training = self.training
        self.eval()
        try:
            context = np.array(backend.to_numpy(idx.data if isinstance(idx, Tensor) else idx), dtype=np.int64)
            if context.ndim != 2 or context.shape[1] == 0:
                raise ValueError(f"generation needs a context of shape (batch, time) with time >= 1, got {context.shape}")
            block = self.config.block_size
            caches, layouts = None, DecodeLayouts()
            for _ in range(max_new_tokens):
                if not use_cache:
                    logits = self._last_logits(context[:, -block:])
                elif caches is None or caches[0].length == block:  # the window slides: refill the cache
                    caches = self.make_kv_caches(context.shape[0])
                    logits = self._last_logits(context[:, -block:], caches)
                else:
                    logits = self.decode_step(context[:, -1], caches, layouts)
                next_ids = sample_next_token(logits, temperature, top_k, top_p, rng)
                context = np.concatenate([context, next_ids[:, None]], axis=1)
                yield next_ids
        finally:
            self.train(was_training)

    def _last_logits(self, ids: np.ndarray, kv_caches: list[KVCache] | None = None):
        """The logits array (B, vocab) after the tokens ids (B, T): only the last position predicts the next token."""
        return self.lm_head(self.hidden_states(self._on_device(ids), kv_caches)[:, -1, :]).data

    def decode_step(self, ids, kv_caches: list[KVCache], layouts: DecodeLayouts):
        """Logits (B, vocab_size), an array, of the token after one new token per sequence, ids (B,), whose keys and
        values are appended to kv_caches: hidden_states and lm_head with T = 1 in inference, on raw arrays in fewer and
        cheaper ops (DecoderBlock.decode). `layouts` keeps the weights laid out for decoding: one per generation."""
        position = kv_caches[0].length
        with backend.device_scope(self.wte.weight.device):
            x = self.wte.weight.data[self._on_device(ids)]  # (B, C)
            if self.config.pos == "learned":
                x = x + self.wpe.weight.data[position]
            elif self.config.pos == "sinusoidal":
                x = x + self.position_table[position]
            for block, kv_cache in zip(self.blocks, kv_caches):
                x = block.decode(x, kv_cache, layouts)
            return layouts.linear(self.ln_f.decode(x), self.lm_head)

    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, use_cache: bool = True, rng=None) -> Tensor:
        """The context (B, T) followed by `max_new_tokens` sampled tokens: (B, T + max_new_tokens) int64."""
        context = backend.to_numpy(idx.data if isinstance(idx, Tensor) else np.asarray(idx)).astype(np.int64)
        new = list(self.stream(context, max_new_tokens, temperature, top_k, top_p, use_cache, rng))
        columns = [context] + [ids[:, None] for ids in new]
        return Tensor(self._on_device(np.concatenate(columns, axis=1)))

    def _on_device(self, ids: np.ndarray):
        device = self.wte.weight.device
        return ids if device == "cpu" else backend.to_device(ids, device)
