"""The pre-norm decoder block: x = x + attn(norm1(x)); x = x + mlp(norm2(x))."""

from __future__ import annotations

from ..tensor import Tensor
from .attention import KVCache
from .layers import DecodeLayouts
from .module import Module


class DecoderBlock(Module):
    def __init__(self, norm1: Module, attn: Module, norm2: Module, mlp: Module):
        super().__init__()
        self.norm1, self.attn, self.norm2, self.mlp = norm1, attn, norm2, mlp

    def forward(self, x: Tensor, kv_cache: KVCache | None = None) -> Tensor:
        x = x + self.attn(self.norm1(x), kv_cache)
        return x + self.mlp(self.norm2(x))

    def decode(self, x, kv_cache: KVCache, layouts: DecodeLayouts):
        """forward in inference for one new token per sequence, on raw arrays (no graph): x (B, C) -> (B, C)."""
        x = x + self.attn.decode(self.norm1.decode(x), kv_cache, layouts)
        return x + self.mlp.decode(self.norm2.decode(x), layouts)
