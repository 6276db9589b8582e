"""The emulator's __half and __nv_bfloat16: CUDA's conversions, bit for bit against NumPy's float16 and ml_dtypes'
bfloat16 casts (both round to nearest even), through the kernels of tensor_core_probe.cu.

NaN is the one exception, by design: NumPy and ml_dtypes keep a NaN's sign and payload when narrowing, the GPU's
cvt.rn.f16.f32 / cvt.rn.bf16.f32 (and CUDA's host fallbacks) return the canonical NaN 0x7fff, and the emulator follows
the GPU; widening keeps every bit on both sides.
"""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from tinytf.kernels import KERNELS_DIR
from tinytf.kernels.emulator import EmulatedModule

PROBE = Path(__file__).with_name("tensor_core_probe.cu")
CANONICAL_NAN = 0x7FFF
ELEMENTS = {  # element type -> (numpy dtype, rounding kernel, widening kernel, packing kernel)
    "bfloat16": (ml_dtypes.bfloat16, "round_to_bfloat16", "widen_bfloat16", "pack_bfloat16"),
    "float16": (np.float16, "round_to_half", "widen_half", "pack_half"),
}


# NaN patterns and values past the largest float16 are cast on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:(invalid value|overflow) encountered in cast:RuntimeWarning")


@pytest.fixture(scope="module")
def probe():
    return EmulatedModule(PROBE, options=(f"-I{KERNELS_DIR}",))


def run_elementwise(probe, kernel: str, x: np.ndarray, out_dtype) -> np.ndarray:
    y = np.zeros(x.size, dtype=out_dtype)
    probe.get_function(kernel)(((x.size + 255) // 256,), (256,), (x, y, np.int32(x.size)))
    return y


def interesting_floats(dtype) -> np.ndarray:
    """float32 values where rounding to `dtype` goes wrong in naive code: random bit patterns (every exponent, so
    float32 subnormals, infinities and NaNs too), exact ties around every representable value of `dtype` (normal and
    subnormal), the overflow threshold and its neighbours, zeros of both signs."""
    random = np.random.default_rng(15)
    patterns = random.integers(0, 2**32, size=1 << 16, dtype=np.uint64).astype(np.uint32).view(np.float32)
    every_value = np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(dtype).astype(np.float64)
    finite = np.unique(every_value[np.isfinite(every_value)])
    midpoints = (finite[:-1] + finite[1:]) / 2  # exact in float64, and in float32 for these dtypes
    midpoints = midpoints[np.abs(midpoints) <= np.finfo(np.float32).max].astype(np.float32)
    largest = float(np.finfo(dtype).max)
    beyond = largest + (largest - float(np.nextafter(np.array(largest, dtype), np.array(0, dtype)))) / 2
    edges = np.array([0.0, -0.0, np.inf, -np.inf, largest, beyond, -beyond, np.finfo(np.float32).max,
                      np.finfo(np.float32).smallest_subnormal, float(np.finfo(dtype).smallest_subnormal) / 2],
                     dtype=np.float32)
    nudged = np.concatenate([np.nextafter(midpoints, np.float32(np.inf)), np.nextafter(midpoints, np.float32(-np.inf))])
    return np.concatenate([patterns, midpoints, nudged, edges, np.nextafter(edges, np.float32(0))])


def assert_rounded_like_numpy(got: np.ndarray, x: np.ndarray, dtype) -> None:
    """`got` (16-bit elements) is numpy's cast of `x` bit for bit, and the canonical NaN where x is NaN."""
    got_bits = got.view(np.uint16)
    expected_bits = x.astype(dtype).view(np.uint16)
    is_nan = np.isnan(x)
    mismatched = np.flatnonzero((got_bits != expected_bits) & ~is_nan)
    assert mismatched.size == 0, [(float(x[i]), hex(x[i:i + 1].view(np.uint32)[0]), hex(got_bits[i]),
                                   hex(expected_bits[i])) for i in mismatched[:8]]
    assert (got_bits[is_nan] == CANONICAL_NAN).all()


@pytest.mark.parametrize("element", ELEMENTS)
def test_every_16_bit_value_widens_exactly_and_rounds_back_to_itself(probe, element):
    dtype, round_kernel, widen_kernel, _ = ELEMENTS[element]
    every_value = np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(dtype)
    widened = run_elementwise(probe, widen_kernel, every_value, np.float32)
    np.testing.assert_array_equal(widened.view(np.uint32), every_value.astype(np.float32).view(np.uint32))
    rounded_back = run_elementwise(probe, round_kernel, widened, dtype)
    assert_rounded_like_numpy(rounded_back, widened, dtype)
    not_nan = ~np.isnan(widened)
    np.testing.assert_array_equal(rounded_back.view(np.uint16)[not_nan], every_value.view(np.uint16)[not_nan])


@pytest.mark.parametrize("element", ELEMENTS)
def test_float32_rounds_to_nearest_even_like_numpy(probe, element):
    dtype, round_kernel, _, _ = ELEMENTS[element]
    x = interesting_floats(dtype)
    assert_rounded_like_numpy(run_elementwise(probe, round_kernel, x, dtype), x, dtype)


@pytest.mark.parametrize("element", ELEMENTS)
def test_pack2_puts_the_low_element_in_the_low_half_and_unpack2_inverts_it(probe, element):
    dtype, _, _, pack_kernel = ELEMENTS[element]
    pairs = interesting_floats(dtype)[: 2 * 20000]
    pairs = pairs[np.isfinite(pairs)][: 2 * (np.isfinite(pairs).sum() // 2)]
    n = pairs.size // 2
    packed = np.zeros(n, dtype=np.uint32)
    unpacked, via_pair = np.zeros(2 * n, dtype=np.float32), np.zeros(2 * n, dtype=np.float32)
    probe.get_function(pack_kernel)(((n + 255) // 256,), (256,), (pairs, packed, unpacked, via_pair, np.int32(n)))
    halves = pairs.astype(dtype)
    bits = halves.view(np.uint16).astype(np.uint32)
    np.testing.assert_array_equal(packed, bits[0::2] | bits[1::2] << 16)
    np.testing.assert_array_equal(unpacked.view(np.uint32), halves.astype(np.float32).view(np.uint32))
    np.testing.assert_array_equal(via_pair.view(np.uint32), halves.astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("element", ELEMENTS)
def test_half_precision_arrays_are_checked_and_guarded_with_nan(probe, element):
    dtype, round_kernel, _, _ = ELEMENTS[element]
    kernel = probe.get_function(round_kernel)
    assert kernel.parameter_types[1] == ("__nv_bfloat16*" if element == "bfloat16" else "__half*")
    with pytest.raises(TypeError, match=f"expected dtype {np.dtype(dtype)}, got float32"):
        kernel((1,), (32,), (np.zeros(32, np.float32), np.zeros(32, np.float32), np.int32(32)))
    # Reading past the end of a const input brings the NaN guard in: the elements past n come out NaN.
    widen = probe.get_function(ELEMENTS[element][2])
    y = np.zeros(40, dtype=np.float32)
    widen((1,), (64,), (np.ones(32, dtype=dtype), y, np.int32(40)))
    assert (y[:32] == 1).all() and np.isnan(y[32:]).all()
