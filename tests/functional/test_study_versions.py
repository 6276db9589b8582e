"""Each tuned op equals its study version, the textbook formula beside it, in values and gradients, in float32 and
float64, for row counts that fill the cache blocks unevenly.

The tolerance is justified the way FlashAttention's tests justify theirs. The truth is the study version in long
double (80-bit on x86) from the same inputs; the tuned op's error against it may be at most ERROR_MULTIPLE times
the study version's own error in the tested dtype, plus ULPS units in the last place of the largest value involved
(inputs, upstream gradient or result). Both versions round the same formula in a different order, so their errors
are of one size, but the study version's largest error over a handful of elements can be lucky; the ULPS term
covers that, and it is wide because cancellation magnifies rounding: sums of gradients that nearly cancel, and
layer norm over a few features that nearly agree, where 1/std is large. A wrong formula is off by far more, as
test_the_comparison_rejects_a_wrong_formula shows.
"""

from contextlib import contextmanager

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from op_check import random_array

import tinytf
import tinytf.functional as F
from tinytf.functional import common
from tinytf.functional.activation import (
    gelu_tanh_study_backward,
    gelu_tanh_study_forward,
    silu_study_backward,
    silu_study_forward,
)
from tinytf.functional.normalization import (
    layer_norm_study_backward,
    layer_norm_study_forward,
    rms_norm_study_backward,
    rms_norm_study_forward,
)

ERROR_MULTIPLE = 4
ULPS = 32
TRUTH = np.longdouble


@contextmanager
def block_bytes(size: int):
    """Run the fused ops with cache blocks of `size` bytes."""
    default = common.BLOCK_BYTES
    common.BLOCK_BYTES = size
    try:
        yield
    finally:
        common.BLOCK_BYTES = default


def through_autograd(op, upstream, *arrays):
    """[y, dL/d(each array)] of a tuned op, with dL/dy = upstream."""
    tensors = [tinytf.tensor(a, requires_grad=True) for a in arrays]
    y = op(*tensors)
    y.backward(upstream)
    return [y.numpy(), *(t.grad for t in tensors)]


def study_layer_norm(upstream, x, weight, bias):
    y, x_hat, rstd = layer_norm_study_forward(x, weight, bias)
    return [y, *layer_norm_study_backward(upstream, x_hat, rstd, weight)]


def study_rms_norm(upstream, x, weight):
    y, x_hat, rstd = rms_norm_study_forward(x, weight)
    return [y, *rms_norm_study_backward(upstream, x_hat, rstd, weight)]


def study_gelu_tanh(upstream, x):
    return [gelu_tanh_study_forward(x), gelu_tanh_study_backward(upstream, x)]


def study_silu(upstream, x):
    return [silu_study_forward(x), silu_study_backward(upstream, x)]


# name: (tuned op on Tensors, study version [y, grads] from (upstream, *arrays), how many arrays it takes)
CASES = {
    "layer_norm": (lambda x, w, b: F.layer_norm(x, x.shape[-1], w, b), study_layer_norm, 3),
    "rms_norm": (lambda x, w: F.rms_norm(x, x.shape[-1], w), study_rms_norm, 2),
    "gelu_tanh": (lambda x: F.gelu(x, approximate="tanh"), study_gelu_tanh, 1),
    "silu": (F.silu, study_silu, 1),
}


def inputs(seed: int, rows: int, width: int, count: int):
    """upstream gradient and `count` arrays: x (rows, width), then weight and bias (width,), all float64."""
    x = random_array(seed, (rows, width)) * 2 + 1
    params = [random_array(seed + 1 + i, (width,)) for i in range(count - 1)]
    return random_array(seed + count, (rows, width)), [x, *params]


def assert_as_accurate_as_study(tuned, study, truth, dtype, inputs_scale, label: str = "") -> None:
    """tuned's error against truth is at most ERROR_MULTIPLE times study's, plus ULPS of dtype at the scale of the
    largest value involved: inputs_scale (the largest input) or the result."""
    truth = np.asarray(truth, dtype=TRUTH)
    tuned_error = np.abs(np.asarray(tuned, dtype=TRUTH) - truth).max()
    study_error = np.abs(np.asarray(study, dtype=TRUTH) - truth).max()
    floor = ULPS * np.finfo(dtype).eps * max(np.abs(truth).max(), inputs_scale)
    assert tuned_error <= ERROR_MULTIPLE * study_error + floor, (
        f"{label}: tuned error {float(tuned_error):.3g}, study error {float(study_error):.3g}, "
        f"floor {float(floor):.3g}")


def largest_value(*arrays) -> float:
    return max(float(np.abs(a).max()) for a in arrays)


@st.composite
def ragged_rows(draw):
    """(rows, rows per block): whole blocks and a partial one, or whole blocks only, or less than one block."""
    per_block = draw(st.integers(1, 6))
    rows = draw(st.integers(0, 4)) * per_block + draw(st.integers(0, per_block - 1))
    return max(rows, 1), per_block


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", sorted(CASES))
@given(seed=st.integers(0, 2**32 - 5), blocking=ragged_rows(), width=st.integers(1, 9))
def test_tuned_op_equals_its_study_version(name, dtype, seed, blocking, width):
    op, study_version, count = CASES[name]
    rows, per_block = blocking
    upstream, arrays = inputs(seed, rows, width, count)
    upstream, arrays = upstream.astype(dtype), [a.astype(dtype) for a in arrays]
    with block_bytes(per_block * width * np.dtype(dtype).itemsize):
        tuned = through_autograd(op, upstream, *arrays)
    study = study_version(upstream, *arrays)
    truth = study_version(upstream.astype(TRUTH), *(a.astype(TRUTH) for a in arrays))
    scale = largest_value(upstream, *arrays)
    for what, got, want, exact in zip(["y", "dL/dx", "dL/dw", "dL/db"], tuned, study, truth):
        assert got.dtype == want.dtype == dtype and got.shape == want.shape, what
        assert_as_accurate_as_study(got, want, exact, dtype, scale, f"{name} {what}")


@pytest.mark.parametrize("name", sorted(CASES))
@given(seed=st.integers(0, 2**32 - 5), rows=st.integers(1, 20), width=st.integers(1, 9))
def test_tuned_op_equals_its_study_version_in_half_precision(name, seed, rows, width):
    """Both keep float16 outputs and inputs' gradients; the norms compute in float32 inside (parameters' gradients
    come back from the study version in float32, and the engine casts the tuned op's to float16)."""
    op, study_version, count = CASES[name]
    upstream, arrays = inputs(seed, rows, width, count)
    upstream, arrays = upstream.astype(np.float16), [a.astype(np.float16) for a in arrays]
    tuned = through_autograd(op, upstream, *arrays)
    study = study_version(upstream, *arrays)
    truth = study_version(upstream.astype(TRUTH), *(a.astype(TRUTH) for a in arrays))
    assert tuned[0].dtype == study[0].dtype == tuned[1].dtype == study[1].dtype == np.float16
    for got, want, exact in zip(tuned, study, truth):
        assert_as_accurate_as_study(got, want, exact, np.float16, largest_value(upstream, *arrays), name)


@pytest.mark.parametrize("name", sorted(CASES))
def test_tuned_op_takes_zero_rows(name):
    op, study_version, count = CASES[name]
    upstream, arrays = inputs(0, 0, 3, count)
    for got, want in zip(through_autograd(op, upstream, *arrays), study_version(upstream, *arrays)):
        assert got.shape == want.shape


def layer_norm_backward_without_centering(upstream, x, weight, bias):
    """The mistake of forgetting that each output also depends on the row mean: RMS norm's backward."""
    y, x_hat, rstd = layer_norm_study_forward(x, weight, bias)
    return [y, rms_norm_study_backward(upstream, x_hat, rstd, weight)[0]]


def layer_norm_eps_outside_the_root(upstream, x, weight, bias):
    """1 / (std + eps) for 1 / sqrt(var + eps): off by about eps / std relative, a few float32 ulps."""
    mean = x.mean(axis=-1, keepdims=True)
    return [(x - mean) / (x.std(axis=-1, keepdims=True) + 1e-5) * weight + bias]


def gelu_tanh_backward_without_the_tanh_slope(upstream, x):
    """d/dx of x/2 (1 + t) with t taken as constant."""
    return [gelu_tanh_study_forward(x), upstream * 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))]


@pytest.mark.parametrize("name, wrong, dtype", [
    ("layer_norm", layer_norm_backward_without_centering, np.float32),
    ("gelu_tanh", gelu_tanh_backward_without_the_tanh_slope, np.float32),
    ("layer_norm", layer_norm_eps_outside_the_root, np.float64),  # in float32 it is within rounding
])
def test_the_comparison_rejects_a_wrong_formula(name, wrong, dtype):
    _, study_version, count = CASES[name]
    upstream, arrays = inputs(0, 13, 8, count)
    upstream, arrays = upstream.astype(dtype), [a.astype(dtype) for a in arrays]
    truth = study_version(upstream.astype(TRUTH), *(a.astype(TRUTH) for a in arrays))
    study = study_version(upstream, *arrays)
    mistaken = wrong(upstream, *arrays)
    with pytest.raises(AssertionError, match="tuned error"):
        for got, want, exact in zip(mistaken, study, truth):
            assert_as_accurate_as_study(got, want, exact, dtype, largest_value(upstream, *arrays))
