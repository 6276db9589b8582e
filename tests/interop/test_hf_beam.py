"""Beam search against transformers' generate(num_beams=4, do_sample=False): the same sequences, token for token, for
every length penalty and early-stopping rule, with and without an end token, and for prompts of different lengths
(left-padded with an attention mask in transformers, packed in tinytf).

Small random models built from configs (tests/hf_reference.py, never the Hub); skips without the interop extra.
"""

import numpy as np
import pytest
from hf_reference import IDS

from tinytf.interop import from_pretrained

NEW_TOKENS = 10
# Tokens these random models choose often enough that some beams end early (the test checks that some do).
EOS = {"gpt2": 46, "llama_gqa": 86}
SETTINGS = [  # (length_penalty, early_stopping, num_return_sequences)
    (1.0, False, 2), (2.0, "never", 2), (-1.0, True, 3), (0.0, False, 4), (0.5, "never", 1),
]


def _transformers_beams(torch, hf_model, ids, mask, eos, length_penalty, early_stopping, num_return_sequences):
    # The end token pads the shorter sequences, as tinytf pads them; without one, no sequence is shorter.
    return hf_model.generate(
        torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), max_new_tokens=NEW_TOKENS, num_beams=4,
        do_sample=False, length_penalty=length_penalty, early_stopping=early_stopping, eos_token_id=eos,
        pad_token_id=0 if eos is None else eos, num_return_sequences=num_return_sequences).numpy()


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
def test_beam_search_equals_transformers(hf, hf_models, name):
    torch, _ = hf
    hf_model, folder = hf_models[name]
    model = from_pretrained(folder)
    ids = IDS[:, :6]
    ended_early = False
    for eos in (None, EOS[name]):
        for length_penalty, early_stopping, num_return_sequences in SETTINGS:
            expected = _transformers_beams(torch, hf_model, ids, np.ones_like(ids), eos, length_penalty,
                                           early_stopping, num_return_sequences)
            for use_cache in (True, False):
                generated = model.generate(ids, NEW_TOKENS, num_beams=4, length_penalty=length_penalty,
                                           early_stopping=early_stopping, eos_token_id=eos,
                                           num_return_sequences=num_return_sequences, use_cache=use_cache)
                np.testing.assert_array_equal(generated.numpy(), expected)
            ended_early |= expected.shape[1] < ids.shape[1] + NEW_TOKENS
    assert ended_early


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
def test_a_ragged_batch_equals_transformers_left_padded(hf, hf_models, name):
    torch, _ = hf
    hf_model, folder = hf_models[name]
    prompts = [IDS[0, :7], IDS[1, :3]]
    padded, mask = np.zeros((2, 7), dtype=np.int64), np.zeros((2, 7), dtype=np.int64)
    for row, prompt in enumerate(prompts):
        padded[row, 7 - len(prompt):], mask[row, 7 - len(prompt):] = prompt, 1
    expected = _transformers_beams(torch, hf_model, padded, mask, EOS[name], 1.0, False, 2)
    generated = from_pretrained(folder).generate(prompts, NEW_TOKENS, num_beams=4, eos_token_id=EOS[name],
                                                 num_return_sequences=2)
    for sequence, row, prompt in zip(generated, expected, np.repeat([0, 1], 2)):
        new = sequence[len(prompts[prompt]):]
        np.testing.assert_array_equal(new, row[7 : 7 + len(new)])
        assert (row[7 + len(new):] == EOS[name]).all()
