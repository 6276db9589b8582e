"""Modules: layers with parameters, convolutions and pooling, attention, the decoder block; nn.functional: the ops
and attention."""

from . import functional
from .attention import MultiHeadAttention
from .block import DecoderBlock
from .conv import (AdaptiveAvgPool2d, AvgPool2d, BatchNorm2d, Conv1d, Conv2d, ConvTranspose2d, GroupNorm,
                   MaxPool2d)
from .kv_cache import KVCache
from .layers import Dropout, Embedding, GatedMLP, GELUMLP, LayerNorm, Linear, RMSNorm
from .module import Module, ModuleList, Parameter, init_skipped, skip_init

__all__ = [
    "AdaptiveAvgPool2d", "AvgPool2d", "BatchNorm2d", "Conv1d", "Conv2d", "ConvTranspose2d", "DecoderBlock", "Dropout",
    "Embedding", "GatedMLP", "GELUMLP", "GroupNorm", "KVCache", "LayerNorm", "Linear", "MaxPool2d", "Module",
    "ModuleList", "MultiHeadAttention", "Parameter", "RMSNorm", "init_skipped", "skip_init",
]
