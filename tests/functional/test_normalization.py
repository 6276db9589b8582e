import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from op_check import check_op, random_array

import tinytf
import tinytf.functional as F

seeds = st.integers(0, 2**32 - 1)
leading_dims = st.lists(st.integers(1, 3), max_size=2)


def _layer_norm(x, w=None, b=None, eps=1e-5):
    y = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)
    return y * (1 if w is None else w) + (0 if b is None else b)


def _rms_norm(x, w=None, eps=1e-6):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * (1 if w is None else w)


@given(seed=seeds, leading=leading_dims, width=st.integers(2, 8), affine=st.sampled_from(["none", "weight", "both"]))
def test_layer_norm_matches_reference(seed, leading, width, affine):
    x = random_array(seed, (*leading, width)) * 2 + 1
    w, b = random_array(seed + 1, (width,)), random_array(seed + 2, (width,))
    if affine == "none":
        check_op(lambda x: F.layer_norm(x, width), _layer_norm, x)
    elif affine == "weight":
        check_op(lambda x, w: F.layer_norm(x, width, w), _layer_norm, x, w)
    else:
        check_op(lambda x, w, b: F.layer_norm(x, width, w, b), _layer_norm, x, w, b)


@given(seed=seeds, leading=leading_dims, width=st.integers(1, 8), weighted=st.booleans())
def test_rms_norm_matches_reference(seed, leading, width, weighted):
    x = random_array(seed, (*leading, width)) * 2
    if weighted:
        check_op(lambda x, w: F.rms_norm(x, width, w), _rms_norm, x, random_array(seed + 1, (width,)))
    else:
        check_op(lambda x: F.rms_norm(x, width), _rms_norm, x)


@given(seed=seeds)
def test_fused_layer_norm_backward_equals_composed_ops(seed):
    x = tinytf.tensor(random_array(seed, (3, 6)), requires_grad=True)
    w = tinytf.tensor(random_array(seed + 1, (6,)), requires_grad=True)
    b = tinytf.tensor(random_array(seed + 2, (6,)), requires_grad=True)
    upstream = random_array(seed + 3, (3, 6))
    F.layer_norm(x, 6, w, b).backward(upstream)
    fused = [t.grad.copy() for t in (x, w, b)]
    for t in (x, w, b):
        t.grad = None
    centered = x - x.mean(-1, keepdims=True)
    composed = centered * ((centered * centered).mean(-1, keepdims=True) + 1e-5).rsqrt() * w + b
    composed.backward(upstream)
    for got, t in zip(fused, (x, w, b)):
        np.testing.assert_allclose(got, t.grad, rtol=1e-9, atol=1e-12)


def test_norm_errors_name_shapes():
    with pytest.raises(ValueError, match=r"shape \(2, 3\) does not end in the normalized size 4"):
        F.layer_norm(tinytf.randn(2, 3), 4)
    with pytest.raises(ValueError, match=r"parameter of shape \(5,\), expected \(3,\)"):
        F.rms_norm(tinytf.randn(2, 3), 3, tinytf.ones(5))


@pytest.mark.parametrize("norm", ["layer_norm", "rms_norm"])
def test_half_precision_norms_compute_in_float32_and_keep_the_dtype(norm):
    x32 = tinytf.tensor(random_array(0, (4, 5, 16)) * 3 + 1, dtype=tinytf.float32)
    w32 = tinytf.tensor(random_array(1, (16,)), dtype=tinytf.float32)
    x16, w16 = (tinytf.tensor(t.numpy().astype(np.float16), requires_grad=True) for t in (x32, w32))
    op = getattr(F, norm)
    y16 = op(x16, 16, w16)
    assert y16.dtype == np.float16
    np.testing.assert_allclose(y16.numpy(), op(x32, 16, w32).numpy(), rtol=2e-3, atol=2e-3)
    y16.sum().backward()
    assert x16.grad.dtype == np.float16 and w16.grad.dtype == np.float16


@pytest.mark.parametrize("wanted", ["x", "weight", "bias"])
def test_layer_norm_computes_only_the_gradients_asked_for(wanted):
    tensors = {name: tinytf.tensor(random_array(i, shape), requires_grad=name == wanted)
               for i, (name, shape) in enumerate([("x", (3, 4)), ("weight", (4,)), ("bias", (4,))])}
    upstream = random_array(7, (3, 4))
    F.layer_norm(tensors["x"], 4, tensors["weight"], tensors["bias"]).backward(upstream)
    reference = {name: tinytf.tensor(t.numpy(), requires_grad=True) for name, t in tensors.items()}
    F.layer_norm(reference["x"], 4, reference["weight"], reference["bias"]).backward(upstream)
    for name, tensor in tensors.items():
        if name == wanted:
            np.testing.assert_allclose(tensor.grad, reference[name].grad, rtol=1e-12)
        else:
            assert tensor.grad is None
