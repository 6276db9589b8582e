import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tinytf
from tinytf import nn
from tinytf.nn.layers import DecodeLayouts

from nn.test_attention import numpy_bidirectional_attention, numpy_linear, padding_mask


def _encoder_block(dim=16, n_head=4, norm_first=True):
    return nn.EncoderBlock(nn.LayerNorm(dim), nn.MultiHeadAttention(dim, n_head, causal=False), nn.LayerNorm(dim),
                           nn.GELUMLP(dim, 2 * dim), norm_first=norm_first)


def _decoder_block(dim=16, n_head=4, norm_first=True):
    return nn.DecoderBlock(nn.LayerNorm(dim), nn.MultiHeadAttention(dim, n_head), nn.LayerNorm(dim),
                           nn.GELUMLP(dim, 2 * dim), norm_first=norm_first,
                           cross_attn=nn.MultiHeadAttention(dim, n_head, cross=True), cross_norm=nn.LayerNorm(dim))


def _numpy_layer_norm(x, norm):
    centered = x - x.mean(-1, keepdims=True)
    normalized = centered / np.sqrt((centered**2).mean(-1, keepdims=True) + norm.eps)
    return normalized * norm.weight.numpy() + norm.bias.numpy()


def _numpy_mlp(x, mlp):
    hidden = numpy_linear(x, mlp.c_fc)
    hidden = 0.5 * hidden * (1 + np.tanh(math.sqrt(2 / math.pi) * (hidden + 0.044715 * hidden**3)))
    return numpy_linear(hidden, mlp.c_proj)


@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_block_matches_numpy_formula(norm_first):
    """Post-norm (BERT): x = norm1(x + attn(x)); x = norm2(x + mlp(x)). Pre-norm: x = x + attn(norm1(x)); ..."""
    tinytf.manual_seed(0)
    block = _encoder_block(norm_first=norm_first)
    for norm in (block.norm1, block.norm2):  # not the identity init, so that the norms' placement shows
        norm.weight.data[:] = np.random.default_rng(1).uniform(0.5, 1.5, 16)
        norm.bias.data[:] = np.random.default_rng(2).uniform(-0.5, 0.5, 16)
    x = np.random.default_rng(0).standard_normal((2, 5, 16)) * 2
    mask = padding_mask([5, 3], 5)
    out = block(tinytf.tensor(x.astype(np.float32)), padding_mask=mask).numpy()
    if norm_first:
        x = x + numpy_bidirectional_attention(_numpy_layer_norm(x, block.norm1), block.attn, mask)
        expected = x + _numpy_mlp(_numpy_layer_norm(x, block.norm2), block.mlp)
    else:
        x = _numpy_layer_norm(x + numpy_bidirectional_attention(x, block.attn, mask), block.norm1)
        expected = _numpy_layer_norm(x + _numpy_mlp(x, block.mlp), block.norm2)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


@settings(max_examples=15)
@given(lengths=st.lists(st.integers(1, 6), min_size=1, max_size=3), norm_first=st.booleans(),
       seed=st.integers(0, 2**16))
def test_padding_never_changes_an_encoder_blocks_tokens(lengths, norm_first, seed):
    """Each row's outputs at its tokens equal those of the row alone, unpadded, whatever fills the padding."""
    tinytf.manual_seed(seed)
    block = _encoder_block(8, 2, norm_first)
    T = max(lengths)
    x = np.random.default_rng(seed).standard_normal((len(lengths), T, 8)).astype(np.float32)
    x[~padding_mask(lengths, T)] *= 100
    out = block(tinytf.tensor(x), padding_mask=padding_mask(lengths, T)).numpy()
    for row, length in enumerate(lengths):
        alone = block(tinytf.tensor(x[row : row + 1, :length])).numpy()[0]
        np.testing.assert_allclose(out[row, :length], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm_first", [False, True])
def test_decoder_block_with_cached_self_and_cross_attention_equals_full_forward(device, norm_first):
    """Token by token with the self-attention's KV cache and the sources' ContextKV, by forward and by decode on
    arrays, the outputs are those of one forward over the whole target; the padded source's keys are hidden."""
    tinytf.manual_seed(0)
    block = _decoder_block(norm_first=norm_first).to(device)
    x, source = tinytf.randn(2, 4, 16).to(device), tinytf.randn(2, 5, 16).to(device)
    mask = padding_mask([5, 2], 5)
    full = block(x, context=source, context_mask=mask).numpy()
    context = block.cross_attn.context_keys_values(source, mask)
    cache = nn.KVCache(2, 4, 4, 4, np.float32, device)
    stepped = [block(x[:, t : t + 1], cache, context=context).numpy() for t in range(4)]
    np.testing.assert_allclose(np.concatenate(stepped, axis=1), full, rtol=1e-5, atol=1e-5)
    cache, layouts = nn.KVCache(2, 4, 4, 4, np.float32, device), DecodeLayouts()
    with tinytf.backend.device_scope(x.device):
        decoded = [tinytf.Tensor(block.decode(x.data[:, t], cache, layouts, context)) for t in range(4)]
    np.testing.assert_allclose(np.stack([step.numpy() for step in decoded], axis=1), full, rtol=1e-5, atol=1e-5)


def test_block_errors():
    with pytest.raises(ValueError, match="EncoderBlock: the attention must be bidirectional self-attention"):
        nn.EncoderBlock(nn.LayerNorm(8), nn.MultiHeadAttention(8, 2), nn.LayerNorm(8), nn.GELUMLP(8, 16))
    with pytest.raises(ValueError, match="sandwich norms .* are for pre-norm blocks"):
        nn.DecoderBlock(nn.LayerNorm(8), nn.MultiHeadAttention(8, 2), nn.LayerNorm(8), nn.GELUMLP(8, 16),
                        nn.LayerNorm(8), norm_first=False)
    with pytest.raises(ValueError, match="cross_attn and cross_norm come together"):
        nn.DecoderBlock(nn.LayerNorm(8), nn.MultiHeadAttention(8, 2), nn.LayerNorm(8), nn.GELUMLP(8, 16),
                        cross_attn=nn.MultiHeadAttention(8, 2, cross=True))
    x = tinytf.randn(1, 3, 16)
    with pytest.raises(ValueError, match="a block with cross-attention takes a context, one without none"):
        _decoder_block()(x)
    with pytest.raises(ValueError, match="a block with cross-attention takes a context, one without none"):
        _encoder_block()(x, context=x)
