"""Modules: layers with parameters, convolutions and pooling, attention, the decoder and encoder blocks, heads;
nn.functional: the ops and attention."""

from . import functional
from .attention import ContextKV, MultiHeadAttention
from .block import DecoderBlock, EncoderBlock
from .conv import (AdaptiveAvgPool2d, AvgPool2d, BatchNorm2d, Conv1d, Conv2d, ConvTranspose2d, GroupNorm,
                   MaxPool2d)
from .heads import LMHead, MaskedLMHead, SequenceClassificationHead, mean_pool
from .kv_cache import KVCache
from .layers import Dropout, Embedding, GatedMLP, GELUMLP, LayerNorm, Linear, RMSNorm
from .module import Module, ModuleList, Parameter, init_skipped, skip_init

__all__ = [
    "AdaptiveAvgPool2d", "AvgPool2d", "BatchNorm2d", "ContextKV", "Conv1d", "Conv2d", "ConvTranspose2d", "DecoderBlock",
    "Dropout", "Embedding", "EncoderBlock", "GatedMLP", "GELUMLP", "GroupNorm", "KVCache", "LayerNorm", "Linear",
    "LMHead", "MaskedLMHead", "MaxPool2d", "Module", "ModuleList", "MultiHeadAttention", "Parameter", "RMSNorm",
    "SequenceClassificationHead", "init_skipped", "mean_pool", "skip_init",
]
