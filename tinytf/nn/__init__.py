"""Modules: layers with parameters, attention, the decoder block."""

from .attention import KVCache, MultiHeadAttention
from .block import DecoderBlock
from .layers import Dropout, Embedding, GELUMLP, LayerNorm, Linear, RMSNorm, SwiGLUMLP
from .module import Module, ModuleList, Parameter, skip_init

__all__ = [
    "DecoderBlock", "Dropout", "Embedding", "GELUMLP", "KVCache", "LayerNorm", "Linear", "Module", "ModuleList",
    "MultiHeadAttention", "Parameter", "RMSNorm", "SwiGLUMLP", "skip_init",
]
