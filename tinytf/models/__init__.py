"""Models: the GPT-2 / Llama-style decoder and its configuration."""

from .gpt import GPT, PRESETS, GPTConfig
from .sampling import filter_logits, sample_next_token

__all__ = ["GPT", "GPTConfig", "PRESETS", "filter_logits", "sample_next_token"]
