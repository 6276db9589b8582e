"""Transformer blocks: the decoder block and the encoder block, pre-norm or post-norm, through one residual rule.

Pre-norm (norm_first=True; GPT-2, Llama): each sublayer reads a normalized copy of the residual stream,
    x = x + attn(norm1(x)); x = x + mlp(norm2(x)).
With "sandwich" norms (Gemma 2) each branch's output is normalized too, before it joins the residual stream:
    x = x + attn_out_norm(attn(norm1(x))); x = x + mlp_out_norm(mlp(norm2(x))).
Post-norm (norm_first=False; the 2017 paper, BERT, BART): the norm follows the residual sum,
    x = norm1(x + attn(x)); x = norm2(x + mlp(x)).
A decoder of an encoder-decoder model has a cross-attention sublayer between the two, with its own norm
(cross_norm), reading the encoder's output: x = x + cross_attn(cross_norm(x), context) (pre-norm), or
x = cross_norm(x + cross_attn(x, context)) (post-norm).
"""

from __future__ import annotations

from ..tensor import Tensor
from .attention import ContextKV
from .kv_cache import KVCache
from .layers import DecodeLayouts
from .module import Module


class DecoderBlock(Module):
    """Self-attention, an optional cross-attention, and the MLP, each a residual sublayer (see the module docstring).

    forward: x (B, T, C) -> (B, T, C). padding_mask (B, S) bool, True = a token: the self-attention's keys that are
    not padding; context: the encoder's output (B, S_src, C_ctx) with context_mask (B, S_src), or the cross-attention's
    ContextKV; position_ids: rows of packed sequences (MultiHeadAttention.forward).
    """

    def __init__(self, norm1: Module, attn: Module, norm2: Module, mlp: Module, attn_out_norm: Module | None = None,
                 mlp_out_norm: Module | None = None, *, norm_first: bool = True, cross_attn: Module | None = None,
                 cross_norm: Module | None = None):
        super().__init__()
        if not norm_first and (attn_out_norm is not None or mlp_out_norm is not None):
            raise ValueError("DecoderBlock: sandwich norms (attn_out_norm, mlp_out_norm) are for pre-norm blocks; "
                             "this one has norm_first=False")
        if (cross_attn is None) != (cross_norm is None):
            raise ValueError("DecoderBlock: cross_attn and cross_norm come together")
        self.norm_first = norm_first
        self.norm1, self.attn, self.norm2, self.mlp = norm1, attn, norm2, mlp
        self.attn_out_norm, self.mlp_out_norm = attn_out_norm, mlp_out_norm
        self.cross_attn, self.cross_norm = cross_attn, cross_norm

    def _residual(self, x, sublayer, norm, out_norm=None, *args):
        """One residual sublayer, pre- or post-norm; `sublayer` (called as sublayer(h, *args)), `norm` and `out_norm`
        are callables, so that forward (Tensors) and decode (raw arrays, bound methods: no closure per token) share
        the rule."""
        if not self.norm_first:
            return norm(x + sublayer(x, *args))
        out = sublayer(norm(x), *args)
        return x + (out if out_norm is None else out_norm(out))

    def forward(self, x: Tensor, kv_cache: KVCache | None = None, position_ids=None, *, padding_mask=None,
                context: Tensor | ContextKV | None = None, context_mask=None) -> Tensor:
        if (context is None) != (self.cross_attn is None):
            raise ValueError("DecoderBlock: a block with cross-attention takes a context, one without none")
        x = self._residual(x, lambda h: self.attn(h, kv_cache, position_ids, key_padding_mask=padding_mask),
                           self.norm1, self.attn_out_norm)
        if self.cross_attn is not None:
            x = self._residual(x, lambda h: self.cross_attn(h, key_padding_mask=context_mask, context=context),
                               self.cross_norm)
        return self._residual(x, self.mlp, self.norm2, self.mlp_out_norm)

    def decode(self, x, kv_cache: KVCache, layouts: DecodeLayouts, context: ContextKV | None = None):
        """forward in inference for one new token per sequence, on raw arrays (no graph): x (B, C) -> (B, C);
        context: the cross-attention's ContextKV of the sources."""
        x = self._residual(x, self.attn.decode, self.norm1.decode, _decode_of(self.attn_out_norm), kv_cache, layouts)
        if self.cross_attn is not None:
            x = self._residual(x, self.cross_attn.decode, self.cross_norm.decode, None, context, layouts)
        return self._residual(x, self.mlp.decode, self.norm2.decode, _decode_of(self.mlp_out_norm), layouts)


def _decode_of(norm: Module | None):
    """An optional norm's decode method (None without the norm)."""
    return None if norm is None else norm.decode


class EncoderBlock(DecoderBlock):
    """Bidirectional self-attention and the MLP (BERT, an encoder-decoder's encoder): a DecoderBlock whose attention
    has causal=False and which has no cross-attention. forward: x (B, T, C), padding_mask (B, T) -> (B, T, C)."""

    def __init__(self, norm1: Module, attn: Module, norm2: Module, mlp: Module, *, norm_first: bool = True):
        if getattr(attn, "causal", False) or getattr(attn, "cross", False):
            raise ValueError("EncoderBlock: the attention must be bidirectional self-attention "
                             "(MultiHeadAttention(..., causal=False))")
        super().__init__(norm1, attn, norm2, mlp, norm_first=norm_first)
