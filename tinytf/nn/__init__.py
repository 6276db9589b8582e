"""Modules: layers with parameters, attention, the decoder block; nn.functional: the ops and attention."""

from . import functional
from .attention import KVCache, MultiHeadAttention
from .block import DecoderBlock
from .layers import Dropout, Embedding, GELUMLP, LayerNorm, Linear, RMSNorm, SwiGLUMLP
from .module import Module, ModuleList, Parameter, init_skipped, skip_init

__all__ = [
    "DecoderBlock", "Dropout", "Embedding", "GELUMLP", "KVCache", "LayerNorm", "Linear", "Module", "ModuleList",
    "MultiHeadAttention", "Parameter", "RMSNorm", "SwiGLUMLP", "init_skipped", "skip_init",
]
