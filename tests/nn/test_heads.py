import math

import numpy as np
import pytest

import tinytf
from tinytf import nn
from tinytf.nn.layers import DecodeLayouts

from nn.test_attention import numpy_linear


def test_lm_head_tied_to_the_embeddings_scores_with_their_table():
    tinytf.manual_seed(0)
    embedding = nn.Embedding(11, 8)
    head = nn.LMHead(8, 11, tied_to=embedding)
    assert head.decoder.weight is embedding.weight and head.decoder.bias is None
    x = tinytf.randn(2, 3, 8, requires_grad=True)
    logits = head(x)
    np.testing.assert_allclose(logits.numpy(), x.numpy() @ embedding.weight.numpy().T, rtol=1e-5, atol=1e-5)
    logits.sum().backward()
    np.testing.assert_allclose(embedding.weight.grad, np.broadcast_to(x.numpy().sum((0, 1)), (11, 8)), rtol=1e-5)
    np.testing.assert_allclose(head.decode(x.numpy()[:, 0], DecodeLayouts()), logits.numpy()[:, 0], rtol=1e-5,
                               atol=1e-6)


def test_masked_lm_head_matches_bert_formula(device):
    """dense -> GELU (exact, erf) -> LayerNorm (eps 1e-12) -> tied decoder plus a bias."""
    tinytf.manual_seed(0)
    embedding = nn.Embedding(13, 8)
    head = nn.MaskedLMHead(8, 13, tied_to=embedding)
    head.norm.weight.data[:] = np.linspace(0.5, 1.5, 8)
    x = np.random.default_rng(0).standard_normal((2, 3, 8)) * 3
    expected_hidden = numpy_linear(x, head.dense)
    expected_hidden = 0.5 * expected_hidden * (1 + np.vectorize(math.erf)(expected_hidden / math.sqrt(2)))
    centered = expected_hidden - expected_hidden.mean(-1, keepdims=True)
    normalized = centered / np.sqrt((centered**2).mean(-1, keepdims=True) + 1e-12) * head.norm.weight.numpy()
    expected = normalized @ embedding.weight.numpy().T + head.lm_head.decoder.bias.numpy()
    out = head.to(device)(tinytf.tensor(x.astype(np.float32)).to(device)).numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_sequence_classification_head_pools_the_first_token(device):
    tinytf.manual_seed(0)
    head = nn.SequenceClassificationHead(8, 3, dropout=0.5).eval()
    x = np.random.default_rng(0).standard_normal((2, 4, 8))
    expected = numpy_linear(np.tanh(numpy_linear(x[:, 0], head.pooler)), head.classifier)
    out = head.to(device)(tinytf.tensor(x.astype(np.float32)).to(device)).numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
    assert out.shape == (2, 3)


def test_mean_pool_averages_the_tokens_only(device):
    x = np.random.default_rng(0).standard_normal((3, 4, 5)).astype(np.float32)
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=bool)
    pooled = nn.mean_pool(tinytf.tensor(x, requires_grad=True).to(device), mask)
    np.testing.assert_allclose(pooled.numpy(), [x[0].mean(0), x[1, :2].mean(0), np.zeros(5)], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(nn.mean_pool(tinytf.tensor(x)).numpy(), x.mean(1), rtol=1e-6)
    leaf = tinytf.tensor(x, requires_grad=True)
    nn.mean_pool(leaf, mask).sum().backward()
    np.testing.assert_allclose(leaf.grad[:, :, 0], [[0.25] * 4, [0.5, 0.5, 0, 0], [0] * 4])


def test_head_errors():
    with pytest.raises(ValueError, match=r"tied embedding's table must have the shape \(vocab_size, dim\) = \(10, 8\), "
                                         r"got \(11, 8\)"):
        nn.LMHead(8, 10, tied_to=nn.Embedding(11, 8))
    with pytest.raises(ValueError, match=r"mean_pool: padding_mask must be bool of shape \(B, T\) = \(2, 3\), got "
                                         r"int64 of shape \(2, 3\)"):
        nn.mean_pool(tinytf.randn(2, 3, 4), np.ones((2, 3), dtype=np.int64))
