"""The pre-norm decoder block: x = x + attn(norm1(x)); x = x + mlp(norm2(x))."""

from __future__ import annotations

from ..tensor import Tensor
from .attention import KVCache
from .module import Module


class DecoderBlock(Module):
    def __init__(self, norm1: Module, attn: Module, norm2: Module, mlp: Module):
        super().__init__()
        self.norm1, self.attn, self.norm2, self.mlp = norm1, attn, norm2, mlp

    def forward(self, x: Tensor, kv_cache: KVCache | None = None) -> Tensor:
        x = x + self.attn(self.norm1(x), kv_cache)
        return x + self.mlp(self.norm2(x))
