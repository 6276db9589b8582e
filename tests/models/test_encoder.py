"""Encoder (tinytf.models.encoder), BERT style: the embeddings and the exact GELU as the formulas read, post-norm rows
normalized, padding that changes no token's state, the masked-LM and classification heads' shapes and losses,
gradients to every parameter, sentence embeddings, every device agreeing, and errors that name the problem."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tinytf
from tinytf.models import Encoder, EncoderConfig, EncoderForMaskedLM, EncoderForSequenceClassification

SMALL = dict(vocab_size=17, max_positions=10, n_layer=2, n_head=2, n_embd=16, mlp_hidden=32)
STYLES = pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])


def _config(**overrides) -> EncoderConfig:
    tinytf.manual_seed(0)
    return EncoderConfig(**{**SMALL, **overrides})


def test_embeddings_sum_token_position_and_type_then_normalize():
    encoder = Encoder(_config(n_layer=1))
    ids, types = np.array([[3, 5, 7]]), np.array([[0, 1, 1]])
    word, position, token_type = (table.weight.numpy() for table in
                                  (encoder.word_embeddings, encoder.position_embeddings, encoder.token_type_embeddings))
    summed = word[ids[0]] + position[:3] + token_type[types[0]]
    expected = (summed - summed.mean(-1, keepdims=True)) / np.sqrt(summed.var(-1, keepdims=True) + 1e-12)
    encoder.blocks = tinytf.nn.ModuleList()  # the embeddings alone
    np.testing.assert_allclose(encoder(ids, types).numpy()[0], expected, rtol=1e-4, atol=1e-5)


def test_the_mlp_uses_exact_gelu():
    mlp = Encoder(_config(n_layer=1)).blocks[0].mlp
    # inputs large enough that the hidden units spread over [-3, 3], where the tanh form differs from erf's
    x = (np.random.default_rng(0).standard_normal((3, 16)) * 40).astype(np.float32)
    hidden = x.astype(np.float64) @ mlp.c_fc.weight.numpy().T + mlp.c_fc.bias.numpy()
    erf = np.vectorize(math.erf)
    expected = (0.5 * hidden * (1 + erf(hidden / math.sqrt(2)))) @ mlp.c_proj.weight.numpy().T + mlp.c_proj.bias.numpy()
    np.testing.assert_allclose(mlp(tinytf.Tensor(x)).numpy(), expected, rtol=1e-5, atol=1e-6)


def test_post_norm_rows_leave_each_block_normalized():
    hidden = Encoder(_config()).forward(np.array([[1, 2, 3, 4]])).numpy()
    np.testing.assert_allclose(hidden.mean(-1), 0, atol=1e-5)
    np.testing.assert_allclose(hidden.var(-1), 1, rtol=1e-3)


@settings(max_examples=10)
@given(st.data())
def test_padding_never_changes_the_tokens_states(data):
    norm_first = data.draw(st.booleans())
    encoder = Encoder(_config(norm_first=norm_first))
    T, extra = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 4))
    ids = np.array(data.draw(st.lists(st.integers(0, 16), min_size=T + extra, max_size=T + extra)))[None]
    types = np.array(data.draw(st.lists(st.integers(0, 1), min_size=T + extra, max_size=T + extra)))[None]
    mask = np.arange(T + extra)[None] < T
    with tinytf.no_grad():
        alone = encoder(ids[:, :T], types[:, :T]).numpy()
        padded = encoder(ids, types, mask).numpy()[:, :T]
        np.testing.assert_allclose(padded, alone, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(encoder.embed(ids, mask, types).numpy(), alone.mean(axis=1), rtol=1e-5, atol=1e-5)


def _log_softmax(logits):
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def test_masked_lm_loss_counts_only_the_masked_tokens():
    model = EncoderForMaskedLM(_config())
    ids = np.array([[3, 4, 5, 6], [7, 8, 9, 10]])
    targets = np.full((2, 4), -100)
    targets[0, 1], targets[1, 3] = 11, 12
    logits, loss = model(ids, targets=targets)
    assert logits.shape == (2, 4, 17)
    log_probs = _log_softmax(logits.numpy())
    np.testing.assert_allclose(loss.item(), -(log_probs[0, 1, 11] + log_probs[1, 3, 12]) / 2, rtol=1e-5)
    assert model.head.lm_head.decoder.weight is model.encoder.word_embeddings.weight  # tied


@STYLES
def test_gradients_reach_every_parameter(norm_first):
    for model, targets in ((EncoderForMaskedLM(_config(norm_first=norm_first)), np.array([[3, 4, 5], [6, 7, 8]])),
                           (EncoderForSequenceClassification(_config(norm_first=norm_first), 3), np.array([2, 0]))):
        ids, types = np.array([[1, 2, 3], [4, 5, 6]]), np.array([[0, 0, 1], [0, 1, 1]])
        mask = np.array([[True, True, True], [True, True, False]])
        model(ids, types, mask, targets)[1].backward()
        for name, parameter in model.named_parameters():
            assert parameter.grad is not None and np.abs(tinytf.backend.to_numpy(parameter.grad)).max() > 0, name


def test_sequence_classification_shape_and_loss():
    model = EncoderForSequenceClassification(_config(), 3)
    logits, loss = model(np.array([[1, 2, 3], [4, 5, 6]]), labels=np.array([2, 0]))
    assert logits.shape == (2, 3)
    log_probs = _log_softmax(logits.numpy())
    np.testing.assert_allclose(loss.item(), -(log_probs[0, 2] + log_probs[1, 0]) / 2, rtol=1e-5)


def test_every_device_agrees(device):
    model, reference = EncoderForMaskedLM(_config()).to(device), EncoderForMaskedLM(_config())
    ids, types = np.array([[1, 2, 3, 0]]), np.array([[0, 1, 1, 0]])
    mask = np.array([[True, True, True, False]])
    np.testing.assert_allclose(model(ids, types, mask)[0].numpy()[:, :3],
                               reference(ids, types, mask)[0].numpy()[:, :3], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.encoder.embed(ids, mask).numpy(), reference.encoder.embed(ids, mask).numpy(),
                               rtol=1e-5, atol=1e-5)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="n_layer must be a positive integer"):
        EncoderConfig(n_layer=0)
    with pytest.raises(ValueError, match="divisible by n_head"):
        EncoderConfig(n_embd=10, n_head=4)
    with pytest.raises(ValueError, match="activation must be one of"):
        EncoderConfig(activation="relu")
    with pytest.raises(ValueError, match="n_classes must be a positive integer"):
        EncoderForSequenceClassification(_config(), 0)
    encoder = Encoder(_config())
    with pytest.raises(ValueError, match="more than max_positions"):
        encoder(np.zeros((1, 11), dtype=np.int64))
    with pytest.raises(ValueError, match="token_type_ids must have the ids' shape"):
        encoder(np.zeros((1, 3), dtype=np.int64), np.zeros((1, 2), dtype=np.int64))
    with pytest.raises(ValueError, match="ids must be integers"):
        encoder(np.zeros((1, 3)))
