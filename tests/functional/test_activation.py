import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from op_check import check_op, random_array, small_shapes

import tinytf
import tinytf.functional as F
from tinytf.functional.activation import gelu_tanh_study_forward, silu_study_forward

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


def test_dropout_is_identity_in_evaluation_and_rejects_bad_p():
    x = tinytf.randn(5)
    assert F.dropout(x, p=0.5, training=False) is x
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        F.dropout(x, p=1.0)


def test_gelu_rejects_unknown_approximation():
    with pytest.raises(ValueError, match="approximate"):
        F.gelu(tinytf.randn(2), approximate="fast")


def test_softmax_rejects_axis_out_of_range():
    with pytest.raises(ValueError, match="out of range"):
        F.softmax(tinytf.randn(2, 3), dim=2)


def test_erf_has_double_precision():
    x = np.linspace(-8, 8, 4001)
    np.testing.assert_allclose(F.erf(x), _erf(x), rtol=0, atol=1e-14)  # a few float64 ulps of values near 1


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
