"""Layer norm and RMS norm as fused ops: forward caches the row statistics, backward is derived by hand.

With x_hat = (x - mean) * rstd and y = x_hat * w + b over the last axis of size C, and g = dL/dy:
    dL/dx_hat = g * w
    dL/dx     = rstd * (dx_hat - mean(dx_hat) - x_hat * mean(dx_hat * x_hat))      (layer norm)
    dL/dx     = rstd * (dx_hat - x_hat * mean(dx_hat * x_hat))                     (RMS norm: no centering)
    dL/dw     = sum over rows of g * x_hat,   dL/db = sum over rows of g
The mean terms come from every output of a row depending on that row's mean and rstd.

Study versions: these formulas as written, on plain arrays, are `layer_norm_study_forward` / `_backward` and
`rms_norm_study_forward` / `_backward` just below. The tuned ops after them (`LayerNorm`, `RMSNorm`, through
`_normalize_rows` and `_normalize_rows_backward`) compute the same, and the tests hold them to the study versions.
"""

from __future__ import annotations

from .. import backend
from ..tensor import Function, Tensor, array_of
from .common import block_scratch, map_row_blocks, row_sum_vector


def layer_norm_study_forward(x, weight=None, bias=None, eps: float = 1e-5):
    """(..., C) -> y (x's shape and dtype), and x_hat (..., C) and rstd (..., 1) for the backward; the statistics
    are in float32 at least, as in LayerNorm. No weight or bias means w = 1, b = 0."""
    xp = backend.get_array_module(x)
    x_up = x.astype(xp.promote_types(x.dtype, xp.float32), copy=False)
    mean = x_up.mean(axis=-1, keepdims=True)
    rstd = 1 / xp.sqrt(((x_up - mean) ** 2).mean(axis=-1, keepdims=True) + eps)
    x_hat = (x_up - mean) * rstd
    y = x_hat * (1 if weight is None else weight) + (0 if bias is None else bias)
    return y.astype(x.dtype, copy=False), x_hat, rstd


def layer_norm_study_backward(grad, x_hat, rstd, weight=None):
    """dL/dx (grad's shape and dtype), dL/dw and dL/db (C,) from grad = dL/dy and the forward's x_hat and rstd,
    computed in x_hat's dtype."""
    dy = grad.astype(x_hat.dtype, copy=False)
    g = dy * (1 if weight is None else weight)  # dL/dx_hat
    dx = rstd * (g - g.mean(axis=-1, keepdims=True) - x_hat * (g * x_hat).mean(axis=-1, keepdims=True))
    rows = tuple(range(dy.ndim - 1))
    return dx.astype(grad.dtype, copy=False), (dy * x_hat).sum(axis=rows), dy.sum(axis=rows)


def rms_norm_study_forward(x, weight=None, eps: float = 1e-6):
    """(..., C) -> y (x's shape and dtype), and x_hat (..., C) and rstd (..., 1) for the backward; the statistics
    are in float32 at least, as in RMSNorm. No weight means w = 1."""
    xp = backend.get_array_module(x)
    x_up = x.astype(xp.promote_types(x.dtype, xp.float32), copy=False)
    rstd = 1 / xp.sqrt((x_up**2).mean(axis=-1, keepdims=True) + eps)
    x_hat = x_up * rstd
    y = x_hat * (1 if weight is None else weight)
    return y.astype(x.dtype, copy=False), x_hat, rstd


def rms_norm_study_backward(grad, x_hat, rstd, weight=None):
    """dL/dx (grad's shape and dtype) and dL/dw (C,) from grad = dL/dy and the forward's x_hat and rstd, computed
    in x_hat's dtype."""
    dy = grad.astype(x_hat.dtype, copy=False)
    g = dy * (1 if weight is None else weight)  # dL/dx_hat
    dx = rstd * (g - x_hat * (g * x_hat).mean(axis=-1, keepdims=True))
    return dx.astype(grad.dtype, copy=False), (dy * x_hat).sum(axis=tuple(range(dy.ndim - 1)))


def _row_dots(a, b):
    """Each row's dot product a_i . b_i of two (rows, C) arrays, as (rows, 1): einsum makes no (rows, C) array of
    products, as (a * b).sum(axis=-1) would."""
    return backend.get_array_module(a).einsum("ij,ij->i", a, b)[:, None]


def _column_dots(a, b):
    """sum over rows of a * b for two (rows, C) arrays, (C,), by einsum: no (rows, C) array of products."""
    return backend.get_array_module(a).einsum("ij,ij->j", a, b)


def _subtract_row_means(rows, averager, out) -> None:
    """out = rows - mean(rows) over the last axis, with the means from one matrix-vector product: `averager` is
    row_sum_vector(C, ..., scale=1 / C)."""
    backend.get_array_module(rows).subtract(rows, (rows @ averager)[:, None], out=out)


def _reciprocal_rms(rows, eps: float, out) -> None:
    """out = 1 / sqrt(mean(rows^2) + eps), (rows, 1), in place; for centered rows that is 1 / sqrt(var + eps)."""
    xp = backend.get_array_module(rows)
    xp.multiply(_row_dots(rows, rows), 1 / rows.shape[-1], out=out)
    out += eps
    xp.sqrt(out, out=out)
    xp.reciprocal(out, out=out)


def _normalize_rows(x, weight, bias, eps: float, centered: bool):
    """y = x_hat * weight + bias with x_hat = (x - mean) * rstd over the last axis (no centering for RMS norm), in
    float32 at least: the tuned form of layer_norm_study_forward and rms_norm_study_forward. Returns y (x's shape
    and dtype) and, for backward, x_hat (rows, C) and rstd (rows, 1).

    Optimisations: cache-blocked rows (row_blocks), runs of blocks on worker threads (map_row_blocks); in-place
    ufunc chains with out= into x_hat, rstd and y,
    allocated once; row means by a matrix-vector product (BLAS: _subtract_row_means, row_sum_vector); squared norms
    as einsum row dot products with no (rows, C) temporary (_reciprocal_rms, _row_dots). Half precision (float16,
    bfloat16) computes y in float32 too and rounds it once, at the end.
    """
    xp = backend.get_array_module(x)
    width = x.shape[-1]
    rows = x.reshape(-1, width)
    compute = backend.compute_dtype(x.dtype)
    x_hat = xp.empty(rows.shape, dtype=compute)
    rstd = xp.empty((rows.shape[0], 1), dtype=compute)
    out = xp.empty(rows.shape, dtype=compute) if weight is not None else None
    averager = row_sum_vector(width, compute, xp, scale=1 / width)

    def normalize(blocks: list[slice]) -> None:
        for block in blocks:
            xb, hb, rb = rows[block], x_hat[block], rstd[block]
            if centered:
                _subtract_row_means(xb.astype(compute, copy=False), averager, out=hb)
            else:
                hb[...] = xb
            _reciprocal_rms(hb, eps, out=rb)
            hb *= rb
            if weight is not None:
                ob = out[block]
                xp.multiply(hb, weight, out=ob)
                if bias is not None:
                    ob += bias

    map_row_blocks(normalize, rows)
    if out is None:  # y is x_hat: rounded to x's dtype, or a copy, because backward keeps x_hat
        y = x_hat.astype(x.dtype) if x.dtype != compute else x_hat.copy()
    else:
        y = out.astype(x.dtype, copy=False)
    return y.reshape(x.shape), x_hat, rstd


def _normalize_rows_backward(function: Function, grad, centered: bool):
    """Gradients of the normalized rows' inputs (x, weight[, bias]) from dL/dy, with y = x_hat * w (+ b): the tuned
    form of layer_norm_study_backward and rms_norm_study_backward, computing only the gradients asked for.

    Optimisations: cache-blocked rows (row_blocks), runs of blocks on worker threads (map_row_blocks), each summing
    its own share of dL/dw and dL/db; in-place ufunc chains with out= into dL/dx, with one scratch block per thread
    reused by every block (block_scratch); row means and dL/db's column sums by matrix-vector products (BLAS:
    _subtract_row_means, row_sum_vector);
    row and column dot products by einsum with no (rows, C) temporary (_row_dots, _column_dots).
    """
    x_hat, rstd, weight = function.saved_tensors
    xp = backend.get_array_module(x_hat)
    width = x_hat.shape[-1]
    g = grad.reshape(-1, width).astype(x_hat.dtype, copy=False)  # half precision: the gradient in float32 too
    needs = function.needs_input_grad
    grad_x = xp.empty(g.shape, dtype=x_hat.dtype) if needs[0] else None
    wants_weight, wants_bias = weight is not None and needs[1], function.has_bias and needs[-1]
    averager = row_sum_vector(width, x_hat.dtype, xp, scale=1 / width)
    ones = row_sum_vector(len(x_hat), x_hat.dtype, xp) if wants_bias else None  # ones @ rows: column sums

    def backward_blocks(blocks: list[slice]) -> tuple:
        """dL/dx of these blocks' rows, and their shares of dL/dw and dL/db."""
        grad_weight = xp.zeros(width, dtype=x_hat.dtype) if wants_weight else None
        grad_bias = xp.zeros(width, dtype=x_hat.dtype) if wants_bias else None
        scratch = block_scratch(x_hat, blocks) if grad_x is not None else None
        for block in blocks:
            hb, gb = x_hat[block], g[block]
            if grad_weight is not None:
                grad_weight += _column_dots(gb, hb)
            if grad_bias is not None:
                grad_bias += ones[: gb.shape[0]] @ gb
            if grad_x is None:
                continue
            rb = grad_x[block]
            if weight is not None:
                xp.multiply(gb, weight, out=rb)  # dL/dx_hat
            else:
                rb[...] = gb
            projection = xp.multiply(hb, _row_dots(rb, hb) * (1 / width), out=scratch[: hb.shape[0]])
            if centered:
                _subtract_row_means(rb, averager, out=rb)
            rb -= projection
            rb *= rstd[block]
        return grad_weight, grad_bias

    grad_weight = xp.zeros(width, dtype=x_hat.dtype) if wants_weight else None
    grad_bias = xp.zeros(width, dtype=x_hat.dtype) if wants_bias else None
    for weight_share, bias_share in map_row_blocks(backward_blocks, x_hat):  # in row order: a deterministic sum
        if wants_weight:
            grad_weight += weight_share
        if wants_bias:
            grad_bias += bias_share
    grads = [None if grad_x is None else grad_x.reshape(grad.shape).astype(grad.dtype, copy=False)]
    if weight is not None:
        grads.append(None if grad_weight is None else grad_weight.astype(weight.dtype, copy=False))
    if function.has_bias:
        grads.append(None if grad_bias is None else grad_bias.astype(grad.dtype, copy=False))
    return tuple(grads)


class LayerNorm(Function):
    """Layer norm, tuned (_normalize_rows lists the optimisations); the formula is layer_norm_study_forward and
    layer_norm_study_backward."""

    def forward(self, x, weight=None, bias=None, eps: float = 1e-5):
        """(..., C), (C,), (C,) -> (..., C); statistics in float32 at least."""
        out, x_hat, rstd = _normalize_rows(x, weight, bias, eps, centered=True)
        self.save_for_backward(x_hat, rstd, weight)
        self.has_bias = bias is not None
        return out

    def backward(self, grad):
        return _normalize_rows_backward(self, grad, centered=True)


class RMSNorm(Function):
    """RMS norm, tuned like LayerNorm; the formula is rms_norm_study_forward and rms_norm_study_backward."""

    def forward(self, x, weight=None, eps: float = 1e-6):
        """(..., C), (C,) -> (..., C); statistics in float32 at least (half-precision inputs are upcast)."""
        out, x_hat, rstd = _normalize_rows(x, weight, None, eps, centered=False)
        self.save_for_backward(x_hat, rstd, weight)
        self.has_bias = False
        return out

    def backward(self, grad):
        return _normalize_rows_backward(self, grad, centered=False)


def _check_feature(op: str, x: Tensor, normalized_shape: int, *params) -> None:
    if x.ndim == 0 or x.shape[-1] != normalized_shape:
        raise ValueError(f"{op}: input of shape {x.shape} does not end in the normalized size {normalized_shape}")
    for param in params:
        if param is not None and param.shape != (normalized_shape,):
            raise ValueError(f"{op}: parameter of shape {param.shape}, expected ({normalized_shape},)")


def layer_norm(x: Tensor, normalized_shape, weight: Tensor | None = None, bias: Tensor | None = None,
               eps: float = 1e-5) -> Tensor:
    """Normalize the last axis to zero mean and unit variance, then scale by `weight` and shift by `bias`."""
    size = normalized_shape[-1] if isinstance(normalized_shape, (tuple, list)) else normalized_shape
    _check_feature("layer_norm", x, size, weight, bias)
    inputs = [tensor for tensor in (x, weight, bias) if tensor is not None]
    if bias is not None and weight is None:
        raise ValueError("layer_norm: a bias needs a weight")
    return LayerNorm.apply(*inputs, eps=eps)


def rms_norm(x: Tensor, normalized_shape, weight: Tensor | None = None, eps: float = 1e-6) -> Tensor:
    """Divide the last axis by its root mean square, then scale by `weight` (Llama's norm)."""
    size = normalized_shape[-1] if isinstance(normalized_shape, (tuple, list)) else normalized_shape
    _check_feature("rms_norm", x, size, weight)
    return RMSNorm.apply(x, weight, eps=eps) if weight is not None else RMSNorm.apply(x, eps=eps)


# --- Batch norm and group norm -----------------------------------------------------------------------------------
# The same standardization as layer norm, over other axes: batch norm over the batch and spatial axes of each channel
# (N, C, *) -> per C; group norm over the channels of a group and the spatial axes of each sample, (N, G, C/G * ...)
# -> per (N, G). With x_hat = (x - mean) * rstd over those axes and g = dL/dx_hat:
#     dL/dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat))
# When batch norm normalizes by its running statistics (evaluation), they are constants: dL/dx = rstd * g.


def _standardize(x, axes: tuple[int, ...], eps: float):
    """x_hat = (x - mean) * rstd over `axes`, in float32 at least; returns x_hat, mean, biased var and rstd (the
    statistics keep their axes, as size 1)."""
    xp = backend.get_array_module(x)
    x_up = x.astype(xp.promote_types(x.dtype, xp.float32), copy=False)
    mean = x_up.mean(axis=axes, keepdims=True)
    centered = x_up - mean
    var = (centered * centered).mean(axis=axes, keepdims=True)
    rstd = 1 / xp.sqrt(var + eps)
    return centered * rstd, mean, var, rstd


def _standardize_backward(grad_x_hat, x_hat, rstd, axes: tuple[int, ...]):
    """dL/dx from dL/dx_hat, for x_hat = _standardize(x, axes) (the formula above)."""
    mean_grad = grad_x_hat.mean(axis=axes, keepdims=True)
    mean_projection = (grad_x_hat * x_hat).mean(axis=axes, keepdims=True)
    return rstd * (grad_x_hat - mean_grad - x_hat * mean_projection)


def _per_channel(vector, ndim: int):
    """A (C,) vector shaped (C, 1, ...) to broadcast over the channel axis 1 of an ndim-d (N, C, ...) array."""
    return vector.reshape(-1, *(1,) * (ndim - 2))


def _affine(x_hat, weight, bias):
    """x_hat * weight + bias per channel (axis 1); a missing weight is 1, a missing bias 0."""
    out = x_hat if weight is None else x_hat * _per_channel(weight, x_hat.ndim)
    return out if bias is None else out + _per_channel(bias, x_hat.ndim)


def _affine_grads(function: Function, grad, x_hat, weight):
    """(dL/dx_hat, then dL/dweight and dL/dbias for those passed) of y = x_hat * weight + bias per channel."""
    needs, sums = function.needs_input_grad, (0, *range(2, grad.ndim))
    dy = grad.astype(x_hat.dtype, copy=False)
    grads = []
    if weight is not None:
        grads.append((dy * x_hat).sum(axis=sums).astype(weight.dtype, copy=False) if needs[1] else None)
    if function.has_bias:
        bias_position = 1 + (weight is not None)  # the inputs are x, then weight and bias where given
        grads.append(dy.sum(axis=sums).astype(grad.dtype, copy=False) if needs[bias_position] else None)
    grad_x_hat = dy if weight is None else dy * _per_channel(weight, dy.ndim)
    return grad_x_hat, grads


class BatchNorm(Function):
    def forward(self, x, *affine, running_mean, running_var, training: bool, momentum: float, eps: float,
                has_weight: bool, has_bias: bool):
        """(N, C, *), then weight (C,) and bias (C,) where given -> (N, C, *). In training, normalizes by the batch's
        statistics and moves the running ones (if given) towards them, in place; otherwise by the running ones."""
        xp = backend.get_array_module(x)
        axes = (0, *range(2, x.ndim))
        if training:
            x_hat, mean, var, rstd = _standardize(x, axes, eps)
            if running_mean is not None:
                count = x.size // x.shape[1]
                running_mean *= 1 - momentum
                running_mean += (momentum * mean.reshape(-1)).astype(running_mean.dtype, copy=False)
                running_var *= 1 - momentum  # the running variance is the unbiased estimate, as in PyTorch
                running_var += (momentum * count / (count - 1) * var.reshape(-1)).astype(running_var.dtype, copy=False)
        else:
            compute = xp.promote_types(x.dtype, xp.float32)
            rstd = _per_channel(1 / xp.sqrt(running_var.astype(compute) + eps), x.ndim)
            x_hat = (x.astype(compute, copy=False) - _per_channel(running_mean.astype(compute), x.ndim)) * rstd
        weight = affine[0] if has_weight else None
        self.save_for_backward(x_hat, rstd, weight)
        self.training, self.has_bias = training, has_bias
        return _affine(x_hat, weight, affine[-1] if has_bias else None).astype(x.dtype, copy=False)

    def backward(self, grad):
        x_hat, rstd, weight = self.saved_tensors
        grad_x_hat, affine_grads = _affine_grads(self, grad, x_hat, weight)
        grad_x = None
        if self.needs_input_grad[0]:
            axes = (0, *range(2, grad.ndim))
            grad_x = _standardize_backward(grad_x_hat, x_hat, rstd, axes) if self.training else grad_x_hat * rstd
            grad_x = grad_x.astype(grad.dtype, copy=False)
        return grad_x, *affine_grads


class GroupNorm(Function):
    def forward(self, x, *affine, num_groups: int, eps: float, has_weight: bool, has_bias: bool):
        """(N, C, *), then weight (C,) and bias (C,) where given -> (N, C, *), each sample's groups of C / num_groups
        channels normalized on their own."""
        grouped = x.reshape(x.shape[0], num_groups, -1)
        x_hat, _, _, rstd = _standardize(grouped, (2,), eps)
        x_hat = x_hat.reshape(x.shape)
        weight = affine[0] if has_weight else None
        self.save_for_backward(x_hat, rstd, weight)
        self.has_bias = has_bias
        return _affine(x_hat, weight, affine[-1] if has_bias else None).astype(x.dtype, copy=False)

    def backward(self, grad):
        x_hat, rstd, weight = self.saved_tensors
        grad_x_hat, affine_grads = _affine_grads(self, grad, x_hat, weight)
        grad_x = None
        if self.needs_input_grad[0]:
            grouped_shape = (grad.shape[0], rstd.shape[1], -1)
            grad_x = _standardize_backward(grad_x_hat.reshape(grouped_shape), x_hat.reshape(grouped_shape), rstd, (2,))
            grad_x = grad_x.reshape(grad.shape).astype(grad.dtype, copy=False)
        return grad_x, *affine_grads


def _check_channels(op: str, x: Tensor, **params) -> int:
    """The channel count C of an (N, C, *) input, after checking that each given parameter has shape (C,)."""
    if x.ndim < 2:
        raise ValueError(f"{op}: expected an input of shape (N, C, *), got {x.shape}")
    channels = x.shape[1]
    for name, param in params.items():
        if param is not None and tuple(param.shape) != (channels,):
            raise ValueError(f"{op}: {name} of shape {tuple(param.shape)}, expected ({channels},) for the "
                             f"{channels} channels of an input of shape {x.shape}")
    return channels


def batch_norm(x: Tensor, running_mean, running_var, weight: Tensor | None = None, bias: Tensor | None = None,
               training: bool = False, momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    """Normalize each channel of x (N, C, *) over the batch and spatial axes, then scale and shift it per channel,
    as torch.nn.functional.batch_norm. In training the batch's statistics normalize, and running_mean and
    running_var (arrays or Tensors of shape (C,), or None) are updated in place:
    running = (1 - momentum) * running + momentum * batch statistic. Otherwise the running statistics normalize."""
    running_mean, running_var = array_of(running_mean), array_of(running_var)
    channels = _check_channels("batch_norm", x, running_mean=running_mean, running_var=running_var,
                               weight=weight, bias=bias)
    if (running_mean is None) != (running_var is None):
        raise ValueError("batch_norm: give both running_mean and running_var, or neither")
    if not training and running_mean is None:
        raise ValueError("batch_norm: evaluation (training=False) needs running_mean and running_var")
    if training and x.numel() // max(channels, 1) < 2:
        raise ValueError(f"batch_norm: expected more than 1 value per channel when training, got input of shape "
                         f"{x.shape}")
    affine = [param for param in (weight, bias) if param is not None]
    return BatchNorm.apply(x, *affine, running_mean=running_mean, running_var=running_var, training=training,
                           momentum=momentum, eps=eps, has_weight=weight is not None, has_bias=bias is not None)


def group_norm(x: Tensor, num_groups: int, weight: Tensor | None = None, bias: Tensor | None = None,
               eps: float = 1e-5) -> Tensor:
    """Normalize each sample's groups of channels of x (N, C, *), then scale and shift per channel, as
    torch.nn.functional.group_norm."""
    channels = _check_channels("group_norm", x, weight=weight, bias=bias)
    if not isinstance(num_groups, int) or num_groups < 1 or channels % num_groups:
        raise ValueError(f"group_norm: num_groups={num_groups!r} must be a positive int dividing the {channels} "
                         "channels")
    affine = [param for param in (weight, bias) if param is not None]
    return GroupNorm.apply(x, *affine, num_groups=num_groups, eps=eps, has_weight=weight is not None,
                           has_bias=bias is not None)
