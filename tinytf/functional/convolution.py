"""Convolutions with PyTorch's arguments, shapes and weight layouts: conv1d, conv2d and conv_transpose2d.

conv2d is im2col plus one matrix product per group. The input x (N, C, H, W), zero-padded, is unfolded into columns
    cols[n, c, p, q, i, j] = x_padded[n, c, i*sh + p*dh, j*sw + q*dw]          (N, C, kh, kw, OH, OW)
which, per group g, is a matrix X_g (K, L) with K = C/groups * kh * kw and L = OH * OW. With the weight as a matrix
W_g (O/groups, K) and G_g = dL/dY_g:
    Y_g     = W_g X_g  (+ bias)
    dL/dW_g = sum over n of G_g X_g^T           (from the columns forward kept)
    dL/dX_g = W_g^T G_g, then col2im: each column entry is added back into the input pixel it was copied from
    dL/db   = sum of G over n, i, j
conv_transpose2d is the adjoint of conv2d: its forward is conv2d's input gradient, and its input gradient is conv2d.

Study version: `conv2d_study` is the direct definition, a loop over output pixels; the tests hold conv2d to it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import backend
from ..tensor import Function, Tensor
from .common import computes_in_float32
from .shape import squeeze, unsqueeze


@dataclass(frozen=True)
class Window:
    """Where a kernel reads the input along (height, width): its size, step, padding (before, after) and dilation."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[tuple[int, int], tuple[int, int]]
    dilation: tuple[int, int]

    def output_size(self, input_size: tuple[int, int]) -> tuple[int, int]:
        """(OH, OW): how many whole windows fit in the padded input."""
        return tuple(
            (size + before + after - dilation * (kernel - 1) - 1) // stride + 1
            for size, (before, after), kernel, stride, dilation
            in zip(input_size, self.padding, self.kernel, self.stride, self.dilation)
        )


def pair(op: str, name: str, value) -> tuple[int, int]:
    """An int or a pair of ints as a pair, as PyTorch's 2-d ops accept them."""
    if isinstance(value, int):
        return value, value
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return tuple(value)
    raise TypeError(f"{op}: {name} must be an int or a pair of ints, got {value!r}")


def _window(op: str, kernel, stride, padding, dilation) -> Window:
    """A Window from conv2d's arguments; padding is an int, a pair, 'valid' or 'same' (stride 1 only, and the odd
    extra pixel of an even span goes after, as in PyTorch)."""
    kernel, stride, dilation = tuple(kernel), pair(op, "stride", stride), pair(op, "dilation", dilation)
    if min(stride) < 1 or min(dilation) < 1:
        raise ValueError(f"{op}: stride and dilation must be positive, got {stride} and {dilation}")
    if padding == "valid":
        pads = ((0, 0), (0, 0))
    elif padding == "same":
        if stride != (1, 1):
            raise ValueError(f"{op}: padding='same' is not supported for strided convolutions (stride {stride})")
        spans = [d * (k - 1) for k, d in zip(kernel, dilation)]
        pads = tuple((span // 2, span - span // 2) for span in spans)
    elif isinstance(padding, str):
        raise ValueError(f"{op}: padding must be 'valid', 'same', an int or a pair, got {padding!r}")
    else:
        symmetric = pair(op, "padding", padding)
        if min(symmetric) < 0:
            raise ValueError(f"{op}: padding must be non-negative, got {padding!r}")
        pads = tuple((p, p) for p in symmetric)
    return Window(kernel, stride, pads, dilation)


def im2col(x, window: Window, output_size: tuple[int, int], fill: float = 0.0):
    """(N, C, H, W) -> columns (N, C, kh, kw, OH, OW), the input under each kernel tap at each output pixel, with
    `fill` outside the input: one strided slice per tap, so the Python loop runs kh * kw times."""
    xp = backend.get_array_module(x)
    batch, channels, height, width = x.shape
    (top, bottom), (left, right) = window.padding
    padded = xp.full((batch, channels, height + top + bottom, width + left + right), fill, dtype=x.dtype)
    padded[:, :, top : top + height, left : left + width] = x
    columns = xp.empty((batch, channels, *window.kernel, *output_size), dtype=x.dtype)
    for p, q, rows, cols in _tap_slices(window, output_size):
        columns[:, :, p, q] = padded[:, :, rows, cols]
    return columns


def col2im(columns, window: Window, input_size: tuple[int, int]):
    """The adjoint of im2col: (N, C, kh, kw, OH, OW) -> (N, C, H, W), each entry added into the pixel it came from
    (overlapping windows sum); what fell on the padding is dropped."""
    xp = backend.get_array_module(columns)
    batch, channels, *_, out_height, out_width = columns.shape
    height, width = input_size
    (top, bottom), (left, right) = window.padding
    padded = xp.zeros((batch, channels, height + top + bottom, width + left + right), dtype=columns.dtype)
    for p, q, rows, cols in _tap_slices(window, (out_height, out_width)):
        padded[:, :, rows, cols] += columns[:, :, p, q]
    return padded[:, :, top : top + height, left : left + width]


def _tap_slices(window: Window, output_size: tuple[int, int]):
    """For each kernel tap (p, q), the strided slices of the padded input it reads over all output pixels."""
    (kernel_h, kernel_w), (stride_h, stride_w), (dilation_h, dilation_w) = window.kernel, window.stride, window.dilation
    out_height, out_width = output_size
    for p in range(kernel_h):
        rows = slice(p * dilation_h, p * dilation_h + stride_h * (out_height - 1) + 1, stride_h)
        for q in range(kernel_w):
            cols = slice(q * dilation_w, q * dilation_w + stride_w * (out_width - 1) + 1, stride_w)
            yield p, q, rows, cols


def _convolve(x, weight, groups: int, window: Window, output_size):
    """Y = W_g X_g for every group: (N, C, H, W), (O, C/groups, kh, kw) -> Y (N, O, OH, OW) and the grouped
    columns X (N, groups, K, L) that the weight gradient needs."""
    batch, out_channels = x.shape[0], weight.shape[0]
    columns = im2col(x, window, output_size).reshape(batch, groups, -1, output_size[0] * output_size[1])
    out = weight.reshape(groups, out_channels // groups, -1) @ columns  # (N, groups, O/groups, L)
    return out.reshape(batch, out_channels, *output_size), columns


def _convolve_input_grad(grad, weight, groups: int, window: Window, input_size):
    """dL/dX from G = dL/dY (N, O, OH, OW): col2im of W_g^T G_g -> (N, C, H, W)."""
    batch, out_channels, out_height, out_width = grad.shape
    grad_rows = grad.reshape(batch, groups, out_channels // groups, out_height * out_width)
    columns = weight.reshape(groups, out_channels // groups, -1).swapaxes(-1, -2) @ grad_rows  # (N, groups, K, L)
    columns = columns.reshape(batch, weight.shape[1] * groups, *window.kernel, out_height, out_width)
    return col2im(columns, window, input_size)


def _convolve_weight_grad(grad, columns, groups: int, weight_shape):
    """dL/dW = sum over n of G_g X_g^T, from G = dL/dY (N, O, OH, OW) and the grouped columns X (N, groups, K, L)."""
    batch, out_channels = grad.shape[:2]
    grad_rows = grad.reshape(batch, groups, out_channels // groups, -1)
    return (grad_rows @ columns.swapaxes(-1, -2)).sum(axis=0).reshape(weight_shape)


@computes_in_float32
class Conv2d(Function):
    """conv2d, tuned; the formula is conv2d_study. The tricks: im2col copies the input once per kernel tap, as one
    strided slice over all output pixels (im2col, _tap_slices), so the Python loop is kh * kw long; all groups and
    samples then go through one batched matrix product (_convolve); the input gradient is col2im's sum of slices."""

    def forward(self, x, weight, bias=None, *, window: Window, groups: int):
        """(N, C, H, W), (O, C/groups, kh, kw), (O,) -> (N, O, OH, OW)"""
        out, columns = _convolve(x, weight, groups, window, window.output_size(x.shape[2:]))
        if bias is not None:
            out += bias[:, None, None]
        self.save_for_backward(columns, weight)
        self.window, self.groups, self.input_size = window, groups, x.shape[2:]
        return out

    def backward(self, grad):
        columns, weight = self.saved_tensors
        needs = self.needs_input_grad
        grad_x = _convolve_input_grad(grad, weight, self.groups, self.window, self.input_size) if needs[0] else None
        grad_weight = _convolve_weight_grad(grad, columns, self.groups, weight.shape) if needs[1] else None
        if len(needs) == 2:
            return grad_x, grad_weight
        return grad_x, grad_weight, grad.sum(axis=(0, 2, 3)) if needs[2] else None


@computes_in_float32
class ConvTranspose2d(Function):
    """The adjoint of Conv2d with the same window: forward is conv2d's input gradient, backward convolves."""

    def forward(self, x, weight, bias=None, *, window: Window, groups: int, output_size):
        """(N, C, H, W), (C, O/groups, kh, kw), (O,) -> (N, O, *output_size)"""
        out = _convolve_input_grad(x, weight, groups, window, output_size)
        if bias is not None:
            out += bias[:, None, None]
        self.save_for_backward(x, weight)
        self.window, self.groups = window, groups
        return out

    def backward(self, grad):
        x, weight = self.saved_tensors
        needs = self.needs_input_grad
        grads = (None, None)
        if needs[0] or needs[1]:
            grad_x, columns = _convolve(grad, weight, self.groups, self.window, x.shape[2:])
            grads = (grad_x if needs[0] else None,
                     _convolve_weight_grad(x, columns, self.groups, weight.shape) if needs[1] else None)
        if len(needs) == 2:
            return grads
        return *grads, grad.sum(axis=(0, 2, 3)) if needs[2] else None


def _check_conv(op: str, x: Tensor, weight: Tensor, bias: Tensor | None, groups: int, transposed: bool) -> None:
    """The shape checks PyTorch makes: x (N, C, H, W), a 4-d weight, (O, C/groups, kh, kw) for a convolution or
    (C, O/groups, kh, kw) transposed, groups dividing both channel counts, bias (O,)."""
    if x.ndim != 4 or weight.ndim != 4:
        raise ValueError(f"{op}: expected a 4-d input (N, C, H, W) and a 4-d weight, got shapes {x.shape} and "
                         f"{weight.shape}")
    if not isinstance(groups, int) or groups < 1 or weight.shape[0] % groups:
        raise ValueError(f"{op}: groups={groups!r} must be a positive int dividing the weight's first dimension "
                         f"{weight.shape[0]}")
    in_channels, out_channels = weight.shape[0], weight.shape[1] * groups
    if not transposed:
        in_channels, out_channels = out_channels, in_channels
    if x.shape[1] != in_channels:
        raise ValueError(f"{op}: input of shape {x.shape} has {x.shape[1]} channels, but the weight of shape "
                         f"{weight.shape} with groups={groups} expects {in_channels}")
    if bias is not None and bias.shape != (out_channels,):
        raise ValueError(f"{op}: bias of shape {bias.shape}, expected ({out_channels},)")


def conv2d(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0, dilation=1,
           groups: int = 1) -> Tensor:
    """2-d cross-correlation, as torch.nn.functional.conv2d: x (N, C, H, W), weight (O, C/groups, kh, kw), bias (O,)
    -> (N, O, OH, OW). padding is an int, a pair, 'valid' or 'same'."""
    _check_conv("conv2d", x, weight, bias, groups, transposed=False)
    window = _window("conv2d", weight.shape[2:], stride, padding, dilation)
    output_size = window.output_size(x.shape[2:])
    if min(output_size) < 1:
        raise ValueError(f"conv2d: the kernel {window.kernel} (dilation {window.dilation}) does not fit the padded "
                         f"input of shape {x.shape}")
    inputs = (x, weight) if bias is None else (x, weight, bias)
    return Conv2d.apply(*inputs, window=window, groups=groups)


def _single(op: str, name: str, value) -> int:
    """An int or a 1-tuple of an int, as PyTorch's 1-d ops accept them."""
    if isinstance(value, (tuple, list)) and len(value) == 1:
        value = value[0]
    if not isinstance(value, int):
        raise TypeError(f"{op}: {name} must be an int or a 1-tuple, got {value!r}")
    return value


def conv1d(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0, dilation=1,
           groups: int = 1) -> Tensor:
    """1-d cross-correlation, as torch.nn.functional.conv1d: x (N, C, L), weight (O, C/groups, k), bias (O,)
    -> (N, O, OL); conv2d on a height of 1."""
    if x.ndim != 3 or weight.ndim != 3:
        raise ValueError(f"conv1d: expected a 3-d input (N, C, L) and a 3-d weight, got shapes {x.shape} and "
                         f"{weight.shape}")
    padding = padding if isinstance(padding, str) else (0, _single("conv1d", "padding", padding))
    out = conv2d(unsqueeze(x, 2), unsqueeze(weight, 2), bias, stride=(1, _single("conv1d", "stride", stride)),
                 padding=padding, dilation=(1, _single("conv1d", "dilation", dilation)), groups=groups)
    return squeeze(out, 2)


def conv_transpose2d(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0, output_padding=0,
                     groups: int = 1, dilation=1) -> Tensor:
    """The transposed convolution (the gradient of conv2d with respect to its input), as
    torch.nn.functional.conv_transpose2d: x (N, C, H, W), weight (C, O/groups, kh, kw), bias (O,) -> (N, O, OH, OW)
    with OH = (H - 1) * sh - 2 * ph + dh * (kh - 1) + output_padding_h + 1. output_padding adds rows and columns at
    the bottom and right, each smaller than the stride or the dilation."""
    _check_conv("conv_transpose2d", x, weight, bias, groups, transposed=True)
    if isinstance(padding, str):
        raise ValueError(f"conv_transpose2d: padding must be an int or a pair, got {padding!r}")
    window = _window("conv_transpose2d", weight.shape[2:], stride, padding, dilation)
    extra = pair("conv_transpose2d", "output_padding", output_padding)
    if any(not 0 <= e < max(s, d) for e, s, d in zip(extra, window.stride, window.dilation)):
        raise ValueError(f"conv_transpose2d: output_padding {extra} must be non-negative and smaller than the stride "
                         f"{window.stride} or the dilation {window.dilation}")
    output_size = tuple(
        (size - 1) * s - before - after + d * (k - 1) + e + 1
        for size, (before, after), k, s, d, e
        in zip(x.shape[2:], window.padding, window.kernel, window.stride, window.dilation, extra)
    )
    if min(output_size) < 1:
        raise ValueError(f"conv_transpose2d: the output size {output_size} for an input of shape {x.shape} is empty")
    inputs = (x, weight) if bias is None else (x, weight, bias)
    return ConvTranspose2d.apply(*inputs, window=window, groups=groups, output_size=output_size)


def conv2d_study(x, weight, bias=None, stride=1, padding=0, dilation=1, groups: int = 1):
    """conv2d by its definition, on arrays, one output pixel at a time:
        y[n, o, i, j] = bias[o] + sum over c, p, q of weight[o, c, p, q] * x_padded[n, g + c, i*sh + p*dh, j*sw + q*dw]
    where g = (o // (O / groups)) * C/groups is the first input channel of o's group."""
    xp = backend.get_array_module(x)
    N, C, H, W = x.shape
    O, C_group, KH, KW = weight.shape
    window = _window("conv2d_study", (KH, KW), stride, padding, dilation)
    (top, bottom), (left, right) = window.padding
    (SH, SW), (DH, DW) = window.stride, window.dilation
    x_padded = xp.zeros((N, C, H + top + bottom, W + left + right), dtype=x.dtype)
    x_padded[:, :, top : top + H, left : left + W] = x
    OH, OW = window.output_size((H, W))
    y = xp.zeros((N, O, OH, OW), dtype=x.dtype)
    for n in range(N):
        for o in range(O):
            g = (o // (O // groups)) * C_group
            for i in range(OH):
                for j in range(OW):
                    patch = x_padded[n, g : g + C_group, i * SH : i * SH + DH * (KH - 1) + 1 : DH,
                                     j * SW : j * SW + DW * (KW - 1) + 1 : DW]
                    y[n, o, i, j] = (weight[o] * patch).sum() + (0 if bias is None else bias[o])
    return y
