import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tinytf
import tinytf.attention
from tinytf import nn
from tinytf.nn.layers import DecodeLayouts
from tinytf.testing import gradcheck


def _reference_attention(x, attention, window=None, softcap=None, scale=None):
    """Causal attention from the layer's weights in plain NumPy, repeating K/V heads for GQA; with a window, query t
    sees keys t - window .. t; with a softcap, scaled scores become softcap * tanh(scores / softcap)."""
    B, T, C = x.shape
    H, Hkv, D = attention.n_head, attention.n_kv_head, attention.head_dim
    qkv = x @ attention.c_attn.weight.numpy().T.astype(x.dtype) + attention.c_attn.bias.numpy()
    q, k, v = np.split(qkv, [H * D, (H + Hkv) * D], axis=-1)
    q = q.reshape(B, T, H, D).transpose(0, 2, 1, 3)
    k = np.repeat(k.reshape(B, T, Hkv, D).transpose(0, 2, 1, 3), H // Hkv, axis=1)
    v = np.repeat(v.reshape(B, T, Hkv, D).transpose(0, 2, 1, 3), H // Hkv, axis=1)
    scores = q @ k.transpose(0, 1, 3, 2) * (1 / np.sqrt(D) if scale is None else scale)
    if softcap is not None:
        scores = softcap * np.tanh(scores / softcap)
    visible = np.tril(np.ones((T, T), dtype=bool))
    if window is not None:
        visible &= np.triu(np.ones((T, T), dtype=bool), -window)
    scores = np.where(visible, scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    y = (probs @ v).transpose(0, 2, 1, 3).reshape(B, T, H * D)
    out = y @ attention.c_proj.weight.numpy().T
    return out if attention.c_proj.bias is None else out + attention.c_proj.bias.numpy()


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_attention_matches_numpy_reference_for_mha_gqa_and_mqa(n_kv_head):
    tinytf.manual_seed(0)
    attention = nn.MultiHeadAttention(16, 4, n_kv_head, max_length=8)
    x = np.random.default_rng(0).standard_normal((2, 7, 16)).astype(np.float32)
    np.testing.assert_allclose(attention(tinytf.tensor(x)).numpy(), _reference_attention(x, attention),
                               rtol=1e-4, atol=1e-5)
    assert attention.c_attn.weight.shape == ((4 + 2 * n_kv_head) * 4, 16)


@pytest.mark.parametrize("window, softcap, scale", [(2, None, None), (0, None, None), (None, 0.8, None),
                                                    (3, 0.8, 0.3)])
def test_window_softcap_and_scale_match_numpy_reference(window, softcap, scale):
    tinytf.manual_seed(0)
    attention = nn.MultiHeadAttention(16, 4, 2, max_length=8, bias=False, qkv_bias=True, window=window,
                                      softcap=softcap, scale=scale)
    assert attention.c_proj.bias is None and attention.c_attn.bias is not None  # Qwen2's biases
    x = np.random.default_rng(0).standard_normal((2, 7, 16)).astype(np.float32) * 3  # scores big enough to cap
    np.testing.assert_allclose(attention(tinytf.tensor(x)).numpy(),
                               _reference_attention(x, attention, window, softcap, scale), rtol=1e-4, atol=1e-5)


def test_attention_output_at_t_ignores_later_tokens():
    attention = nn.MultiHeadAttention(8, 2, rope=True, max_length=8)
    x = tinytf.randn(1, 6, 8)
    changed = x.numpy().copy()
    changed[:, 4:] += 10
    np.testing.assert_allclose(attention(x).numpy()[:, :4], attention(tinytf.tensor(changed)).numpy()[:, :4],
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rope, window, softcap", [(False, None, None), (True, None, None), (True, 2, 0.8)])
def test_kv_cache_decoding_equals_full_attention(rope, window, softcap):
    attention = nn.MultiHeadAttention(16, 4, 2, max_length=12, rope=rope, window=window, softcap=softcap)
    x = tinytf.randn(2, 9, 16)
    full = attention(x).numpy()
    cache = nn.KVCache(2, 2, 12, 4, np.float32)
    pieces = [attention(x[:, :5], cache).numpy()] + [attention(x[:, t : t + 1], cache).numpy() for t in range(5, 9)]
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, rtol=1e-5, atol=1e-6)
    assert cache.length == 9


@pytest.mark.parametrize("rope, window, softcap", [(False, None, None), (True, None, None), (True, 2, None),
                                                   (True, 0, 0.8), (False, 6, 0.8)])
@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_decode_on_arrays_equals_forward_with_the_cache(rope, window, softcap, n_kv_head):
    """MultiHeadAttention.decode (one token, raw arrays) gives forward's output and fills the cache alike, with a
    sliding window shorter than the cache (and one longer) and a softcap."""
    attention = nn.MultiHeadAttention(16, 4, n_kv_head, max_length=12, rope=rope, window=window, softcap=softcap)
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
    with pytest.raises(ValueError, match="window must be None or a number of keys >= 0, got -1"):
        nn.MultiHeadAttention(16, 4, window=-1)


def test_kv_cache_stores_packed_sequences_right_aligned():
    cache = nn.KVCache(3, 2, 6, 4, np.float32)
    cache.keys[...] = np.nan  # what an earlier use may have left
    lengths = [2, 4, 1]
    keys = np.arange(7 * 2 * 4, dtype=np.float32).reshape(7, 2, 4)  # (total, Hkv, D)
    cache.store_sequences(keys, -keys, np.array([0, 2, 6, 7], dtype=np.int32))
    assert cache.length == 4
    np.testing.assert_array_equal(cache.positions(), lengths)
    np.testing.assert_array_equal(cache.start_bias(1)[:, 0, 0], [[-np.inf, 0, 0], [0, 0, 0], [-np.inf, -np.inf, 0]])
    first = 0
    for row, length in enumerate(lengths):
        start = 4 - length
        np.testing.assert_array_equal(cache.keys[row, :, start:4], keys[first : first + length].swapaxes(0, 1))
        np.testing.assert_array_equal(cache.values[row, :, start:4], -keys[first : first + length].swapaxes(0, 1))
        assert (cache.keys[row, :, :start] == 0).all() and (cache.values[row, :, :start] == 0).all()
        first += length
    equal = nn.KVCache(2, 2, 6, 4, np.float32)
    equal.store_sequences(keys[:6], keys[:6], np.array([0, 3, 6]))
    assert equal.positions() == 3 and equal.start_bias() is None


def test_kv_cache_refuses_sequences_that_do_not_fit():
    keys = np.zeros((5, 2, 4), dtype=np.float32)
    with pytest.raises(ValueError, match=r"shape \(3, 2, 6, 4\) cannot take 2 sequences of keys \(5, 2, 4\)"):
        nn.KVCache(3, 2, 6, 4, np.float32).store_sequences(keys, keys, np.array([0, 2, 5]))
    with pytest.raises(ValueError, match="holds 3 positions; a sequence of 4 does not fit"):
        nn.KVCache(2, 2, 3, 4, np.float32).store_sequences(keys, keys, np.array([0, 1, 5]))
    cache = nn.KVCache(2, 2, 6, 4, np.float32)
    cache.store_sequences(keys, keys, np.array([0, 1, 5]))
    with pytest.raises(ValueError, match="into an empty cache; this one holds 4 positions"):
        cache.store_sequences(keys, keys, np.array([0, 1, 5]))


@pytest.mark.parametrize("rope, window, softcap", [(False, None, None), (True, 1, 0.8)])
def test_decoding_rows_of_different_lengths_equals_each_row_alone(device, rope, window, softcap):
    """Prompts of 5, 2 and 3 tokens prefilled as packed sequences (forward with position_ids and a cache), then one
    token per row by decode: each row's outputs are those of its prompt alone."""
    tinytf.manual_seed(0)
    attention = nn.MultiHeadAttention(16, 4, 2, max_length=8, rope=rope, window=window, softcap=softcap).to(device)
    lengths, new = [5, 2, 3], 2
    x = np.random.default_rng(0).standard_normal((3, 5 + new, 16)).astype(np.float32) * 3
    rows = np.concatenate([x[row, :length] for row, length in enumerate(lengths)])[None]  # (1, 10, 16)
    positions = np.concatenate([np.arange(length) for length in lengths])[None]
    cache, layouts = nn.KVCache(3, 2, 8, 4, np.float32, device), DecodeLayouts()
    prefill = attention(tinytf.tensor(rows).to(device), cache, positions).numpy()[0]
    decoded = []
    with tinytf.backend.device_scope(cache.device):  # decode works on raw arrays of the current device (decode_step)
        for t in range(new):
            tokens = np.stack([x[row, length + t] for row, length in enumerate(lengths)])  # (3, 16)
            decoded.append(tinytf.Tensor(attention.decode(tinytf.tensor(tokens).to(device).data, cache, layouts)))
    decoded = [step.numpy() for step in decoded]
    first = 0
    for row, length in enumerate(lengths):
        alone = attention(tinytf.tensor(x[row : row + 1, : length + new]).to(device)).numpy()[0]
        np.testing.assert_allclose(prefill[first : first + length], alone[:length], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.stack([step[row] for step in decoded]), alone[length:], rtol=1e-5, atol=1e-6)
        first += length


def numpy_linear(x, linear):
    """x W^T + b in NumPy (a reference for test_block and test_heads too)."""
    out = x @ linear.weight.numpy().T.astype(x.dtype)
    return out if linear.bias is None else out + linear.bias.numpy()


def numpy_attention(q, k, v, visible, attention):
    """softmax(q k^T * scale, hidden keys -inf) v with q (B, T, H*D), k and v (B, S, Hkv*D), visible (B, T, S) bool;
    through the output projection -> (B, T, C)."""
    H, Hkv, D = attention.n_head, attention.n_kv_head, attention.head_dim
    B, T, S = visible.shape
    q = q.reshape(B, T, H, D).transpose(0, 2, 1, 3)
    k = np.repeat(k.reshape(B, S, Hkv, D).transpose(0, 2, 1, 3), H // Hkv, axis=1)
    v = np.repeat(v.reshape(B, S, Hkv, D).transpose(0, 2, 1, 3), H // Hkv, axis=1)
    scores = np.where(visible[:, None], q @ k.transpose(0, 1, 3, 2) / np.sqrt(D), -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return numpy_linear((probs @ v).transpose(0, 2, 1, 3).reshape(B, T, H * D), attention.c_proj)


def numpy_bidirectional_attention(x, attention, mask):
    """Self-attention of x (B, T, C) over every key where mask (B, T) is True, earlier or later."""
    H, Hkv, D = attention.n_head, attention.n_kv_head, attention.head_dim
    q, k, v = np.split(numpy_linear(x, attention.c_attn), [H * D, (H + Hkv) * D], axis=-1)
    return numpy_attention(q, k, v, np.broadcast_to(mask[:, None], mask.shape[:1] + mask.shape[1:] * 2), attention)


def padding_mask(lengths, S):
    """(B, S) bool: True on each row's first lengths[b] positions, its tokens."""
    return np.arange(S)[None, :] < np.asarray(lengths)[:, None]  # (B, S), True = a token


@pytest.mark.parametrize("flash_threshold", [tinytf.attention.AUTO_FLASH_MIN_SCORES, 0])
def test_bidirectional_attention_with_padding_matches_numpy_reference(device, flash_threshold, monkeypatch):
    """causal=False: every query sees every key that is a token, later ones too; on the naive and flash paths."""
    monkeypatch.setattr(tinytf.attention, "AUTO_FLASH_MIN_SCORES", flash_threshold)
    tinytf.manual_seed(0)
    attention = nn.MultiHeadAttention(16, 4, 2, causal=False)
    x = np.random.default_rng(0).standard_normal((3, 7, 16)).astype(np.float32)
    mask = padding_mask([7, 3, 5], 7)
    out = attention.to(device)(tinytf.tensor(x).to(device), key_padding_mask=mask).numpy()
    np.testing.assert_allclose(out, numpy_bidirectional_attention(x, attention, mask), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_cross_attention_with_a_padded_source_matches_numpy_reference(device, n_kv_head):
    tinytf.manual_seed(0)
    attention = nn.MultiHeadAttention(16, 4, n_kv_head, cross=True, context_dim=12)
    rng = np.random.default_rng(0)
    x, context = (rng.standard_normal(shape).astype(np.float32) for shape in ((2, 5, 16), (2, 6, 12)))
    mask = padding_mask([6, 2], 6)
    out = attention.to(device)(tinytf.tensor(x).to(device), key_padding_mask=mask,
                               context=tinytf.tensor(context).to(device)).numpy()
    q = numpy_linear(x, attention.q_proj)
    k, v = np.split(numpy_linear(context, attention.kv_proj), 2, axis=-1)
    expected = numpy_attention(q, k, v, np.broadcast_to(mask[:, None], (2, 5, 6)), attention)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
    assert attention.q_proj.weight.shape == (16, 16) and attention.kv_proj.weight.shape == (2 * n_kv_head * 4, 12)


def test_encoder_self_attention_with_padding_passes_gradcheck(device):
    attention = nn.MultiHeadAttention(8, 2, causal=False).double().to(device)
    x = tinytf.randn(2, 5, 8, dtype=np.float64, requires_grad=True).to(device)
    mask = padding_mask([5, 3], 5)
    assert gradcheck(lambda x: attention(x, key_padding_mask=mask), x)


def test_cross_attention_with_a_padded_source_passes_gradcheck(device):
    attention = nn.MultiHeadAttention(8, 2, 1, cross=True, context_dim=6).double().to(device)
    x = tinytf.randn(2, 3, 8, dtype=np.float64, requires_grad=True).to(device)
    context = tinytf.randn(2, 4, 6, dtype=np.float64, requires_grad=True).to(device)
    mask = padding_mask([4, 2], 4)
    assert gradcheck(lambda x, context: attention(x, key_padding_mask=mask, context=context), x, context)


def test_cross_attention_with_cached_keys_and_values_equals_recomputing_them(device):
    """The ContextKV of a source, computed once, gives forward's outputs token by token, and decode's on arrays."""
    tinytf.manual_seed(0)
    attention = nn.MultiHeadAttention(16, 4, 2, cross=True).to(device)
    x, context = tinytf.randn(2, 4, 16).to(device), tinytf.randn(2, 5, 16).to(device)
    mask = padding_mask([5, 3], 5)
    full = attention(x, key_padding_mask=mask, context=context).numpy()
    with tinytf.no_grad():
        cached = attention.context_keys_values(context, mask)
    stepped = np.concatenate([attention(x[:, t : t + 1], context=cached).numpy() for t in range(4)], axis=1)
    np.testing.assert_allclose(stepped, full, rtol=1e-5, atol=1e-6)
    layouts = DecodeLayouts()
    with tinytf.backend.device_scope(x.device):
        decoded = [tinytf.Tensor(attention.decode(x.data[:, t], cached, layouts)) for t in range(4)]
    np.testing.assert_allclose(np.stack([step.numpy() for step in decoded], axis=1), full, rtol=1e-5, atol=1e-6)


@settings(max_examples=15)
@given(lengths=st.lists(st.integers(1, 6), min_size=1, max_size=3), seed=st.integers(0, 2**16))
def test_padding_a_source_never_changes_cross_attention(lengths, seed):
    """Each target row's output over its padded source equals its output over the source alone, whatever fills the
    padding."""
    tinytf.manual_seed(seed)
    attention = nn.MultiHeadAttention(8, 2, cross=True)
    rng = np.random.default_rng(seed)
    S = max(lengths)
    x = rng.standard_normal((len(lengths), 3, 8)).astype(np.float32)
    context = rng.standard_normal((len(lengths), S, 8)).astype(np.float32) * 10
    out = attention(tinytf.tensor(x), key_padding_mask=padding_mask(lengths, S), context=tinytf.tensor(context))
    for row, length in enumerate(lengths):
        alone = attention(tinytf.tensor(x[row : row + 1]), context=tinytf.tensor(context[row : row + 1, :length]))
        np.testing.assert_allclose(out.numpy()[row], alone.numpy()[0], rtol=1e-5, atol=1e-6)


def test_cross_attention_and_padding_errors():
    with pytest.raises(ValueError, match="cross-attention takes neither rope nor a window"):
        nn.MultiHeadAttention(8, 2, cross=True, rope=True)
    with pytest.raises(ValueError, match="context_dim is the size of cross-attention's context"):
        nn.MultiHeadAttention(8, 2, context_dim=4)
    self_attention, cross_attention = nn.MultiHeadAttention(8, 2), nn.MultiHeadAttention(8, 2, cross=True)
    x = tinytf.randn(2, 3, 8)
    with pytest.raises(ValueError, match="takes a context, self-attention none; this layer has cross=False"):
        self_attention(x, context=x)
    with pytest.raises(ValueError, match="takes a context, self-attention none; this layer has cross=True"):
        cross_attention(x)
    with pytest.raises(ValueError, match=r"key_padding_mask must be bool of shape \(B, S\) = \(2, 3\), got bool of "
                                         r"shape \(2, 4\)"):
        self_attention(x, key_padding_mask=np.ones((2, 4), dtype=bool))
    with pytest.raises(ValueError, match="got float64"):
        self_attention(x, key_padding_mask=np.ones((2, 3)))
    with pytest.raises(ValueError, match="position_ids .* are for self-attention without a key_padding_mask"):
        self_attention(x, position_ids=np.zeros((2, 3), dtype=int), key_padding_mask=np.ones((2, 3), dtype=bool))
    with pytest.raises(ValueError, match="a ContextKV carries its source's key_padding_mask"):
        cross_attention(x, key_padding_mask=np.ones((2, 3), dtype=bool), context=cross_attention.context_keys_values(x))
    with pytest.raises(ValueError, match="keeps its keys and values in a ContextKV"):
        cross_attention(x, nn.KVCache(2, 2, 4, 4, np.float32), context=x)
