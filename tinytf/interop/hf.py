"""Hugging Face checkpoints in and out: GPT-2, Llama, Mistral, Qwen2 and Gemma 2 model folders <-> tinytf's `GPT`.

A Hugging Face model folder holds `config.json` and the weights, as `model.safetensors` or as shards listed in
`model.safetensors.index.json`. Every family is tinytf's one decoder with different settings; their tensors map
onto tinytf's names as follows (per block i, in `transformer.h.{i}` / `model.layers.{i}`):

    tinytf                   GPT-2 ("transformer." prefix)  Llama, Mistral, Qwen2 ("model.")  Gemma 2 ("model.")
    wte                      wte                            embed_tokens                      embed_tokens
    wpe                      wpe                            -  (RoPE)                         -  (RoPE)
    blocks.i.norm1           h.i.ln_1                       layers.i.input_layernorm          (as Llama)
    blocks.i.attn.c_attn     h.i.attn.c_attn                layers.i.self_attn.q_proj | k_proj | v_proj
    blocks.i.attn.c_proj     h.i.attn.c_proj                layers.i.self_attn.o_proj         (as Llama)
    blocks.i.attn_out_norm   -                              -                                 post_attention_layernorm
    blocks.i.norm2           h.i.ln_2                       layers.i.post_attention_layernorm pre_feedforward_layernorm
    blocks.i.mlp.c_fc        h.i.mlp.c_fc                   -                                 -
    blocks.i.mlp.gate/up     -                              layers.i.mlp.gate_proj / up_proj  (as Llama)
    blocks.i.mlp.c_proj      h.i.mlp.c_proj                 layers.i.mlp.down_proj            (as Llama)
    blocks.i.mlp_out_norm    -                              -                                 post_feedforward_layernorm
    ln_f                     ln_f                           norm                              norm
    lm_head                  lm_head (absent when tied)     lm_head (absent when tied)        (as Llama)

(Gemma 2's post_attention_layernorm normalizes the attention's output; Llama's, despite the same name, the MLP's
input.) Mistral, Qwen2 and Gemma 2 are Llama's decoder with a sliding window (on every layer for Mistral, on the
layers `layer_types` names for Qwen2 and Gemma 2), biases on q, k, v (Qwen2), and for Gemma 2 a GeGLU MLP, RMSNorm
scaling by 1 + weight, sandwich norms, scaled embeddings and softcapped scores and logits.

GPT-2 keeps its block weights as Conv1D, (in, out): they are transposed to tinytf's (out, in). tinytf fuses Llama's
q/k/v projections into one matrix, rows [q heads | k heads | v heads], the order GPT-2's c_attn has too.

Everything is read without torch: the safetensors header is JSON, and BF16 tensors are ml_dtypes.bfloat16 arrays.
Weights load in float32 by default, or in the dtype asked for (a bfloat16 checkpoint loaded as bfloat16 is never
widened); a half-precision model saves its tensors as F16 / BF16. No network access ever: a path that is not a local
folder is an error.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import safetensors.numpy

from .. import backend
from ..checkpoint import (CheckpointError, load_json, replace_folder_contents, save_json, staging_folder,
                          write_atomic)
from ..models import GPT, GPTConfig
from ..nn import skip_init

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


_REQUIRED = object()  # a config.json key without a default


class _Settings:
    """config.json's values, each read with its key so that every error can name it."""

    def __init__(self, values: dict, path: Path):
        self.values, self.path = values, path

    def get(self, key: str, default=_REQUIRED):
        if key not in self.values and default is _REQUIRED:
            raise CheckpointError(f"{self.path}: the key {key!r} is missing")
        return self.values.get(key, default)

    def refuse_unless(self, key: str, default, supported: tuple, reason: str) -> None:
        value = self.values.get(key, default)
        if value not in supported:
            raise CheckpointError(
                f"{self.path}: {key}={value!r} is not supported ({reason}; tinytf supports "
                f"{' or '.join(map(repr, supported))})"
            )


# --- what differs between the families --------------------------------------------------------------------------------
def _gpt2_fields(settings: _Settings) -> dict:
    settings.refuse_unless("activation_function", "gelu_new", ("gelu_new", "gelu_pytorch_tanh"),
                           "the MLP uses GELU's tanh approximation")
    settings.refuse_unless("scale_attn_weights", True, (True,), "attention scores are scaled by 1/sqrt(head_dim)")
    settings.refuse_unless("scale_attn_by_inverse_layer_idx", False, (False,), "every layer scales alike")
    settings.refuse_unless("add_cross_attention", False, (False,), "a decoder-only model has no cross-attention")
    return dict(bias=True)


def _gpt2_entries(config: GPTConfig) -> dict:
    if not (config.bias and config.qkv_bias):
        raise ValueError(f"save_pretrained: GPT-2 has biases everywhere, this model has bias={config.bias}, "
                         f"qkv_bias={config.qkv_bias}")
    _refuse_features(config, "GPT-2", *_OFF)
    if config.n_kv_head != config.n_head or config.head_dim not in (None, config.n_embd // config.n_head):
        raise ValueError(
            f"save_pretrained: GPT-2 has n_head key/value heads of size n_embd / n_head; this model has "
            f"n_kv_head={config.n_kv_head}, head_dim={config.head_dim}"
        )
    # tinytf's one dropout rate acts where GPT-2's three do: embeddings, attention probabilities, residual branches.
    return dict(activation_function="gelu_new", embd_pdrop=config.dropout, attn_pdrop=config.dropout)


def _llama_fields(settings: _Settings) -> dict:
    settings.refuse_unless("hidden_act", "silu", ("silu",), "the MLP is SwiGLU")
    bias = settings.get("attention_bias", False)
    if settings.get("mlp_bias", False) != bias:  # tinytf's one `bias` flag covers attention and MLP together
        raise CheckpointError(
            f"{settings.path}: attention_bias={bias!r} with mlp_bias={settings.get('mlp_bias', False)!r} is not "
            "supported (tinytf has biases on both the attention and the MLP projections, or on neither)"
        )
    return dict(bias=bias, rope_theta=_rope_theta(settings))


def _rope_theta(settings: _Settings) -> float:
    """RoPE's base from `rope_parameters` (transformers 5) or the top-level `rope_theta` beside `rope_scaling` (4)."""
    key = "rope_scaling" if settings.get("rope_scaling", None) else "rope_parameters"  # as in transformers
    rope = settings.get(key, None) or {}
    if not isinstance(rope, dict):
        raise CheckpointError(f"{settings.path}: {key} must be an object, got {rope!r}")
    type_key = "type" if "type" in rope and "rope_type" not in rope else "rope_type"  # "type": older configs
    if rope.get(type_key, "default") != "default":
        raise CheckpointError(
            f"{settings.path}: {key}.{type_key}={rope[type_key]!r} is not supported (tinytf has the default rotary "
            "embedding only, without scaling)"
        )
    return float(rope.get("rope_theta", settings.get("rope_theta", 10000.0)))


def _rope_entries(config: GPTConfig) -> dict:
    # transformers 5 reads rope_parameters, transformers 4 the top-level rope_theta.
    return dict(rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta}, rope_theta=config.rope_theta)


# GPTConfig settings that only some families' config.json can express, with their "off" values.
_OFF = dict(sliding_window=None, attn_softcap=None, final_softcap=None, query_pre_attn_scalar=None)
_GEMMA2_ONLY = ("attn_softcap", "final_softcap", "query_pre_attn_scalar")


def _refuse_features(config: GPTConfig, family: str, *fields: str) -> None:
    for field in fields:
        if getattr(config, field) != _OFF[field]:
            raise ValueError(
                f"save_pretrained: {family} has no {field}; this model has {field}={getattr(config, field)!r}"
            )


def _llama_entries(config: GPTConfig) -> dict:
    if config.qkv_bias != config.bias:
        raise ValueError(f"save_pretrained: Llama has biases on all attention projections or on none; this model has "
                         f"bias={config.bias}, qkv_bias={config.qkv_bias}")
    _refuse_features(config, "Llama", *_OFF)
    return dict(hidden_act="silu", attention_bias=config.bias, mlp_bias=config.bias, **_rope_entries(config))


def _check_biases(config: GPTConfig, family: str, qkv_bias: bool) -> None:
    """Mistral, Qwen2 and Gemma 2 have no biases but, for Qwen2, on q, k, v."""
    if config.bias or config.qkv_bias != qkv_bias:
        raise ValueError(f"save_pretrained: {family} has biases {'on q, k, v only' if qkv_bias else 'nowhere'}; this "
                         f"model has bias={config.bias}, qkv_bias={config.qkv_bias}")


def _mistral_fields(settings: _Settings) -> dict:
    settings.refuse_unless("hidden_act", "silu", ("silu",), "the MLP is SwiGLU")
    return dict(bias=False, qkv_bias=False, rope_theta=_rope_theta(settings))


def _mistral_entries(config: GPTConfig) -> dict:
    _check_biases(config, "Mistral", qkv_bias=False)
    if config.full_attention_layers:
        raise ValueError(f"save_pretrained: Mistral has the sliding window on every layer; this model has "
                         f"full_attention_layers={config.full_attention_layers}")
    _refuse_features(config, "Mistral", *_GEMMA2_ONLY)
    return dict(hidden_act="silu", **_rope_entries(config))


_LAYER_TYPES = ("full_attention", "sliding_attention")


def _windows(settings: _Settings, window, default_types: list[str]) -> dict:
    """sliding_window and full_attention_layers from config.json's layer_types (default_types when absent)."""
    types = settings.get("layer_types", None) or default_types
    if (not isinstance(types, list) or len(types) != len(default_types)
            or not all(layer_type in _LAYER_TYPES for layer_type in types)):
        raise CheckpointError(
            f"{settings.path}: layer_types={types!r} is not supported (tinytf takes one of {_LAYER_TYPES} per layer, "
            f"for {len(default_types)} layers)"
        )
    if window is None or "sliding_attention" not in types:
        return dict(sliding_window=None, full_attention_layers=())
    return dict(sliding_window=window,
                full_attention_layers=tuple(i for i, layer_type in enumerate(types) if layer_type == "full_attention"))


def _layer_types(config: GPTConfig) -> list[str]:
    return [_LAYER_TYPES[config.window(layer) is not None] for layer in range(config.n_layer)]


def _qwen2_fields(settings: _Settings) -> dict:
    settings.refuse_unless("hidden_act", "silu", ("silu",), "the MLP is SwiGLU")
    # As transformers' Qwen2Config: without use_sliding_window no layer has the window; layer_types, if absent,
    # puts it on the layers from max_window_layers on.
    window = settings.get("sliding_window", 4096) if settings.get("use_sliding_window", False) else None
    n_layer, first = settings.get("num_hidden_layers"), settings.get("max_window_layers", 28)
    default_types = [_LAYER_TYPES[window is not None and i >= first] for i in range(n_layer)]
    return dict(bias=False, qkv_bias=True, rope_theta=_rope_theta(settings),
                **_windows(settings, window, default_types))


def _qwen2_entries(config: GPTConfig) -> dict:
    _check_biases(config, "Qwen2", qkv_bias=True)
    _refuse_features(config, "Qwen2", *_GEMMA2_ONLY)
    sliding = [layer for layer in range(config.n_layer) if config.window(layer) is not None]
    # head_dim written always: Qwen2's attention reads it without a default for null. max_window_layers, the first
    # layer with the window, tells a reader that predates layer_types the same when the window ends the stack.
    return dict(hidden_act="silu", head_dim=config.head_dim or config.n_embd // config.n_head,
                use_sliding_window=config.sliding_window is not None, sliding_window=config.sliding_window,
                max_window_layers=sliding[0] if sliding else config.n_layer, layer_types=_layer_types(config),
                **_rope_entries(config))


def _gemma2_fields(settings: _Settings) -> dict:
    settings.refuse_unless("hidden_activation", "gelu_pytorch_tanh", ("gelu_pytorch_tanh",),
                           "the MLP is GeGLU with GELU's tanh approximation")
    settings.refuse_unless("attention_bias", False, (False,), "Gemma 2's projections have no biases")
    settings.refuse_unless("use_bidirectional_attention", None, (None, False), "attention is causal")
    n_layer = settings.get("num_hidden_layers")
    default_types = [_LAYER_TYPES[(i + 1) % 2] for i in range(n_layer)]  # the window on layers 0, 2, 4, ...
    scalar, head_dim = settings.get("query_pre_attn_scalar", 256), settings.get("head_dim", 256)
    return dict(bias=False, qkv_bias=False, rope_theta=_rope_theta(settings),
                query_pre_attn_scalar=None if scalar == head_dim else scalar,
                **_windows(settings, settings.get("sliding_window", 4096), default_types))


def _gemma2_entries(config: GPTConfig) -> dict:
    _check_biases(config, "Gemma 2", qkv_bias=False)
    head_dim = config.head_dim or config.n_embd // config.n_head
    # transformers builds Gemma 2's sliding-window mask even when no layer uses it, so the window is never null.
    return dict(hidden_activation="gelu_pytorch_tanh", attention_bias=False, head_dim=head_dim,
                query_pre_attn_scalar=config.query_pre_attn_scalar or head_dim,
                sliding_window=config.sliding_window or config.block_size, layer_types=_layer_types(config),
                **_rope_entries(config))


@dataclasses.dataclass(frozen=True)
class _Family:
    """How one model family maps onto GPT: its fixed architecture, config.json keys and tensor names."""

    architecture: dict  # the GPTConfig settings the family fixes
    hf_class: str
    config_keys: dict  # config.json key -> (GPTConfig field, the value transformers assumes when it is absent)
    gpt_fields: Callable[[_Settings], dict]  # the family's other GPTConfig fields, refusing what tinytf lacks
    hf_entries: Callable[[GPTConfig], dict]  # the family's other config.json entries
    prefix: str  # of every tensor name but lm_head's
    blocks: str  # the list of decoder blocks
    modules: dict[str, tuple[str, ...]]  # tinytf module -> the Hugging Face module(s) it is made of
    block_modules: dict[str, tuple[str, ...]]  # the same inside a block
    conv1d: bool  # block weights stored (in, out)
    ignored: re.Pattern  # buffers that old checkpoints carry and loading skips


# The settings that tell the families' decoders apart; the families without them have them off.
_PLAIN = dict(norm_weight_offset=0.0, scale_embeddings=False, sandwich_norm=False)
_LLAMA_ARCHITECTURE = dict(_PLAIN, norm="rmsnorm", mlp="swiglu", pos="rope")
_LLAMA_CONFIG_KEYS = {
    "vocab_size": ("vocab_size", _REQUIRED), "max_position_embeddings": ("block_size", _REQUIRED),
    "num_hidden_layers": ("n_layer", _REQUIRED), "num_attention_heads": ("n_head", _REQUIRED),
    "num_key_value_heads": ("n_kv_head", None), "hidden_size": ("n_embd", _REQUIRED),
    "head_dim": ("head_dim", None), "intermediate_size": ("mlp_hidden", _REQUIRED),
    "rms_norm_eps": ("norm_eps", 1e-6), "tie_word_embeddings": ("tie_weights", False),
}
_LLAMA_LAYOUT = dict(
    prefix="model.",
    blocks="layers",
    modules={"wte": ("embed_tokens",), "ln_f": ("norm",)},
    block_modules={
        "norm1": ("input_layernorm",),
        "attn.c_attn": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        "attn.c_proj": ("self_attn.o_proj",),
        "norm2": ("post_attention_layernorm",),
        "mlp.gate": ("mlp.gate_proj",), "mlp.up": ("mlp.up_proj",), "mlp.c_proj": ("mlp.down_proj",),
    },
    conv1d=False,
    ignored=re.compile(r"\.rotary_emb\.inv_freq$"),  # the RoPE frequencies, recomputed from rope_theta
)

_FAMILIES = {
    "gpt2": _Family(
        architecture=dict(_PLAIN, norm="layernorm", mlp="gelu", pos="learned"),
        hf_class="GPT2LMHeadModel",
        config_keys={
            "vocab_size": ("vocab_size", _REQUIRED), "n_positions": ("block_size", _REQUIRED),
            "n_layer": ("n_layer", _REQUIRED), "n_head": ("n_head", _REQUIRED), "n_embd": ("n_embd", _REQUIRED),
            "n_inner": ("mlp_hidden", None), "layer_norm_epsilon": ("norm_eps", 1e-5),
            "tie_word_embeddings": ("tie_weights", True), "resid_pdrop": ("dropout", 0.1),
        },
        gpt_fields=_gpt2_fields,
        hf_entries=_gpt2_entries,
        prefix="transformer.",
        blocks="h",
        modules={"wte": ("wte",), "wpe": ("wpe",), "ln_f": ("ln_f",)},
        block_modules={
            "norm1": ("ln_1",), "attn.c_attn": ("attn.c_attn",), "attn.c_proj": ("attn.c_proj",),
            "norm2": ("ln_2",), "mlp.c_fc": ("mlp.c_fc",), "mlp.c_proj": ("mlp.c_proj",),
        },
        conv1d=True,
        ignored=re.compile(r"\.attn\.(masked_)?bias$"),  # the causal mask and its fill value
    ),
    "llama": _Family(
        architecture=_LLAMA_ARCHITECTURE,
        hf_class="LlamaForCausalLM",
        config_keys=_LLAMA_CONFIG_KEYS,
        gpt_fields=_llama_fields,
        hf_entries=_llama_entries,
        **_LLAMA_LAYOUT,
    ),
    "mistral": _Family(
        architecture=_LLAMA_ARCHITECTURE,
        hf_class="MistralForCausalLM",
        config_keys={**_LLAMA_CONFIG_KEYS, "sliding_window": ("sliding_window", 4096)},
        gpt_fields=_mistral_fields,
        hf_entries=_mistral_entries,
        **_LLAMA_LAYOUT,
    ),
    "qwen2": _Family(
        architecture=_LLAMA_ARCHITECTURE,
        hf_class="Qwen2ForCausalLM",
        config_keys=_LLAMA_CONFIG_KEYS,
        gpt_fields=_qwen2_fields,
        hf_entries=_qwen2_entries,
        **_LLAMA_LAYOUT,
    ),
    "gemma2": _Family(
        architecture=dict(_LLAMA_ARCHITECTURE, mlp="geglu", norm_weight_offset=1.0, scale_embeddings=True,
                          sandwich_norm=True),
        hf_class="Gemma2ForCausalLM",
        config_keys={
            **_LLAMA_CONFIG_KEYS, "head_dim": ("head_dim", 256), "tie_word_embeddings": ("tie_weights", True),
            "attn_logit_softcapping": ("attn_softcap", 50.0), "final_logit_softcapping": ("final_softcap", 30.0),
        },
        gpt_fields=_gemma2_fields,
        hf_entries=_gemma2_entries,
        **dict(_LLAMA_LAYOUT, block_modules={
            **_LLAMA_LAYOUT["block_modules"],
            "attn_out_norm": ("post_attention_layernorm",), "norm2": ("pre_feedforward_layernorm",),
            "mlp_out_norm": ("post_feedforward_layernorm",),
        }),
    ),
}


# --- loading ----------------------------------------------------------------------------------------------------------
def from_pretrained(path, device: str = "cpu", dtype=None) -> GPT:
    """A GPT-2, Llama, Mistral, Qwen2 or Gemma 2 model from a local Hugging Face folder, in eval mode, on `device`.

    dtype: the parameters' floating dtype, float32 by default (None); tinytf.bfloat16 or tinytf.float16 (or their
    names) load half-precision weights as they are stored, without widening; "auto" takes the checkpoint's own
    (config.json's "dtype" or "torch_dtype", as transformers writes it, else float32).
    Raises CheckpointError naming the file and the problem: not a local folder, a missing or malformed file, an
    unsupported setting (with its key and value), or tensors that do not fit the config (all of them listed).
    """
    device = backend.check_device(device)  # before any file is read
    if dtype is not None and dtype != "auto":
        dtype = _floating_dtype(dtype)
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(
            f"{str(path)!r} is not a local folder; tinytf never downloads from the Hugging Face Hub: fetch the model "
            "folder (config.json and model.safetensors) yourself and pass its path"
        )
    if not (folder / CONFIG_FILE).exists():
        raise CheckpointError(f"{folder} holds no {CONFIG_FILE}: it is not a Hugging Face model folder")
    hf_config = load_json(folder / CONFIG_FILE)
    model_type = hf_config.get("model_type") if isinstance(hf_config, dict) else None
    if model_type not in _FAMILIES:
        raise CheckpointError(
            f"{folder / CONFIG_FILE}: model_type={model_type!r} is not supported; tinytf loads "
            f"{', '.join(_FAMILIES)}, bert and bart"
        )
    family = _FAMILIES[model_type]
    settings = _Settings(hf_config, folder / CONFIG_FILE)
    config = _read_config(settings, family)
    if dtype == "auto":
        dtype = _checkpoint_dtype(settings)
    # Every parameter is loaded below; the uninitialized ones only give load_state_dict their dtype (casting their
    # garbage may overflow: no warning for that).
    with skip_init(), np.errstate(over="ignore", invalid="ignore"):
        model = GPT(config).to(dtype or backend.DEFAULT_DTYPE)
    # load_state_dict converts each tensor to its parameter's dtype: no conversion when they are the same.
    model.load_state_dict(_to_tinytf(_read_weights(folder), model, family, folder))
    return model.to(device).eval()


def _floating_dtype(dtype) -> np.dtype:
    """`dtype` as a floating np.dtype, or a ValueError."""
    dtype = backend.as_dtype(dtype)
    if not backend.is_floating(dtype):
        raise ValueError(f"from_pretrained: dtype must be a floating dtype or 'auto', got {dtype}")
    return dtype


def _checkpoint_dtype(settings: _Settings) -> np.dtype:
    """The dtype config.json says the weights have ("dtype" in transformers 5, "torch_dtype" before), else float32."""
    name = settings.get("dtype", None) or settings.get("torch_dtype", None) or "float32"
    try:
        return _floating_dtype(name)
    except (TypeError, ValueError):
        raise CheckpointError(f"{settings.path}: dtype {name!r} is not a floating dtype tinytf knows") from None


def _read_config(settings: _Settings, family: _Family) -> GPTConfig:
    fields = {field: settings.get(key, default) for key, (field, default) in family.config_keys.items()}
    try:
        if fields.get("head_dim") == fields["n_embd"] // fields["n_head"]:
            fields["head_dim"] = None  # GPTConfig's way of saying n_embd // n_head
        return GPTConfig(**fields, **family.gpt_fields(settings), **family.architecture)
    except CheckpointError:
        raise
    except (ArithmeticError, TypeError, ValueError) as error:  # values GPTConfig rejects, such as 0 heads
        raise CheckpointError(f"{settings.path}: {error}") from None


def _read_weights(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of the folder's safetensors file(s), in its stored dtype."""
    if (folder / WEIGHTS_FILE).exists():
        return _read_safetensors(folder / WEIGHTS_FILE)
    if (folder / INDEX_FILE).exists():
        index = load_json(folder / INDEX_FILE)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(shard, str) for shard in weight_map.values()):
            raise CheckpointError(f"{folder / INDEX_FILE}: no \"weight_map\" from tensor names to shard files")
        tensors = {}
        for shard in sorted(set(weight_map.values())):
            if Path(shard).name != shard:  # the index must not send the loader outside the folder
                raise CheckpointError(f"{folder / INDEX_FILE}: shard {shard!r} is not a file name in the folder")
            tensors.update(_read_safetensors(folder / shard))
        return tensors
    message = f"{folder} holds neither {WEIGHTS_FILE} nor {INDEX_FILE}"
    pickles = sorted(path.name for path in folder.iterdir() if path.suffix in (".bin", ".pt", ".pth"))
    if pickles:
        message += f"; {', '.join(pickles)} are PyTorch pickles, which need torch: convert them to safetensors"
    raise CheckpointError(message)


_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """The tensors of one safetensors file, each in its stored dtype. The format: an 8-byte little-endian header
    size, a JSON header {name: {"dtype", "shape", "data_offsets": [begin, end]}} and the raw data, offsets counted
    from the data's start."""
    try:
        with open(path, "rb") as file:
            header_size = int.from_bytes(file.read(8), "little")
            header = json.loads(file.read(header_size))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file is missing") from None
    except OSError as error:
        raise CheckpointError(f"{path}: cannot be read ({error.strerror or error})") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (its header is not a JSON object)")
    header.pop("__metadata__", None)
    data_start = 8 + header_size
    # Mapped rather than read: the tensors stay views of the file until load_state_dict copies them.
    data = np.memmap(path, np.uint8, "r", data_start) if path.stat().st_size > data_start else np.empty(0, np.uint8)
    return {name: _tensor(data, path, name, entry) for name, entry in header.items()}


def _tensor(data: np.ndarray, path: Path, name: str, entry) -> np.ndarray:
    try:
        dtype_name, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path}: the header entry of {name!r} is malformed: {entry!r:.200}") from None
    if dtype_name not in _SAFETENSORS_DTYPES:
        raise CheckpointError(f"{path}: {name!r} has dtype {dtype_name}; tinytf loads {', '.join(_SAFETENSORS_DTYPES)}")
    dtype = backend.as_dtype(_SAFETENSORS_DTYPES[dtype_name]).newbyteorder("<")
    if end - begin != math.prod(shape) * dtype.itemsize or not 0 <= begin <= end <= data.size:
        raise CheckpointError(f"{path}: {name!r} does not fit the file (truncated or corrupt)")
    return data[begin:end].view(dtype).reshape(shape)


def _to_tinytf(tensors: dict[str, np.ndarray], model: GPT, family: _Family, folder: Path) -> dict[str, np.ndarray]:
    """The model's state dict built from a checkpoint's tensors; one error lists every missing, unexpected or
    mis-shaped tensor."""
    # Checkpoints of the bare model (GPT2Model, LlamaModel) name their tensors without the prefix.
    prefix = family.prefix if any(name.startswith(family.prefix) for name in tensors) else ""
    links = _links(model, family, prefix)
    expected = {name: shape for link in links for name, shape in link.theirs.items()}
    ignored = {name for name in tensors if family.ignored.search(name)}
    if model.config.tie_weights:
        ignored.add("lm_head.weight")  # some checkpoints store the tied head too; transformers ignores it as well
    check_weights_fit(folder, tensors, expected, lambda name: name in ignored)

    state = {}
    for link in links:
        parts = [tensors[name] for name in link.theirs]
        array = np.concatenate(parts) if len(parts) > 1 else parts[0]
        state[link.ours] = _transposed(array) if link.transposed else array
    if model.config.tie_weights:
        state["lm_head.weight"] = state["wte.weight"]
    return state


def check_weights_fit(folder: Path, tensors: dict, expected: dict, is_ignored) -> None:
    """A CheckpointError listing, together, the tensors missing from `tensors`, the unexpected ones (those
    `is_ignored(name)` does not skip) and the mis-shaped ones, against `expected` ({name: shape})."""
    missing = [name for name in expected if name not in tensors]
    unexpected = [name for name in tensors if name not in expected and not is_ignored(name)]
    misshaped = [f"{name}: checkpoint {tensors[name].shape}, model {shape}"
                 for name, shape in expected.items() if name in tensors and tensors[name].shape != shape]
    problems = [f"{title}: {', '.join(names)}" for title, names in
                (("missing tensors", missing), ("unexpected tensors", unexpected), ("mis-shaped tensors", misshaped))
                if names]
    if problems:
        raise CheckpointError(f"{folder}: the weights do not fit the model its {CONFIG_FILE} describes: "
                              + " | ".join(problems))


def _transposed(array: np.ndarray, band: int = 64) -> np.ndarray:
    """array.T, C-contiguous. Copied a band of rows at a time, which stays in cache: NumPy's plain copy of the
    transposed view strides across all of memory and is a few times slower (most of GPT-2's load time)."""
    out = np.empty(array.shape[::-1], array.dtype)
    for start in range(0, array.shape[0], band):
        out[:, start : start + band] = array[start : start + band].T
    return out


@dataclasses.dataclass
class _Link:
    """One tinytf tensor and the Hugging Face tensors (name -> shape) it is made of, concatenated along axis 0."""

    ours: str
    theirs: dict[str, tuple[int, ...]]
    transposed: bool


def _links(model: GPT, family: _Family, prefix: str) -> list[_Link]:
    config = model.config
    head_dim = config.head_dim or config.n_embd // config.n_head
    qkv_rows = (config.n_head * head_dim, config.n_kv_head * head_dim, config.n_kv_head * head_dim)
    links = []
    for ours, array in model.state_dict().items():
        module, kind = ours.rsplit(".", 1)  # "blocks.3.attn.c_attn", "weight"
        if module == "lm_head":
            if config.tie_weights:
                continue  # stored once, as the embedding
            modules, transposed = ("lm_head",), False
        elif module.startswith("blocks."):
            _, index, inner = module.split(".", 2)
            modules = tuple(f"{prefix}{family.blocks}.{index}.{name}" for name in family.block_modules[inner])
            transposed = family.conv1d and array.ndim == 2
        else:
            modules, transposed = tuple(prefix + name for name in family.modules[module]), False
        shape = array.shape[::-1] if transposed else array.shape
        rows = qkv_rows if len(modules) == 3 else (shape[0],)  # only Llama's q/k/v come in parts
        theirs = {f"{name}.{kind}": (part_rows, *shape[1:]) for name, part_rows in zip(modules, rows)}
        links.append(_Link(ours, theirs, transposed))
    return links


# --- saving -----------------------------------------------------------------------------------------------------------
def save_pretrained(model: GPT, path) -> Path:
    """Write `config.json` and `model.safetensors` into the folder `path` (created if needed), in the layout that
    `transformers.AutoModelForCausalLM.from_pretrained(path)` loads, each tensor in the model's dtype (bfloat16 as
    safetensors "BF16"). Returns the folder.

    The two files replace the folder's old ones together: a crash at any moment leaves the old model or the new one,
    never the new weights under the old config (see `tinytf.checkpoint.replace_folder_contents`)."""
    model_type = _model_type_of(model.config)
    family = _FAMILIES[model_type]
    hf_config = {
        "architectures": [family.hf_class],
        "model_type": model_type,
        **{key: getattr(model.config, field) for key, (field, _) in family.config_keys.items()},
        **family.hf_entries(model.config),
        # Token ids belong to a tokenizer, which tinytf does not save. Unset, generate() stops only at its length
        # (transformers' defaults, such as Llama's eos_token_id 2, would stop it at an arbitrary token).
        "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
        # The weights' dtype, under transformers 5's key and 4's, for dtype="auto" loading.
        "dtype": model.wte.weight.dtype.name, "torch_dtype": model.wte.weight.dtype.name,
    }
    state = model.state_dict()
    tensors = {}
    for link in _links(model, family, family.prefix):
        array = backend.to_numpy(state[link.ours])
        array = array.T if link.transposed else array
        boundaries = np.cumsum([shape[0] for shape in link.theirs.values()])[:-1]
        for name, part in zip(link.theirs, np.split(array, boundaries)):
            tensors[name] = np.ascontiguousarray(part)  # safetensors writes the raw buffer
    return write_folder(Path(path), tensors, hf_config)


def write_folder(folder: Path, tensors: dict[str, np.ndarray], hf_config: dict) -> Path:
    """config.json and model.safetensors written into `folder` (created if missing) as one change.

    Both files are written into a staging folder beside `folder` and moved in together, so that a crash never pairs
    the new weights with the old config. Other files in `folder` (a tokenizer, a README) stay."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"save_pretrained: {folder} is a file; pass a folder (it is created if missing)")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_folder(folder)
    try:
        # "format": "pt" tells transformers the tensors are laid out as PyTorch's, as every Hub checkpoint says.
        write_atomic(staging / WEIGHTS_FILE, safetensors.numpy.save(tensors, metadata={"format": "pt"}))
        save_json(staging / CONFIG_FILE, hf_config)
        replace_folder_contents(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def _model_type_of(config: GPTConfig) -> str:
    matching = [model_type for model_type, family in _FAMILIES.items()
                if all(getattr(config, key) == value for key, value in family.architecture.items())]
    if not matching:
        raise ValueError(
            f"save_pretrained writes GPT-2 (layernorm, gelu, learned positions), Llama, Mistral, Qwen2 (rmsnorm, "
            f"swiglu, rope) or Gemma 2 (rmsnorm with weight offset 1, geglu, rope, scaled embeddings, sandwich norms) "
            f"models; this one has norm={config.norm!r}, mlp={config.mlp!r}, pos={config.pos!r}, "
            f"norm_weight_offset={config.norm_weight_offset}, scale_embeddings={config.scale_embeddings}, "
            f"sandwich_norm={config.sandwich_norm}"
        )
    # Llama, Mistral and Qwen2 share one architecture: the attention tells them apart.
    if matching[0] == "llama" and config.qkv_bias and not config.bias:
        return "qwen2"
    if matching[0] == "llama" and config.sliding_window is not None:
        return "mistral"
    return matching[0]
