"""Differentiable ops on Tensors, and the Tensor operators and methods built on them.

Users reach them as `import tinytf.nn.functional as F` (like torch.nn.functional), which adds attention; this layer
sits below attention and never imports it.
"""

from __future__ import annotations

from ..tensor import Tensor
from .activation import (
    dropout,
    elu,
    erf,
    gelu,
    hardswish,
    hardtanh,
    leaky_relu,
    log_softmax,
    masked_softmax,
    mish,
    relu,
    selu,
    sigmoid,
    silu,
    softmax,
    softplus,
    swiglu,
    tanh,
)
from .arithmetic import (
    abs,
    add,
    cast,
    clamp,
    cos,
    eq,
    exp,
    ge,
    gt,
    le,
    log,
    lt,
    masked_fill,
    maximum,
    minimum,
    mul,
    ne,
    neg,
    pow,
    rsqrt,
    sin,
    sqrt,
    sub,
    to,
    true_divide,
    where,
)
from .common import sum_to
from .convolution import conv1d, conv2d, conv_transpose2d
from .embedding import embedding, one_hot
from .indexing import (
    gather,
    index_add,
    index_select,
    masked_select,
    nonzero,
    scatter,
    scatter_add,
    scatter_reduce,
    take_along_dim,
)
from .linalg import einsum, linear, matmul, outer
from .loss import (
    binary_cross_entropy,
    binary_cross_entropy_with_logits,
    cross_entropy,
    huber_loss,
    kl_div,
    l1_loss,
    mse_loss,
    nll_loss,
    smooth_l1_loss,
)
from .normalization import batch_norm, group_norm, layer_norm, rms_norm
from .pointwise import (
    acos,
    asin,
    atan,
    atan2,
    bitwise_and,
    bitwise_left_shift,
    bitwise_not,
    bitwise_or,
    bitwise_right_shift,
    bitwise_xor,
    ceil,
    cosh,
    div,
    exp2,
    expm1,
    floor,
    floor_divide,
    frac,
    isclose,
    isfinite,
    isinf,
    isnan,
    log1p,
    log2,
    log10,
    logical_and,
    logical_not,
    logical_or,
    logical_xor,
    remainder,
    round,
    sign,
    sinh,
    tan,
    trunc,
    trunc_divide,
)
from .pooling import adaptive_avg_pool2d, avg_pool2d, interpolate, max_pool2d
from .reduction import (
    all,
    any,
    argmax,
    argmin,
    logsumexp,
    max,
    mean,
    min,
    norm,
    prod,
    std,
    std_mean,
    sum,
    var,
    var_mean,
)
from .rotary import apply_rotary, rotary_tables, sinusoidal_table
from .scan import cummax, cummin, cumprod, cumsum, logcumsumexp
from .shape import (
    cat,
    chunk,
    diag,
    expand,
    flatten,
    flip,
    getitem,
    meshgrid,
    pad,
    permute,
    repeat,
    repeat_interleave,
    reshape,
    roll,
    split,
    squeeze,
    stack,
    swapaxes,
    tile,
    transpose,
    tril,
    triu,
    unsqueeze,
    view,
)
from .sorting import ValuesIndices, argsort, median, sort, topk


def _reflected(op):
    return lambda self, other: op(other, self)


def _install_tensor_methods() -> None:
    """Give Tensor its operators and PyTorch-style methods (the engine in tensor.py knows none of the ops)."""
    operators = {
        "__add__": add, "__radd__": _reflected(add),
        "__sub__": sub, "__rsub__": _reflected(sub),
        "__mul__": mul, "__rmul__": _reflected(mul),
        "__truediv__": true_divide, "__rtruediv__": _reflected(true_divide),
        "__floordiv__": floor_divide, "__rfloordiv__": _reflected(floor_divide),
        "__mod__": remainder, "__rmod__": _reflected(remainder),
        "__pow__": pow, "__rpow__": _reflected(pow),
        "__matmul__": matmul, "__rmatmul__": _reflected(matmul),
        "__and__": bitwise_and, "__rand__": _reflected(bitwise_and),
        "__or__": bitwise_or, "__ror__": _reflected(bitwise_or),
        "__xor__": bitwise_xor, "__rxor__": _reflected(bitwise_xor),
        "__lshift__": bitwise_left_shift, "__rlshift__": _reflected(bitwise_left_shift),
        "__rshift__": bitwise_right_shift, "__rrshift__": _reflected(bitwise_right_shift),
        "__invert__": bitwise_not,
        "__neg__": neg, "__abs__": abs, "__getitem__": getitem,
        "__eq__": eq, "__ne__": ne, "__lt__": lt, "__le__": le, "__gt__": gt, "__ge__": ge,
    }
    # PyTorch's Tensor methods: each is the op of the same name (first argument: the tensor).
    same_name = [
        add, sub, mul, div, pow, neg, abs, matmul, exp, log, sin, cos, sqrt, rsqrt, tanh, sigmoid, relu, gelu, silu,
        softmax, log_softmax, sum, mean, max, min, var, std, prod, logsumexp, argmax, argmin, any, all, norm, reshape,
        flatten, transpose, permute, unsqueeze, squeeze, expand, split, chunk, masked_fill, clamp,
        maximum, minimum, eq, ne, lt, le, gt, ge, to, floor, ceil, round, trunc, sign, frac, log2, log10, log1p, exp2,
        expm1, tan, sinh, cosh, asin, acos, atan, atan2, isnan, isinf, isfinite, isclose, floor_divide, remainder,
        logical_and, logical_or, logical_xor, logical_not, bitwise_and, bitwise_or, bitwise_xor, bitwise_not,
        bitwise_left_shift, bitwise_right_shift, cumsum, cumprod, cummax, cummin, logcumsumexp, sort, argsort, topk,
        median, gather, scatter, scatter_add, scatter_reduce, index_select, index_add, masked_select, nonzero,
        take_along_dim, roll, repeat, repeat_interleave, tril, triu, diag, outer,
    ]
    methods = {function.__name__: function for function in same_name}
    methods.update({
        "view": view, "swapaxes": swapaxes, "astype": cast,
        "arcsin": asin, "arccos": acos, "arctan": atan, "arctan2": atan2,
        # x.flip(0, 1) and x.tile(2, 3) as well as x.flip((0, 1)) and x.tile((2, 3)), as in PyTorch
        "flip": lambda self, *dims: flip(self, dims[0] if len(dims) == 1 else dims),
        "tile": lambda self, *sizes: tile(self, sizes[0] if len(sizes) == 1 else sizes),
    })
    for name, function in {**operators, **methods}.items():
        setattr(Tensor, name, function)
    Tensor.__hash__ = object.__hash__  # defining __eq__ must not make tensors unhashable
    Tensor.T = property(lambda self: permute(self, tuple(reversed(range(self.ndim)))))
    Tensor.float = lambda self: cast(self, "float32")
    Tensor.double = lambda self: cast(self, "float64")
    Tensor.half = lambda self: cast(self, "float16")
    Tensor.bfloat16 = lambda self: cast(self, "bfloat16")
    Tensor.long = lambda self: cast(self, "int64")
    Tensor.cpu = lambda self: to(self, "cpu")
    Tensor.cuda = lambda self, index=0: to(self, f"cuda:{index}")


_install_tensor_methods()

__all__ = [
    "abs", "acos", "adaptive_avg_pool2d", "add", "all", "any", "apply_rotary", "argmax", "argmin", "argsort", "asin",
    "atan", "atan2", "avg_pool2d", "batch_norm", "binary_cross_entropy", "binary_cross_entropy_with_logits",
    "bitwise_and", "bitwise_left_shift", "bitwise_not", "bitwise_or", "bitwise_right_shift", "bitwise_xor", "cast",
    "cat", "ceil", "chunk", "clamp", "conv1d", "conv2d", "conv_transpose2d", "cos", "cosh", "cross_entropy", "cummax",
    "cummin", "cumprod", "cumsum", "diag", "div", "dropout", "einsum", "elu", "embedding", "eq", "erf", "exp", "exp2",
    "expand", "expm1", "flatten", "flip", "floor", "floor_divide", "frac", "gather", "ge", "gelu", "getitem",
    "group_norm", "gt", "hardswish", "hardtanh", "huber_loss", "index_add", "index_select", "interpolate", "isclose",
    "isfinite", "isinf", "isnan", "kl_div", "l1_loss", "layer_norm", "le", "leaky_relu", "linear", "log", "log10",
    "log1p", "log2", "log_softmax", "logcumsumexp", "logical_and", "logical_not", "logical_or", "logical_xor",
    "logsumexp", "lt", "masked_fill", "masked_select", "masked_softmax", "matmul", "max", "max_pool2d", "maximum",
    "mean", "median", "meshgrid", "min", "minimum", "mish", "mse_loss", "mul", "ne", "neg", "nll_loss", "nonzero",
    "norm", "one_hot", "outer", "pad", "permute", "pow", "prod", "relu", "remainder", "repeat", "repeat_interleave",
    "reshape", "rms_norm", "roll", "rotary_tables", "round", "rsqrt", "scatter", "scatter_add", "scatter_reduce",
    "selu", "sigmoid", "sign", "silu", "sin", "sinh", "sinusoidal_table", "smooth_l1_loss", "softmax", "softplus",
    "sort", "split", "sqrt", "squeeze", "stack", "std", "std_mean", "sub", "sum", "sum_to", "swapaxes", "swiglu",
    "take_along_dim", "tan", "tanh", "tile", "to", "topk", "transpose", "tril", "triu", "true_divide", "trunc",
    "trunc_divide", "unsqueeze", "var", "var_mean", "view", "where", "ValuesIndices",
]
