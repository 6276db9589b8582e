"""tinytf: a small deep-learning framework on NumPy (CPU) and CuPy (GPU), written to be read.

    backend -> tensor (autograd engine) -> functional (ops) -> nn (modules) -> models -> training, sampling, CLI
"""

import numpy as np

from . import backend, functional
from .backend import is_available, manual_seed
from .creation import (
    arange,
    full,
    full_like,
    ones,
    ones_like,
    rand,
    rand_like,
    randn,
    randn_like,
    tensor,
    zeros,
    zeros_like,
)
from .functional import cat, chunk, matmul, maximum, minimum, split, stack, where
from .tensor import Function, Tensor, enable_grad, is_grad_enabled, no_grad

float16, float32, float64 = np.dtype("float16"), np.dtype("float32"), np.dtype("float64")
int32, int64, bool_ = np.dtype("int32"), np.dtype("int64"), np.dtype("bool")

__version__ = "0.1.0"
