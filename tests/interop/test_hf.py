"""Hugging Face checkpoints: tinytf matches transformers on GPT-2, Llama, Mistral, Qwen2 and Gemma 2 weights (logits,
greedy generation with and without the KV cache, past the sliding windows), saves folders transformers loads, and
refuses malformed or unsupported checkpoints with errors that name the problem (test_hf_families.py: the settings
only Mistral, Qwen2 and Gemma 2 have).

The tests against transformers build small random models from configs (never the Hub) and skip when the interop
extra is absent; the others need only NumPy and safetensors (and tokenizers for the sampling CLI).
"""

import copy
import io
import json

import numpy as np
import pytest
import safetensors.numpy
from hf_reference import HF_MODELS, IDS, NEW_TOKENS, PROMPT, TOLERANCE, VOCAB, hf_logits, max_difference

import tinytf
import tinytf.sample as sample_module
from tinytf import backend
from tinytf.checkpoint import CheckpointError
from tinytf.interop import from_pretrained, save_pretrained
from tinytf.models import GPT, GPTConfig


# --- against transformers ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", HF_MODELS)
def test_logits_match_transformers(hf_models, name):
    hf_model, folder = hf_models[name]
    model = from_pretrained(folder)
    difference = max_difference(model(IDS)[0].data, hf_logits(hf_model, IDS))
    print(f"{name}: max |logit difference| {difference:.2e}")
    assert difference < TOLERANCE


@pytest.mark.parametrize("name", HF_MODELS)
def test_greedy_generation_matches_transformers_with_and_without_cache(hf_models, name):
    import torch

    hf_model, folder = hf_models[name]
    model = from_pretrained(folder)
    with torch.no_grad():
        reference = hf_model.generate(torch.as_tensor(PROMPT), max_new_tokens=NEW_TOKENS, do_sample=False,
                                      output_logits=True, return_dict_in_generate=True)
    expected = reference.sequences.numpy()
    for use_cache in (True, False):
        np.testing.assert_array_equal(model.generate(PROMPT, NEW_TOKENS, temperature=0, use_cache=use_cache).data,
                                      expected)
    # Per step, past the window: tinytf's decoding logits (decode_step) and its logits from the whole sequence.
    reference_logits = np.stack([logits[0].numpy() for logits in reference.logits])
    caches = model.make_kv_caches(1)
    first = model.logits(model.hidden_states(PROMPT, caches)[:, -1]).data
    layouts = tinytf.nn.layers.DecodeLayouts()
    decoded = [first] + [model.decode_step(expected[:, PROMPT.shape[1] + step], caches, layouts)
                         for step in range(NEW_TOKENS - 1)]
    difference = max_difference(np.concatenate(decoded), reference_logits)
    print(f"{name}: max |decoding logit difference| {difference:.2e}")
    assert difference < TOLERANCE
    full_logits = model(expected[:, :-1])[0].data[0, PROMPT.shape[1] - 1:]
    assert max_difference(full_logits, reference_logits) < TOLERANCE


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_files_load_as_float32(hf, hf_models, tmp_path, dtype):
    torch, transformers = hf
    hf_model, _ = hf_models["llama_gqa"]
    copy.deepcopy(hf_model).to(getattr(torch, dtype)).save_pretrained(tmp_path)
    model = from_pretrained(tmp_path)
    assert all(array.dtype == np.float32 for array in model.state_dict().values())
    widened = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert max_difference(model(IDS)[0].data, hf_logits(widened, IDS)) < TOLERANCE


def _bits(array) -> np.ndarray:
    """The raw 16 bits of a float16 or bfloat16 array (NumPy) or tensor (torch): equal bits, equal values."""
    import torch

    return array.view(np.int16) if isinstance(array, np.ndarray) else array.view(torch.int16).numpy()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_files_load_without_widening_when_asked(hf, hf_models, tmp_path, dtype):
    torch, transformers = hf
    hf_model, _ = hf_models["llama_gqa"]
    half_model = copy.deepcopy(hf_model).to(getattr(torch, dtype))
    half_model.save_pretrained(tmp_path)
    model = from_pretrained(tmp_path, dtype=dtype)
    assert {array.dtype for array in model.state_dict().values()} == {backend.as_dtype(dtype)}
    # Bit for bit the file's values (q, k and v are fused, in that order, as tinytf stores them).
    theirs = half_model.state_dict()
    np.testing.assert_array_equal(_bits(model.wte.weight.data), _bits(theirs["model.embed_tokens.weight"]))
    np.testing.assert_array_equal(_bits(model.blocks[1].mlp.up.weight.data),
                                  _bits(theirs["model.layers.1.mlp.up_proj.weight"]))
    fused = torch.cat([theirs[f"model.layers.0.self_attn.{name}_proj.weight"] for name in "qkv"])
    np.testing.assert_array_equal(_bits(model.blocks[0].attn.c_attn.weight.data), _bits(fused))
    assert from_pretrained(tmp_path, dtype="auto").wte.weight.dtype == backend.as_dtype(dtype)  # config.json's dtype
    # The half-precision forward is as close to the float32 one (same rounded weights) as transformers' own
    # half-precision forward is: both round activations at every op, so neither is expected to be closer than about
    # the other (FlashAttention's tests justify tolerances this way); the factor 2 leaves room for different
    # rounding points, and the 1e-3 floor for rows where transformers happens to round less.
    reference = hf_logits(transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval(),
                           IDS)
    with torch.no_grad():
        theirs_half = half_model(torch.as_tensor(IDS)).logits.float().numpy()
    ours_half = model(IDS)[0]
    assert ours_half.dtype == backend.as_dtype(dtype)
    print(f"{dtype}: max |logit difference| from float32: tinytf {max_difference(ours_half.numpy(), reference):.2e}, "
          f"transformers {max_difference(theirs_half, reference):.2e}")
    assert max_difference(ours_half.numpy(), reference) <= 2 * max_difference(theirs_half, reference) + 1e-3


def test_a_bfloat16_model_saves_bf16_tensors_that_transformers_reads(hf, tmp_path):
    torch, transformers = hf
    model = _tinytf_model("llama", tie_weights=False).to(tinytf.bfloat16)
    save_pretrained(model, tmp_path)
    header = _safetensors_header(tmp_path / "model.safetensors")
    assert {entry["dtype"] for entry in header.values()} == {"BF16"}
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype="auto")
    assert hf_model.dtype == torch.bfloat16
    np.testing.assert_array_equal(_bits(hf_model.state_dict()["model.layers.1.mlp.down_proj.weight"]),
                                  _bits(model.blocks[1].mlp.c_proj.weight.data))
    np.testing.assert_array_equal(_bits(hf_model.state_dict()["lm_head.weight"]), _bits(model.lm_head.weight.data))
    # Read back by tinytf in bfloat16: the same model, bit for bit.
    loaded = from_pretrained(tmp_path, dtype="auto")
    for name, array in model.state_dict().items():
        np.testing.assert_array_equal(_bits(loaded.state_dict()[name]), _bits(array), err_msg=name)


def _safetensors_header(path) -> dict:
    payload = path.read_bytes()
    header = json.loads(payload[8 : 8 + int.from_bytes(payload[:8], "little")])
    header.pop("__metadata__", None)
    return header


@pytest.mark.parametrize("preset, overrides", [("gpt2", {}), ("llama", dict(bias=True, tie_weights=False))])
def test_saved_model_loads_in_transformers_with_the_same_logits(hf, tmp_path, preset, overrides):
    _, transformers = hf
    model = _tinytf_model(preset, **overrides)
    save_pretrained(model, tmp_path)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert max_difference(model(IDS)[0].data, hf_logits(hf_model, IDS)) < TOLERANCE


# --- tinytf's own round trip and checkpoint variants (no torch) ------------------------------------------------------
def _tinytf_model(preset, **overrides):
    """A small random model whose norm weights and biases are away from their init values."""
    tinytf.manual_seed(0)
    settings = dict(vocab_size=VOCAB, block_size=64, n_layer=2, n_head=4, n_embd=32, **overrides)
    model = GPT(GPTConfig.from_preset(preset, **settings))
    rng = np.random.default_rng(1)
    for parameter in model.parameters():
        if parameter.ndim == 1:
            parameter.data = parameter.data + rng.normal(0, 0.2, parameter.shape).astype(np.float32)
    return model.eval()


@pytest.fixture(params=["gpt2", "llama"])
def saved(request, tmp_path):
    """(model, folder it was saved to) for a GPT-2- and a Llama-style model."""
    model = _tinytf_model(request.param)
    save_pretrained(model, tmp_path / "model")
    return model, tmp_path / "model"


def _assert_same_model(model, folder):
    loaded = from_pretrained(folder)
    assert loaded.config == model.config
    for name, array in model.state_dict().items():
        np.testing.assert_array_equal(loaded.state_dict()[name], array, err_msg=name)


def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_save_and_load_round_trip_is_exact(saved):
    _assert_same_model(*saved)


@pytest.mark.parametrize("preset", ["gpt2", "llama"])
def test_a_model_saved_from_a_device_loads_onto_it_with_the_same_logits(tmp_path, preset, device):
    model = _tinytf_model(preset)
    ids = np.random.default_rng(0).integers(0, VOCAB, size=(2, 9))
    with tinytf.no_grad():
        expected = model(tinytf.tensor(ids))[0].numpy()
        save_pretrained(model.to(device), tmp_path)
        loaded = from_pretrained(tmp_path, device=device)
        logits = loaded(tinytf.tensor(ids, device=device))[0]
    assert {parameter.device for parameter in loaded.parameters()} == {backend.canonical_device(device)}
    assert logits.device == backend.canonical_device(device)
    np.testing.assert_allclose(logits.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_loading_onto_a_device_the_machine_lacks_fails_before_reading(tmp_path):
    with pytest.raises(RuntimeError, match="cuda:7"):
        from_pretrained(tmp_path / "does-not-exist", device="cuda:7")


def test_loading_draws_no_initial_weights(saved):
    """The parameters are built uninitialized (skip_init), so the seeded generator is left where it was."""
    _, folder = saved
    tinytf.manual_seed(5)
    expected = tinytf.randn(3).data
    tinytf.manual_seed(5)
    from_pretrained(folder)
    np.testing.assert_array_equal(tinytf.randn(3).data, expected)


@pytest.mark.parametrize("preset, overrides", [
    ("gpt2", dict(tie_weights=False, mlp_hidden=72, norm_eps=1e-3, dropout=0.1)),
    ("llama", dict(n_kv_head=1, head_dim=6, bias=True, rope_theta=300.0, norm_eps=1e-4)),
    ("llama", dict(tie_weights=False, mlp_hidden=40)),
])
def test_settings_round_trip(tmp_path, preset, overrides):
    model = _tinytf_model(preset, **overrides)
    save_pretrained(model, tmp_path)
    _assert_same_model(model, tmp_path)


def test_transformers_4_llama_config_with_top_level_rope_theta(tmp_path):
    model = _tinytf_model("llama", rope_theta=300.0)
    save_pretrained(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["rope_parameters"]
    config["rope_scaling"] = None
    (tmp_path / "config.json").write_text(json.dumps(config))
    _assert_same_model(model, tmp_path)


def test_gpt2_checkpoint_without_prefix_and_with_attention_mask_buffers(tmp_path):
    model = _tinytf_model("gpt2")
    save_pretrained(model, tmp_path)
    tensors = safetensors.numpy.load_file(tmp_path / "model.safetensors")
    tensors = {name.removeprefix("transformer."): array for name, array in tensors.items()}
    tensors["h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), dtype=np.float32))
    tensors["h.0.attn.masked_bias"] = np.array(-1e4, dtype=np.float32)
    safetensors.numpy.save_file(tensors, tmp_path / "model.safetensors")
    _assert_same_model(model, tmp_path)


def _shard(folder):
    """Split the folder's model.safetensors into two shards and an index, as large checkpoints come."""
    tensors = safetensors.numpy.load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    weight_map = {}
    for index, shard_names in enumerate((names[: len(names) // 2], names[len(names) // 2:]), start=1):
        shard = f"model-0000{index}-of-00002.safetensors"
        safetensors.numpy.save_file({name: tensors[name] for name in shard_names}, folder / shard)
        weight_map.update(dict.fromkeys(shard_names, shard))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return weight_map


def test_sharded_checkpoint_loads(saved):
    model, folder = saved
    _shard(folder)
    _assert_same_model(model, folder)


# --- refusals -------------------------------------------------------------------------------------------------------
def test_a_name_that_is_not_a_local_folder_is_refused():
    with pytest.raises(CheckpointError, match=r"'openai-community/gpt2' is not a local folder.*never downloads"):
        from_pretrained("openai-community/gpt2")


def test_folder_without_config_or_safetensors(saved):
    _, folder = saved
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"neither model.safetensors nor .*pytorch_model.bin .*need torch"):
        from_pretrained(folder)
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match="holds no config.json"):
        from_pretrained(folder)


def test_missing_unexpected_and_misshaped_tensors_are_listed_together(tmp_path):
    model = _tinytf_model("llama")
    save_pretrained(model, tmp_path)
    tensors = safetensors.numpy.load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    tensors["model.layers.0.self_attn.q_norm.weight"] = np.ones(8, dtype=np.float32)
    tensors["model.norm.weight"] = np.ones(31, dtype=np.float32)
    safetensors.numpy.save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError) as error:
        from_pretrained(tmp_path)
    assert "missing tensors: model.layers.1.self_attn.k_proj.weight" in str(error.value)
    assert "unexpected tensors: model.layers.0.self_attn.q_norm.weight" in str(error.value)
    assert "mis-shaped tensors: model.norm.weight: checkpoint (31,), model (32,)" in str(error.value)


@pytest.mark.parametrize("preset, changes, message", [
    ("llama", dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}),
     "rope_parameters.rope_type='llama3' is not supported"),
    ("llama", dict(rope_parameters=None, rope_scaling={"type": "linear", "factor": 2.0}),
     "rope_scaling.type='linear' is not supported"),
    ("llama", dict(hidden_act="gelu"), "hidden_act='gelu' is not supported"),
    ("llama", dict(attention_bias=True), "attention_bias=True with mlp_bias=False is not supported"),
    ("llama", dict(model_type="falcon"),
     "model_type='falcon' is not supported; tinytf loads gpt2, llama, mistral, qwen2, gemma2"),
    ("gpt2", dict(activation_function="relu"), "activation_function='relu' is not supported"),
    ("gpt2", dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx=True is not supported"),
    ("gpt2", dict(n_head=5), "n_embd .32. must be divisible by n_head .5."),
])
def test_unsupported_settings_are_refused_naming_key_and_value(tmp_path, preset, changes, message):
    save_pretrained(_tinytf_model(preset), tmp_path)
    _edit_config(tmp_path, **changes)
    with pytest.raises(CheckpointError, match=message):
        from_pretrained(tmp_path)


def test_missing_config_key_is_named(saved):
    _, folder = saved
    config = json.loads((folder / "config.json").read_text())
    del config["vocab_size"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="the key 'vocab_size' is missing"):
        from_pretrained(folder)


def test_broken_shard_index(saved):
    _, folder = saved
    weight_map = _shard(folder)
    index = folder / "model.safetensors.index.json"
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors: file is missing"):
        from_pretrained(folder)
    index.write_text(json.dumps({"weight_map": dict.fromkeys(weight_map, "../elsewhere.safetensors")}))
    with pytest.raises(CheckpointError, match="shard '../elsewhere.safetensors' is not a file name in the folder"):
        from_pretrained(folder)
    index.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match='no "weight_map"'):
        from_pretrained(folder)


def test_corrupt_or_unsupported_safetensors(saved):
    _, folder = saved
    weights = folder / "model.safetensors"
    payload = weights.read_bytes()
    weights.write_bytes(payload[:-100])
    with pytest.raises(CheckpointError, match="does not fit the file .truncated or corrupt."):
        from_pretrained(folder)
    weights.write_bytes(payload[:4])
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        from_pretrained(folder)
    safetensors.numpy.save_file({"wte.weight": np.zeros((2, 2), dtype=np.int64)}, weights)
    with pytest.raises(CheckpointError, match="'wte.weight' has dtype I64; tinytf loads F64, F32, F16, BF16"):
        from_pretrained(folder)


def test_save_refuses_models_without_a_hugging_face_layout(tmp_path):
    with pytest.raises(ValueError, match="norm='layernorm', mlp='swiglu', pos='rope'"):
        save_pretrained(_tinytf_model("llama", norm="layernorm"), tmp_path)
    with pytest.raises(ValueError, match="GPT-2 has biases everywhere"):
        save_pretrained(_tinytf_model("gpt2", bias=False), tmp_path)
    with pytest.raises(ValueError, match="n_kv_head=2"):
        save_pretrained(_tinytf_model("gpt2", n_kv_head=2), tmp_path)


# --- sampling from a model folder with its tokenizer.json ----------------------------------------------------------
@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A small Llama-style model beside a byte-level BPE tokenizer trained here (no download)."""
    tokenizers = pytest.importorskip("tokenizers", reason="sampling with tokenizer.json needs the tokenizers package")
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    corpus = ["ROMEO: good night, good night! parting is such sweet sorrow. 10 €\n"] * 20
    tokenizer.train_from_iterator(corpus, trainer)
    folder = tmp_path_factory.mktemp("model")
    tinytf.manual_seed(0)
    model = GPT(GPTConfig.from_preset("llama", vocab_size=tokenizer.get_vocab_size(), block_size=32, n_layer=1,
                                      n_head=2, n_embd=16))
    save_pretrained(model, folder)
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder, tokenizer


def _sample(*argv):
    out = io.StringIO()
    sample_module.sample(sample_module.build_parser().parse_args([str(arg) for arg in argv]), out)
    return out.getvalue()


def test_sampling_from_a_model_folder_streams_its_tokenizer_text(model_folder):
    folder, tokenizer = model_folder
    prompt = "ROMEO: 10 € good"
    text = _sample("--model", folder, "--prompt", prompt, "--max-new-tokens", 12, "--temperature", 0)
    assert text == _sample("--model", folder, "--prompt", prompt, "--max-new-tokens", 12, "--temperature", 0,
                           "--no-cache")
    prompt_ids = tokenizer.encode(prompt).ids
    ids = from_pretrained(folder).generate(np.array([prompt_ids]), 12, temperature=0).data[0].tolist()
    assert text == prompt + tokenizer.decode(ids)[len(tokenizer.decode(prompt_ids)):] + "\n"


def test_sampling_needs_a_tokenizer_and_a_model(model_folder, tmp_path, capsys):
    folder, _ = model_folder
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    assert sample_module.main(["--model", str(tmp_path)]) == 2
    assert "has no tokenizer.json" in capsys.readouterr().err
    assert sample_module.main(["--model", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "cannot load the model" in err and "is not a local folder" in err
