"""conv2d against its study version (the direct loop), conv_transpose2d against a loop that scatters each input
pixel through the kernel, conv1d as conv2d on a height of 1: forward on every device and dtype, gradients by gradcheck
in float64."""

import numpy as np
import pytest
from op_check import check_op, random_array

import tinytf
from tinytf.functional.convolution import conv1d, conv2d, conv2d_study, conv_transpose2d

# (input shape, weight shape, with a bias, conv2d keyword arguments): every option, and the combinations where
# indexing slips.
CONV2D_CASES = {
    "plain": ((2, 3, 5, 5), (4, 3, 3, 3), True, {}),
    "plain_without_bias": ((1, 2, 4, 5), (3, 2, 3, 3), False, {}),
    "stride_padding_dilation_per_axis": ((1, 4, 6, 7), (4, 2, 3, 2), True, dict(stride=(2, 1), padding=(1, 2),
                                                                                dilation=(1, 2), groups=2)),
    "same_dilated_depthwise": ((2, 2, 5, 6), (2, 1, 2, 3), False, dict(padding="same", dilation=2, groups=2)),
    "valid_pointwise_strided": ((1, 3, 5, 4), (2, 3, 1, 1), True, dict(padding="valid", stride=2)),
    "stride_larger_than_kernel": ((1, 2, 7, 7), (4, 1, 2, 2), False, dict(stride=3, padding=1, groups=2)),
}


@pytest.mark.parametrize("case", sorted(CONV2D_CASES))
def test_conv2d_matches_the_direct_loop(case):
    x_shape, w_shape, bias, options = CONV2D_CASES[case]
    x, w, b = random_array(1, x_shape), random_array(2, w_shape), random_array(3, (w_shape[0],))
    if bias:
        check_op(lambda x, w, b: conv2d(x, w, b, **options), lambda x, w, b: conv2d_study(x, w, b, **options), x, w, b)
    else:
        check_op(lambda x, w: conv2d(x, w, **options), lambda x, w: conv2d_study(x, w, **options), x, w)


def test_conv2d_study_is_the_sum_over_each_window():
    x = np.arange(16.0).reshape(1, 1, 4, 4)
    window_sums = np.array([[x[0, 0, i : i + 2, j : j + 2].sum() for j in range(3)] for i in range(3)])
    np.testing.assert_array_equal(conv2d_study(x, np.ones((1, 1, 2, 2)))[0, 0], window_sums)
    # padding 1 and stride 2: the top-left output sees only x[0, 0, 0, 0], the others a 2x2 corner of the padding
    np.testing.assert_array_equal(conv2d_study(x, np.ones((1, 1, 2, 2)), stride=2, padding=1)[0, 0, 0],
                                  [0, 1 + 2, 3])


def conv_transpose2d_loop(x, weight, bias, stride, padding, output_padding, groups, dilation):
    """Each input pixel x[n, c, h, w] adds x * weight[c] into the output at rows h*sh + p*dh and columns
    w*sw + q*dw, before the padding is cropped from every side (output_padding rows stay at the bottom and right)."""
    N, C, H, W = x.shape
    _, O_group, KH, KW = weight.shape
    (sh, sw), (ph, pw), (oph, opw), (dh, dw) = stride, padding, output_padding, dilation
    OH = (H - 1) * sh - 2 * ph + dh * (KH - 1) + oph + 1
    OW = (W - 1) * sw - 2 * pw + dw * (KW - 1) + opw + 1
    full = np.zeros((N, O_group * groups, OH + 2 * ph, OW + 2 * pw))
    for n in range(N):
        for c in range(C):
            first = (c // (C // groups)) * O_group
            for h in range(H):
                for w in range(W):
                    full[n, first : first + O_group, h * sh : h * sh + dh * (KH - 1) + 1 : dh,
                         w * sw : w * sw + dw * (KW - 1) + 1 : dw] += x[n, c, h, w] * weight[c]
    y = full[:, :, ph : ph + OH, pw : pw + OW]
    return y if bias is None else y + bias[:, None, None]


# (input shape, weight shape, with a bias, stride, padding, output_padding, groups, dilation)
TRANSPOSE_CASES = {
    "plain": ((2, 3, 3, 4), (3, 2, 3, 3), True, (1, 1), (0, 0), (0, 0), 1, (1, 1)),
    "upsample_by_two": ((1, 2, 3, 3), (2, 3, 4, 4), False, (2, 2), (1, 1), (0, 0), 1, (1, 1)),
    "output_padding_per_axis_grouped": ((1, 4, 3, 2), (4, 1, 3, 2), True, (2, 3), (1, 0), (1, 2), 2, (1, 1)),
    "dilated_with_output_padding_below_dilation": ((1, 2, 3, 3), (2, 2, 2, 3), False, (1, 1), (1, 1), (1, 0), 1,
                                                   (2, 1)),
}


@pytest.mark.parametrize("case", sorted(TRANSPOSE_CASES))
def test_conv_transpose2d_matches_the_scatter_loop(case):
    x_shape, w_shape, bias, *options = TRANSPOSE_CASES[case]
    out_channels = w_shape[1] * options[3]
    x, w, b = random_array(4, x_shape), random_array(5, w_shape), random_array(6, (out_channels,))
    if bias:
        check_op(lambda x, w, b: conv_transpose2d(x, w, b, *options), lambda x, w, b: conv_transpose2d_loop(
            x, w, b, *options), x, w, b)
    else:
        check_op(lambda x, w: conv_transpose2d(x, w, None, *options),
                 lambda x, w: conv_transpose2d_loop(x, w, None, *options), x, w)


def test_conv_transpose2d_is_the_adjoint_of_conv2d():
    # <conv2d(x), y> = <x, conv_transpose2d(y)> for the same weight and window
    # x's height 8 and width 7 give y's 3 x 4, as 7 and 6 would: output_padding=1 picks x's shape for the adjoint
    x, w, y = random_array(7, (2, 4, 8, 7)), random_array(8, (6, 2, 3, 2)), random_array(9, (2, 6, 3, 4))
    options = dict(stride=2, padding=1, groups=2, dilation=(2, 1))
    forward = conv2d(tinytf.tensor(x), tinytf.tensor(w), **options).numpy()
    adjoint = conv_transpose2d(tinytf.tensor(y), tinytf.tensor(w), output_padding=1, **options).numpy()
    assert adjoint.shape == x.shape
    np.testing.assert_allclose((forward * y).sum(), (x * adjoint).sum(), rtol=1e-12)


# (conv1d's options, the same as conv2d options on a height of 1)
CONV1D_CASES = [
    ({}, {}),
    (dict(stride=2, padding=1, dilation=2, groups=2), dict(stride=(1, 2), padding=(0, 1), dilation=(1, 2), groups=2)),
    (dict(stride=(1,), padding="same", dilation=(3,)), dict(padding="same", dilation=(1, 3))),
]


@pytest.mark.parametrize(("options", "as_conv2d"), CONV1D_CASES)
def test_conv1d_is_conv2d_on_a_height_of_one(options, as_conv2d):
    groups = options.get("groups", 1)
    x, w, b = random_array(10, (2, 4, 9)), random_array(11, (6, 4 // groups, 3)), random_array(12, (6,))
    check_op(lambda x, w, b: conv1d(x, w, b, **options),
             lambda x, w, b: conv2d_study(x[:, :, None], w[:, :, None], b, **as_conv2d)[:, :, 0], x, w, b)


def test_conv_errors_name_the_shapes():
    x = tinytf.randn(1, 4, 5, 5)
    with pytest.raises(ValueError, match="expects 3"):
        conv2d(x, tinytf.randn(2, 3, 3, 3))
    with pytest.raises(ValueError, match="groups=3 must"):
        conv2d(x, tinytf.randn(4, 2, 3, 3), groups=3)
    with pytest.raises(ValueError, match="strided"):
        conv2d(x, tinytf.randn(2, 4, 3, 3), stride=2, padding="same")
    with pytest.raises(ValueError, match="does not fit"):
        conv2d(x, tinytf.randn(2, 4, 6, 6))
    with pytest.raises(ValueError, match=r"bias of shape \(3,\)"):
        conv2d(x, tinytf.randn(2, 4, 3, 3), tinytf.randn(3))
    with pytest.raises(ValueError, match="output_padding"):
        conv_transpose2d(x, tinytf.randn(4, 2, 3, 3), stride=2, output_padding=2)
    with pytest.raises(ValueError, match="3-d input"):
        conv1d(x, tinytf.randn(2, 4, 3))
