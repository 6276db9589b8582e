"""EncoderDecoder (tinytf.models.encoder_decoder): shapes and the padding-aware loss, gradients to every parameter,
generation with the cache equal to recomputation, one beam equal to greedy, a ragged batch equal to each source
alone, padding that changes nothing, a copy task learned, every device agreeing, and errors that name the problem.
Post-norm with learned positions (BART) and pre-norm with sinusoidal positions (the Transformer) both run."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tinytf
from tinytf.models import EncoderDecoder, EncoderDecoderConfig
from tinytf.optim import AdamW

SMALL = dict(vocab_size=13, max_positions=12, d_model=16, n_head=2, encoder_layers=2, decoder_layers=2, ffn_dim=32)
BART_LIKE = dict(position_offset=2)
TRANSFORMER_LIKE = dict(norm_first=True, final_norm=True, layernorm_embedding=False, positions="sinusoidal",
                        scale_embedding=True, activation="gelu_tanh", share_embeddings=False,
                        tie_word_embeddings=False)
STYLES = pytest.mark.parametrize("style", [BART_LIKE, TRANSFORMER_LIKE], ids=["post-norm", "pre-norm"])
SOURCES = [np.array([5, 6, 7, 8, 9, 10, 3]), np.array([4]), np.array([11, 3, 12, 4])]


def _model(style, spread: float = 0.3, **overrides):
    """A small random model whose weights are spread wider than the 0.02 init, so that greedy decoding varies its
    tokens instead of repeating one."""
    tinytf.manual_seed(0)
    model = EncoderDecoder(EncoderDecoderConfig(**{**SMALL, **style, **overrides}))
    for name, parameter in model.named_parameters():
        if parameter.ndim == 2:
            parameter.data = parameter.data * np.float32(spread / 0.02)
    return model


def _log_softmax(logits):
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


@STYLES
def test_logits_shape_and_loss_ignore_padding_targets(style):
    model = _model(style)
    rng = np.random.default_rng(0)
    src, tgt = rng.integers(3, 13, (2, 5)), rng.integers(3, 13, (2, 4))
    targets = rng.integers(3, 13, (2, 4))
    targets[1, 2:] = model.config.pad_token_id
    logits, loss = model(src, tgt, targets=targets)
    assert logits.shape == (2, 4, 13)
    log_probs = _log_softmax(logits.numpy())
    kept = targets != model.config.pad_token_id
    expected = -np.mean(np.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0][kept])
    np.testing.assert_allclose(loss.item(), expected, rtol=1e-5)
    assert model(src, tgt)[1] is None


@STYLES
def test_gradients_reach_every_parameter(style):
    model = _model(style)
    rng = np.random.default_rng(1)
    src, tgt = rng.integers(3, 13, (2, 5)), rng.integers(3, 13, (2, 4))
    mask = np.ones((2, 5), dtype=bool)
    mask[0, 3:] = False
    model(src, tgt, src_padding_mask=mask, targets=tgt)[1].backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and np.abs(tinytf.backend.to_numpy(parameter.grad)).max() > 0, name


@STYLES
def test_cached_decoding_equals_recomputation(style):
    model = _model(style)
    for settings_ in (dict(), dict(num_beams=3, length_penalty=0.7)):
        cached = model.generate(SOURCES, 9, **settings_)
        recomputed = model.generate(SOURCES, 9, use_cache=False, **settings_)
        assert len({len(sequence) for sequence in cached}) > 1 or len(set(cached[0].tolist())) > 1  # not degenerate
        for a, b in zip(cached, recomputed):
            np.testing.assert_array_equal(a, b)


@STYLES
def test_one_beam_is_greedy(style):
    model = _model(style)
    for beam, greedy in zip(model.generate(SOURCES, 9, num_beams=1), model.generate(SOURCES, 9)):
        np.testing.assert_array_equal(beam, greedy)


@STYLES
def test_ragged_batch_generates_each_source_as_alone(style):
    model = _model(style)
    for settings_ in (dict(), dict(num_beams=2, early_stopping=True)):
        together = model.generate(SOURCES, 9, **settings_)
        for source, generated in zip(SOURCES, together):
            np.testing.assert_array_equal(generated, model.generate([source], 9, **settings_)[0])


def test_generation_stops_at_eos_and_keeps_it():
    model = _model(BART_LIKE)
    free = model.generate(SOURCES, 9, eos_token_id=-1)  # an id never drawn: every row runs to max_new_tokens
    assert all(len(sequence) == 9 for sequence in free)
    eos = int(free[0][3])
    stopped = model.generate(SOURCES, 9, eos_token_id=eos)
    first_eos = list(free[0]).index(eos)
    np.testing.assert_array_equal(stopped[0], free[0][: first_eos + 1])
    for sequence in stopped:
        assert eos not in sequence[:-1].tolist() and (len(sequence) == 9 or sequence[-1] == eos)


def test_sampling_with_top_k_one_is_greedy_and_a_seed_repeats():
    model = _model(TRANSFORMER_LIKE)
    for sampled, greedy in zip(model.generate(SOURCES, 6, temperature=1.0, top_k=1), model.generate(SOURCES, 6)):
        np.testing.assert_array_equal(sampled, greedy)
    runs = [model.generate(SOURCES, 6, temperature=1.5, top_p=0.9, rng=np.random.default_rng(7)) for _ in range(2)]
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)


def test_enough_beams_find_the_exhaustive_best():
    """vocab 5, 3 new tokens, 5 ** 3 beams: every prefix stays a beam, so the 4 best beams returned are the best of all
    continuations that end with eos or reach 3 tokens, scored by summed log-probability / length ** 0.5 (full
    forward passes in float64, no cache)."""
    model = _model(BART_LIKE, vocab_size=5, pad_token_id=1, eos_token_id=2, decoder_start_token_id=0)
    source, steps, eos, penalty = np.array([[3, 4, 2]]), 3, 2, 0.5
    scores = {}
    with tinytf.no_grad():
        for tokens in itertools.product(range(5), repeat=steps):
            log_probs = _log_softmax(model(source, np.array([[0, *tokens[:-1]]]))[0].numpy()[0])
            for length in range(1, steps + 1):
                if eos in tokens[: length - 1]:
                    break
                if length == steps or tokens[length - 1] == eos:
                    total = sum(log_probs[t, tokens[t]] for t in range(length))
                    scores[tokens[:length]] = total / length**penalty
    best = sorted(scores, key=scores.get, reverse=True)[:4]
    found = model.generate([source[0]], steps, num_beams=5**steps, length_penalty=penalty, num_return_sequences=4)
    assert [tuple(sequence.tolist()) for sequence in found] == best


@settings(max_examples=10)
@given(st.data())
def test_padding_never_changes_the_tokens_results(data):
    """Extra padding of any content after a source (masked) or after a target leaves every unpadded position's
    encoder output and logits as they are without it."""
    style = data.draw(st.sampled_from([BART_LIKE, TRANSFORMER_LIKE]))
    model = _model(style)
    S, T = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 5))
    extra_s, extra_t = data.draw(st.integers(1, 5)), data.draw(st.integers(1, 5))
    ids = st.integers(0, 12)
    src = np.array(data.draw(st.lists(ids, min_size=S + extra_s, max_size=S + extra_s)))[None]
    tgt = np.array(data.draw(st.lists(ids, min_size=T + extra_t, max_size=T + extra_t)))[None]
    src_mask = np.arange(S + extra_s)[None] < S
    tgt_mask = np.arange(T + extra_t)[None] < T
    with tinytf.no_grad():
        alone_memory = model.encode(src[:, :S]).numpy()
        alone = model(src[:, :S], tgt[:, :T])[0].numpy()
        padded_memory = model.encode(src, src_mask).numpy()[:, :S]
        padded = model(src, tgt, src_padding_mask=src_mask, tgt_padding_mask=tgt_mask)[0].numpy()[:, :T]
    np.testing.assert_allclose(padded_memory, alone_memory, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(padded, alone, rtol=1e-5, atol=1e-4)


def test_learns_to_copy():
    """A pre-norm model learns to copy strings of 2 to 5 symbols in 200 steps: held-out strings come back exactly,
    followed by eos."""
    tinytf.manual_seed(0)
    config = EncoderDecoderConfig(vocab_size=8, max_positions=8, d_model=32, n_head=2, encoder_layers=1,
                                  decoder_layers=1, ffn_dim=64, **TRANSFORMER_LIKE)
    model = EncoderDecoder(config)
    optimizer = AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    rng = np.random.default_rng(0)
    pad, eos = config.pad_token_id, config.eos_token_id

    def batch(size):
        src, tgt_in, tgt_out = np.full((size, 5), pad), np.full((size, 6), pad), np.full((size, 6), pad)
        for row, length in enumerate(rng.integers(2, 6, size)):
            symbols = rng.integers(3, 8, length)
            src[row, :length] = symbols
            tgt_in[row, 0], tgt_in[row, 1 : length + 1] = config.decoder_start_token_id, symbols
            tgt_out[row, :length], tgt_out[row, length] = symbols, eos
        return src, src != pad, tgt_in, tgt_out

    for _ in range(200):
        src, mask, tgt_in, tgt_out = batch(32)
        loss = model(src, tgt_in, src_padding_mask=mask, targets=tgt_out)[1]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    held_out = [rng.integers(3, 8, length) for length in rng.integers(2, 6, 20)]
    copies = model.generate(held_out, 7)
    correct = sum(np.array_equal(copy, np.append(source, eos)) for copy, source in zip(copies, held_out))
    assert correct >= 19, f"{correct} of 20 copied"


def test_every_device_agrees(device):
    model, reference = _model(BART_LIKE).to(device), _model(BART_LIKE)
    src, tgt = np.array([[5, 6, 7, 1]]), np.array([[2, 5, 6]])
    mask = np.array([[True, True, True, False]])
    np.testing.assert_allclose(model(src, tgt, src_padding_mask=mask)[0].numpy(),
                               reference(src, tgt, src_padding_mask=mask)[0].numpy(), rtol=1e-5, atol=1e-5)
    for settings_ in (dict(), dict(num_beams=2)):
        for a, b in zip(model.generate(SOURCES, 5, **settings_), reference.generate(SOURCES, 5, **settings_)):
            np.testing.assert_array_equal(a, b)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="positions must be one of"):
        EncoderDecoderConfig(positions="rope")
    with pytest.raises(ValueError, match="activation must be one of"):
        EncoderDecoderConfig(activation="relu")
    with pytest.raises(ValueError, match="divisible by n_head"):
        EncoderDecoderConfig(d_model=10, n_head=4)
    with pytest.raises(ValueError, match="pad_token_id must be a token id"):
        EncoderDecoderConfig(vocab_size=4, pad_token_id=7)
    model = _model(BART_LIKE)
    with pytest.raises(ValueError, match="sources must be a list of 1-D"):
        model.generate([np.array([], dtype=np.int64)], 3)
    with pytest.raises(ValueError, match="num_return_sequences is beam search's setting"):
        model.generate(SOURCES, 3, num_return_sequences=2)
    with pytest.raises(ValueError, match="max_new_tokens must be an integer"):
        model.generate(SOURCES, 13)
    with pytest.raises(ValueError, match="more than max_positions"):
        model(np.zeros((1, 13), dtype=np.int64), np.zeros((1, 2), dtype=np.int64))
    with pytest.raises(ValueError, match="targets must have the shape"):
        model(np.zeros((1, 3), dtype=np.int64), np.zeros((1, 2), dtype=np.int64), targets=np.zeros((1, 3), int))
    with pytest.raises(ValueError, match="src_ids must be integers"):
        model.encode(np.zeros((1, 3)))
