"""The pre-norm decoder block: x = x + attn(norm1(x)); x = x + mlp(norm2(x)).

With "sandwich" norms (Gemma 2) each branch's output is normalized too, before it joins the residual stream:
x = x + attn_out_norm(attn(norm1(x))); x = x + mlp_out_norm(mlp(norm2(x))).
"""

from __future__ import annotations

from ..tensor import Tensor
from .kv_cache import KVCache
from .layers import DecodeLayouts
from .module import Module


class DecoderBlock(Module):
    def __init__(self, norm1: Module, attn: Module, norm2: Module, mlp: Module, attn_out_norm: Module | None = None,
                 mlp_out_norm: Module | None = None):
        super().__init__()
        self.norm1, self.attn, self.norm2, self.mlp = norm1, attn, norm2, mlp
        self.attn_out_norm, self.mlp_out_norm = attn_out_norm, mlp_out_norm

    def forward(self, x: Tensor, kv_cache: KVCache | None = None, position_ids=None) -> Tensor:
        """x (B, T, C) -> (B, T, C); position_ids: rows of packed sequences (MultiHeadAttention.forward)."""
        attended = self.attn(self.norm1(x), kv_cache, position_ids)
        x = x + (attended if self.attn_out_norm is None else self.attn_out_norm(attended))
        transformed = self.mlp(self.norm2(x))
        return x + (transformed if self.mlp_out_norm is None else self.mlp_out_norm(transformed))

    def decode(self, x, kv_cache: KVCache, layouts: DecodeLayouts):
        """forward in inference for one new token per sequence, on raw arrays (no graph): x (B, C) -> (B, C)."""
        attended = self.attn.decode(self.norm1.decode(x), kv_cache, layouts)
        x = x + (attended if self.attn_out_norm is None else self.attn_out_norm.decode(attended))
        transformed = self.mlp.decode(self.norm2.decode(x), layouts)
        return x + (transformed if self.mlp_out_norm is None else self.mlp_out_norm.decode(transformed))
