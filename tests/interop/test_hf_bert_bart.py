"""BERT and BART checkpoints: tinytf matches transformers' BertModel, BertForMaskedLM, BertForSequenceClassification
and BartForConditionalGeneration (hidden states and logits with token types and padding masks, greedy and beam-search
generation with and without the cache, for sources of different lengths), saves folders transformers loads, and
refuses what it cannot run.

Small random models built from configs (never the Hub); skips without the interop extra.
"""

import json
import re

import numpy as np
import pytest
import safetensors.numpy
from hf_reference import TOLERANCE, VOCAB, max_difference

from tinytf import backend
from tinytf.checkpoint import CheckpointError
from tinytf.interop import from_pretrained, save_pretrained
from tinytf.models.encoder import Encoder, EncoderConfig, EncoderForMaskedLM, EncoderForSequenceClassification
from tinytf.models.encoder_decoder import EncoderDecoder, EncoderDecoderConfig

BERT = dict(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
            max_position_embeddings=32, type_vocab_size=3, layer_norm_eps=1e-6, initializer_range=0.1)
# No forced tokens (tinytf's generate forces none). Tied embeddings make these random models repeat the start token,
# which is also the end token: generation is checked on an untied model whose larger weights make it follow the source.
BART = dict(vocab_size=VOCAB, d_model=48, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=96, decoder_ffn_dim=96, max_position_embeddings=40,
            scale_embedding=True, init_std=0.1, forced_eos_token_id=None, forced_bos_token_id=None)
BART_UNTIED = dict(BART, scale_embedding=False, init_std=0.5, tie_word_embeddings=False)
# init_std 0.5 makes the untied model follow its source; its head is scaled down to logits of magnitude ~1, whose
# float32 rounding stays within TOLERANCE.
UNTIED_HEAD_SCALE = 0.1
BART_PAD = 1
BART_START = 2  # BartConfig's decoder_start_token_id, also its eos_token_id
NEW_TOKENS = 8
EOS = 45  # a token the untied model chooses often enough that some sequences end early (the test checks that some do)
BERT_CLASSES = {"bert": Encoder, "bert_mlm": EncoderForMaskedLM, "bert_classifier": EncoderForSequenceClassification}
LENGTHS = (12, 7)  # the second row is padded after 7 tokens


def _random(torch, model):
    """Norm weights, biases and BART's final_logits_bias (a buffer) start at 0 or 1: move them, so that a loader must
    read them."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.2 * torch.randn_like(parameter) if parameter.ndim == 1 else 0)
        for buffer in model.buffers():
            buffer.add_(0.2 * torch.randn_like(buffer) if buffer.is_floating_point() else 0)
    return model.eval()


@pytest.fixture(scope="module")
def references(hf, tmp_path_factory):
    """name -> (transformers model in eval mode, the folder it saved itself to)."""
    torch, transformers = hf
    built = {
        "bert": lambda: transformers.BertModel(transformers.BertConfig(**BERT)),
        "bert_mlm": lambda: transformers.BertForMaskedLM(transformers.BertConfig(**BERT)),
        "bert_classifier": lambda: transformers.BertForSequenceClassification(
            transformers.BertConfig(**BERT, num_labels=3)),
        "bart": lambda: transformers.BartForConditionalGeneration(transformers.BartConfig(**BART)),
        "bart_untied": lambda: transformers.BartForConditionalGeneration(transformers.BartConfig(**BART_UNTIED)),
    }
    models = {}
    for name, build in built.items():
        torch.manual_seed(0)  # each model the same whatever the others
        model = build()
        model.config._attn_implementation = "eager"
        if name == "bart_untied":  # untied, the stacks' token tables, model.shared and lm_head are four tensors
            with torch.no_grad():
                model.lm_head.weight.mul_(UNTIED_HEAD_SCALE)
        folder = tmp_path_factory.mktemp(name)
        _random(torch, model).save_pretrained(folder)
        models[name] = model, folder
    return models


def _batch(lengths=LENGTHS, seed=0):
    """ids (B, T), their padding mask (True = a token), right-padded to the longest."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, VOCAB, (len(lengths), max(lengths)))
    mask = np.arange(max(lengths))[None, :] < np.array(lengths)[:, None]
    return np.where(mask, ids, 1), mask


def _bert_outputs(torch, hf_model, ids, types, mask):
    with torch.no_grad():
        output = hf_model(torch.as_tensor(ids), token_type_ids=torch.as_tensor(types),
                          attention_mask=torch.as_tensor(mask.astype(np.int64)))
    return (output.logits if hasattr(output, "logits") else output.last_hidden_state).numpy()


@pytest.mark.parametrize("name", ["bert", "bert_mlm", "bert_classifier"])
def test_bert_matches_transformers_with_token_types_and_padding(hf, references, name):
    torch, _ = hf
    hf_model, folder = references[name]
    model = from_pretrained(folder)
    assert type(model) is BERT_CLASSES[name]
    ids, mask = _batch()
    types = np.random.default_rng(1).integers(0, BERT["type_vocab_size"], ids.shape)
    ours = model(ids, types, mask)
    ours = (ours if name == "bert" else ours[0]).data
    expected = _bert_outputs(torch, hf_model, ids, types, mask)
    if name != "bert_classifier":  # (B, n_classes) for the classifier: no padding positions
        ours, expected = ours[mask], expected[mask]
    difference = max_difference(ours, expected)
    print(f"{name}: max |difference| {difference:.2e}")
    assert difference < TOLERANCE


@pytest.mark.parametrize("name", ["bart", "bart_untied"])
def test_bart_logits_match_transformers_with_source_and_target_padding(hf, references, name):
    torch, _ = hf
    hf_model, folder = references[name]
    model = from_pretrained(folder)
    assert type(model) is EncoderDecoder
    src, src_mask = _batch()
    tgt, tgt_mask = _batch((5, 9), seed=2)
    with torch.no_grad():
        expected = hf_model(torch.as_tensor(src), attention_mask=torch.as_tensor(src_mask.astype(np.int64)),
                            decoder_input_ids=torch.as_tensor(tgt),
                            decoder_attention_mask=torch.as_tensor(tgt_mask.astype(np.int64))).logits.numpy()
    logits = model(src, tgt, src_mask, tgt_mask)[0].data
    difference = max_difference(logits[tgt_mask], expected[tgt_mask])
    print(f"{name}: max |logit difference| {difference:.2e}")
    assert difference < TOLERANCE


@pytest.mark.parametrize("num_beams, length_penalty, early_stopping", [(1, 1.0, False), (4, 1.0, False),
                                                                     (4, 2.0, True)])
def test_bart_generation_equals_transformers_with_and_without_cache(hf, references, num_beams, length_penalty,
                                                                    early_stopping):
    """Sources of different lengths in one batch (right-padded with a mask in transformers); transformers pads the
    sequences that end early with pad_token_id after the end token, tinytf returns each up to its end token. With
    these sources and EOS the three settings choose three different sets of sequences."""
    torch, _ = hf
    hf_model, folder = references["bart_untied"]
    model = from_pretrained(folder)
    src, src_mask = _batch((9, 4, 6), seed=1)
    sources = [row[mask] for row, mask in zip(src, src_mask)]
    with torch.no_grad():
        expected = hf_model.generate(torch.as_tensor(src), attention_mask=torch.as_tensor(src_mask.astype(int)),
                                     max_new_tokens=NEW_TOKENS, num_beams=num_beams, do_sample=False,
                                     length_penalty=length_penalty, early_stopping=early_stopping,
                                     eos_token_id=EOS).numpy()
    assert (expected[:, 0] == BART_START).all()
    ended_early = False
    for use_cache in (True, False):
        generated = model.generate(sources, NEW_TOKENS, num_beams=None if num_beams == 1 else num_beams,
                                   length_penalty=length_penalty, early_stopping=early_stopping, eos_token_id=EOS,
                                   use_cache=use_cache)
        assert len(generated) == len(sources)
        for ours, theirs in zip(generated, expected[:, 1:]):
            np.testing.assert_array_equal(ours, theirs[: len(ours)])
            assert (theirs[len(ours):] == BART_PAD).all()
            ended_early |= len(ours) < NEW_TOKENS
    assert ended_early


@pytest.mark.parametrize("num_beams", [1, 3])
def test_forced_first_and_last_tokens_from_generation_config_match_transformers(hf, references, tmp_path, num_beams):
    """generation_config.json's forced_bos_token_id / forced_eos_token_id, which transformers' generate applies:
    the first token and the token at max_new_tokens are forced (a forced beam step adds no score)."""
    torch, _ = hf
    hf_model, folder = references["bart_untied"]
    forced_bos, forced_eos = 7, EOS
    edited = _edited_copy(folder, tmp_path)
    (edited / "generation_config.json").write_text(json.dumps({"forced_bos_token_id": forced_bos,
                                                                "forced_eos_token_id": forced_eos}))
    model = from_pretrained(edited)
    assert (model.config.forced_bos_token_id, model.config.forced_eos_token_id) == (forced_bos, forced_eos)
    src, src_mask = _batch((9, 4, 6), seed=1)
    with torch.no_grad():
        expected = hf_model.generate(torch.as_tensor(src), attention_mask=torch.as_tensor(src_mask.astype(int)),
                                     max_new_tokens=NEW_TOKENS, num_beams=num_beams, do_sample=False,
                                     eos_token_id=EOS, forced_bos_token_id=forced_bos,
                                     forced_eos_token_id=forced_eos).numpy()
    generated = model.generate([row[mask] for row, mask in zip(src, src_mask)], NEW_TOKENS,
                               num_beams=None if num_beams == 1 else num_beams, eos_token_id=EOS)
    for ours, theirs in zip(generated, expected[:, 1:]):
        np.testing.assert_array_equal(ours, theirs[: len(ours)])
        assert ours[0] == forced_bos and ours[-1] == forced_eos
    assert any(len(ours) == NEW_TOKENS for ours in generated)  # one ran to the end, where the end token is forced


def _outputs(torch, hf_model, name):
    """The reference model's hidden states or logits on a padded batch (BERT with token types)."""
    ids, mask = _batch()
    with torch.no_grad():
        if name.startswith("bart"):
            return hf_model(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask.astype(int)),
                            decoder_input_ids=torch.as_tensor(ids[:, ::-1].copy())).logits.numpy()
        return _bert_outputs(torch, hf_model, ids, np.random.default_rng(1).integers(0, 3, ids.shape), mask)


@pytest.mark.parametrize("name", ["bert", "bert_mlm", "bert_classifier", "bart", "bart_untied"])
def test_transformers_loads_what_save_pretrained_writes(hf, references, tmp_path, name):
    """Every tensor must arrive: transformers would initialize a missing one at random (and BertModel's pooler, which
    tinytf has not, does not touch the hidden states)."""
    torch, _ = hf
    hf_model, folder = references[name]
    saved = save_pretrained(from_pretrained(folder), tmp_path / name)
    reloaded = type(hf_model).from_pretrained(saved, attn_implementation="eager").eval()
    np.testing.assert_array_equal(_outputs(torch, reloaded, name), _outputs(torch, hf_model, name))
    assert type(from_pretrained(saved).config) is type(from_pretrained(folder).config)


def _edited_copy(folder, tmp_path, **changes):
    """A copy of the model folder whose config.json has `changes`."""
    copy = tmp_path / "edited"
    copy.mkdir()
    (copy / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    config = json.loads((folder / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, **changes}))
    return copy


@pytest.mark.parametrize("name, changes, message", [
    ("bert", dict(hidden_act="relu"), "hidden_act='relu' is not supported"),
    ("bert", dict(position_embedding_type="relative_key"), "position_embedding_type='relative_key'"),
    ("bert", dict(is_decoder=True), "is_decoder=True"),
    ("bart", dict(decoder_attention_heads=2), "decoder_attention_heads=2 is not supported"),
    ("bart", dict(activation_function="relu"), "activation_function='relu'"),
    ("bart", dict(d_model=32), "mis-shaped tensors: model.shared.weight"),
])
def test_unsupported_or_inconsistent_folders_are_refused_by_name(references, tmp_path, name, changes, message):
    with pytest.raises(CheckpointError, match=re.escape(message)):
        from_pretrained(_edited_copy(references[name][1], tmp_path, **changes))


def test_bart_token_tables_follow_tie_word_embeddings(references, tmp_path):
    """Tied, transformers overwrites the stacks' tables with model.shared, so tinytf reads shared alone even where a
    checkpoint's copies differ; untied, each stack reads its own table (share_embeddings=False)."""
    ids, mask = _batch()
    tied_folder = references["bart"][1]
    edited = _edited_copy(tied_folder, tmp_path)
    tensors = safetensors.numpy.load_file(edited / "model.safetensors")
    tensors["model.decoder.embed_tokens.weight"] = tensors["model.shared.weight"] + 1
    safetensors.numpy.save_file(tensors, edited / "model.safetensors")
    tied, original = from_pretrained(edited), from_pretrained(tied_folder)
    assert tied.config.share_embeddings and tied.decoder.embed_tokens is None
    np.testing.assert_array_equal(tied(ids, ids, mask, mask)[0].data, original(ids, ids, mask, mask)[0].data)

    untied_folder = references["bart_untied"][1]
    untied = from_pretrained(untied_folder)
    assert not untied.config.share_embeddings and untied.shared is None
    tensors = safetensors.numpy.load_file(untied_folder / "model.safetensors")
    for stack in ("encoder", "decoder"):
        np.testing.assert_array_equal(getattr(untied, stack).embed_tokens.weight.data,
                                      tensors[f"model.{stack}.embed_tokens.weight"])
    assert not np.array_equal(*(tensors[f"model.{stack}.embed_tokens.weight"] for stack in ("encoder", "decoder")))


def test_a_model_on_a_device_gives_the_cpu_results_and_saves_the_same_tensors(references, tmp_path, device):
    ids, mask = _batch()
    bert_folder, bart_folder = references["bert_mlm"][1], references["bart_untied"][1]
    bert = from_pretrained(bert_folder, device=device)
    assert {parameter.device for parameter in bert.parameters()} == {backend.canonical_device(device)}
    difference = max_difference(backend.to_numpy(bert(ids, None, mask)[0].data)[mask],
                                from_pretrained(bert_folder)(ids, None, mask)[0].data[mask])
    assert difference < TOLERANCE
    sources = [row[keep] for row, keep in zip(ids, mask)]
    generated = from_pretrained(bart_folder, device=device).generate(sources, NEW_TOKENS, eos_token_id=EOS)
    for ours, cpu in zip(generated, from_pretrained(bart_folder).generate(sources, NEW_TOKENS, eos_token_id=EOS)):
        np.testing.assert_array_equal(ours, cpu)
    for folder, model in ((bert_folder, bert), (bart_folder, from_pretrained(bart_folder, device=device))):
        saved = safetensors.numpy.load_file(save_pretrained(model, tmp_path / folder.name) / "model.safetensors")
        original = safetensors.numpy.load_file(folder / "model.safetensors")
        assert saved.keys() == original.keys()
        if folder == bart_folder:  # a table per stack: transformers never reads model.shared; saved as the encoder's
            original["model.shared.weight"] = original["model.encoder.embed_tokens.weight"]
        for name, array in original.items():
            np.testing.assert_array_equal(saved[name], array)


def test_half_precision_loads_without_widening_and_saves_as_bf16(references, tmp_path):
    model = from_pretrained(references["bart"][1], dtype="bfloat16")
    assert {parameter.dtype for parameter in model.parameters()} == {backend.as_dtype("bfloat16")}
    config = json.loads((save_pretrained(model, tmp_path / "bf16") / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    assert from_pretrained(tmp_path / "bf16", dtype="auto").shared.weight.dtype == backend.as_dtype("bfloat16")


@pytest.mark.parametrize("model, message", [
    (EncoderDecoder(EncoderDecoderConfig(vocab_size=8, d_model=8, n_head=2, encoder_layers=1, decoder_layers=1,
                                         ffn_dim=8, positions="sinusoidal")),
     "'positions': 'sinusoidal'"),
    (EncoderDecoder(EncoderDecoderConfig(vocab_size=8, d_model=8, n_head=2, encoder_layers=1, decoder_layers=1,
                                         ffn_dim=8, share_embeddings=False)),
     "a table per stack (share_embeddings=False) with tie_word_embeddings=True"),
    (Encoder(EncoderConfig(vocab_size=8, n_layer=1, n_head=2, n_embd=8, mlp_hidden=8, norm_first=True)),
     "norm_first=True"),
])
def test_models_bert_or_bart_cannot_express_are_refused_by_save_pretrained(tmp_path, model, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        save_pretrained(model, tmp_path)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("position_offset", [0, 3])
def test_a_tinytf_encoder_decoder_saved_as_bart_gives_its_logits_in_transformers(hf, tmp_path, position_offset):
    """A model trained in tinytf (its own position offset, untied head) runs in transformers: positions shifted to
    BART's offset of 2."""
    torch, transformers = hf
    config = EncoderDecoderConfig(vocab_size=VOCAB, max_positions=16, d_model=32, n_head=4, encoder_layers=1,
                                  decoder_layers=2, ffn_dim=64, position_offset=position_offset, scale_embedding=True,
                                  tie_word_embeddings=False)
    model = EncoderDecoder(config)
    for parameter in model.parameters():  # BERT-style init has norms at 1 and biases at 0: move them
        parameter.data = parameter.data + np.float32(0.2) * np.random.default_rng(0).standard_normal(
            parameter.shape, dtype=np.float32)
    src, src_mask = _batch()
    tgt = _batch((7, 7), seed=4)[0]
    reloaded = transformers.BartForConditionalGeneration.from_pretrained(
        save_pretrained(model, tmp_path / "bart"), attn_implementation="eager").eval()
    with torch.no_grad():
        expected = reloaded(torch.as_tensor(src), attention_mask=torch.as_tensor(src_mask.astype(int)),
                            decoder_input_ids=torch.as_tensor(tgt)).logits.numpy()
    assert max_difference(model(src, tgt, src_mask)[0].data, expected) < TOLERANCE


def test_t5_is_refused_by_name(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 8}))
    with pytest.raises(CheckpointError, match="model_type='t5' is not supported .*relative position buckets"):
        from_pretrained(tmp_path)
