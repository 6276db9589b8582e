"""Activations, softmax and dropout: each forward beside its hand-derived backward. The floating activations of
integer or bool tensors compute in the default float dtype (common.floating); at a kink, the gradient is PyTorch's.

GELUTanh, SiLU, SwiGLU and Dropout run on the widest activations of a transformer, so they are tuned: each pass is
one fused elementwise expression (expression.ElementwiseExpression: cache-blocked in-place ufunc chains on NumPy, one
kernel on CuPy). Study versions: the textbook formulas on plain arrays stand just above the ops they explain,
`gelu_tanh_study_forward` / `_backward` above GELUTanh and `silu_study_forward` / `_backward` above SiLU (SwiGLU is
silu(gate) * up); the tests hold the tuned ops to them.
"""

from __future__ import annotations

import math

import numpy as np

from .. import backend
from ..tensor import Function, Tensor
from .common import (
    canonical_axes,
    computes_in_float32,
    floating,
    map_row_blocks,
    normalize_axis,
    row_sum_vector,
    stable_max,
)
from .expression import ElementwiseExpression


@computes_in_float32
class Tanh(Function):
    def forward(self, a):
        out = backend.get_array_module(a).tanh(a)
        self.save_for_backward(out)
        return out

    def backward(self, grad):
        (out,) = self.saved_tensors
        return grad * (1 - out * out)


@computes_in_float32
class Sigmoid(Function):
    def forward(self, a):
        out = sigmoid_array(a)
        self.save_for_backward(out)
        return out

    def backward(self, grad):
        (out,) = self.saved_tensors
        return grad * out * (1 - out)


class ReLU(Function):
    def forward(self, a):
        self.save_for_backward(a > 0)
        return backend.get_array_module(a).maximum(a, 0)

    def backward(self, grad):
        (positive,) = self.saved_tensors
        return grad * positive


_GELU_C = math.sqrt(2 / math.pi)
_GELU_K = 0.044715


def gelu_tanh_study_forward(x):
    """GELU in its tanh form, as the formula reads: x/2 (1 + tanh(c (x + k x^3))), c = sqrt(2/pi), k = 0.044715."""
    xp = backend.get_array_module(x)
    return 0.5 * x * (1 + xp.tanh(_GELU_C * (x + _GELU_K * x**3)))


def gelu_tanh_study_backward(grad, x):
    """dL/dx = grad * gelu'(x), with gelu'(x) = (1 + t)/2 + x/2 (1 - t^2) c (1 + 3k x^2), t = tanh(c (x + k x^3))."""
    xp = backend.get_array_module(x)
    t = xp.tanh(_GELU_C * (x + _GELU_K * x**3))
    return grad * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * _GELU_C * (1 + 3 * _GELU_K * x * x))


# The tuned forms of the study formulas, written in the order that costs fewest passes over a block: an operation
# whose operand is already in a buffer updates that buffer in place (see expression.py).
GELU_TANH_FORWARD = ElementwiseExpression("gelu_tanh_forward", """
    t = tanh(x * (c + c * k * x * x))
    y = (1 + t) * x * 0.5
""", inputs=("x",), outputs=("y", "t"), constants=dict(c=_GELU_C, k=_GELU_K))
# gelu'(x) = (1/2 + u (1 - t)) (1 + t), u = x c (1 + 3k x^2) / 2: one scratch buffer, for (1 - t) and then (1 + t)
GELU_TANH_BACKWARD = ElementwiseExpression("gelu_tanh_backward",
                                           "dx = ((x * x * (1.5 * c * k) + 0.5 * c) * x * (1 - t) + 0.5) * (1 + t) * g",
                                           inputs=("x", "t", "g"), outputs=("dx",),
                                           constants=dict(c=_GELU_C, k=_GELU_K))


@computes_in_float32
class GELUTanh(Function):
    """GELU with the tanh approximation (GPT-2's "gelu_new"), tuned; the formula is gelu_tanh_study_forward and
    gelu_tanh_study_backward.

    Optimisations, for the (B, T, 4C) activations it runs on: one fused expression each way (GELU_TANH_FORWARD,
    GELU_TANH_BACKWARD: cache-blocked in-place ufunc chains on NumPy, one kernel on CuPy); t = tanh(...) kept from
    forward, so backward computes no tanh; the derivative factored to (1 + t) (1/2 + u (1 - t)) with
    u = x c (1 + 3k x^2) / 2, fewer passes than the study form.
    """

    def forward(self, a):
        out, t = GELU_TANH_FORWARD(a)
        self.save_for_backward(a, t)
        return out

    def backward(self, grad):
        x, t = self.saved_tensors
        return GELU_TANH_BACKWARD(x, t, grad)


def erf_series(x):
    """The error function to float64 accuracy on NumPy or CuPy arrays: the study version of `erf`.

    erf(x) = 2/sqrt(pi) e^(-x^2) sum_n 2^n x^(2n+1) / (1*3*...*(2n+1)): every term is positive, so there is no
    cancellation; 100 terms reach double precision for |x| <= 6, and beyond that erf is +-1 in float64.
    """
    xp = backend.get_array_module(x)
    clipped = xp.clip(x.astype("float64"), -6.0, 6.0)
    twice_square = 2 * clipped * clipped
    series = xp.ones_like(clipped)
    for n in range(100, 0, -1):  # Horner form, innermost term first
        series = 1 + twice_square / (2 * n + 1) * series
    dtype = x.dtype if backend.is_floating(x.dtype) else backend.DEFAULT_DTYPE  # erf of integers is floating
    return (2 / math.sqrt(math.pi) * xp.exp(-clipped * clipped) * clipped * series).astype(dtype)


def _chebyshev_fit(function, lo: float, hi: float, degree: int) -> np.ndarray:
    """The coefficients c_k of sum_k c_k T_k(s), s = (2 v - lo - hi) / (hi - lo), fitted to function(v) on [lo, hi]
    by least squares at 4 * degree Chebyshev nodes (close to the minimax polynomial of that degree)."""
    nodes = np.cos(np.pi * (np.arange(4 * degree) + 0.5) / (4 * degree))
    values = [function((node + 1) / 2 * (hi - lo) + lo) for node in nodes]
    return np.polynomial.chebyshev.chebfit(nodes, values, degree)


def _clenshaw_source(coefficients, s: str, result: str) -> str:
    """Statements of the expression language that set `result` to sum_k c_k T_k(s) by Clenshaw's recurrence
    b_k = 2 s b_(k+1) - b_(k+2) + c_k, result = s b_1 - b_2 + c_0 (locals b_odd, b_even)."""
    c = [repr(float(value)) for value in coefficients]
    n = len(c) - 1
    names = ("b_even", "b_odd")  # b_k lives in names[k % 2], where b_(k+2) was
    lines = [f"{names[n % 2]} = {c[n]} + 0 * {s}", f"{names[(n - 1) % 2]} = 2 * {s} * {names[n % 2]} + {c[n - 1]}"]
    for k in range(n - 2, 0, -1):
        lines.append(f"{names[k % 2]} = 2 * {s} * {names[(k + 1) % 2]} - {names[k % 2]} + {c[k]}")
    lines.append(f"{result} = {s} * {names[1]} - {names[0]} + {c[0]}")
    return "\n".join(lines)


def _erf_expression(dtype, inner_degree: int, outer_degree: int, cutoff: float) -> ElementwiseExpression:
    """erf as one fused expression for `dtype` and inputs z in [-cutoff, cutoff] (erf rounds to +-1 beyond, its
    complement below the dtype's resolution of 1): erf(a) = a P(a^2) for a = |z| <= 1 and 1 - e^(-a^2) Q(1/a) for
    1 < a <= cutoff. P and Q are Chebyshev series
    fitted to Python's math.erf and math.erfc once, here, at the degrees the dtype needs (float64: 10 and 24, max
    error 7e-16; float32: 6 and 12, 9e-8, measured against math.erf in tests/functional/test_activation.py)."""
    inner = _chebyshev_fit(lambda u: math.erf(math.sqrt(u)) / math.sqrt(u) if u else 2 / math.sqrt(math.pi),
                           0.0, 1.0, inner_degree)
    lo = 1 / cutoff
    outer = _chebyshev_fit(lambda t: math.erfc(1 / t) * math.exp(1 / (t * t)), lo, 1.0, outer_degree)
    source = "\n".join([
        "a = abs(z)",
        "square = a * a",
        "s = 2 * square - 1",
        _clenshaw_source(inner, "s", "p"),
        "near = a * p",
        "t = 1 / (a + (a < 1) * (1 - a))",  # 1/a where a >= 1, and 1 (unused) below: no division by zero
        f"s = t * {2 / (1 - lo)!r} - {(1 + lo) / (1 - lo)!r}",
        _clenshaw_source(outer, "s", "q"),
        "far = 1 - exp(-square) * q",
        "w = a <= 1",
        "e = ((z >= 0) * 2 - 1) * (w * near + (1 - w) * far)",
    ])
    return ElementwiseExpression(f"erf_{np.dtype(dtype).name}", source, inputs=("z",), outputs=("e",))


_ERF_CUTOFFS = {np.dtype(np.float64): 6.0, np.dtype(np.float32): 4.0}
_ERF = {np.dtype(np.float64): _erf_expression(np.float64, 10, 24, _ERF_CUTOFFS[np.dtype(np.float64)]),
        np.dtype(np.float32): _erf_expression(np.float32, 6, 12, _ERF_CUTOFFS[np.dtype(np.float32)])}


def erf(x):
    """The error function of a NumPy or CuPy array (NumPy itself has none), tuned; the study version is erf_series.

    One fused expression (_erf_expression: two Chebyshev series, evaluated by Clenshaw's recurrence, cache-blocked on
    NumPy, one kernel on CuPy) in float64 for float64 input and in float32 otherwise (half precision computes in
    float32; integers give the default float dtype). About 10x fewer passes than the 100-term series.
    """
    dtype = x.dtype if backend.is_floating(x.dtype) else backend.DEFAULT_DTYPE
    work = np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)
    cutoff = _ERF_CUTOFFS[work]
    clipped = backend.get_array_module(x).clip(x.astype(work), -cutoff, cutoff)  # +-inf too; NaN stays NaN
    return _ERF[work](clipped).astype(dtype, copy=False)


@computes_in_float32
class GELUErf(Function):
    """Exact GELU: x Phi(x), with Phi the standard normal CDF."""

    def forward(self, a):
        cdf = 0.5 * (1 + erf(a / math.sqrt(2)))
        self.save_for_backward(a, cdf)
        return a * cdf

    def backward(self, grad):
        a, cdf = self.saved_tensors
        pdf = backend.get_array_module(a).exp(-0.5 * a * a) / math.sqrt(2 * math.pi)
        return grad * (cdf + a * pdf)


def silu_study_forward(x):
    """SiLU (swish) as the formula reads: x sigmoid(x) = x / (1 + e^-x)."""
    return x / (1 + backend.get_array_module(x).exp(-x))


def silu_study_backward(grad, x):
    """dL/dx = grad * silu'(x), with silu'(x) = s + x s (1 - s), s = sigmoid(x) = 1 / (1 + e^-x)."""
    s = 1 / (1 + backend.get_array_module(x).exp(-x))
    return grad * (s + x * s * (1 - s))


# sigmoid(x) = (1 + tanh(x/2)) / 2: one transcendental ufunc, and no overflow of e^-x for x << 0
SILU_FORWARD = ElementwiseExpression("silu_forward", """
    s = tanh(x * 0.5) * 0.5 + 0.5
    y = x * s
""", inputs=("x",), outputs=("y", "s"))
# silu'(x) = s + x s (1 - s) = s (1 + x (1 - s)), given s = sigmoid(x)
SILU_BACKWARD = ElementwiseExpression("silu_backward", "dx = ((1 - s) * x + 1) * s * g",
                                      inputs=("x", "s", "g"), outputs=("dx",))


@computes_in_float32
class SiLU(Function):
    """x sigmoid(x) (swish), tuned like GELUTanh (Llama's MLP runs it on (B, T, hidden)); the formula is
    silu_study_forward and silu_study_backward.

    Optimisations: one fused expression each way (SILU_FORWARD, SILU_BACKWARD); sigmoid(x) kept from forward for
    the backward; sigmoid as (1 + tanh(x/2))/2, one ufunc that never overflows.
    """

    def forward(self, a):
        out, s = SILU_FORWARD(a)
        self.save_for_backward(a, s)
        return out

    def backward(self, grad):
        x, s = self.saved_tensors
        return SILU_BACKWARD(x, s, grad)


def _sigmoid_into(x, out) -> None:
    """out = sigmoid(x) = (1 + tanh(x/2))/2, which never overflows, unlike 1/(1+e^-x) for x << 0."""
    xp = backend.get_array_module(x)
    xp.multiply(x, 0.5, out=out)
    xp.tanh(out, out=out)
    out *= 0.5
    out += 0.5


def sigmoid_array(x):
    """sigmoid(x) as a new array (see _sigmoid_into)."""
    out = backend.get_array_module(x).empty_like(x)
    _sigmoid_into(x, out)
    return out


SWIGLU_FORWARD = ElementwiseExpression("swiglu_forward", """
    s = tanh(a * 0.5) * 0.5 + 0.5
    y = a * s * b
""", inputs=("a", "b"), outputs=("y", "s"))
# d/d up = g silu(a) = g a s;   d/d gate = g up silu'(a). Both in one pass over the blocks, which reads a, s and g
# from memory once: a frozen gate or up (one gradient unused) is rare enough not to deserve a pass of its own.
SWIGLU_BACKWARD = ElementwiseExpression("swiglu_backward", """
    db = a * s * g
    da = ((1 - s) * a + 1) * s * b * g
""", inputs=("a", "b", "s", "g"), outputs=("da", "db"))


@computes_in_float32
class SwiGLU(Function):
    """silu(gate) * up, Llama's gated MLP activation, fused: no (B, T, hidden) array for silu(gate) or its gradient.
    Its study form is silu_study_forward(gate) * up; each pass is one fused expression, as in SiLU."""

    def forward(self, gate, up):
        """(..., hidden), (..., hidden) -> (..., hidden)"""
        out, s = SWIGLU_FORWARD(gate, up)
        self.save_for_backward(gate, up, s)
        return out

    def backward(self, grad):
        grad_gate, grad_up = SWIGLU_BACKWARD(*self.saved_tensors, grad)
        return (grad_gate if self.needs_input_grad[0] else None, grad_up if self.needs_input_grad[1] else None)


@computes_in_float32
class Softplus(Function):
    def forward(self, a, beta: float, threshold: float):
        """(...) -> (...): log(1 + e^(beta a)) / beta, and a itself where beta a > threshold (PyTorch's cut-off)"""
        xp = backend.get_array_module(a)
        scaled = a * beta
        self.save_for_backward(scaled)
        self.threshold = threshold
        # logaddexp(0, s) = log(1 + e^s) without overflowing e^s
        return xp.where(scaled > threshold, a, xp.logaddexp(0, scaled) / beta)

    def backward(self, grad):
        (scaled,) = self.saved_tensors
        # d/da log(1 + e^(beta a)) / beta = sigmoid(beta a); 1 on the linear side
        return grad * backend.get_array_module(scaled).where(scaled > self.threshold, 1, sigmoid_array(scaled))


@computes_in_float32
class ELU(Function):
    def forward(self, a, alpha: float, scale: float):
        """(...) -> (...): scale * (a for a > 0, alpha (e^a - 1) for a <= 0); SELU is ELU with fixed alpha, scale"""
        xp = backend.get_array_module(a)
        positive = a > 0
        negative_side = alpha * xp.expm1(xp.minimum(a, 0))  # minimum: no e^a overflow where the value is unused
        self.save_for_backward(positive, negative_side)
        self.alpha, self.scale = alpha, scale
        return scale * xp.where(positive, a, negative_side)

    def backward(self, grad):
        positive, negative_side = self.saved_tensors
        # d/da = scale for a > 0, scale alpha e^a = scale (negative_side + alpha) for a <= 0 (PyTorch's side at 0)
        slope = backend.get_array_module(positive).where(positive, 1, negative_side + self.alpha)
        return grad * (self.scale * slope)


class LeakyReLU(Function):
    def forward(self, a, negative_slope: float):
        """(...) -> (...): a for a > 0, negative_slope * a for a <= 0"""
        positive = a > 0
        self.save_for_backward(positive)
        self.negative_slope = negative_slope
        return backend.get_array_module(a).where(positive, a, a * negative_slope)

    def backward(self, grad):
        (positive,) = self.saved_tensors
        # negative_slope at 0, as in PyTorch
        return backend.get_array_module(grad).where(positive, grad, grad * self.negative_slope)


class Hardtanh(Function):
    def forward(self, a, min_val: float, max_val: float):
        """(...) -> (...): a clipped to [min_val, max_val]"""
        self.save_for_backward((a > min_val) & (a < max_val))
        return backend.get_array_module(a).clip(a, min_val, max_val).astype(a.dtype, copy=False)  # as Clamp

    def backward(self, grad):
        (inside,) = self.saved_tensors
        return grad * inside  # zero at the bounds themselves, as in PyTorch


@computes_in_float32
class Hardswish(Function):
    def forward(self, a):
        """(...) -> (...): a relu6(a + 3) / 6, so 0 below -3, a above 3 and a (a + 3) / 6 between"""
        self.save_for_backward(a)
        return a * backend.get_array_module(a).clip(a + 3, 0, 6) / 6

    def backward(self, grad):
        (a,) = self.saved_tensors
        xp = backend.get_array_module(a)
        # d/da = 0 below -3, a/3 + 1/2 on [-3, 3] (both kinks take this side, as in PyTorch), 1 above 3
        return grad * xp.where(a < -3, 0, xp.where(a <= 3, a / 3 + 0.5, 1))


@computes_in_float32
class Mish(Function):
    def forward(self, a):
        """(...) -> (...): a tanh(softplus(a))"""
        xp = backend.get_array_module(a)
        t = xp.tanh(xp.logaddexp(0, a))  # softplus(a) = log(1 + e^a) without overflowing e^a
        self.save_for_backward(a, t)
        return a * t

    def backward(self, grad):
        a, t = self.saved_tensors
        # d/da = t + a (1 - t^2) sigmoid(a), since softplus'(a) = sigmoid(a)
        return grad * (t + a * (1 - t * t) * sigmoid_array(a))


def softmax_rows_into(logits, out, ones):
    """out = softmax of each row of `logits` (..., C) (`out` may be `logits` itself), in place: shift by the row
    maximum (common.stable_max), exp, row sums as one matrix-vector product with `ones` = row_sum_vector(C, ...), scale
    by their reciprocals. Returns the shifts and the row sums of exp(logits - shift), (..., 1) each, from which a
    caller gets log-sum-exp = shift + log(sum). A row of only -inf comes out all zeros."""
    xp = backend.get_array_module(out)
    shift = stable_max(logits, -1)
    xp.subtract(logits, shift, out=out)
    xp.exp(out, out=out)
    total = (out.reshape(-1, out.shape[-1]) @ ones).reshape(shift.shape)  # 2-D: one BLAS call, not one per group
    out *= 1 / xp.where(total > 0, total, 1)
    return shift, total


@computes_in_float32
class Softmax(Function):
    def forward(self, a, axis: int | None, scale: float = 1.0, bias=None):
        """(..., C) -> (..., C): softmax(a * scale + bias) along `axis`, with bias a constant that broadcasts against
        a (0 and -inf for a mask; only with axis -1).

        The rows are cut into groups: one row each without a bias, the last two axes (T, C) with one, so that a
        (T, C) mask applies to every group as it is. Optimisations: each cache-sized block of groups (row_blocks)
        goes through scale, bias, max, exp, sum and normalization, in place with out=, before the next one is read,
        runs of blocks on worker threads (map_row_blocks); row maxima by a halving tree (common.row_max);
        row sums by a matrix-vector product (BLAS, row_sum_vector), in float32 at least (softmax_rows_into).
        """
        xp = backend.get_array_module(a)
        moved = xp.moveaxis(a, axis, -1) if a.ndim else a.reshape(1)
        group_rows = moved.shape[-2] if bias is not None and a.ndim >= 2 else 1
        groups = moved.reshape(-1, group_rows, moved.shape[-1])
        if bias is not None:
            bias = xp.broadcast_to(bias, a.shape).reshape(groups.shape)  # a view for masks that ignore the batch
        out = xp.empty(groups.shape, dtype=a.dtype)
        ones = row_sum_vector(groups.shape[-1], xp.promote_types(a.dtype, xp.float32), xp)

        def softmax_blocks(blocks: list[slice]) -> None:
            for block in blocks:
                logits, ob = groups[block], out[block]
                if scale != 1 or bias is not None:
                    logits = xp.multiply(logits, scale, out=ob)
                    if bias is not None:
                        logits += bias[block]
                softmax_rows_into(logits, ob, ones)  # a fully masked row stays all zeros

        map_row_blocks(softmax_blocks, groups)
        self.axis, self.scale, self.moved_shape, self.input_shape = axis, scale, moved.shape, a.shape
        self.save_for_backward(out)
        return self._unmoved(out)

    def backward(self, grad):
        (probs,) = self.saved_tensors
        xp = backend.get_array_module(probs)
        # dL/da_j = scale * y_j (g_j - sum_k g_k y_k)
        g = (xp.moveaxis(grad, self.axis, -1) if grad.ndim else grad).reshape(probs.shape)
        grad_in = xp.empty_like(probs)

        def backward_blocks(blocks: list[slice]) -> None:
            for block in blocks:
                yb, gb, rb = probs[block], g[block], grad_in[block]
                xp.subtract(gb, xp.einsum("...i,...i->...", gb, yb)[..., None], out=rb)
                rb *= yb
                if self.scale != 1:
                    rb *= self.scale

        map_row_blocks(backward_blocks, probs)
        return self._unmoved(grad_in)

    def _unmoved(self, groups):
        """Groups back to the input's shape and axis order."""
        if len(self.input_shape) <= 1:  # nothing was moved
            return groups.reshape(self.input_shape)
        return backend.get_array_module(groups).moveaxis(groups.reshape(self.moved_shape), -1, self.axis)


@computes_in_float32
class LogSoftmax(Function):
    def forward(self, a, axis: int | None):
        xp = backend.get_array_module(a)
        shifted = a - stable_max(a, axis)
        out = shifted - xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))
        self.save_for_backward(out)
        self.axis = axis
        return out

    def backward(self, grad):
        (out,) = self.saved_tensors
        # dL/da_j = g_j - softmax_j sum_k g_k
        xp = backend.get_array_module(out)
        return grad - xp.exp(out) * grad.sum(axis=self.axis, keepdims=True)


# Inverted dropout: the kept units are scaled now, so evaluation needs no rescaling. The uniform draws r become the
# scaled mask in place, in the same pass that applies it.
DROPOUT_FORWARD = ElementwiseExpression("dropout_forward", """
    r = (r >= p) * scale
    y = x * r
""", inputs=("x",), outputs=("r", "y"), scalars=("p", "scale"))


@computes_in_float32
class Dropout(Function):
    def forward(self, a, p: float, device: str):
        uniform = backend.generator(device).random(a.shape, dtype=a.dtype)
        self.scaled_mask, out = DROPOUT_FORWARD(a, out=(uniform, backend.get_array_module(a).empty_like(a)), p=p,
                                                scale=1 / (1 - p))
        return out

    def backward(self, grad):
        return grad * self.scaled_mask


def tanh(a: Tensor) -> Tensor:
    return Tanh.apply(floating(a))


def sigmoid(a: Tensor) -> Tensor:
    return Sigmoid.apply(floating(a))


def relu(a: Tensor) -> Tensor:
    return ReLU.apply(a)


def gelu(a: Tensor, approximate: str = "none") -> Tensor:
    """GELU; approximate="tanh" is GPT-2's form, "none" the exact erf form (PyTorch's names)."""
    if approximate == "tanh":
        return GELUTanh.apply(floating(a))
    if approximate == "none":
        return GELUErf.apply(floating(a))
    raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")


def silu(a: Tensor) -> Tensor:
    return SiLU.apply(floating(a))


def softplus(a: Tensor, beta: float = 1.0, threshold: float = 20.0) -> Tensor:
    """log(1 + e^(beta a)) / beta, a smooth relu; linear where beta a > threshold."""
    return Softplus.apply(floating(a), beta=beta, threshold=threshold)


def elu(a: Tensor, alpha: float = 1.0) -> Tensor:
    """a for a > 0, alpha (e^a - 1) for a <= 0."""
    return ELU.apply(floating(a), alpha=alpha, scale=1.0)


# SELU's constants (Klambauer et al. 2017), as PyTorch spells them
_SELU_ALPHA = 1.6732632423543772848170429916717
_SELU_SCALE = 1.0507009873554804934193349852946


def selu(a: Tensor) -> Tensor:
    """scale * elu(a, alpha) with the self-normalizing constants alpha ~ 1.6733, scale ~ 1.0507."""
    return ELU.apply(floating(a), alpha=_SELU_ALPHA, scale=_SELU_SCALE)


def leaky_relu(a: Tensor, negative_slope: float = 0.01) -> Tensor:
    """a for a > 0, negative_slope * a for a <= 0."""
    return LeakyReLU.apply(floating(a), negative_slope=negative_slope)


def hardtanh(a: Tensor, min_val: float = -1.0, max_val: float = 1.0) -> Tensor:
    """a clipped to [min_val, max_val]."""
    if min_val > max_val:
        raise ValueError(f"hardtanh: min_val {min_val} is greater than max_val {max_val}")
    return Hardtanh.apply(floating(a), min_val=min_val, max_val=max_val)


def hardswish(a: Tensor) -> Tensor:
    """a relu6(a + 3) / 6 (MobileNetV3)."""
    return Hardswish.apply(floating(a))


def mish(a: Tensor) -> Tensor:
    """a tanh(softplus(a))."""
    return Mish.apply(floating(a))


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up in one fused op (Llama's feed-forward); gate and up have the same shape."""
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate of shape {gate.shape} and up of shape {up.shape} must have the same shape")
    return SwiGLU.apply(gate, up)


def _single_axis(op: str, a: Tensor, axis, dim) -> int | None:
    """The one axis a softmax normalizes over (default the last), non-negative. A 0-d tensor takes 0 and -1, as in
    PyTorch, and gets None: its single element is a whole row (reductions over axis None cover it)."""
    axis, _ = normalize_axis(axis, dim)
    if axis is None:
        axis = -1
    if not isinstance(axis, (int, np.integer)):
        raise TypeError(f"{op}: dim must be one integer, got {axis!r}")
    axes = canonical_axes(axis, a.ndim, op)
    return axes[0] if axes else None


def softmax(a: Tensor, axis: int | None = None, dim: int | None = None) -> Tensor:
    """exp(a) / sum(exp(a)) along one axis (default the last), stable for large logits and -inf."""
    return Softmax.apply(floating(a), axis=_single_axis("softmax", a, axis, dim))


def masked_softmax(a: Tensor, keep=None, scale: float = 1.0) -> Tensor:
    """softmax(a * scale) along the last axis in one fused op, with probability 0 wherever the boolean `keep`
    (broadcastable to a; True = attend) is False. A row with nothing kept is all zeros. Attention's scores path."""
    if a.ndim == 0:
        raise ValueError("masked_softmax: needs at least one dimension")
    bias = None
    if keep is not None:
        xp = backend.get_array_module(a.data)
        keep = keep.data if isinstance(keep, Tensor) else backend.to_device(keep, a.device)
        if keep.dtype != bool:
            raise TypeError(f"masked_softmax: keep must be a boolean mask, got dtype {keep.dtype}")
        try:
            if np.broadcast_shapes(keep.shape, a.shape) != a.shape:
                raise ValueError
        except ValueError:
            raise ValueError(f"masked_softmax: mask of shape {keep.shape} does not broadcast to {a.shape}") from None
        with backend.device_scope(a.device):
            bias = xp.where(keep, a.dtype.type(0), a.dtype.type(float("-inf")))
    return Softmax.apply(a, axis=-1, scale=float(scale), bias=bias)


def log_softmax(a: Tensor, axis: int | None = None, dim: int | None = None) -> Tensor:
    return LogSoftmax.apply(floating(a), axis=_single_axis("log_softmax", a, axis, dim))


def dropout(a: Tensor, p: float = 0.5, training: bool = True) -> Tensor:
    """Zero each element with probability p and scale the rest by 1/(1-p); the identity when not training."""
    if not 0 <= p < 1:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    if not training or p == 0:
        return a
    return Dropout.apply(a, p=p, device=a.device)
