import numpy as np
import pytest

import tinytf
from tinytf import nn
from tinytf.nn.layers import DecodeLayouts


def _reference_attention(x, attention):
    """Causal attention from the layer's weights in plain NumPy, repeating K/V heads for GQA."""
    B, T, C = x.shape
    H, Hkv, D = attention.n_head, attention.n_kv_head, attention.head_dim
    qkv = x @ attention.c_attn.weight.numpy().T.astype(x.dtype) + attention.c_attn.bias.numpy()
    q, k, v = np.split(qkv, [H * D, (H + Hkv) * D], axis=-1)
    q = q.reshape(B, T, H, D).transpose(0, 2, 1, 3)
    k = np.repeat(k.reshape(B, T, Hkv, D).transpose(0, 2, 1, 3), H // Hkv, axis=1)
    v = np.repeat(v.reshape(B, T, Hkv, D).transpose(0, 2, 1, 3), H // Hkv, axis=1)
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(D)
    scores = np.where(np.tril(np.ones((T, T), dtype=bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    y = (probs @ v).transpose(0, 2, 1, 3).reshape(B, T, H * D)
    return y @ attention.c_proj.weight.numpy().T + attention.c_proj.bias.numpy()


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_attention_matches_numpy_reference_for_mha_gqa_and_mqa(n_kv_head):
    tinytf.manual_seed(0)
    attention = nn.MultiHeadAttention(16, 4, n_kv_head, max_length=8)
    x = np.random.default_rng(0).standard_normal((2, 7, 16)).astype(np.float32)
    np.testing.assert_allclose(attention(tinytf.tensor(x)).numpy(), _reference_attention(x, attention),
                               rtol=1e-4, atol=1e-5)
    assert attention.c_attn.weight.shape == ((4 + 2 * n_kv_head) * 4, 16)


def test_attention_output_at_t_ignores_later_tokens():
    attention = nn.MultiHeadAttention(8, 2, rope=True, max_length=8)
    x = tinytf.randn(1, 6, 8)
    changed = x.numpy().copy()
    changed[:, 4:] += 10
    np.testing.assert_allclose(attention(x).numpy()[:, :4], attention(tinytf.tensor(changed)).numpy()[:, :4],
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rope", [False, True])
def test_kv_cache_decoding_equals_full_attention(rope):
    attention = nn.MultiHeadAttention(16, 4, 2, max_length=12, rope=rope)
    x = tinytf.randn(2, 9, 16)
    full = attention(x).numpy()
    cache = nn.KVCache(2, 2, 12, 4, np.float32)
    pieces = [attention(x[:, :5], cache).numpy()] + [attention(x[:, t : t + 1], cache).numpy() for t in range(5, 9)]
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, rtol=1e-5, atol=1e-6)
    assert cache.length == 9


@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_decode_on_arrays_equals_forward_with_the_cache(rope, n_kv_head):
    """MultiHeadAttention.decode (one token, raw arrays) gives forward's output and fills the cache alike."""
    attention = nn.MultiHeadAttention(16, 4, n_kv_head, max_length=12, rope=rope)
    x = tinytf.randn(3, 9, 16)
    general, fast = nn.KVCache(3, n_kv_head, 12, 4, np.float32), nn.KVCache(3, n_kv_head, 12, 4, np.float32)
    attention(x[:, :5], general)
    attention(x[:, :5], fast)
    layouts = DecodeLayouts()
    for t in range(5, 9):
        expected = attention(x[:, t : t + 1], general).numpy()[:, 0]
        np.testing.assert_allclose(attention.decode(x.numpy()[:, t], fast, layouts), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fast.keys[:, :, :9], general.keys[:, :, :9], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fast.values[:, :, :9], general.values[:, :, :9], rtol=1e-5, atol=1e-6)
    assert fast.length == 9


def test_kv_cache_refuses_overflow():
    cache = nn.KVCache(1, 1, 4, 2, np.float32)
    cache.append(tinytf.zeros(1, 1, 3, 2), tinytf.zeros(1, 1, 3, 2))
    with pytest.raises(ValueError, match="holds 4 positions; 3 are used and 2 more do not fit"):
        cache.append(tinytf.zeros(1, 1, 2, 2), tinytf.zeros(1, 1, 2, 2))


def test_attention_dropout_acts_in_training_only():
    tinytf.manual_seed(0)
    attention = nn.MultiHeadAttention(8, 4, 2, max_length=6, dropout=0.5)
    x = tinytf.randn(1, 5, 8, requires_grad=True)
    evaluated = attention.eval()(x).numpy()
    no_dropout = nn.MultiHeadAttention(8, 4, 2, max_length=6, dropout=0.0)
    no_dropout.load_state_dict(attention.state_dict())
    np.testing.assert_allclose(evaluated, no_dropout.train()(x).numpy(), rtol=1e-6)
    dropped = attention.train()(x)
    assert not np.allclose(dropped.numpy(), evaluated)
    dropped.sum().backward()
    assert np.isfinite(x.grad).all() and np.abs(x.grad).sum() > 0


def test_attention_configuration_errors():
    with pytest.raises(ValueError, match="multiple of n_kv_head"):
        nn.MultiHeadAttention(16, 4, 3)
    with pytest.raises(ValueError, match="not divisible by n_head"):
        nn.MultiHeadAttention(10, 4)
