import numpy as np
import pytest

import tinytf

from tinytf.models import filter_logits, sample_next_token


def test_greedy_takes_the_argmax():
    logits = np.array([[0.1, 3.0, -1.0], [5.0, 0.0, 4.9]])
    np.testing.assert_array_equal(sample_next_token(logits, temperature=0), [1, 0])


def test_top_k_keeps_the_k_largest():
    filtered = filter_logits(np.array([[1.0, 4.0, 3.0, 2.0]]), top_k=2)
    assert np.isinf(filtered[0, [0, 3]]).all() and np.isfinite(filtered[0, [1, 2]]).all()


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = np.array([[0.5, 0.3, 0.15, 0.05]])
    filtered = filter_logits(np.log(probs), top_p=0.75)
    assert np.isfinite(filtered[0, :2]).all() and np.isinf(filtered[0, 2:]).all()
    assert np.isfinite(filter_logits(np.log(probs), top_p=0.1)[0, 0])


def test_sampling_frequencies_follow_the_distribution():
    probs = np.array([0.6, 0.3, 0.1])
    rng = np.random.default_rng(0)
    draws = sample_next_token(np.tile(np.log(probs), (20000, 1)), rng=rng)
    np.testing.assert_allclose(np.bincount(draws, minlength=3) / 20000, probs, atol=0.015)


def test_bad_sampling_parameters():
    with pytest.raises(ValueError, match="top_k"):
        filter_logits(np.zeros((1, 3)), top_k=0)
    with pytest.raises(ValueError, match="top_p"):
        filter_logits(np.zeros((1, 3)), top_p=1.5)
    with pytest.raises(ValueError, match="temperature"):
        sample_next_token(np.zeros((1, 3)), temperature=-1)


def test_sampling_takes_logits_on_any_device_and_returns_host_ids(device):
    logits = np.random.default_rng(0).standard_normal((3, 7)).astype(np.float32)
    on_device = tinytf.tensor(logits).to(device).data
    greedy = sample_next_token(on_device, temperature=0)
    assert isinstance(greedy, np.ndarray) and greedy.dtype == np.int64
    np.testing.assert_array_equal(greedy, logits.argmax(axis=-1))
    drawn = sample_next_token(on_device, temperature=1.0, rng=np.random.default_rng(1))
    np.testing.assert_array_equal(drawn, sample_next_token(logits, temperature=1.0, rng=np.random.default_rng(1)))
