"""The random transformers models that tests/interop compares tinytf with, built offline from configs, and the
comparison helpers: one set of models and one set of parity tests for every family tinytf loads."""

import numpy as np

TOLERANCE = 5e-5  # max |logit difference| against transformers, float32
VOCAB = 97
WINDOW = 4  # Hugging Face's sliding_window: a query sees its last 4 keys, itself included
IDS = np.random.default_rng(0).integers(0, VOCAB, (2, 40))  # 10 windows long
PROMPT = IDS[:1, :5]
NEW_TOKENS = 20

# name -> (config class, model class, settings). GPT-2; Llama with GQA and an explicit head_dim (6 heads of 10 in
# width 48); Llama with MQA and tied embeddings; Mistral: the window on every layer, GQA; Qwen2: biases on q, k, v,
# the window on the layers from max_window_layers = 1 on, tied embeddings; Gemma 2: the window on layers 0 and 2,
# head_dim 24 apart from hidden_size / heads = 16, query_pre_attn_scalar apart from head_dim, softcaps small enough
# to bend the scores and logits of these random weights. No special tokens, so that generate() never stops early.
HF_MODELS = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_positions=64, n_embd=48, n_layer=2, n_head=4,
                                                    layer_norm_epsilon=1e-4)),
    "llama_gqa": ("LlamaConfig", "LlamaForCausalLM", dict(
        hidden_size=48, intermediate_size=112, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
        head_dim=10, max_position_embeddings=64, rope_theta=500.0, rms_norm_eps=1e-5)),
    "llama_mqa_tied": ("LlamaConfig", "LlamaForCausalLM", dict(
        hidden_size=48, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
        max_position_embeddings=64, tie_word_embeddings=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(
        hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=64, sliding_window=WINDOW, rms_norm_eps=1e-5)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2,
        max_position_embeddings=64, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1,
        tie_word_embeddings=True)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=24, query_pre_attn_scalar=20, max_position_embeddings=64, sliding_window=WINDOW,
        attn_logit_softcapping=1.5, final_logit_softcapping=2.0)),
}


def build_hf_models(hf, folder_for) -> dict:
    """name -> (transformers model in eval mode, the folder it saved itself to), for every model of HF_MODELS.

    Eager attention: transformers' other implementations drop Gemma 2's softcap. folder_for(name): a new folder."""
    torch, transformers = hf
    torch.manual_seed(0)
    models = {}
    for name, (config_class, model_class, settings) in HF_MODELS.items():
        config = getattr(transformers, config_class)(vocab_size=VOCAB, initializer_range=0.1, bos_token_id=None,
                                                     eos_token_id=None, pad_token_id=None, **settings)
        config._attn_implementation = "eager"
        model = getattr(transformers, model_class)(config).eval()
        with torch.no_grad():  # norm weights and biases start at 0 or 1: move them, so a loader must read them
            for parameter in model.parameters():
                if parameter.ndim == 1:
                    parameter.add_(0.2 * torch.randn_like(parameter))
        folder = folder_for(name)
        model.save_pretrained(folder)
        models[name] = model, folder
    return models


def hf_logits(hf_model, ids):
    import torch

    with torch.no_grad():
        return hf_model(torch.as_tensor(ids)).logits.numpy()


def max_difference(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())
