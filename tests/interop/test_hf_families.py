"""Mistral, Qwen2 and Gemma 2 checkpoints beyond the parity tests every family shares (test_hf.py): their settings
load as they are, Gemma 2 in bfloat16, folders tinytf saves load in transformers with the same logits, and settings
tinytf cannot honour are refused by name.

Small random models built from configs (never the Hub); the tests against transformers skip without the interop
extra.
"""

import copy
import json

import numpy as np
import pytest
from hf_reference import IDS, TOLERANCE, VOCAB, WINDOW, hf_logits, max_difference

import tinytf
from tinytf.checkpoint import CheckpointError
from tinytf.interop import from_pretrained, save_pretrained
from tinytf.models import GPT, GPTConfig


# --- against transformers ---------------------------------------------------------------------------------------------
def test_the_checkpoints_load_as_the_settings_they_have(hf_models):
    def settings(name, *fields):
        config = from_pretrained(hf_models[name][1]).config
        return tuple(getattr(config, field) for field in fields)

    window_and_biases = ("sliding_window", "full_attention_layers", "bias", "qkv_bias")
    assert settings("mistral", *window_and_biases) == (4, (), False, False)
    assert settings("qwen2", *window_and_biases, "tie_weights") == (4, (0,), False, True, True)
    assert settings("gemma2", *window_and_biases, "head_dim", "query_pre_attn_scalar", "attn_softcap",
                    "final_softcap", "mlp", "tie_weights") == (4, (1, 3), False, False, 24, 20, 1.5, 2.0, "geglu", True)


def test_gemma2_in_bfloat16_is_as_close_to_float32_as_transformers_is(hf, hf_models, tmp_path):
    """A bfloat16 Gemma 2 (its embedding scale rounded to bfloat16, its norms' 1 + w in float32, as transformers
    computes them) is as close to the float32 forward of the same rounded weights as transformers' bfloat16 forward;
    the bound is test_hf.py's half-precision one."""
    torch, transformers = hf
    half_model = copy.deepcopy(hf_models["gemma2"][0]).to(torch.bfloat16)
    half_model.save_pretrained(tmp_path)
    reference = hf_logits(transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, attn_implementation="eager").eval(), IDS)
    with torch.no_grad():
        theirs = half_model(torch.as_tensor(IDS)).logits.float().numpy()
    ours = from_pretrained(tmp_path, dtype="bfloat16")(IDS)[0].numpy()
    print(f"gemma2 bfloat16: max |logit difference| from float32: tinytf {max_difference(ours, reference):.2e}, "
          f"transformers {max_difference(theirs, reference):.2e}")
    assert max_difference(ours, reference) <= 2 * max_difference(theirs, reference) + 1e-3


# --- tinytf's models saved for transformers -------------------------------------------------------------------------
def _tinytf_model(**settings):
    """A small random model whose norm weights and biases are away from their init values."""
    tinytf.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=VOCAB, block_size=64, n_layer=3, n_head=4, n_embd=32, **settings))
    rng = np.random.default_rng(1)
    for parameter in model.parameters():
        if parameter.ndim == 1:
            parameter.data = parameter.data + rng.normal(0, 0.2, parameter.shape).astype(np.float32)
    return model.eval()


LLAMA = dict(norm="rmsnorm", mlp="swiglu", pos="rope", bias=False, n_kv_head=2)
GEMMA2 = dict(LLAMA, mlp="geglu", norm_weight_offset=1.0, scale_embeddings=True, sandwich_norm=True,
              tie_weights=True)
TINYTF_MODELS = {
    "mistral": dict(LLAMA, sliding_window=WINDOW, rope_theta=500.0),
    "qwen2": dict(LLAMA, qkv_bias=True, sliding_window=WINDOW, full_attention_layers=(0, 2), tie_weights=False),
    "qwen2_no_window": dict(LLAMA, qkv_bias=True),
    "gemma2": dict(GEMMA2, sliding_window=WINDOW, full_attention_layers=(1,), head_dim=12, attn_softcap=1.5,
                   final_softcap=2.0, query_pre_attn_scalar=10),
    "gemma2_no_caps": dict(GEMMA2),
}


@pytest.mark.parametrize("name", TINYTF_MODELS)
def test_saved_model_loads_in_transformers_with_the_same_logits(hf, tmp_path, name):
    _, transformers = hf
    model = _tinytf_model(**TINYTF_MODELS[name])
    save_pretrained(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == name.split("_")[0]
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert max_difference(model(IDS)[0].data, hf_logits(hf_model, IDS)) < TOLERANCE


@pytest.mark.parametrize("name", TINYTF_MODELS)
def test_save_and_load_round_trip_is_exact(tmp_path, name):
    model = _tinytf_model(**TINYTF_MODELS[name])
    save_pretrained(model, tmp_path)
    loaded = from_pretrained(tmp_path)
    assert loaded.config == model.config
    for key, array in model.state_dict().items():
        np.testing.assert_array_equal(loaded.state_dict()[key], array, err_msg=key)


# --- refusals -------------------------------------------------------------------------------------------------------
def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("name, changes, message", [
    ("mistral", dict(hidden_act="gelu"), "hidden_act='gelu' is not supported"),
    ("mistral", dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}),
     "rope_parameters.rope_type='yarn' is not supported"),
    ("qwen2", dict(layer_types=["full_attention", "chunked_attention", "full_attention"]),
     "layer_types=.*'chunked_attention'.* is not supported"),
    ("qwen2", dict(layer_types=["full_attention"]), r"layer_types=\['full_attention'\] is not supported"),
    ("gemma2", dict(hidden_activation="gelu"), "hidden_activation='gelu' is not supported"),
    ("gemma2", dict(attention_bias=True), "attention_bias=True is not supported"),
    ("gemma2", dict(use_bidirectional_attention=True), "use_bidirectional_attention=True is not supported"),
])
def test_unsupported_settings_are_refused_naming_key_and_value(tmp_path, name, changes, message):
    save_pretrained(_tinytf_model(**TINYTF_MODELS[name]), tmp_path)
    _edit_config(tmp_path, **changes)
    with pytest.raises(CheckpointError, match=message):
        from_pretrained(tmp_path)


def test_qwen2_without_layer_types_takes_the_window_from_max_window_layers(tmp_path):
    save_pretrained(_tinytf_model(**TINYTF_MODELS["qwen2"]), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["layer_types"]
    (tmp_path / "config.json").write_text(json.dumps(dict(config, max_window_layers=2)))
    assert from_pretrained(tmp_path).config.full_attention_layers == (0, 1)
    (tmp_path / "config.json").write_text(json.dumps(dict(config, use_sliding_window=False)))
    assert from_pretrained(tmp_path).config.sliding_window is None


@pytest.mark.parametrize("settings, message", [
    (dict(LLAMA, sliding_window=WINDOW, bias=True, qkv_bias=True),
     "Mistral has biases nowhere; this model has bias=True"),
    (dict(LLAMA, sliding_window=WINDOW, full_attention_layers=(1,)), "Mistral has the sliding window on every layer"),
    (dict(LLAMA, attn_softcap=30.0), "Llama has no attn_softcap; this model has attn_softcap=30.0"),
    (dict(LLAMA, qkv_bias=True, final_softcap=30.0), "Qwen2 has no final_softcap"),
    (dict(LLAMA, bias=True, qkv_bias=False), "Llama has biases on all attention projections or on none"),
    (dict(query_pre_attn_scalar=8.0), "GPT-2 has no query_pre_attn_scalar"),
    (dict(GEMMA2, qkv_bias=True), "Gemma 2 has biases nowhere; this model has bias=False, qkv_bias=True"),
    (dict(LLAMA, qkv_bias=True, attn_softcap=5.0), "Qwen2 has no attn_softcap"),
    (dict(LLAMA, sandwich_norm=True), "sandwich_norm=True"),
])
def test_save_refuses_settings_the_family_lacks(tmp_path, settings, message):
    with pytest.raises(ValueError, match=message):
        save_pretrained(_tinytf_model(**settings), tmp_path)
