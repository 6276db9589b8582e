"""Models: the GPT-2 / Llama-style decoder, its configuration, and Hugging Face checkpoints in and out."""

from .gpt import GPT, PRESETS, GPTConfig
from .hf import from_pretrained, save_pretrained
from .sampling import filter_logits, sample_next_token

__all__ = ["GPT", "GPTConfig", "PRESETS", "filter_logits", "from_pretrained", "sample_next_token", "save_pretrained"]
