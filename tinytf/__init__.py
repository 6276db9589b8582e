"""tinytf: a small deep-learning framework on NumPy (CPU) and CuPy (GPU), written to be read.

    backend -> tensor (autograd engine) -> functional (ops) -> attention -> nn (modules) -> models -> interop,
    training, sampling, CLI

`import tinytf` loads the engine and the ops; tinytf.nn, tinytf.optim, tinytf.models and the other subpackages load
on first use (PEP 562), as attributes, the way `import torch` gives torch.nn and torch.optim.
"""

import importlib

import numpy as np

from . import backend, functional
from .backend import finfo, is_available, manual_seed
from .creation import (
    arange,
    eye,
    full,
    full_like,
    linspace,
    ones,
    ones_like,
    rand,
    rand_like,
    randn,
    randn_like,
    tensor,
    tril_indices,
    triu_indices,
    zeros,
    zeros_like,
)
from .functional import cat, chunk, einsum, matmul, maximum, meshgrid, minimum, split, stack, where
from .tensor import Function, Tensor, enable_grad, is_grad_enabled, no_grad
from .threads import get_num_threads, set_num_threads

float16, float32, float64 = np.dtype("float16"), np.dtype("float32"), np.dtype("float64")
half = float16  # PyTorch's other name; `bfloat16` (ml_dtypes.bfloat16 as a NumPy dtype) is made on first use
int32, int64, bool_ = np.dtype("int32"), np.dtype("int64"), np.dtype("bool")

__version__ = "0.1.0"

_SUBMODULES = ("attention", "checkpoint", "data", "distributed", "interop", "kernels", "models", "nn", "optim",
               "testing")


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name == "bfloat16":  # importing ml_dtypes costs about a second: only for those who ask
        return backend.BFLOAT16
    raise AttributeError(f"module 'tinytf' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_SUBMODULES, "bfloat16"])
