"""Decoding's raw-array norms and activations (nn.layers.decode_layer_norm, decode_rms_norm, decode_gelu_tanh,
decode_swiglu) against the study formulas they re-order. The decode steps they make up are held to the full forward
by tests/models/test_gpt.py (decode_step, KV-cache generation) and tests/nn/test_block.py."""

import numpy as np
import pytest

from tinytf import backend
from tinytf.functional.activation import gelu_tanh_study_forward, silu_study_forward
from tinytf.functional.normalization import layer_norm_study_forward, rms_norm_study_forward
from tinytf.nn.layers import decode_gelu_tanh, decode_layer_norm, decode_rms_norm, decode_swiglu


def _rows(shape, dtype, device, scale=3.0, offset=0.5):
    """Rows with an offset (layer norm's mean matters) and a spread that reaches GELU's tails."""
    values = np.random.default_rng(0).standard_normal(shape) * scale + offset
    return values.astype(dtype), backend.to_device(values.astype(dtype), device)


@pytest.mark.parametrize("affine", [True, False])
def test_decode_layer_norm_equals_the_study_formula(device, affine):
    host, x = _rows((3, 40), np.float32, device)
    weight = np.linspace(0.5, 2, 40).astype(np.float32) if affine else None
    bias = np.linspace(-1, 1, 40).astype(np.float32) if affine else None
    on_device = [None if p is None else backend.to_device(p, device) for p in (weight, bias)]
    with backend.device_scope(backend.canonical_device(device)):
        y = decode_layer_norm(x, *on_device, eps=1e-5)
    exact = layer_norm_study_forward(host.astype(np.float64), weight, bias, 1e-5)[0]
    study = layer_norm_study_forward(host, weight, bias, 1e-5)[0]
    assert y.dtype == np.float32 and y.shape == host.shape
    np.testing.assert_allclose(backend.to_numpy(y), exact, rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(study, exact, rtol=2e-6, atol=2e-6)  # the same error bound holds the study version
    np.testing.assert_array_equal(backend.to_numpy(x), host)  # the input is left as it is


def test_decode_rms_norm_equals_the_study_formula(device):
    host, x = _rows((2, 24), np.float32, device)
    weight = np.linspace(-1, 3, 24).astype(np.float32)
    with backend.device_scope(backend.canonical_device(device)):
        y = decode_rms_norm(x, backend.to_device(weight, device), eps=1e-6)
    exact = rms_norm_study_forward(host.astype(np.float64), weight, 1e-6)[0]
    np.testing.assert_allclose(backend.to_numpy(y), exact, rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(rms_norm_study_forward(host, weight, 1e-6)[0], exact, rtol=2e-6, atol=2e-6)
    np.testing.assert_array_equal(backend.to_numpy(x), host)


def test_decode_gelu_tanh_equals_the_study_formula(device):
    host, x = _rows((4, 64), np.float32, device, scale=4.0, offset=0.0)
    with backend.device_scope(backend.canonical_device(device)):
        y = decode_gelu_tanh(x)
    exact = gelu_tanh_study_forward(host.astype(np.float64))
    np.testing.assert_allclose(backend.to_numpy(y), exact, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(gelu_tanh_study_forward(host), exact, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(backend.to_numpy(x), host)


def test_decode_swiglu_equals_the_study_formula(device):
    host, x = _rows((2, 48), np.float32, device, scale=4.0, offset=0.0)
    gate, up = host[:, :24], host[:, 24:]
    with backend.device_scope(backend.canonical_device(device)):
        y = decode_swiglu(x[:, :24], x[:, 24:])
    exact = silu_study_forward(gate.astype(np.float64)) * up
    np.testing.assert_allclose(backend.to_numpy(y), exact, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(silu_study_forward(gate) * up, exact, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(backend.to_numpy(x), host)


def test_decode_norms_and_activations_compute_half_precision_in_float32_and_round_once():
    host, _ = _rows((2, 16), np.float16, "cpu")
    weight, bias = np.linspace(0.5, 2, 16).astype(np.float16), np.linspace(-1, 1, 16).astype(np.float16)
    pairs = [(decode_layer_norm(host, weight, bias), layer_norm_study_forward(host, weight, bias)[0]),
             (decode_rms_norm(host, weight), rms_norm_study_forward(host, weight)[0]),
             (decode_gelu_tanh(host), gelu_tanh_study_forward(host.astype(np.float32)).astype(np.float16)),
             (decode_swiglu(host, weight), (silu_study_forward(host.astype(np.float32)) * weight).astype(np.float16))]
    for fast, study in pairs:
        assert fast.dtype == np.float16
        np.testing.assert_allclose(fast.astype(np.float32), study.astype(np.float32), rtol=1e-3, atol=1e-3)
