"""Layers: Linear, Embedding, LayerNorm, RMSNorm, Dropout, the two transformer MLPs (GELU and gated: SwiGLU, GeGLU),
and the weights laid out for decoding (DecodeLayouts)."""

from __future__ import annotations

import math

import numpy as np

from .. import backend
from .. import functional as F
from ..functional.normalization import layer_norm_study_forward, rms_norm_study_forward
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
        """forward in inference on a few rows of raw arrays (decoding: no graph): the study formula, whose few
        whole-array passes cost less on a handful of rows than the tuned op's blocks and saved statistics."""
        return layer_norm_study_forward(x, self.weight.data, None if self.bias is None else self.bias.data, self.eps)[0]

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
        """forward in inference on a few rows of raw arrays (decoding), as LayerNorm.decode."""
        weight = self.weight.data
        if self.weight_offset:
            weight = weight.astype(backend.compute_dtype(weight.dtype)) + self.weight_offset
        return rms_norm_study_forward(x, weight, self.eps)[0]

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}" + (f", weight_offset={self.weight_offset}" if self.weight_offset else "")


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
        hidden = F.gelu(Tensor(layouts.linear(x, self.c_fc)), approximate=self.approximate).data
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
        hidden = self.gate.out_features
        return layouts.linear(self._gated(Tensor(gate_up[:, :hidden]), Tensor(gate_up[:, hidden:])).data, self.c_proj)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"
