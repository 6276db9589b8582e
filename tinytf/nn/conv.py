"""Layers for small vision and audio models: Conv1d, Conv2d, ConvTranspose2d, MaxPool2d, AvgPool2d,
AdaptiveAvgPool2d, BatchNorm2d and GroupNorm, with PyTorch's arguments, parameter shapes and initialization."""

from __future__ import annotations

import math

import numpy as np

from ..functional.convolution import conv1d, conv2d, conv_transpose2d, pair
from ..functional.normalization import batch_norm, group_norm
from ..functional.pooling import adaptive_avg_pool2d, avg_pool2d, max_pool2d
from ..tensor import Tensor
from .layers import uniform_parameter
from .module import Module, Parameter


class _ConvNd(Module):
    """The parameters of a convolution: weight (O, C/groups, *kernel), or (C, O/groups, *kernel) when transposed,
    and bias (O,). PyTorch's initialization: kaiming_uniform with a = sqrt(5), which is U(-1/sqrt(fan_in),
    1/sqrt(fan_in)) with fan_in = weight.shape[1] * prod(kernel), and the bias drawn from the same range."""

    def __init__(self, in_channels: int, out_channels: int, kernel: tuple[int, ...], stride, padding, dilation,
                 groups: int, bias: bool, transposed: bool):
        super().__init__()
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise ValueError(f"{type(self).__name__}: groups={groups} must divide in_channels={in_channels} and "
                             f"out_channels={out_channels}")
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        shape = (in_channels, out_channels // groups, *kernel) if transposed else \
            (out_channels, in_channels // groups, *kernel)
        bound = 1 / math.sqrt(shape[1] * math.prod(kernel))
        self.weight = uniform_parameter(shape, bound)
        self.bias = uniform_parameter((out_channels,), bound) if bias else None

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"bias={self.bias is not None}")


class Conv1d(_ConvNd):
    """(N, C, L) -> (N, O, OL); see tinytf.functional.convolution.conv1d."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True):
        kernel = (kernel_size[0] if isinstance(kernel_size, (tuple, list)) else kernel_size,)
        super().__init__(in_channels, out_channels, kernel, stride, padding, dilation, groups, bias, transposed=False)

    def forward(self, x: Tensor) -> Tensor:
        return conv1d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class Conv2d(_ConvNd):
    """(N, C, H, W) -> (N, O, OH, OW); see tinytf.functional.convolution.conv2d."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True):
        kernel = pair("Conv2d", "kernel_size", kernel_size)
        super().__init__(in_channels, out_channels, kernel, stride, padding, dilation, groups, bias, transposed=False)

    def forward(self, x: Tensor) -> Tensor:
        return conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ConvTranspose2d(_ConvNd):
    """(N, C, H, W) -> (N, O, OH, OW); see tinytf.functional.convolution.conv_transpose2d."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, output_padding=0,
                 groups: int = 1, bias: bool = True, dilation=1):
        kernel = pair("ConvTranspose2d", "kernel_size", kernel_size)
        super().__init__(in_channels, out_channels, kernel, stride, padding, dilation, groups, bias, transposed=True)
        self.output_padding = output_padding

    def forward(self, x: Tensor) -> Tensor:
        return conv_transpose2d(x, self.weight, self.bias, self.stride, self.padding, self.output_padding,
                                self.groups, self.dilation)


class MaxPool2d(Module):
    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, return_indices: bool = False,
                 ceil_mode: bool = False):
        super().__init__()
        self.kernel_size, self.stride, self.padding, self.dilation = kernel_size, stride, padding, dilation
        self.return_indices, self.ceil_mode = return_indices, ceil_mode

    def forward(self, x: Tensor):
        return max_pool2d(x, self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode,
                          self.return_indices)

    def extra_repr(self) -> str:
        return (f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"dilation={self.dilation}, ceil_mode={self.ceil_mode}")


class AvgPool2d(Module):
    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode: bool = False, count_include_pad: bool = True,
                 divisor_override: int | None = None):
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.ceil_mode, self.count_include_pad, self.divisor_override = ceil_mode, count_include_pad, divisor_override

    def forward(self, x: Tensor) -> Tensor:
        return avg_pool2d(x, self.kernel_size, self.stride, self.padding, self.ceil_mode, self.count_include_pad,
                          self.divisor_override)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class AdaptiveAvgPool2d(Module):
    def __init__(self, output_size):
        super().__init__()
        self.output_size = output_size

    def forward(self, x: Tensor) -> Tensor:
        return adaptive_avg_pool2d(x, self.output_size)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}"


class BatchNorm2d(Module):
    """Batch norm over (N, C, H, W): in training mode by the batch's statistics, which move the running_mean and
    running_var buffers (saved in the state dict, with num_batches_tracked, as in PyTorch); in eval mode by those
    running statistics. weight starts at 1 and bias at 0."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, affine: bool = True,
                 track_running_stats: bool = True):
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.affine, self.track_running_stats = affine, track_running_stats
        self.weight = Parameter(np.ones(num_features, dtype=np.float32)) if affine else None
        self.bias = Parameter(np.zeros(num_features, dtype=np.float32)) if affine else None
        if track_running_stats:
            self.register_buffer("running_mean", np.zeros(num_features, dtype=np.float32))
            self.register_buffer("running_var", np.ones(num_features, dtype=np.float32))
            self.register_buffer("num_batches_tracked", np.zeros((), dtype=np.int64))

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4:
            raise ValueError(f"BatchNorm2d: expected a 4-d input (N, C, H, W), got shape {x.shape}")
        use_batch_stats = self.training or not self.track_running_stats
        running = (self.running_mean, self.running_var) if self.track_running_stats else (None, None)
        if self.training and self.track_running_stats:
            self.num_batches_tracked[...] += 1  # in place: the buffer stays registered
        return batch_norm(x, *running, self.weight, self.bias, use_batch_stats, self.momentum, self.eps)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}")


class GroupNorm(Module):
    """Group norm over (N, C, *): each sample's groups of C / num_groups channels normalized on their own; weight
    starts at 1 and bias at 0."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True):
        super().__init__()
        if num_groups < 1 or num_channels % num_groups:
            raise ValueError(f"GroupNorm: num_groups={num_groups} must divide num_channels={num_channels}")
        self.num_groups, self.num_channels, self.eps, self.affine = num_groups, num_channels, eps, affine
        self.weight = Parameter(np.ones(num_channels, dtype=np.float32)) if affine else None
        self.bias = Parameter(np.zeros(num_channels, dtype=np.float32)) if affine else None

    def forward(self, x: Tensor) -> Tensor:
        return group_norm(x, self.num_groups, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}"
