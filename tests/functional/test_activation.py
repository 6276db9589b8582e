import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from op_check import check_op, random_array, small_shapes

import tinytf
import tinytf.functional as F
from tinytf import backend
from tinytf.functional import common
from tinytf.functional.activation import (
    elu,
    erf_series,
    gelu_tanh_study_backward,
    gelu_tanh_study_forward,
    hardswish,
    hardtanh,
    leaky_relu,
    mish,
    selu,
    silu_study_backward,
    silu_study_forward,
    softplus,
)

seeds = st.integers(0, 2**32 - 1)
_erf = np.vectorize(math.erf)


def _softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


ACTIVATIONS = {
    "tanh": (F.tanh, np.tanh, None),
    "sigmoid": (F.sigmoid, lambda x: 1 / (1 + np.exp(-x)), None),
    "relu": (F.relu, lambda x: np.maximum(x, 0), 0.0),
    "gelu_tanh": (lambda x: F.gelu(x, approximate="tanh"), gelu_tanh_study_forward, None),
    "gelu_erf": (F.gelu, lambda x: 0.5 * x * (1 + _erf(x / math.sqrt(2))), None),
    "silu": (F.silu, silu_study_forward, None),
}


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
@given(shape=small_shapes, seed=seeds)
def test_activation_matches_numpy(name, shape, seed):
    op, reference, kink = ACTIVATIONS[name]
    check_op(op, reference, random_array(seed, shape, away_from=kink) * 2)


def _softplus(x, beta=1.0, threshold=20.0):
    return np.where(beta * x > threshold, x, np.log1p(np.exp(beta * x)) / beta)


def _elu(x, alpha=1.0):
    return np.where(x > 0, x, alpha * np.expm1(x))


SELU_ALPHA, SELU_SCALE = 1.6732632423543772848170429916717, 1.0507009873554804934193349852946

# name: (op, reference, kink to keep inputs away from, input scale)
MORE_ACTIVATIONS = {
    "softplus": (softplus, _softplus, None, 2),
    "softplus_beta_threshold": (lambda x: softplus(x, beta=2, threshold=3), lambda x: _softplus(x, 2, 3), 1.5, 2),
    "elu": (elu, _elu, None, 2),
    "elu_alpha": (lambda x: elu(x, alpha=0.5), lambda x: _elu(x, 0.5), 0.0, 2),
    "selu": (selu, lambda x: SELU_SCALE * _elu(x, SELU_ALPHA), 0.0, 2),
    "leaky_relu": (leaky_relu, lambda x: np.where(x > 0, x, 0.01 * x), 0.0, 2),
    "leaky_relu_slope": (lambda x: leaky_relu(x, 0.2), lambda x: np.where(x > 0, x, 0.2 * x), 0.0, 2),
    "hardtanh": (lambda x: hardtanh(x, -0.5, 2.0), lambda x: np.clip(x, -0.5, 2.0), -0.5, 2),
    "hardswish": (hardswish, lambda x: x * np.clip(x + 3, 0, 6) / 6, -3.0, 3),
    "mish": (mish, lambda x: x * np.tanh(np.log1p(np.exp(x))), None, 3),
}


@pytest.mark.parametrize("name", sorted(MORE_ACTIVATIONS))
@settings(max_examples=10)  # every example runs gradcheck on every device
@given(shape=small_shapes, seed=seeds)
def test_more_activations_match_numpy(name, shape, seed):
    op, reference, kink, scale = MORE_ACTIVATIONS[name]
    check_op(op, reference, random_array(seed, shape, away_from=None if kink is None else kink / scale) * scale)


# op, input at a kink, PyTorch's gradient there
KINKS = [
    (lambda x: elu(x, alpha=0.5), 0.0, 0.5),
    (selu, 0.0, SELU_SCALE * SELU_ALPHA),
    (lambda x: leaky_relu(x, 0.2), 0.0, 0.2),
    (F.relu, 0.0, 0.0),
    (hardtanh, -1.0, 0.0),
    (hardtanh, 1.0, 0.0),
    (hardswish, -3.0, -0.5),
    (hardswish, 3.0, 1.5),
    (lambda x: softplus(x, threshold=2), 2.0, 1 / (1 + math.exp(-2))),
]


@pytest.mark.parametrize("op, x, slope", KINKS)
def test_activation_takes_pytorchs_gradient_at_kinks(op, x, slope, device):
    point = tinytf.tensor([x], requires_grad=True, device=device)
    op(point).backward(tinytf.tensor([1.0], device=device))
    np.testing.assert_allclose(backend.to_numpy(point.grad), [slope], rtol=1e-6)


def test_softplus_and_mish_do_not_overflow():
    x = tinytf.tensor([-1000.0, 1000.0], requires_grad=True)
    for op, expected in [(softplus, [0.0, 1000.0]), (mish, [-0.0, 1000.0]),
                         (lambda a: softplus(a, threshold=1e9), [0.0, 1000.0])]:
        y = op(x)
        np.testing.assert_allclose(y.numpy(), expected)
        y.sum().backward()
        assert np.isfinite(x.grad).all()
        x.grad = None


def test_hardtanh_rejects_crossed_bounds():
    with pytest.raises(ValueError, match="min_val 2 is greater than max_val 1"):
        hardtanh(tinytf.randn(2), min_val=2, max_val=1)


FLOATING_ACTIVATIONS = [F.tanh, F.sigmoid, F.gelu, lambda x: F.gelu(x, approximate="tanh"), F.silu, F.softmax,
                        F.log_softmax, softplus, elu, selu, leaky_relu, hardtanh, hardswish, mish]


@pytest.mark.parametrize("op", FLOATING_ACTIVATIONS)
def test_floating_activation_of_integers_computes_in_float32(op):
    for data in (np.array([[-2, 0, 3]]), np.array([[True, False]])):
        result = op(tinytf.tensor(data))
        assert result.dtype == np.float32
        np.testing.assert_array_equal(result.numpy(), op(tinytf.tensor(data.astype(np.float32))).numpy())


def test_relu_keeps_integers_and_erf_of_integers_is_float32():
    assert F.relu(tinytf.tensor([-2, 3])).tolist() == [0, 3]
    assert F.erf(np.array([0, 1])).dtype == np.float32


@pytest.mark.parametrize("dim", [None, 0, -1])
def test_softmax_of_a_0d_tensor_is_one_with_zero_gradient(dim):
    x = np.array(2.5)
    check_op(lambda a: F.softmax(a, dim=dim), lambda a: np.ones_like(a), x)
    check_op(lambda a: F.log_softmax(a, dim=dim), lambda a: np.zeros_like(a), x)


@st.composite
def shape_and_axis(draw):
    shape = draw(st.lists(st.integers(1, 5), min_size=1, max_size=4).map(tuple))
    return shape, draw(st.integers(-len(shape), len(shape) - 1))


@given(shape_axis=shape_and_axis(), seed=seeds)
def test_softmax_matches_numpy_on_any_axis(shape_axis, seed):
    shape, axis = shape_axis
    check_op(lambda x: F.softmax(x, dim=axis), lambda x: _softmax(x, axis), random_array(seed, shape) * 3)


@given(shape_axis=shape_and_axis(), seed=seeds)
def test_log_softmax_matches_numpy_on_any_axis(shape_axis, seed):
    shape, axis = shape_axis
    check_op(lambda x: x.log_softmax(axis=axis), lambda x: np.log(_softmax(x, axis)), random_array(seed, shape) * 3)


def test_softmax_is_stable_for_huge_logits_and_minus_infinity():
    x = tinytf.tensor([[1e4, 0.0, -1e4], [-np.inf, 1.0, 1.0], [-np.inf, -np.inf, -np.inf]], requires_grad=True)
    probs = F.softmax(x, -1)
    np.testing.assert_allclose(probs.numpy(), [[1, 0, 0], [0, 0.5, 0.5], [0, 0, 0]], atol=1e-7)
    logp = F.log_softmax(x[:2], -1)
    np.testing.assert_allclose(logp.numpy()[0, 0], 0.0)
    assert logp.numpy()[1, 0] == -np.inf and np.isfinite(logp.numpy()[1, 1:]).all()
    (probs * tinytf.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert np.isfinite(x.grad).all()


def test_dropout_zeroes_about_p_and_keeps_the_mean():
    tinytf.manual_seed(0)
    x = tinytf.ones(200_000, requires_grad=True)
    y = F.dropout(x, p=0.3)
    kept = y.numpy() != 0
    assert abs(kept.mean() - 0.7) < 0.01
    np.testing.assert_allclose(y.numpy()[kept], 1 / 0.7, rtol=1e-6)
    y.sum().backward()
    np.testing.assert_array_equal(x.grad, y.numpy())


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_dropout_keeps_where_the_seeded_uniform_reaches_p(device, dtype):
    rng = np.random.default_rng(0)
    x = tinytf.tensor(rng.standard_normal((33, 5)).astype(dtype), requires_grad=True, device=device)
    tinytf.manual_seed(7)
    uniform = backend.to_numpy(backend.generator(device).random((33, 5), dtype=np.float32))
    tinytf.manual_seed(7)
    y = F.dropout(x, p=0.25)
    upstream = rng.standard_normal((33, 5)).astype(dtype)
    y.backward(tinytf.tensor(upstream, device=device))
    mask = (uniform >= 0.25) * np.float32(1 / 0.75)
    assert y.dtype == x.grad.dtype == dtype
    np.testing.assert_array_equal(y.numpy(), (x.numpy().astype(np.float32) * mask).astype(dtype))
    np.testing.assert_array_equal(backend.to_numpy(x.grad), (upstream.astype(np.float32) * mask).astype(dtype))


def test_dropout_is_identity_in_evaluation_and_rejects_bad_p():
    x = tinytf.randn(5)
    assert F.dropout(x, p=0.5, training=False) is x
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        F.dropout(x, p=1.0)


def test_gelu_rejects_unknown_approximation():
    with pytest.raises(ValueError, match="approximate"):
        F.gelu(tinytf.randn(2), approximate="fast")


def test_softmax_rejects_axis_out_of_range():
    with pytest.raises(IndexError, match=r"dimension 2 is out of range .* \[-2, 1\]"):
        F.softmax(tinytf.randn(2, 3), dim=2)
    with pytest.raises(IndexError, match=r"dimension -3 is out of range"):
        F.log_softmax(tinytf.randn(2, 3), dim=-3)
    for dim in (1, -2):
        with pytest.raises(IndexError, match=r"out of range for a tensor of 0 dimensions"):
            F.softmax(tinytf.tensor(1.0), dim=dim)
    with pytest.raises(TypeError, match="one integer"):
        F.softmax(tinytf.randn(2, 3), dim=(0, 1))


def test_erf_has_double_precision():
    x = np.linspace(-8, 8, 4001)
    np.testing.assert_allclose(F.erf(x), _erf(x), rtol=0, atol=1e-14)  # a few float64 ulps of values near 1
    np.testing.assert_allclose(erf_series(x), _erf(x), rtol=0, atol=1e-14)  # the study version too


def test_erf_of_float32_is_within_an_ulp_of_one_and_of_edge_values():
    x = np.linspace(-6, 6, 120001).astype(np.float32)
    error = np.abs(F.erf(x).astype(np.float64) - _erf(x.astype(np.float64)))
    assert F.erf(x).dtype == np.float32 and error.max() <= np.finfo(np.float32).eps
    for dtype in (np.float32, np.float64):
        edges = F.erf(np.array([np.inf, -np.inf, np.nan, 0.0, -0.0], dtype=dtype))
        np.testing.assert_array_equal(edges, [1, -1, np.nan, 0, 0])


def test_erf_on_a_device_equals_the_host(device):
    x = np.random.default_rng(0).normal(0, 2, 1000)
    for dtype in (np.float32, np.float64):
        with backend.device_scope(backend.canonical_device(device)):  # CuPy computes on the current device
            on_device = F.erf(backend.to_device(x.astype(dtype), device))
        np.testing.assert_allclose(backend.to_numpy(on_device), F.erf(x.astype(dtype)), rtol=0,
                                   atol=4 * np.finfo(dtype).eps)


def _masked_softmax(x, keep, scale):
    shifted = np.where(keep, x * scale, -np.inf)
    row_max = np.max(shifted, axis=-1, keepdims=True)
    e = np.exp(shifted - np.where(np.isfinite(row_max), row_max, 0))
    total = e.sum(axis=-1, keepdims=True)
    return e / np.where(total > 0, total, 1)


@st.composite
def scores_and_mask(draw):
    shape = draw(st.lists(st.integers(1, 5), min_size=1, max_size=4).map(tuple))
    mask_shape = tuple(draw(st.sampled_from([1, side])) for side in shape[draw(st.integers(0, len(shape) - 1)):])
    return shape, mask_shape


@given(shapes=scores_and_mask(), seed=seeds, scale=st.floats(0.05, 3.0))
def test_masked_softmax_matches_numpy(shapes, seed, scale):
    shape, mask_shape = shapes
    keep = np.random.default_rng(seed).random(mask_shape) < 0.7  # some rows keep nothing: they must be zeros
    check_op(lambda x: F.masked_softmax(x, keep, scale), lambda x: _masked_softmax(x, keep, scale),
             random_array(seed, shape) * 3)


def test_attention_softmax_in_training_sized_blocks_matches_numpy(monkeypatch, device):
    """The training step's causal softmax, (B*H, T, T) with T = 64, in the default cache blocks: hundreds of rows per
    block, so the row maxima come from common.row_max's tree (the other tests' one-row blocks take max)."""
    monkeypatch.setattr(common, "BLOCK_BYTES", 256 * 1024)
    rng = np.random.default_rng(7)
    x, grad = rng.standard_normal((48, 64, 64)) * 3, rng.standard_normal((48, 64, 64))  # float64: tight tolerances
    x[0, 10, 5] = -np.inf  # a kept score of -inf: probability 0
    keep = np.tril(np.ones((64, 64), dtype=bool))
    scores = tinytf.tensor(x, device=device, requires_grad=True)
    probs = F.masked_softmax(scores, keep, 0.125)
    probs.backward(tinytf.tensor(grad, device=device))
    expected = _masked_softmax(x, keep, 0.125)
    np.testing.assert_allclose(probs.numpy(), expected, rtol=1e-13, atol=1e-15)
    inner = (grad * expected).sum(axis=-1, keepdims=True)  # dL/dx = scale * p (g - sum(g p))
    np.testing.assert_allclose(backend.to_numpy(scores.grad), 0.125 * expected * (grad - inner), rtol=1e-12,
                               atol=1e-14)


def test_masked_softmax_without_mask_is_a_scaled_softmax():
    x = tinytf.randn(3, 7)
    np.testing.assert_allclose(F.masked_softmax(x, scale=0.5).numpy(), _softmax(x.numpy() * 0.5, -1), rtol=1e-6)


def test_masked_softmax_rejects_bad_masks():
    x = tinytf.randn(2, 3)
    with pytest.raises(TypeError, match="boolean"):
        F.masked_softmax(x, np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"\(4,\) does not broadcast"):
        F.masked_softmax(x, np.ones(4, dtype=bool))


@given(shape=small_shapes, seed=seeds)
def test_swiglu_is_silu_of_gate_times_up(shape, seed):
    check_op(F.swiglu, lambda gate, up: silu_study_forward(gate) * up,
             random_array(seed, shape) * 2, random_array(seed + 1, shape) * 2)


def test_swiglu_needs_equal_shapes():
    with pytest.raises(ValueError, match=r"gate of shape \(2, 3\) and up of shape \(3,\)"):
        F.swiglu(tinytf.randn(2, 3), tinytf.randn(3))


@pytest.mark.parametrize("wanted", ["gate", "up"])
def test_swiglu_computes_only_the_gradient_asked_for(wanted):
    rng = np.random.default_rng(0)
    gate, up = (tinytf.tensor(rng.standard_normal((3, 4)), requires_grad=name == wanted) for name in ("gate", "up"))
    upstream = rng.standard_normal((3, 4))
    F.swiglu(gate, up).backward(upstream)
    composed = {name: tinytf.tensor(t.numpy(), requires_grad=True) for name, t in (("gate", gate), ("up", up))}
    (F.silu(composed["gate"]) * composed["up"]).backward(upstream)
    for name, tensor in (("gate", gate), ("up", up)):
        if name == wanted:
            np.testing.assert_allclose(tensor.grad, composed[name].grad, rtol=1e-12)
        else:
            assert tensor.grad is None


@pytest.mark.parametrize("op, forward, backward", [
    (lambda x: F.gelu(x, approximate="tanh"), gelu_tanh_study_forward, gelu_tanh_study_backward),
    (F.silu, silu_study_forward, silu_study_backward)])
def test_fused_activations_take_transposed_inputs(op, forward, backward, device):
    rng = np.random.default_rng(0)
    x = tinytf.tensor(rng.standard_normal((5, 7)).astype(np.float32), device=device).T  # not contiguous
    x.requires_grad = True
    upstream = rng.standard_normal((5, 7)).astype(np.float32).T
    y = op(x)
    y.backward(tinytf.tensor(upstream, device=device))
    np.testing.assert_allclose(y.numpy(), forward(x.numpy()), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(backend.to_numpy(x.grad), backward(upstream, x.numpy()), rtol=1e-5, atol=1e-6)
