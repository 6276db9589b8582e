import numpy as np
import pytest

import tinytf
from tinytf import nn
from tinytf.nn.layers import DecodeLayouts


def test_layer_shapes_and_parameter_counts():
    x = tinytf.randn(2, 5, 8)
    assert nn.Linear(8, 3)(x).shape == (2, 5, 3) and nn.Linear(8, 3).num_parameters() == 27
    assert nn.Linear(8, 3, bias=False).num_parameters() == 24
    assert nn.Embedding(10, 4)(tinytf.tensor([[1, 2]])).shape == (1, 2, 4)
    assert nn.LayerNorm(8)(x).shape == x.shape and nn.LayerNorm(8, bias=False).num_parameters() == 8
    assert nn.RMSNorm(8)(x).shape == x.shape and nn.RMSNorm(8).num_parameters() == 8
    assert nn.GELUMLP(8, 32)(x).shape == x.shape and nn.GELUMLP(8, 32).num_parameters() == 8 * 32 * 2 + 32 + 8
    assert nn.GatedMLP(8, 24)(x).shape == x.shape and nn.GatedMLP(8, 24).num_parameters() == 3 * 8 * 24


def test_linear_init_matches_pytorch_bound():
    layer = nn.Linear(100, 50)
    assert np.abs(layer.weight.numpy()).max() <= 0.1 and np.abs(layer.weight.numpy()).max() > 0.09


def test_dropout_module_follows_train_and_eval():
    layer = nn.Dropout(0.5)
    x = tinytf.ones(1000)
    assert (layer(x).numpy() == 0).any()
    layer.eval()
    assert layer(x) is x
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        nn.Dropout(1.5)


def test_swiglu_matches_its_formula():
    mlp = nn.GatedMLP(4, 6)
    x = tinytf.randn(3, 4)
    gate = x.numpy() @ mlp.gate.weight.numpy().T
    up = x.numpy() @ mlp.up.weight.numpy().T
    expected = (gate / (1 + np.exp(-gate)) * up) @ mlp.c_proj.weight.numpy().T
    np.testing.assert_allclose(mlp(x).numpy(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rows", [1, 8])
@pytest.mark.parametrize("bias", [True, False])
def test_decode_layouts_compute_the_linears_side_by_side(rows, bias):
    """DecodeLayouts.linear on raw arrays equals each Linear's forward, for one layer and for two stacked (one GEMM)."""
    first, second = nn.Linear(6, 5, bias), nn.Linear(6, 3, bias)
    x = tinytf.randn(rows, 6).numpy()
    layouts = DecodeLayouts()
    expected = [x @ linear.weight.numpy().T + (linear.bias.numpy() if bias else 0) for linear in (first, second)]
    np.testing.assert_allclose(layouts.linear(x, first), expected[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(layouts.linear(x, first, second), np.concatenate(expected, axis=1), rtol=1e-6, atol=1e-6)


def test_decode_layouts_compute_half_precision_in_float32_and_round_once():
    linear = nn.Linear(8, 4).to(dtype="bfloat16")
    x = tinytf.randn(2, 8).to(dtype="bfloat16")
    out = DecodeLayouts().linear(x.data, linear)
    assert out.dtype == x.dtype
    np.testing.assert_array_equal(out.astype(np.float32), linear(x).numpy().astype(np.float32))


def test_rms_norm_with_a_weight_offset_scales_by_offset_plus_weight():
    """Gemma's RMSNorm: x / rms(x) * (1 + w), its weight starting at 0; forward, decode and the weight's gradient."""
    norm = nn.RMSNorm(6, eps=1e-6, weight_offset=1.0)
    np.testing.assert_array_equal(norm.weight.numpy(), np.zeros(6, dtype=np.float32))
    norm.weight.data = np.linspace(-0.5, 0.5, 6, dtype=np.float32)
    x = tinytf.randn(3, 6, requires_grad=True)
    normalized = x.numpy() / np.sqrt((x.numpy() ** 2).mean(-1, keepdims=True) + 1e-6)
    y = norm(x)
    np.testing.assert_allclose(y.numpy(), normalized * (1 + norm.weight.numpy()), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(norm.decode(x.numpy()), y.numpy(), rtol=1e-6, atol=1e-6)
    y.sum().backward()
    np.testing.assert_allclose(norm.weight.grad, normalized.sum(0), rtol=1e-5, atol=1e-6)


def test_geglu_matches_its_formula_and_decodes_alike():
    mlp = nn.GatedMLP(4, 6, activation="gelu_tanh")
    x = tinytf.randn(3, 4)
    gate = x.numpy() @ mlp.gate.weight.numpy().T
    up = x.numpy() @ mlp.up.weight.numpy().T
    gelu = 0.5 * gate * (1 + np.tanh(np.sqrt(2 / np.pi) * (gate + 0.044715 * gate**3)))
    expected = (gelu * up) @ mlp.c_proj.weight.numpy().T
    np.testing.assert_allclose(mlp(x).numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mlp.decode(x.numpy(), DecodeLayouts()), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="activation must be one of .'silu', 'gelu_tanh'., got 'relu'"):
        nn.GatedMLP(4, 6, activation="relu")
