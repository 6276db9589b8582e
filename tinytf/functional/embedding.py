"""Embedding lookup (a gather whose backward scatters into the rows used) and one-hot encoding."""

from __future__ import annotations

from .. import backend
from ..tensor import Function, Tensor, array_of


# Below this many rows, the table's gradient is one-hot(ids)^T @ grad, a GEMM of 2 V flops per gradient element:
# at ~100 GFLOP/s that beats add.at's ~10 ns per element (measured here: 7x faster for V = 65, N = 768, D = 128 and
# 6x for N = 16384, D = 384) until V reaches several hundred. Character vocabularies and position tables are small.
ONE_HOT_MAX_ROWS = 256
# The one-hot matrix is built this many entries at a time (16 MiB of float32), however many ids there are.
ONE_HOT_CHUNK = 1 << 22


class Embedding(Function):
    def forward(self, weight, ids):
        """(V, D) table, (...) ids -> (..., D)"""
        self.ids = ids
        self.table_shape = weight.shape
        return weight[ids]

    def backward(self, grad):
        xp = backend.get_array_module(grad)
        vocab, dim = self.table_shape
        # Half-precision gradients are summed in float32 (BLAS, and a frequent id's many rows would stop adding up
        # in bfloat16), and rounded once.
        compute = backend.compute_dtype(grad.dtype)
        ids, rows = self.ids.reshape(-1), grad.reshape(-1, dim).astype(compute, copy=False)
        grad_weight = xp.zeros(self.table_shape, dtype=compute)
        # An id used several times gets the sum of its gradients: both ways accumulate repeated ids.
        if vocab > ONE_HOT_MAX_ROWS:
            xp.add.at(grad_weight, ids, rows)
        else:
            table_ids = xp.arange(vocab)[:, None]
            step = max(1, ONE_HOT_CHUNK // vocab)
            for start in range(0, ids.shape[0], step):
                one_hot_transposed = (table_ids == ids[None, start : start + step]).astype(compute)
                grad_weight += one_hot_transposed @ rows[start : start + step]
        return grad_weight.astype(grad.dtype, copy=False)


def _integer_ids(op: str, ids, xp):
    data = ids.data if isinstance(ids, Tensor) else xp.asarray(ids)
    if data.dtype.kind not in "iu":
        raise TypeError(f"{op}: ids must be integers, got dtype {data.dtype}")
    return data


def embedding(ids, weight: Tensor) -> Tensor:
    """Rows of `weight` (num_embeddings, dim) picked by integer `ids` of any shape."""
    xp = backend.get_array_module(weight.data)
    vocab = weight.shape[0]
    with backend.device_scope(weight.device):  # the ids go to, and are checked on, the weight's device
        data = _integer_ids("embedding", ids, xp)
        if data.size:
            low, high = int(data.min()), int(data.max())
            if low < 0 or high >= vocab:
                bad = low if low < 0 else high
                raise IndexError(f"embedding: id {bad} is out of range for a vocabulary of size {vocab}")
    return Embedding.apply(weight, ids=data)


def one_hot(ids, num_classes: int = -1) -> Tensor:
    """int64 tensor (..., num_classes) with a 1 at each id; num_classes=-1 uses max(id) + 1."""
    data = array_of(ids)
    xp = backend.get_array_module(data)
    with backend.device_scope(backend.device_of(data)):
        data = _integer_ids("one_hot", data, xp)
        if num_classes == -1:
            num_classes = int(data.max()) + 1 if data.size else 0
        if data.size and (int(data.min()) < 0 or int(data.max()) >= num_classes):
            raise IndexError(
                f"one_hot: ids must lie in [0, {num_classes}), got range [{int(data.min())}, {int(data.max())}]"
            )
        return Tensor((data[..., None] == xp.arange(num_classes)).astype(xp.int64))
