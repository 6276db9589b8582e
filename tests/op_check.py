"""The one helper every op test uses: compare an op's forward with NumPy, and its gradients with gradcheck.

Modelled on tinygrad's helper_test_op and Chainer's idea that an op test states only the NumPy reference forward.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import tinytf
from devices import DEVICES_AND_SECOND_GPU
from tinytf.testing import gradcheck

small_shapes = hnp.array_shapes(min_dims=0, max_dims=4, min_side=1, max_side=5)
shapes_with_empty = hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=4)


@st.composite
def broadcastable_shapes(draw, num_shapes: int = 2):
    """Shapes that broadcast together, including size-1 dimensions and different ranks."""
    shapes = draw(hnp.mutually_broadcastable_shapes(num_shapes=num_shapes, min_dims=0, max_dims=4, max_side=4))
    return shapes.input_shapes


@st.composite
def shape_and_dim(draw, shapes=small_shapes):
    """A shape (0-d included) and one dimension of it, negative too; a 0-d shape takes 0 or -1, as in PyTorch."""
    shape = draw(shapes)
    extent = max(len(shape), 1)
    return shape, draw(st.integers(-extent, extent - 1))


def random_array(seed: int, shape, low: float | None = None, high: float | None = None, away_from=None):
    """Standard normal values (or uniform in [low, high]); `away_from` nudges values off a kink such as 0."""
    rng = np.random.default_rng(seed)
    if low is not None:
        values = rng.uniform(low, high, size=shape)
    else:
        values = rng.standard_normal(shape)
    if away_from is not None:
        too_close = np.abs(values - away_from) < 0.05
        values = np.where(too_close, away_from + 0.1 * np.sign(values - away_from + 1e-12), values)
    return values


def check_op(op, reference, *arrays, grad: bool = True, atol: float = 1e-5, rtol: float = 1e-3,
             float32_rtol: float = 1e-4, gradcheck_atol: float = 1e-5):
    """`op` works on Tensors, `reference` on NumPy arrays; both get the same inputs.

    Checks, on the CPU and on each GPU (or the CuPy stand-in's two; the second is not CuPy's current device): float64 forward equals the reference
    closely; float32 forward is float32 and close; gradients of every floating input match central differences in
    float64.
    """
    expected = np.asarray(reference(*arrays))
    for device in DEVICES_AND_SECOND_GPU:
        tensors64 = [tinytf.tensor(a, device=device) for a in arrays]
        out64 = op(*tensors64)
        assert out64.shape == expected.shape, f"shape {out64.shape}, expected {expected.shape}"
        assert out64.device == tensors64[0].device, f"inputs on {device} gave an output on {out64.device}"
        np.testing.assert_allclose(out64.numpy(), expected, rtol=1e-10, atol=1e-12, err_msg=f"on {device}")

        tensors32 = [tinytf.tensor(a.astype(np.float32) if a.dtype == np.float64 else a, device=device)
                     for a in arrays]
        out32 = op(*tensors32)
        if expected.dtype == np.float64:
            assert out32.dtype == np.float32, f"float32 inputs gave {out32.dtype} on {device}"
        np.testing.assert_allclose(out32.numpy(), expected, rtol=float32_rtol, atol=float32_rtol,
                                   err_msg=f"on {device}")

        if grad:
            inputs = [tinytf.tensor(a, requires_grad=a.dtype.kind == "f", device=device) for a in arrays]
            gradcheck(op, *inputs, atol=gradcheck_atol, rtol=rtol)
