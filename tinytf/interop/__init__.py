"""Other frameworks' model folders in and out, above the models (the models never import this package).

    model = from_pretrained("path/to/gpt2")      # a local Hugging Face folder -> tinytf.models.GPT
    save_pretrained(model, "my-gpt2")            # a folder that transformers.AutoModelForCausalLM loads
"""

from .hf import from_pretrained, save_pretrained

__all__ = ["from_pretrained", "save_pretrained"]
