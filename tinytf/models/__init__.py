"""Models: the decoder of GPT-2, Llama, Mistral, Qwen2 and Gemma 2, its configuration, generation, sampling and
beam search.

Hugging Face folders in and out live a layer above, in tinytf.interop.
"""

from .beam import beam_search
from .gpt import GPT, PRESETS, GPTConfig
from .sampling import filter_logits, sample_next_token

__all__ = ["GPT", "GPTConfig", "PRESETS", "beam_search", "filter_logits", "sample_next_token"]
