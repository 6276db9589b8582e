import json

import numpy as np
import pytest

import tinytf
from tinytf.data import document_positions
from tinytf.models import GPT, GPTConfig
from tinytf.nn.layers import DecodeLayouts
from tinytf.optim import AdamW

OLD_FIELDS = ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "n_embd", "dropout", "bias", "norm", "mlp",
              "pos", "tie_weights", "rope_theta", "norm_eps", "mlp_hidden", "head_dim")
SMALL = dict(vocab_size=11, block_size=12, n_layer=2, n_head=4, n_embd=16)
GEMMA2 = dict(mlp="geglu", norm_weight_offset=1.0, scale_embeddings=True, sandwich_norm=True, sliding_window=4,
              full_attention_layers=(1,), head_dim=6, attn_softcap=2.0, final_softcap=3.0, query_pre_attn_scalar=5)
# name -> (preset, settings): the presets, and the other families on Llama's preset with windows of 4 keys (shorter
# than block_size) and, for Gemma 2, softcaps small enough to bend these random scores and logits.
FAMILIES = {"gpt2": ("gpt2", {}), "llama": ("llama", {}), "mistral": ("llama", dict(sliding_window=4)),
            "qwen2": ("llama", dict(qkv_bias=True, sliding_window=4, full_attention_layers=(0,))),
            "gemma2": ("llama", GEMMA2)}


def _model(name, **overrides):
    preset, settings = FAMILIES[name]
    tinytf.manual_seed(0)
    return GPT(GPTConfig.from_preset(preset, **{**SMALL, **settings, **overrides}))


@pytest.mark.parametrize("preset", FAMILIES)
def test_shapes_and_loss(preset):
    model = _model(preset)
    ids = np.random.default_rng(0).integers(0, 11, (3, 12))
    logits, loss = model(ids, ids)
    assert logits.shape == (3, 12, 11) and loss.shape == ()
    assert model(ids)[1] is None
    loss.backward()
    assert all(p.grad is not None and np.isfinite(p.grad).all() for p in model.parameters())


def test_parameter_counts_follow_the_architecture():
    C, V, T, L = 16, 11, 12, 2
    gpt2 = _model("gpt2")
    per_block = (2 * C + C * 3 * C + 3 * C + C * C + C) + (2 * C + C * 4 * C + 4 * C + 4 * C * C + C)
    assert gpt2.num_parameters() == V * C + T * C + L * per_block + 2 * C  # tied head adds nothing
    llama = _model("llama")
    hidden = llama.config.mlp_hidden
    assert llama.config.n_kv_head == 2 and hidden == 64
    per_block = C + C * (C + 2 * C // 2) + C * C + C + 3 * C * hidden
    assert llama.num_parameters() == V * C + L * per_block + C


def test_gemma2_and_qwen2_parameter_counts():
    C, V, L, D = 16, 11, 2, 6
    gemma2 = _model("gemma2")
    hidden = gemma2.config.mlp_hidden
    per_block = 4 * C + C * (4 * D + 2 * 2 * D) + 4 * D * C + 3 * C * hidden  # four norms, GQA with head_dim 6
    assert gemma2.num_parameters() == V * C + L * per_block + C
    assert _model("qwen2").num_parameters() == _model("llama").num_parameters() + L * (C + 2 * C // 2)  # q, k, v


def test_config_round_trips_through_json_and_old_configs_load():
    config = _model("gemma2").config
    assert GPTConfig(**json.loads(json.dumps(config.to_dict()))) == config
    llama = _model("llama").config
    old = {key: value for key, value in llama.to_dict().items() if key in OLD_FIELDS}  # a checkpoint's config before
    assert GPTConfig(**old) == llama


def test_gemma_embedding_scale_is_sqrt_n_embd_rounded_to_the_embeddings_dtype():
    """As transformers' Gemma 2: sqrt(24) = 4.899 multiplies bfloat16 embeddings as 4.906 (8 significant bits)."""
    model = _model("gemma2", n_embd=24)
    assert model._embedding_scale() == np.float32(np.sqrt(24))
    assert model.to(dtype="bfloat16")._embedding_scale() == 4.90625


def test_presets_and_config_errors():
    config = GPTConfig.from_preset("llama", n_head=8, n_embd=64)
    assert (config.norm, config.mlp, config.pos, config.bias, config.n_kv_head) == ("rmsnorm", "swiglu", "rope", False, 4)
    with pytest.raises(ValueError, match="unknown preset"):
        GPTConfig.from_preset("bert")
    with pytest.raises(ValueError, match="GPTConfig.norm must be one of"):
        GPTConfig(norm="batchnorm")
    with pytest.raises(ValueError, match="multiple of n_kv_head"):
        GPTConfig(n_head=4, n_kv_head=3)
    with pytest.raises(ValueError, match="sliding_window must be None or a positive integer, got 0"):
        GPTConfig(sliding_window=0)
    with pytest.raises(ValueError, match=r"full_attention_layers must be layer indices below n_layer=4, got \(4,\)"):
        GPTConfig(sliding_window=8, full_attention_layers=[4])
    with pytest.raises(ValueError, match="attn_softcap must be None or a positive number, got 0"):
        GPTConfig(attn_softcap=0)


def test_residual_projections_get_scaled_init():
    model = _model("gpt2", n_layer=8, n_embd=64, n_head=4)
    std_proj = model.blocks[0].attn.c_proj.weight.numpy().std()
    std_fc = model.blocks[0].mlp.c_fc.weight.numpy().std()
    assert std_fc == pytest.approx(0.02, rel=0.1) and std_proj == pytest.approx(0.02 / 4, rel=0.1)
    assert model.lm_head.weight is model.wte.weight


@pytest.mark.parametrize("preset, pos", [("gpt2", None), ("llama", None), ("gpt2", "sinusoidal"),
                                         ("llama", "sinusoidal"), ("mistral", None), ("qwen2", None),
                                         ("gemma2", None)])
@pytest.mark.parametrize("batch_size", [1, 8])
def test_kv_cache_generation_equals_full_recompute(preset, pos, batch_size):
    model = _model(preset, **({"pos": pos} if pos else {}))
    prompt = np.random.default_rng(1).integers(0, 11, (batch_size, 3))
    # 20 new tokens: past block_size (12), so the sliding window is exercised too.
    cached = model.generate(prompt, 20, temperature=0, use_cache=True).numpy()
    recomputed = model.generate(prompt, 20, temperature=0, use_cache=False).numpy()
    np.testing.assert_array_equal(cached, recomputed)
    assert cached.shape == (batch_size, 23)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("batch_size", [1, 8])
@pytest.mark.parametrize("preset", ["gpt2", "llama", "qwen2", "gemma2"])
def test_decode_step_matches_the_general_path(device, preset, batch_size, dtype):
    """decode_step (raw arrays, weights laid out for decoding) gives the logits of hidden_states + logits with the
    KV cache, token by token up to block_size, and leaves the same keys and values in the cache."""
    model = _model(preset).to(device, dtype)
    ids = np.random.default_rng(3).integers(0, 11, (batch_size, SMALL["block_size"]))
    general, fast = model.make_kv_caches(batch_size), model.make_kv_caches(batch_size)
    layouts = DecodeLayouts()
    with tinytf.no_grad():
        model.hidden_states(ids[:, :3], general)
        model.hidden_states(ids[:, :3], fast)
        for t in range(3, SMALL["block_size"]):
            expected = model.logits(model.hidden_states(ids[:, t : t + 1], general)[:, -1]).numpy().astype(np.float32)
            logits = tinytf.Tensor(model.decode_step(ids[:, t], fast, layouts))
            assert logits.dtype == model.wte.weight.dtype and logits.device == model.wte.weight.device
            if dtype == "float32":
                np.testing.assert_allclose(logits.numpy(), expected, rtol=1e-5, atol=1e-6)
            else:  # the two may round one intermediate to neighbouring bfloat16 values: a few ulps of the logits
                bound = 4 * tinytf.finfo(dtype).eps * float(np.abs(expected).max())
                assert float(np.abs(logits.numpy().astype(np.float32) - expected).max()) <= bound
    assert fast[0].length == general[0].length == SMALL["block_size"]


@pytest.mark.parametrize("preset", ["gpt2", "llama"])
def test_generation_follows_weights_changed_between_calls(preset):
    """The decoding layouts of the weights are rebuilt per generation: after an in-place AdamW step and after
    load_state_dict, cached generation equals full recomputation with the new weights."""
    model, prompt = _model(preset), np.random.default_rng(4).integers(0, 11, (2, 3))
    before = model.generate(prompt, 10, temperature=0).numpy()
    ids = np.random.default_rng(5).integers(0, 11, (2, 12))
    optimizer = AdamW(model.parameters(), lr=0.05)
    for _ in range(3):
        optimizer.zero_grad()
        model(ids, ids)[1].backward()
        optimizer.step()
    after = model.generate(prompt, 10, temperature=0).numpy()
    np.testing.assert_array_equal(after, model.generate(prompt, 10, temperature=0, use_cache=False).numpy())
    assert not np.array_equal(after, before)
    model.load_state_dict(_model(preset).state_dict())
    np.testing.assert_array_equal(model.generate(prompt, 10, temperature=0).numpy(), before)


@pytest.mark.parametrize("n_kv_head", [1, 2])
def test_grouped_query_generation_with_the_cache_equals_full_recompute(n_kv_head):
    model = _model("llama", n_kv_head=n_kv_head)
    prompt = np.random.default_rng(6).integers(0, 11, (8, 3))
    np.testing.assert_array_equal(model.generate(prompt, 14, temperature=0).numpy(),
                                  model.generate(prompt, 14, temperature=0, use_cache=False).numpy())


def test_learned_positions_train_only_the_rows_used():
    model = _model("gpt2")
    _, loss = model(np.zeros((2, 5), dtype=np.int64), np.ones((2, 5), dtype=np.int64))
    loss.backward()
    row_norms = np.abs(model.wpe.weight.grad).sum(axis=1)
    assert (row_norms[:5] > 0).all() and (row_norms[5:] == 0).all()


def test_sampling_is_reproducible_with_a_seeded_generator():
    model = _model("gpt2")
    first = model.generate(np.array([[1, 2]]), 10, temperature=1.0, top_k=5, rng=np.random.default_rng(3)).numpy()
    second = model.generate(np.array([[1, 2]]), 10, temperature=1.0, top_k=5, rng=np.random.default_rng(3)).numpy()
    np.testing.assert_array_equal(first, second)


@pytest.mark.parametrize("preset", ["gpt2", "llama"])
def test_overfits_one_batch(preset):
    model = _model(preset)
    optimizer = AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    ids = np.random.default_rng(0).integers(0, 11, (4, 12))
    inputs, targets = ids[:, :-1], ids[:, 1:]
    for _ in range(250):
        _, loss = model(inputs, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.02


def test_input_errors_name_the_problem():
    model = _model("gpt2")
    with pytest.raises(IndexError, match="id 11 is out of range for a vocabulary of size 11"):
        model([[1, 11]])
    with pytest.raises(ValueError, match="longer than the model's block_size 12"):
        model(np.zeros((1, 13), dtype=np.int64))
    with pytest.raises(ValueError, match=r"shape \(batch, time\)"):
        model(np.zeros(5, dtype=np.int64))


@pytest.mark.parametrize("name", [*FAMILIES, "sinusoidal"])
def test_packed_documents_score_and_learn_as_each_document_alone(name):
    """Rows that pack several documents (position_ids from data.document_positions) give each document the logits
    and the gradients it gets alone: attention, positions and RoPE restart at every document."""
    model = _model("gpt2", pos="sinusoidal") if name == "sinusoidal" else _model(name)
    eot = 10
    documents = [[3, 1, 4, 1, 5, eot], [9, 2, 6, eot], [5, 3], [5, 8, 9, 7, 9, eot], [3, 2, 3, 8, eot], [4]]
    rows = np.array([sum(documents[:3], []), sum(documents[3:], [])])  # (2, 12): three documents per row
    targets = np.roll(rows, -1, axis=1)
    positions = document_positions(rows, eot)
    logits, loss = model(rows, targets, position_ids=positions)
    (loss * rows.size).backward()
    packed_grads = [p.grad.copy() for p in model.parameters()]
    model.zero_grad()

    total = None
    for row, row_documents in enumerate((documents[:3], documents[3:])):
        start = 0
        for document in row_documents:
            ids = rows[row : row + 1, start : start + len(document)]
            alone, document_loss = model(ids, targets[row : row + 1, start : start + len(document)])
            np.testing.assert_allclose(logits.data[row, start : start + len(document)], alone.data[0], atol=2e-6)
            summed = document_loss * len(document)
            total = summed if total is None else total + summed
            start += len(document)
    total.backward()
    for packed, alone in zip(packed_grads, (p.grad for p in model.parameters())):
        np.testing.assert_allclose(packed, alone, atol=2e-6)


def test_position_ids_errors_name_the_problem():
    model = _model("llama")
    ids = np.zeros((2, 4), dtype=np.int64)
    with pytest.raises(ValueError, match=r"position_ids must be integers of the ids' shape \(2, 4\)"):
        model(ids, position_ids=np.zeros((2, 3), dtype=np.int64))
    with pytest.raises(ValueError, match=r"must lie in \[0, block_size=12\), got 0..12"):
        model(ids, position_ids=np.array([[0, 1, 2, 12], [0, 1, 2, 3]]))
    with pytest.raises(ValueError, match=r"KV cache of shape \(2, 2, 12, 4\) cannot take 8 sequences"):
        model.hidden_states(ids, model.make_kv_caches(2), position_ids=np.zeros((2, 4), dtype=np.int64))


def test_generation_leaves_training_mode_as_it_was():
    model = _model("gpt2", dropout=0.1)
    model.train()
    model.generate([[1]], 2)
    assert model.training


@pytest.mark.parametrize("preset", ["gpt2", "llama", "gemma2"])
def test_the_model_trains_and_generates_alike_on_every_device(device, preset):
    """Forward, backward, an AdamW step and KV-cache generation on `device` equal the CPU's (float32 rounding)."""
    ids = np.random.default_rng(2).integers(0, 11, (2, 12))

    def one_step(on):
        model = _model(preset).to(on)
        _, loss = model(ids, ids)
        loss.backward()
        grads = [p.grad for p in model.parameters()]
        # eps 1e-6, not 1e-8: the key bias's gradient is zero in exact arithmetic (a shift of every score of a row),
        # so it is rounding noise that differs between devices, and Adam's first step lr * g / (|g| + eps) turned
        # that noise into steps as large as this test's tolerance (about 1e-6).
        AdamW(model.parameters(), lr=1e-2, eps=1e-6).step()
        return model, loss.item(), grads

    model, loss, grads = one_step(device)
    reference, reference_loss, reference_grads = one_step("cpu")
    assert all(p.device == model.wte.weight.device and p.grad.__class__ is p.data.__class__
               for p in model.parameters())
    np.testing.assert_allclose(loss, reference_loss, rtol=1e-5)
    for grad, reference_grad in zip(grads, reference_grads):
        np.testing.assert_allclose(tinytf.Tensor(grad).numpy(), reference_grad, rtol=1e-4, atol=1e-6)
    for parameter, reference_parameter in zip(model.parameters(), reference.parameters()):
        np.testing.assert_allclose(parameter.numpy(), reference_parameter.numpy(), rtol=1e-4, atol=1e-6)
    prompt = ids[:, :3]
    generated = model.generate(prompt, 15, temperature=0)
    assert generated.device == model.wte.weight.device
    np.testing.assert_array_equal(generated.numpy(), reference.generate(prompt, 15, temperature=0).numpy())


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("preset", ["gpt2", "llama"])
def test_a_half_precision_model_trains_in_its_dtype_close_to_float32(device, preset, dtype):
    """model.to(bfloat16): forward, a float32 loss (as under PyTorch's autocast) and backward, with every parameter
    and gradient in the model's dtype, and a loss close to the float32 model's with the same (rounded) weights."""
    config = GPTConfig.from_preset(preset, vocab_size=65, n_layer=2, n_head=4, n_embd=32, block_size=16)
    tinytf.manual_seed(0)
    half = GPT(config).to(device, dtype)
    reference = GPT(config)
    reference.load_state_dict(half.state_dict())  # the float32 model of the same rounded weights
    ids = np.random.default_rng(0).integers(0, 65, (4, 17))
    logits, loss = half(ids[:, :-1], ids[:, 1:])
    reference_logits, reference_loss = reference(ids[:, :-1], ids[:, 1:])
    assert logits.dtype == tinytf.tensor([], dtype=dtype).dtype and loss.dtype == np.float32
    loss.backward()
    reference_loss.backward()
    assert {parameter.grad.dtype for parameter in half.parameters()} == {logits.dtype}
    # The loss is the mean of rows' logsumexp(z) - z_target, each term 1-Lipschitz in the max-norm of the logits z,
    # so the two losses differ by at most twice the largest logit difference; and the logits, after every op rounds
    # to 8 (bfloat16) or 11 (float16) significant bits, differ by a few of their own ulps.
    logit_difference = float(np.abs(logits.numpy().astype(np.float64) - reference_logits.numpy()).max())
    assert abs(float(loss.item()) - float(reference_loss.item())) <= 2 * logit_difference
    assert logit_difference <= 4 * tinytf.finfo(dtype).eps * float(np.abs(reference_logits.numpy()).max())
    # Gradients point the same way: relative errors of a few 2^-8 per element leave 1 - cosine near (4 * 2^-8)^2 / 2,
    # about 1e-4.
    for parameter, reference_parameter in zip(half.parameters(), reference.parameters()):
        grad = tinytf.backend.to_numpy(parameter.grad).astype(np.float64).ravel()
        reference_grad = reference_parameter.grad.ravel()
        cosine = grad @ reference_grad / (np.linalg.norm(grad) * np.linalg.norm(reference_grad) + 1e-30)
        assert cosine > 0.999
    generated = half.generate(ids[:, :3], 4, temperature=0)
    assert generated.shape == (4, 7)


# Prompts of 7, 1, 5 and 2 tokens: longer and shorter than the windows of 4 keys; with 10 new tokens the longest
# outgrows block_size (12), so the caches are refilled, ragged again, while the others still fit.
RAGGED_PROMPTS = [[3, 1, 4, 1, 5, 9, 2], [6], np.array([5, 3, 5, 8, 9]), [7, 9]]


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("name", ["gpt2", "llama", "mistral", "gemma2", "sinusoidal"])
def test_a_ragged_batch_generates_each_prompt_as_alone(name, use_cache):
    """Greedy generation of prompts of different lengths in one batch (packed prefill, right-aligned caches,
    positions per row) gives each prompt the tokens it gets alone, with sliding windows and softcaps too."""
    model = _model("gpt2", pos="sinusoidal") if name == "sinusoidal" else _model(name)
    batch = model.generate(RAGGED_PROMPTS, 10, temperature=0, use_cache=use_cache)
    assert isinstance(batch, list) and len(batch) == len(RAGGED_PROMPTS)
    for prompt, generated in zip(RAGGED_PROMPTS, batch):
        alone = model.generate(np.array([prompt]), 10, temperature=0, use_cache=use_cache).numpy()[0]
        assert generated.dtype == np.int64 and generated.shape == (len(prompt) + 10,)
        np.testing.assert_array_equal(generated, alone)


def test_sampling_a_ragged_batch_is_reproducible_and_cache_agnostic():
    model = _model("llama")
    runs = [model.generate(RAGGED_PROMPTS, 8, temperature=1.0, top_k=5, use_cache=use_cache,
                           rng=np.random.default_rng(3)) for use_cache in (True, True, False)]
    for run in runs[1:]:
        for first, other in zip(runs[0], run):
            np.testing.assert_array_equal(first, other)
    assert [len(ids) for ids in runs[0]] == [len(prompt) + 8 for prompt in RAGGED_PROMPTS]


@pytest.mark.parametrize("name", ["gpt2", "mistral", "gemma2"])
def test_a_ragged_prefill_hides_the_cache_before_each_row(name):
    """Caches poisoned with NaN before a packed prefill: decoding stays finite and gives each row the logits it gets
    alone: nothing left in the cache before a row's start reaches that row's attention."""
    model = _model(name)
    prompts = [[3, 1, 4, 1, 5], [6], [5, 3]]
    caches = model.make_kv_caches(len(prompts))
    for cache in caches:
        cache.keys[...] = np.nan
        cache.values[...] = np.nan
    with tinytf.no_grad():
        positions = np.concatenate([np.arange(len(prompt)) for prompt in prompts])
        model.hidden_states(np.concatenate(prompts)[None], caches, positions[None])
        assert [cache.length for cache in caches] == [5] * model.config.n_layer
        np.testing.assert_array_equal(caches[0].positions(), [5, 1, 2])  # each row's next token
        layouts = DecodeLayouts()
        for new in ([2, 7, 9], [6, 1, 0]):
            logits = model.decode_step(np.array(new), caches, layouts)
            assert np.isfinite(logits).all()
            prompts = [prompt + [token] for prompt, token in zip(prompts, new)]
            for row, prompt in enumerate(prompts):
                alone = model.logits(model.hidden_states(np.array([prompt]))[:, -1]).numpy()[0]
                np.testing.assert_allclose(logits[row], alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("use_cache", [True, False])
def test_a_prompt_longer_than_block_size_in_a_ragged_batch_is_cropped_as_alone(use_cache):
    """A row of 14 tokens (block_size 12) beside short ones: each row's last block_size tokens are its context."""
    model, prompts = _model("llama"), [list(range(1, 11)) + [3, 1, 4, 1], [2], [5, 3, 5]]
    for prompt, generated in zip(prompts, model.generate(prompts, 4, temperature=0, use_cache=use_cache)):
        np.testing.assert_array_equal(generated, model.generate(np.array([prompt]), 4, temperature=0).numpy()[0])


@pytest.mark.parametrize("preset", ["gpt2", "llama"])
def test_ragged_generation_on_every_device(device, preset):
    model, reference = _model(preset).to(device), _model(preset)
    for generated, expected in zip(model.generate(RAGGED_PROMPTS, 8, temperature=0),
                                   reference.generate(RAGGED_PROMPTS, 8, temperature=0)):
        np.testing.assert_array_equal(generated, expected)


def test_ragged_generation_errors_name_the_problem():
    model = _model("llama")
    with pytest.raises(ValueError, match=r"each 1-D with at least one token, got shapes \[\(2,\), \(0,\)\]"):
        model.generate([[1, 2], []], 3)
    with pytest.raises(ValueError, match="list of prompts"):
        model.generate([], 3)
    with pytest.raises(ValueError, match=r"got shapes \[\(1, 2\)\]"):
        model.generate([np.array([[1, 2]])], 3)
    caches = model.make_kv_caches(2)
    model.hidden_states(np.array([[1, 2, 3]]), caches, np.array([[0, 1, 0]]))
    with pytest.raises(ValueError, match=r"different lengths\) takes new tokens through decode"):
        model.hidden_states(np.array([[1], [2]]), caches)
    with pytest.raises(ValueError, match="sequences are stored into an empty cache; this one holds 2 positions"):
        model.hidden_states(np.array([[1, 2, 3]]), caches, np.array([[0, 1, 0]]))
