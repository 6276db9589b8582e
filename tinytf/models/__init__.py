"""Models: the decoder of GPT-2, Llama, Mistral, Qwen2 and Gemma 2; BERT's encoder; the encoder-decoder of BART
and the original Transformer; their configurations, generation, sampling and beam search.

Hugging Face folders in and out live a layer above, in tinytf.interop.
"""

from .beam import beam_search
from .encoder import Encoder, EncoderConfig, EncoderForMaskedLM, EncoderForSequenceClassification
from .encoder_decoder import EncoderDecoder, EncoderDecoderConfig
from .gpt import GPT, PRESETS, GPTConfig
from .sampling import filter_logits, sample_next_token

__all__ = [
    "GPT", "GPTConfig", "PRESETS", "Encoder", "EncoderConfig", "EncoderDecoder", "EncoderDecoderConfig",
    "EncoderForMaskedLM", "EncoderForSequenceClassification", "beam_search", "filter_logits", "sample_next_token",
]
