"""Differentiable ops on Tensors, and the Tensor operators and methods built on them.

Users reach them as `import tinytf.nn.functional as F` (like torch.nn.functional), which adds attention; this layer
sits below attention and never imports it.
"""

from __future__ import annotations

from ..tensor import Tensor
from .activation import dropout, erf, gelu, log_softmax, masked_softmax, relu, sigmoid, silu, softmax, swiglu, tanh
from .arithmetic import (
    abs,
    add,
    cast,
    clamp,
    cos,
    div,
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
    where,
)
from .common import sum_to
from .embedding import embedding, one_hot
from .linalg import linear, matmul
from .loss import cross_entropy
from .normalization import layer_norm, rms_norm
from .rotary import apply_rotary, rotary_tables, sinusoidal_table
from .reduction import argmax, logsumexp, max, mean, min, sum, var
from .shape import (
    cat,
    chunk,
    expand,
    flatten,
    getitem,
    permute,
    reshape,
    split,
    squeeze,
    stack,
    swapaxes,
    transpose,
    unsqueeze,
    view,
)


def _reflected(op):
    return lambda self, other: op(other, self)


def _install_tensor_methods() -> None:
    """Give Tensor its operators and PyTorch-style methods (the engine in tensor.py knows none of the ops)."""
    operators = {
        "__add__": add, "__radd__": _reflected(add),
        "__sub__": sub, "__rsub__": _reflected(sub),
        "__mul__": mul, "__rmul__": _reflected(mul),
        "__truediv__": div, "__rtruediv__": _reflected(div),
        "__pow__": pow, "__rpow__": _reflected(pow),
        "__matmul__": matmul, "__rmatmul__": _reflected(matmul),
        "__neg__": neg, "__abs__": abs, "__getitem__": getitem,
        "__eq__": eq, "__ne__": ne, "__lt__": lt, "__le__": le, "__gt__": gt, "__ge__": ge,
    }
    methods = {
        "add": add, "sub": sub, "mul": mul, "div": div, "pow": pow, "neg": neg, "abs": abs, "matmul": matmul,
        "exp": exp, "log": log, "sin": sin, "cos": cos, "sqrt": sqrt, "rsqrt": rsqrt, "tanh": tanh, "sigmoid": sigmoid, "relu": relu,
        "gelu": gelu, "silu": silu, "softmax": softmax, "log_softmax": log_softmax,
        "sum": sum, "mean": mean, "max": max, "min": min, "var": var, "logsumexp": logsumexp, "argmax": argmax,
        "reshape": reshape, "view": view, "flatten": flatten, "transpose": transpose, "permute": permute,
        "swapaxes": swapaxes, "unsqueeze": unsqueeze, "squeeze": squeeze, "expand": expand, "split": split,
        "chunk": chunk, "masked_fill": masked_fill, "clamp": clamp, "maximum": maximum, "minimum": minimum,
        "eq": eq, "ne": ne, "lt": lt, "le": le, "gt": gt, "ge": ge, "to": to, "astype": cast,
    }
    for name, function in {**operators, **methods}.items():
        setattr(Tensor, name, function)
    Tensor.__hash__ = object.__hash__  # defining __eq__ must not make tensors unhashable
    Tensor.T = property(lambda self: permute(self, tuple(reversed(range(self.ndim)))))
    Tensor.float = lambda self: cast(self, "float32")
    Tensor.double = lambda self: cast(self, "float64")
    Tensor.long = lambda self: cast(self, "int64")
    Tensor.cpu = lambda self: to(self, "cpu")
    Tensor.cuda = lambda self, index=0: to(self, f"cuda:{index}")
    Tensor.any = lambda self: Tensor(self.data.any())
    Tensor.all = lambda self: Tensor(self.data.all())


_install_tensor_methods()

__all__ = [
    "abs", "add", "apply_rotary", "argmax", "cast", "cat", "chunk", "clamp", "cos", "cross_entropy", "div", "dropout",
    "embedding", "eq", "erf", "exp", "expand", "flatten", "ge", "gelu", "getitem", "gt", "layer_norm", "le", "linear",
    "log", "log_softmax", "logsumexp", "lt", "masked_fill", "masked_softmax", "matmul", "max", "maximum", "mean", "min",
    "minimum", "mul", "ne", "neg", "one_hot", "permute", "pow", "relu", "reshape", "rms_norm", "rotary_tables",
    "rsqrt", "sigmoid", "silu", "sin", "sinusoidal_table", "softmax", "split", "sqrt", "squeeze", "stack", "sub",
    "sum", "sum_to", "swapaxes", "swiglu", "tanh", "to", "transpose", "unsqueeze", "var", "view", "where",
]
