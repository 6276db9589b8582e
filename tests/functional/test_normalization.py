import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from op_check import check_op, random_array

import tinytf
import tinytf.functional as F
from tinytf.functional.normalization import (
    layer_norm_study_backward,
    layer_norm_study_forward,
    rms_norm_study_backward,
    rms_norm_study_forward,
)

seeds = st.integers(0, 2**32 - 1)
leading_dims = st.lists(st.integers(1, 3), max_size=2)


def _layer_norm(x, w=None, b=None):
    return layer_norm_study_forward(x, w, b)[0]


def _rms_norm(x, w=None):
    return rms_norm_study_forward(x, w)[0]


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


def _composed_layer_norm(x, w, b):
    """Layer norm from primitive Tensor ops, for autograd to differentiate."""
    centered = x - x.mean(-1, keepdims=True)
    return centered * ((centered * centered).mean(-1, keepdims=True) + 1e-5).rsqrt() * w + b


def _composed_rms_norm(x, w):
    return x * ((x * x).mean(-1, keepdims=True) + 1e-6).rsqrt() * w


# norm: (study forward, study backward, the same norm from primitive ops, how many inputs: x, w[, b])
STUDY_AND_COMPOSED = {
    "layer_norm": (layer_norm_study_forward, layer_norm_study_backward, _composed_layer_norm, 3),
    "rms_norm": (rms_norm_study_forward, rms_norm_study_backward, _composed_rms_norm, 2),
}


@pytest.mark.parametrize("norm", sorted(STUDY_AND_COMPOSED))
@given(seed=seeds, leading=leading_dims)
def test_study_backward_equals_autograd_of_composed_ops(norm, seed, leading):
    study_forward, study_backward, composed, count = STUDY_AND_COMPOSED[norm]
    arrays = [random_array(seed, (*leading, 6))] + [random_array(seed + 1 + i, (6,)) for i in range(count - 1)]
    upstream = random_array(seed + count, (*leading, 6))
    _, x_hat, rstd = study_forward(*arrays)
    study = study_backward(upstream, x_hat, rstd, arrays[1])
    tensors = [tinytf.tensor(a, requires_grad=True) for a in arrays]
    composed(*tensors).backward(upstream)
    for got, tensor in zip(study, tensors):
        np.testing.assert_allclose(got, tensor.grad, rtol=1e-9, atol=1e-12)


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
