"""Beam search (tinytf.models.beam, GPT.beam_search): one beam is greedy, enough beams find the exhaustive best, a
ragged batch gives each prompt what it gets alone, the cache changes nothing, and every device agrees. Parity with
transformers' generate is in tests/interop/test_hf_beam.py."""

import itertools

import numpy as np
import pytest

import tinytf
from tinytf.models import GPT, GPTConfig, beam_search

SMALL = dict(vocab_size=11, block_size=16, n_layer=2, n_head=4, n_embd=16)
RAGGED_PROMPTS = [[3, 1, 4, 1, 5, 9, 2], [6], np.array([5, 3, 5, 8, 9])]


def _model(preset="llama", **overrides):
    tinytf.manual_seed(0)
    return GPT(GPTConfig.from_preset(preset, **{**SMALL, **overrides}))


@pytest.mark.parametrize("preset", ["gpt2", "llama"])
def test_one_beam_is_greedy(preset):
    model = _model(preset)
    prompt = np.random.default_rng(1).integers(0, 11, (3, 4))
    np.testing.assert_array_equal(model.generate(prompt, 8, num_beams=1).numpy(),
                                  model.generate(prompt, 8, temperature=0).numpy())
    for beam, greedy in zip(model.generate(RAGGED_PROMPTS, 8, num_beams=1),
                            model.generate(RAGGED_PROMPTS, 8, temperature=0)):
        np.testing.assert_array_equal(beam, greedy)


def _exhaustive_ranking(model, prompt, steps, eos, length_penalty):
    """Every continuation of `prompt` that ends with eos or has `steps` tokens, best first by the sum of its
    log-probabilities (float64, full forward passes, no cache) / length ** length_penalty."""
    vocab = model.config.vocab_size
    with tinytf.no_grad():
        scores = {}
        for tokens in itertools.product(range(vocab), repeat=steps):
            logits = model(np.array([prompt + list(tokens)]))[0].numpy()[0].astype(np.float64)
            log_probs = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
            for length in range(1, steps + 1):
                if length < steps and tokens[length - 1] != eos:
                    continue
                if eos in tokens[: length - 1]:
                    break
                total = sum(log_probs[len(prompt) - 1 + t, tokens[t]] for t in range(length))
                scores[tokens[:length]] = total / length**length_penalty
    return sorted(scores, key=scores.get, reverse=True)


@pytest.mark.parametrize("eos, length_penalty, early_stopping", [(None, 1.0, False), (2, 1.0, "never"),
                                                                 (2, 2.0, False), (2, 0.5, True)])
def test_enough_beams_find_the_exhaustive_best(eos, length_penalty, early_stopping):
    """vocab 5, 3 new tokens, num_beams = 5 ** 3: every prefix stays a beam and every ending sequence is among the
    best num_beams candidates of its step, so the beams returned are the exhaustive search's best, in order."""
    model, prompt, steps = _model(vocab_size=5), [1, 2], 3
    expected = _exhaustive_ranking(model, prompt, steps, eos, length_penalty)[:4]
    found = model.generate([prompt], steps, num_beams=5**steps, length_penalty=length_penalty,
                           early_stopping=early_stopping, eos_token_id=eos, num_return_sequences=4)
    assert [tuple(sequence[len(prompt):].tolist()) for sequence in found] == expected
    if eos is not None:
        assert any(tokens[-1] == eos for tokens in expected)  # sequences that end with eos compete


def test_beam_search_scores_a_markov_chain_as_the_exhaustive_search():
    """beam_search alone, on a state that is each row's last token and logits that depend on it alone (a Markov
    chain, as any decoder would plug in): the sequences and scores of the exhaustive search, prompt by prompt."""
    vocab, steps, eos, length_penalty = 4, 3, 0, 1.5
    table = np.random.default_rng(5).normal(0, 2, (vocab, vocab)).astype(np.float32)
    log_probs = table.astype(np.float64) - np.log(np.exp(table.astype(np.float64)).sum(axis=1, keepdims=True))
    last = np.array([1, 3])  # two prompts, ending with tokens 1 and 3

    def reorder(rows):
        nonlocal last
        last = last[rows]

    def advance(ids):
        nonlocal last
        last = ids
        return table[ids]

    sequences, scores = beam_search(table[last], advance, reorder, steps, vocab**steps, length_penalty,
                                    early_stopping=True, eos_token_id=eos, num_return_sequences=3)
    for prompt, found, found_scores in zip((1, 3), (sequences[:3], sequences[3:]), (scores[:3], scores[3:])):
        exhaustive = {}
        for tokens in itertools.product(range(vocab), repeat=steps):
            length = tokens.index(eos) + 1 if eos in tokens else steps
            path = (prompt,) + tokens[:length]
            total = sum(log_probs[a, b] for a, b in zip(path, path[1:]))
            exhaustive[tokens[:length]] = total / length**length_penalty
        best = sorted(exhaustive, key=exhaustive.get, reverse=True)[:3]
        assert [tuple(sequence.tolist()) for sequence in found] == best
        assert len({len(tokens) for tokens in best}) > 1  # sequences that end early compete with longer ones
        np.testing.assert_allclose(found_scores, [exhaustive[tokens] for tokens in best], rtol=1e-5)


@pytest.mark.parametrize("use_cache, early_stopping", [(True, False), (True, True), (False, True)])
@pytest.mark.parametrize("preset, eos", [("gpt2", 9), ("llama", 2)])  # tokens that end a few of these beams
def test_a_ragged_batch_searches_each_prompt_as_alone(preset, eos, use_cache, early_stopping):
    """Prompts of 7, 1 and 5 tokens in one batch (packed prefill, right-aligned caches expanded to the beams):
    each prompt's sequences are those it gets alone, with an end token some beams take. With early_stopping=True
    a prompt whose beams have all finished takes no more while the others go on."""
    model = _model(preset)
    settings = dict(num_beams=3, eos_token_id=eos, num_return_sequences=2, use_cache=use_cache,
                    early_stopping=early_stopping)
    batch = model.generate(RAGGED_PROMPTS, 9, **settings)
    assert len(batch) == 2 * len(RAGGED_PROMPTS)
    for index, prompt in enumerate(RAGGED_PROMPTS):
        alone = model.generate([prompt], 9, **settings)
        for generated, expected in zip(batch[2 * index : 2 * index + 2], alone):
            np.testing.assert_array_equal(generated, expected)
    prompts = [prompt for prompt in RAGGED_PROMPTS for _ in range(2)]
    assert any(len(generated) < len(prompt) + 9 for generated, prompt in zip(batch, prompts))


@pytest.mark.parametrize("eos", [None, 2])
def test_the_cache_changes_nothing_and_shorter_sequences_are_padded_with_eos(eos):
    model = _model("gpt2")
    prompt = np.random.default_rng(4).integers(0, 11, (2, 3))
    settings = dict(num_beams=4, eos_token_id=eos, num_return_sequences=3, length_penalty=0.5)
    cached = model.generate(prompt, 10, **settings).numpy()
    np.testing.assert_array_equal(cached, model.generate(prompt, 10, use_cache=False, **settings).numpy())
    listed = model.generate(list(prompt), 10, **settings)
    assert cached.shape[0] == 6 and cached.shape[1] == max(len(sequence) for sequence in listed)
    for row, sequence in zip(cached, listed):
        np.testing.assert_array_equal(row[: len(sequence)], sequence)
        assert (row[len(sequence):] == eos).all() and (eos is None or len(sequence) == 13 or sequence[-1] == eos)


@pytest.mark.parametrize("preset", ["llama", "gemma2"])
def test_beam_search_on_every_device(device, preset):
    overrides = dict(mlp="geglu", final_softcap=3.0) if preset == "gemma2" else {}
    model, reference = _model("llama", **overrides).to(device), _model("llama", **overrides)
    settings = dict(num_beams=3, eos_token_id=2, num_return_sequences=2)
    generated = model.generate(RAGGED_PROMPTS[:2], 6, **settings)
    for sequence, expected in zip(generated, reference.generate(RAGGED_PROMPTS[:2], 6, **settings)):
        np.testing.assert_array_equal(sequence, expected)
    assert model.generate(np.array([[1, 2]]), 4, **settings).device == model.wte.weight.device


def test_beam_search_errors_name_the_problem():
    model = _model()
    with pytest.raises(ValueError, match="num_beams must be a positive integer"):
        model.generate([[1]], 3, num_beams=0)
    with pytest.raises(ValueError, match="early_stopping must be"):
        model.generate([[1]], 3, num_beams=2, early_stopping="sometimes")
    with pytest.raises(ValueError, match="num_return_sequences must be in"):
        model.generate([[1]], 3, num_beams=2, num_return_sequences=3)
    with pytest.raises(ValueError, match="must fit in block_size"):
        model.generate([[1] * 10], 7, num_beams=2)
    with pytest.raises(ValueError, match="pass num_beams"):
        model.generate([[1]], 3, eos_token_id=0)
