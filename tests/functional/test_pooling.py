"""Pooling and interpolation against loops over output pixels that follow PyTorch's definitions: forward on every
device and dtype, gradients by gradcheck in float64."""

import math

import numpy as np
import pytest
from op_check import check_op, random_array

import tinytf
from tinytf.functional.pooling import adaptive_avg_pool2d, avg_pool2d, interpolate, max_pool2d


def pooled_size(size: int, kernel: int, stride: int, padding: int, dilation: int, ceil_mode: bool) -> int:
    """PyTorch's documented output size; in ceil mode a last window that would start in the padding after the
    input is dropped."""
    rounding = math.ceil if ceil_mode else math.floor
    out = rounding((size + 2 * padding - dilation * (kernel - 1) - 1) / stride) + 1
    return out - 1 if ceil_mode and (out - 1) * stride >= size + padding else out


def max_pool_loop(x, kernel, stride, padding, dilation, ceil_mode):
    """(maxima, flat indices h * W + w of the first maximum in each window)."""
    N, C, H, W = x.shape
    (KH, KW), (SH, SW), (PH, PW), (DH, DW) = kernel, stride, padding, dilation
    OH, OW = pooled_size(H, KH, SH, PH, DH, ceil_mode), pooled_size(W, KW, SW, PW, DW, ceil_mode)
    values, indices = np.full((N, C, OH, OW), -np.inf), np.zeros((N, C, OH, OW), dtype=np.int64)
    for n in range(N):
        for c in range(C):
            for i in range(OH):
                for j in range(OW):
                    for p in range(KH):
                        for q in range(KW):
                            h, w = i * SH - PH + p * DH, j * SW - PW + q * DW
                            if 0 <= h < H and 0 <= w < W and x[n, c, h, w] > values[n, c, i, j]:
                                values[n, c, i, j], indices[n, c, i, j] = x[n, c, h, w], h * W + w
    return values, indices


# (kernel_size, stride, padding, dilation, ceil_mode), each as PyTorch accepts it and as pairs for the loop
MAX_POOL_CASES = {
    "non_overlapping": ((2, None, 0, 1, False), ((2, 2), (2, 2), (0, 0), (1, 1), False)),
    "overlapping_padded_ceil": ((3, 2, 1, 1, True), ((3, 3), (2, 2), (1, 1), (1, 1), True)),
    "per_axis_dilated": (((3, 2), (2, 1), (1, 0), (2, 1), False), ((3, 2), (2, 1), (1, 0), (2, 1), False)),
    "stride_beyond_kernel_ceil": ((2, 3, 1, 1, True), ((2, 2), (3, 3), (1, 1), (1, 1), True)),
    "dilated_ceil": ((3, 2, 1, 2, True), ((3, 3), (2, 2), (1, 1), (2, 2), True)),
}


@pytest.mark.parametrize("case", sorted(MAX_POOL_CASES))
def test_max_pool2d_and_its_indices_match_the_loop(case):
    options, as_pairs = MAX_POOL_CASES[case]
    x = random_array(1, (1, 2, 7, 6))
    check_op(lambda x: max_pool2d(x, *options[:4], ceil_mode=options[4]),
             lambda x: max_pool_loop(x, *as_pairs)[0], x)
    _, indices = max_pool2d(tinytf.tensor(x), *options[:4], ceil_mode=options[4], return_indices=True)
    assert indices.dtype == np.int64
    np.testing.assert_array_equal(indices.numpy(), max_pool_loop(x, *as_pairs)[1])


def test_max_pool2d_gradient_goes_to_the_first_maximum_of_each_window():
    x = tinytf.ones(1, 1, 2, 4, requires_grad=True)
    max_pool2d(x, 2).sum().backward()
    np.testing.assert_array_equal(x.grad[0, 0], [[1, 0, 1, 0], [0, 0, 0, 0]])


def avg_pool_loop(x, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override):
    """Each window's sum over the divisor PyTorch uses: the override, or the window's size within the padded input
    (count_include_pad) or within the input."""
    N, C, H, W = x.shape
    (KH, KW), (SH, SW), (PH, PW) = kernel, stride, padding
    OH, OW = pooled_size(H, KH, SH, PH, 1, ceil_mode), pooled_size(W, KW, SW, PW, 1, ceil_mode)
    y = np.zeros((N, C, OH, OW))
    for i in range(OH):
        for j in range(OW):
            top, left = i * SH - PH, j * SW - PW
            bottom, right = min(top + KH, H + PH), min(left + KW, W + PW)
            padded_count = (bottom - top) * (right - left)
            top, left, bottom, right = max(top, 0), max(left, 0), min(bottom, H), min(right, W)
            divisor = divisor_override or (padded_count if count_include_pad else (bottom - top) * (right - left))
            y[:, :, i, j] = x[:, :, top:bottom, left:right].sum(axis=(2, 3)) / divisor
    return y


# (kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override), as pairs where they are pairs
AVG_POOL_CASES = {
    "non_overlapping": ((2, 2), (2, 2), (0, 0), False, True, None),
    "padded_ceil_counting_padding": ((3, 3), (2, 2), (1, 1), True, True, None),
    "padded_ceil_not_counting_padding": ((3, 3), (2, 2), (1, 1), True, False, None),
    "per_axis_not_counting_padding": ((3, 2), (2, 3), (1, 1), False, False, None),
    "divisor_override": ((3, 3), (2, 2), (1, 1), False, True, 4),
}


@pytest.mark.parametrize("case", sorted(AVG_POOL_CASES))
def test_avg_pool2d_matches_the_loop(case):
    options = AVG_POOL_CASES[case]
    check_op(lambda x: avg_pool2d(x, *options), lambda x: avg_pool_loop(x, *options), random_array(2, (1, 2, 7, 6)))


def adaptive_avg_pool_loop(x, out_height, out_width):
    """Output (i, j) averages rows [floor(i H / oh), ceil((i + 1) H / oh)) and the columns likewise."""
    H, W = x.shape[2:]
    y = np.zeros((*x.shape[:2], out_height, out_width))
    for i in range(out_height):
        for j in range(out_width):
            rows = slice(i * H // out_height, math.ceil((i + 1) * H / out_height))
            cols = slice(j * W // out_width, math.ceil((j + 1) * W / out_width))
            y[:, :, i, j] = x[:, :, rows, cols].mean(axis=(2, 3))
    return y


@pytest.mark.parametrize(("output_size", "as_pair"), [(1, (1, 1)), ((3, None), (3, 6)), ((4, 5), (4, 5))])
def test_adaptive_avg_pool2d_matches_the_loop(output_size, as_pair):
    check_op(lambda x: adaptive_avg_pool2d(x, output_size), lambda x: adaptive_avg_pool_loop(x, *as_pair),
             random_array(3, (2, 2, 7, 6)))


def source_coordinates(size: int, out: int, scale: float, mode: str, align_corners: bool):
    """Where each output pixel samples the input along one axis, as PyTorch computes it."""
    if mode == "nearest":  # PyTorch works in float32 here
        return np.minimum(np.floor(np.arange(out, dtype=np.float32) * np.float32(scale)), size - 1)
    if align_corners:
        return np.arange(out) * ((size - 1) / (out - 1) if out > 1 else 0.0)
    return np.maximum((np.arange(out) + 0.5) * scale - 0.5, 0.0)


def sample(x, rows, cols):
    """x at fractional (row, col) for every pair, by bilinear interpolation (whole coordinates pick one pixel)."""
    H, W = x.shape[2:]
    y = np.zeros((*x.shape[:2], len(rows), len(cols)))
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            r0, c0 = int(r), int(c)
            r1, c1 = min(r0 + 1, H - 1), min(c0 + 1, W - 1)
            fr, fc = r - r0, c - c0
            y[:, :, i, j] = ((1 - fr) * ((1 - fc) * x[:, :, r0, c0] + fc * x[:, :, r0, c1])
                             + fr * ((1 - fc) * x[:, :, r1, c0] + fc * x[:, :, r1, c1]))
    return y


# (mode, align_corners, size, scale_factor, the output size, the scales the source coordinates use)
INTERPOLATE_CASES = {
    "nearest_to_size": ("nearest", None, (9, 4), None, (9, 4), (5 / 9, 6 / 4)),
    "nearest_by_scale_factor": ("nearest", None, None, 1.7, (8, 10), (1 / 1.7, 1 / 1.7)),
    "bilinear_to_size": ("bilinear", False, (3, 11), None, (3, 11), (5 / 3, 6 / 11)),
    "bilinear_by_scale_factors": ("bilinear", False, None, (2.0, 0.5), (10, 3), (0.5, 2.0)),
    "bilinear_aligned_corners": ("bilinear", True, (7, 4), None, (7, 4), None),
}


@pytest.mark.parametrize("case", sorted(INTERPOLATE_CASES))
def test_interpolate_matches_sampling_at_the_source_coordinates(case):
    mode, align_corners, size, scale_factor, (out_height, out_width), scales = INTERPOLATE_CASES[case]
    scales = scales or (None, None)

    def reference(x):
        return sample(x, source_coordinates(5, out_height, scales[0], mode, align_corners),
                      source_coordinates(6, out_width, scales[1], mode, align_corners))

    check_op(lambda x: interpolate(x, size, scale_factor, mode, align_corners), reference,
             random_array(4, (1, 2, 5, 6)))


def test_interpolate_nearest_resizes_a_sequence():
    check_op(lambda x: interpolate(x, size=7), lambda x: x[:, :, [0, 0, 1, 1, 2, 2, 3]], random_array(5, (2, 3, 4)))


def test_pooling_errors_name_the_problem():
    x = tinytf.randn(1, 2, 4, 4)
    with pytest.raises(ValueError, match="at most half"):
        max_pool2d(x, 2, padding=2)
    with pytest.raises(ValueError, match="does not fit"):
        avg_pool2d(x, 5)
    with pytest.raises(TypeError, match="floating"):
        max_pool2d(tinytf.tensor(np.ones((1, 1, 2, 2), dtype=np.int64)), 2)
    with pytest.raises(ValueError, match="exactly one"):
        interpolate(x, size=3, scale_factor=2)
    with pytest.raises(ValueError, match="align_corners"):
        interpolate(x, size=3, align_corners=True)
    with pytest.raises(ValueError, match="4-d input"):
        interpolate(tinytf.randn(1, 2, 4), size=3, mode="bilinear", align_corners=False)
