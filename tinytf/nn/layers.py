"""Layers: Linear, Embedding, LayerNorm, RMSNorm, Dropout, the two transformer MLPs (GELU and gated: SwiGLU, GeGLU),
the weights laid out for decoding (DecodeLayouts), and decoding's norms and activations on raw arrays
(decode_layer_norm, decode_rms_norm, decode_gelu_tanh, decode_swiglu)."""

from __future__ import annotations

import functools
import math

import numpy as np

from .. import backend
from .. import functional as F
from ..functional.activation import GELU_TANH_FORWARD
from ..functional.common import row_sum_vector
from ..tensor import Tensor
from .module import Module, Parameter, init_skipped


def uniform_parameter(shape, bound: float) -> Parameter:
    """A float32 Parameter drawn from U(-bound, bound) with the seeded CPU generator (empty under skip_init)."""
    if init_skipped():
        return Parameter(np.empty(shape, dtype=np.float32))
    draws = backend.generator("cpu").random(shape, dtype=np.float32)
    return Parameter((draws * 2 - 1) * np.float32(bound))


class Linear(Module):
    """y = x W^T + b, W of shape (out_features, in_features); PyTorch's init U(-1/sqrt(in), 1/sqrt(in))."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        bound = 1 / math.sqrt(in_features)
        self.weight = uniform_parameter((out_features, in_features), bound)
        self.bias = uniform_parameter((out_features,), bound) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class DecodeLayouts:
    """The weights of Linear layers laid out for decoding, each built on first use and kept for one generation.

    A decoding step multiplies a few rows (one token per sequence) by every weight W (out, in). On the transposed view
    that x W^T reads, BLAS runs several times slower for 8 rows than on a contiguous (in, out) copy (bench/NOTES.md,
    "Decoding"), so the copy is made once per generation: it never outlives a weight update between generations
    (an optimizer step, load_state_dict). Linears that read the same input (SwiGLU's gate and up) share one layout,
    their weights side by side, so one GEMM computes them all.
    """

    def __init__(self):
        self._layouts = {}

    def linear(self, x, *linears: Linear):
        """x (N, in) -> the linears' outputs side by side (N, sum of out) in x's dtype, on raw arrays (no graph);
        computed as F.linear does, in float32 for half precision."""
        layout = self._layouts.get(linears)
        if layout is None:
            layout = self._layouts[linears] = _stacked_layout(linears)
        weight_t, bias = layout
        out = x.astype(weight_t.dtype, copy=False) @ weight_t
        if bias is not None:
            out += bias
        return out.astype(x.dtype, copy=False)


def _stacked_layout(linears) -> tuple:
    """(W^T, b): the weights transposed side by side, one C-contiguous (in, sum of out) array, and the biases
    concatenated (None without biases), both in the compute dtype."""
    weight = linears[0].weight
    xp = backend.get_array_module(weight.data)
    compute = backend.compute_dtype(weight.dtype)
    with backend.device_scope(weight.device):
        weight_t = xp.concatenate([linear.weight.data.T for linear in linears], axis=1).astype(compute, copy=False)
        if linears[0].bias is None:
            return weight_t, None
        return weight_t, xp.concatenate([linear.bias.data for linear in linears]).astype(compute, copy=False)


class Embedding(Module):
    """A table of `num_embeddings` vectors of size `embedding_dim`, looked up by integer id; init N(0, 1)."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        shape = (num_embeddings, embedding_dim)
        self.weight = Parameter(np.empty(shape, dtype=np.float32) if init_skipped()
                                else backend.generator("cpu").standard_normal(shape, dtype=np.float32))

    def forward(self, ids) -> Tensor:
        return F.embedding(ids, self.weight)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


class LayerNorm(Module):
    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = Parameter(np.ones(dim, dtype=np.float32))
        self.bias = Parameter(np.zeros(dim, dtype=np.float32)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.dim, self.weight, self.bias, self.eps)

    def decode(self, x):
        """forward in inference on a few rows of raw arrays (decoding: no graph): decode_layer_norm."""
        return decode_layer_norm(x, self.weight.data, None if self.bias is None else self.bias.data, self.eps)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, bias={self.bias is not None}"


class RMSNorm(Module):
    """x / rms(x) * (weight_offset + weight). Llama's weight_offset is 0; Gemma's is 1, its weights stored as the
    difference from 1 (they start at 0)."""

    def __init__(self, dim: int, eps: float = 1e-6, weight_offset: float = 0.0):
        super().__init__()
        self.dim, self.eps, self.weight_offset = dim, eps, weight_offset
        self.weight = Parameter(np.full(dim, 1 - weight_offset, dtype=np.float32))

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight
        if self.weight_offset:  # added in float32 at least, as Gemma does: 1 + w in bfloat16 would round w away
            weight = F.cast(weight, backend.compute_dtype(weight.dtype)) + self.weight_offset
        return F.rms_norm(x, self.dim, weight, self.eps)

    def decode(self, x):
        """forward in inference on a few rows of raw arrays (decoding: no graph): decode_rms_norm."""
        weight = self.weight.data
        if self.weight_offset:
            weight = weight.astype(backend.compute_dtype(weight.dtype)) + self.weight_offset
        return decode_rms_norm(x, weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}" + (f", weight_offset={self.weight_offset}" if self.weight_offset else "")


# The norms and activations for decoding: a few rows (one token per sequence) of raw arrays. On rows this short the
# cost is the number of NumPy calls, not the passes over the data, so these run their op's formula as a handful of
# in-place ufunc calls on one fresh array, and take a row statistic as one matrix product with a cached column of
# 1/C (_mean_column) where mean(axis=-1) is a Python wrapper and two calls: fewer calls than the study versions
# (functional/normalization.py, activation.py; the tests hold them equal) and none of the tuned ops' blocking,
# threads, Tensors or saved statistics, made for training's large batches.


def _in_compute_dtype(x, copy: bool):
    """x in float32 at least, the compute dtype of the norms and activations; a new array with copy=True."""
    xp = backend.get_array_module(x)
    return x.astype(xp.promote_types(x.dtype, xp.float32), copy=copy)


def _row_means(x):
    """The means (N, 1) of the rows of x (N, C), as x @ _mean_column."""
    return x @ _mean_column(x.shape[-1], x.dtype, backend.device_of(x))


@functools.lru_cache(maxsize=None)
def _mean_column(width: int, dtype, device: str):
    """The column (width, 1) of 1/width on `device`, made once per width, dtype and device."""
    return backend.to_device(row_sum_vector(width, dtype, np, scale=1 / width)[:, None], device)


def decode_layer_norm(x, weight=None, bias=None, eps: float = 1e-5):
    """layer_norm_study_forward's y on rows x (N, C): (x - mean) / sqrt(var + eps) * weight + bias, in float32 at
    least; returns a new array of x's dtype."""
    y = _normalized_rows(x, weight, eps, centered=True)
    if bias is not None:
        y += bias
    return y.astype(x.dtype, copy=False)


def decode_rms_norm(x, weight=None, eps: float = 1e-6):
    """rms_norm_study_forward's y on rows x (N, C): x / sqrt(mean(x^2) + eps) * weight, in float32 at least;
    returns a new array of x's dtype."""
    return _normalized_rows(x, weight, eps, centered=False).astype(x.dtype, copy=False)


def _normalized_rows(x, weight, eps: float, centered: bool):
    """A new array of x's rows divided by their root mean square (after subtracting their means when centered:
    then that is the standard deviation) plus eps, times weight, in the compute dtype."""
    xp = backend.get_array_module(x)
    y = _in_compute_dtype(x, copy=True)
    if centered:
        y -= _row_means(y)
    scale = _row_means(y * y)
    scale += eps
    xp.sqrt(scale, out=scale)
    y /= scale
    if weight is not None:
        y *= weight
    return y


def decode_gelu_tanh(x):
    """GELU_TANH_FORWARD's y = (1 + tanh(x (c + c k x^2))) x / 2 (gelu_tanh_study_forward's formula) on rows x,
    in float32 at least; returns a new array of x's dtype."""
    xp = backend.get_array_module(x)
    x_float = _in_compute_dtype(x, copy=False)
    c, k = GELU_TANH_FORWARD.constants["c"], GELU_TANH_FORWARD.constants["k"]
    y = x_float * x_float
    y *= c * k
    y += c
    y *= x_float
    xp.tanh(y, out=y)
    y += 1
    y *= x_float
    y *= 0.5
    return y.astype(x.dtype, copy=False)


def decode_swiglu(gate, up):
    """SwiGLU's y = gate sigmoid(gate) up with sigmoid(a) = tanh(a/2)/2 + 1/2, as its fused expression computes it
    (silu_study_forward(gate) * up), on rows, in float32 at least; returns a new array of gate's dtype."""
    xp = backend.get_array_module(gate)
    gate_float = _in_compute_dtype(gate, copy=False)
    y = gate_float * 0.5
    xp.tanh(y, out=y)
    y *= 0.5
    y += 0.5
    y *= gate_float
    y *= up
    return y.astype(gate.dtype, copy=False)


class Dropout(Module):
    """Inverted dropout: active in training mode, the identity in evaluation mode."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return F.dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class GELUMLP(Module):
    """The transformer feed-forward block: Linear(C, hidden) -> GELU -> Linear(hidden, C). approximate: "tanh",
    GPT-2's form, or "none", the exact erf form (BERT, BART)."""

    def __init__(self, dim: int, hidden: int, bias: bool = True, dropout: float = 0.0, approximate: str = "tanh"):
        super().__init__()
        self.approximate = approximate
        self.c_fc = Linear(dim, hidden, bias)
        self.c_proj = Linear(hidden, dim, bias)
        self.dropout = Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate)))

    def decode(self, x, layouts: DecodeLayouts):
        """forward in inference on raw arrays (no graph, no dropout): x (N, C) -> (N, C)."""
        hidden = layouts.linear(x, self.c_fc)
        if self.approximate == "tanh":
            hidden = decode_gelu_tanh(hidden)
        else:
            hidden = F.gelu(Tensor(hidden), approximate=self.approximate).data
        return layouts.linear(hidden, self.c_proj)


GATE_ACTIVATIONS = ("silu", "gelu_tanh")


class GatedMLP(Module):
    """The gated feed-forward block: down(act(gate(x)) * up(x)). activation "silu" is Llama's SwiGLU (one fused op),
    "gelu_tanh" Gemma's GeGLU (GELU's tanh form)."""

    def __init__(self, dim: int, hidden: int, bias: bool = False, dropout: float = 0.0, activation: str = "silu"):
        super().__init__()
        if activation not in GATE_ACTIVATIONS:
            raise ValueError(f"GatedMLP: activation must be one of {GATE_ACTIVATIONS}, got {activation!r}")
        self.activation = activation
        self.gate = Linear(dim, hidden, bias)
        self.up = Linear(dim, hidden, bias)
        self.c_proj = Linear(hidden, dim, bias)
        self.dropout = Dropout(dropout)

    def _gated(self, gate: Tensor, up: Tensor) -> Tensor:
        if self.activation == "silu":
            return F.swiglu(gate, up)  # one fused op
        return F.gelu(gate, approximate="tanh") * up

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self._gated(self.gate(x), self.up(x))))

    def decode(self, x, layouts: DecodeLayouts):
        """forward in inference on raw arrays (no graph, no dropout): x (N, C) -> (N, C); gate and up in one GEMM."""
        gate_up = layouts.linear(x, self.gate, self.up)  # (N, 2 * hidden)
        gate, up = gate_up[:, : self.gate.out_features], gate_up[:, self.gate.out_features :]
        hidden = decode_swiglu(gate, up) if self.activation == "silu" else decode_gelu_tanh(gate) * up
        return layouts.linear(hidden, self.c_proj)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"
