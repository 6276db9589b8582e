"""Other frameworks' model folders in and out, above the models (the models never import this package).

    model = from_pretrained("path/to/gpt2")      # a local Hugging Face folder -> a tinytf model
    save_pretrained(model, "my-gpt2")            # a folder that transformers' Auto classes load

Decoders (GPT-2, Llama, Mistral, Qwen2, Gemma 2 -> tinytf.models.GPT) are hf.py's; BERT (-> Encoder and its masked-LM
and classification models) and BART (-> EncoderDecoder) are bert_bart.py's. T5 is refused by name.
"""

from pathlib import Path

from ..checkpoint import CheckpointError, load_json
from . import bert_bart, hf

T5_REFUSAL = ("model_type='t5' is not supported (T5's relative position buckets, RMS norm without bias and gated "
              "GELU are not in tinytf); tinytf loads bert, bart, gpt2, llama, mistral, qwen2 and gemma2")


def from_pretrained(path, device: str = "cpu", dtype=None):
    """The model of a local Hugging Face folder (config.json and safetensors weights), on `device`."""
    config_file = Path(path) / hf.CONFIG_FILE
    hf_config = load_json(config_file) if config_file.is_file() else None
    model_type = hf_config.get("model_type") if isinstance(hf_config, dict) else None
    if model_type == "t5":
        raise CheckpointError(f"{config_file}: {T5_REFUSAL}")
    load = bert_bart.from_pretrained if model_type in bert_bart.MODEL_TYPES else hf.from_pretrained
    return load(path, device, dtype)


def save_pretrained(model, path) -> Path:
    """Write `model` as a Hugging Face folder that transformers loads with the same outputs."""
    save = bert_bart.save_pretrained if isinstance(model, bert_bart.MODEL_CLASSES) else hf.save_pretrained
    return save(model, path)


__all__ = ["from_pretrained", "save_pretrained"]
