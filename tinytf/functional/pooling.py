"""Pooling and resizing with PyTorch's arguments and semantics: max_pool2d, avg_pool2d, adaptive_avg_pool2d and
interpolate ('nearest', 'bilinear').

Max and average pooling read their windows with conv2d's im2col (N, C, kh, kw, OH, OW) and send gradients back with
its adjoint col2im: max pooling's gradient goes to the element each maximum was taken from, average pooling's is
spread evenly over the window. Adaptive average pooling and interpolation are linear maps that act on rows and on
columns separately, so each is Y = A_h X A_w^T with two small constant matrices, differentiated by matmul.
"""

from __future__ import annotations

import math

import numpy as np

from .. import backend
from ..tensor import Function, Tensor
from .common import computes_in_float32
from .convolution import Window, col2im, im2col, pair
from .linalg import matmul


def _pool_window(op: str, input_size, kernel_size, stride, padding, dilation, ceil_mode: bool):
    """(Window, output size) of a pooling: stride defaults to the kernel; with ceil_mode the last window may hang
    over the bottom or right edge (so the padding after grows to hold it) if it starts inside the input or the
    padding before it, as in PyTorch."""
    kernel = pair(op, "kernel_size", kernel_size)
    stride = kernel if stride is None else pair(op, "stride", stride)
    padding, dilation = pair(op, "padding", padding), pair(op, "dilation", dilation)
    if min(kernel) < 1 or min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(f"{op}: kernel_size, stride and dilation must be positive and padding non-negative, got "
                         f"{kernel}, {stride}, {dilation} and {padding}")
    if any(2 * p > k for p, k in zip(padding, kernel)):
        raise ValueError(f"{op}: padding {padding} must be at most half of kernel_size {kernel}")
    output_size, pads = [], []
    for size, k, s, p, d in zip(input_size, kernel, stride, padding, dilation):
        span = d * (k - 1) + 1
        room = size + 2 * p - span
        out = (-(-room // s) if ceil_mode else room // s) + 1
        if ceil_mode and (out - 1) * s >= size + p:
            out -= 1
        if out < 1:
            raise ValueError(f"{op}: the window {kernel} (dilation {dilation}) does not fit an input of size "
                             f"{tuple(input_size)} with padding {padding}")
        output_size.append(out)
        pads.append((p, max(p, (out - 1) * s + span - size - p)))
    return Window(kernel, stride, tuple(pads), dilation), tuple(output_size)


def _check_pool_input(op: str, x: Tensor) -> None:
    if x.ndim != 4:
        raise ValueError(f"{op}: expected a 4-d input (N, C, H, W), got shape {x.shape}")
    if not backend.is_floating(x.dtype):
        raise TypeError(f"{op}: expected a floating input, got dtype {x.dtype}")


@computes_in_float32
class MaxPool2d(Function):
    """Makes max pooling differentiable: max_pool2d finds the maxima and where they are in their windows (it may
    return those positions too), and the gradient of each maximum goes to the element it was taken from."""

    def forward(self, x, *, pooled, argmax, window: Window):
        """(N, C, H, W) -> pooled (N, C, OH, OW); argmax (N, C, OH, OW) indexes the taps of a window."""
        self.argmax, self.window, self.input_size = argmax, window, x.shape[2:]
        return pooled

    def backward(self, grad):
        xp = backend.get_array_module(grad)
        taps = self.window.kernel[0] * self.window.kernel[1]
        batch, channels, out_height, out_width = grad.shape
        # Only the tap that held the maximum gets the gradient; overlapping windows sum in col2im.
        taps_grad = (xp.arange(taps)[:, None, None] == self.argmax[:, :, None]) * grad[:, :, None]
        taps_grad = taps_grad.reshape(batch, channels, *self.window.kernel, out_height, out_width)
        return col2im(taps_grad, self.window, self.input_size)


def max_pool2d(x: Tensor, kernel_size, stride=None, padding=0, dilation=1, ceil_mode: bool = False,
               return_indices: bool = False):
    """The maximum of each window, as torch.nn.functional.max_pool2d: (N, C, H, W) -> (N, C, OH, OW); padding
    counts as -inf. With return_indices, also each maximum's flat index into its input plane (h * W + w), int64."""
    _check_pool_input("max_pool2d", x)
    window, output_size = _pool_window("max_pool2d", x.shape[2:], kernel_size, stride, padding, dilation, ceil_mode)
    xp = backend.get_array_module(x.data)
    batch, channels, _, width = x.shape
    with backend.device_scope(x.device):
        taps = im2col(x.data, window, output_size, fill=-math.inf).reshape(batch, channels, -1, *output_size)
        argmax = taps.argmax(axis=2)  # the first maximum of a window, as PyTorch picks it; NaN counts as largest
        pooled = taps.max(axis=2)
        out = MaxPool2d.apply(x, pooled=pooled, argmax=argmax, window=window)
        if not return_indices:
            return out
        tap_row, tap_col = argmax // window.kernel[1], argmax % window.kernel[1]
        rows = (xp.arange(output_size[0])[:, None] * window.stride[0] - window.padding[0][0]
                + tap_row * window.dilation[0])
        cols = (xp.arange(output_size[1]) * window.stride[1] - window.padding[1][0] + tap_col * window.dilation[1])
        return out, Tensor((rows * width + cols).astype(xp.int64))


@computes_in_float32
class AvgPool2d(Function):
    def forward(self, x, *, window: Window, output_size, divisor):
        """(N, C, H, W) -> (N, C, OH, OW): each window's sum over `divisor`, a number or an (OH, OW) array."""
        batch, channels = x.shape[:2]
        self.window, self.divisor, self.input_size = window, divisor, x.shape[2:]
        return im2col(x, window, output_size).reshape(batch, channels, -1, *output_size).sum(axis=2) / divisor

    def backward(self, grad):
        xp = backend.get_array_module(grad)
        share = (grad / self.divisor).astype(grad.dtype, copy=False)  # each tap's share of its window's gradient
        taps_grad = xp.broadcast_to(share[:, :, None, None], (*share.shape[:2], *self.window.kernel, *share.shape[2:]))
        return col2im(taps_grad, self.window, self.input_size)


def _window_counts(out: int, kernel: int, stride: int, padding: int, size: int, include_pad: bool):
    """How many elements each window along one axis averages, as PyTorch counts them: the padding counts with
    count_include_pad, the ceil_mode overhang never does."""
    start = np.arange(out) * stride - padding
    end = np.minimum(start + kernel, size + padding)
    if not include_pad:
        start, end = np.maximum(start, 0), np.minimum(end, size)
    return end - start


def avg_pool2d(x: Tensor, kernel_size, stride=None, padding=0, ceil_mode: bool = False,
               count_include_pad: bool = True, divisor_override: int | None = None) -> Tensor:
    """The mean of each window, as torch.nn.functional.avg_pool2d: (N, C, H, W) -> (N, C, OH, OW)."""
    _check_pool_input("avg_pool2d", x)
    window, output_size = _pool_window("avg_pool2d", x.shape[2:], kernel_size, stride, padding, 1, ceil_mode)
    if divisor_override is not None:
        if divisor_override == 0:
            raise ValueError("avg_pool2d: divisor_override must not be zero")
        divisor = divisor_override
    else:
        counts = [_window_counts(out, k, s, p, size, count_include_pad) for out, k, s, (p, _), size
                  in zip(output_size, window.kernel, window.stride, window.padding, x.shape[2:])]
        divisor = backend.to_device(np.outer(*counts).astype(x.dtype), x.device)
    return AvgPool2d.apply(x, window=window, output_size=output_size, divisor=divisor)


def _constant(matrix: np.ndarray, like: Tensor) -> Tensor:
    return Tensor(backend.to_device(matrix.astype(like.dtype), like.device))


def _adaptive_average_matrix(size: int, out: int) -> np.ndarray:
    """(out, size): row i averages the input over [floor(i * size / out), ceil((i + 1) * size / out))."""
    matrix = np.zeros((out, size))
    for i in range(out):
        start, end = i * size // out, -(-(i + 1) * size // out)
        matrix[i, start:end] = 1 / (end - start)
    return matrix


def adaptive_avg_pool2d(x: Tensor, output_size) -> Tensor:
    """Average pooling to a given output size, as torch.nn.functional.adaptive_avg_pool2d: (N, C, H, W)
    -> (N, C, oh, ow); output_size is an int or a pair, None in it keeping that input size."""
    _check_pool_input("adaptive_avg_pool2d", x)
    sizes = (output_size, output_size) if isinstance(output_size, int) or output_size is None else output_size
    if len(sizes) != 2:
        raise ValueError(f"adaptive_avg_pool2d: output_size must be an int or a pair, got {output_size!r}")
    out_height, out_width = (size if out is None else out for out, size in zip(sizes, x.shape[2:]))
    if min(out_height, out_width) < 1:
        raise ValueError(f"adaptive_avg_pool2d: output_size must be positive, got {output_size!r}")
    rows = _constant(_adaptive_average_matrix(x.shape[2], out_height), x)
    cols = _constant(_adaptive_average_matrix(x.shape[3], out_width).T, x)
    return matmul(matmul(rows, x), cols)  # (oh, H) @ (N, C, H, W) @ (W, ow)


def _nearest_matrix(size: int, out: int, scale: float) -> np.ndarray:
    """(out, size): output i copies input floor(i * scale); PyTorch computes that in float32, and so do we, or the
    rounding of i * scale would pick a different pixel at some sizes."""
    source = np.floor(np.arange(out, dtype=np.float32) * np.float32(scale)).astype(np.int64)
    matrix = np.zeros((out, size))
    matrix[np.arange(out), np.minimum(source, size - 1)] = 1
    return matrix


def _linear_matrix(size: int, out: int, scale: float, align_corners: bool) -> np.ndarray:
    """(out, size): output i mixes the two inputs around its source coordinate, (i + 0.5) * scale - 0.5 clamped at
    0 (pixel centres line up), or i * (size - 1) / (out - 1) with align_corners (corner pixels line up)."""
    if align_corners:
        source = np.arange(out) * ((size - 1) / (out - 1) if out > 1 else 0.0)
    else:
        source = np.maximum((np.arange(out) + 0.5) * scale - 0.5, 0.0)
    low = np.minimum(np.floor(source).astype(np.int64), size - 1)
    high = np.minimum(low + 1, size - 1)
    weight_high = source - low
    matrix = np.zeros((out, size))
    np.add.at(matrix, (np.arange(out), low), 1 - weight_high)
    np.add.at(matrix, (np.arange(out), high), weight_high)
    return matrix


def interpolate(x: Tensor, size=None, scale_factor=None, mode: str = "nearest", align_corners: bool | None = None,
                recompute_scale_factor: bool | None = None) -> Tensor:
    """Resize the spatial axes, as torch.nn.functional.interpolate: 'nearest' on (N, C, L) or (N, C, H, W),
    'bilinear' on (N, C, H, W). Give the output `size` or a `scale_factor` (the output size is then
    floor(input size * scale_factor), and the source coordinates use 1 / scale_factor unless
    recompute_scale_factor)."""
    spatial = {"nearest": (1, 2), "bilinear": (2,)}.get(mode)
    if spatial is None:
        raise ValueError(f"interpolate: mode must be 'nearest' or 'bilinear', got {mode!r}")
    if x.ndim - 2 not in spatial:
        raise ValueError(f"interpolate: mode {mode!r} needs a {' or '.join(str(n + 2) for n in spatial)}-d input, "
                         f"got shape {x.shape}")
    if mode == "nearest" and align_corners is not None:
        raise ValueError("interpolate: align_corners can only be set with the interpolating mode 'bilinear'")
    if (size is None) == (scale_factor is None):
        raise ValueError("interpolate: give exactly one of size and scale_factor")
    input_size = x.shape[2:]
    rank = len(input_size)
    if size is not None:
        output_size = (size,) * rank if isinstance(size, int) else tuple(size)
        scales = [in_size / out for in_size, out in zip(input_size, output_size)]
    else:
        factors = (scale_factor,) * rank if isinstance(scale_factor, (int, float)) else tuple(scale_factor)
        output_size = tuple(math.floor(in_size * factor) for in_size, factor in zip(input_size, factors))
        scales = ([in_size / out for in_size, out in zip(input_size, output_size)] if recompute_scale_factor
                  else [1 / factor for factor in factors])
    if len(output_size) != rank or min(output_size) < 1:
        raise ValueError(f"interpolate: the output size {output_size} does not fit an input of shape {x.shape}")
    if mode == "nearest":
        matrices = [_nearest_matrix(n, out, scale) for n, out, scale in zip(input_size, output_size, scales)]
    else:
        matrices = [_linear_matrix(n, out, scale, bool(align_corners))
                    for n, out, scale in zip(input_size, output_size, scales)]
    out = matmul(x, _constant(matrices[-1].T, x))  # (..., W) @ (W, ow)
    if rank == 2:
        out = matmul(_constant(matrices[0], x), out)  # (oh, H) @ (N, C, H, ow)
    return out
