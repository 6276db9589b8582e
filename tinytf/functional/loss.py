"""Fused softmax cross-entropy: a stable log-softmax forward and the one-line backward (softmax - onehot) / N."""

from __future__ import annotations

from .. import backend
from ..tensor import Function, Tensor


class CrossEntropy(Function):
    def forward(self, logits, targets, ignore_index: int, reduction: str):
        """(N, C) logits, (N,) class ids -> () for "mean"/"sum", (N,) for "none"."""
        xp = backend.get_array_module(logits)
        rows = xp.arange(logits.shape[0])
        kept = targets != ignore_index
        safe_targets = xp.where(kept, targets, 0)
        shifted = logits - logits.max(axis=-1, keepdims=True)
        probs = xp.exp(shifted)
        total = probs.sum(axis=-1, keepdims=True)
        probs /= total
        # -log softmax(logits)[t] = log(sum exp(shifted)) - shifted[t]
        losses = (xp.log(total[:, 0]) - shifted[rows, safe_targets]) * kept
        self.count = int(kept.sum()) if reduction == "mean" else 1
        self.save_for_backward(probs, safe_targets, kept)
        self.reduction = reduction
        if reduction == "none":
            return losses
        total_loss = losses.sum()
        return total_loss / max(self.count, 1) if reduction == "mean" else total_loss

    def backward(self, grad):
        probs, targets, kept = self.saved_tensors
        xp = backend.get_array_module(probs)
        # d loss_i / d logits_i = softmax_i - onehot(t_i): subtract 1 at the target instead of building the one-hot.
        scale = (grad / max(self.count, 1)) * kept if self.reduction != "none" else grad * kept
        grad_logits = probs * scale.astype(probs.dtype)[:, None]
        grad_logits[xp.arange(probs.shape[0]), targets] -= scale.astype(probs.dtype)
        return grad_logits, None


def cross_entropy(logits: Tensor, targets: Tensor, ignore_index: int = -100, reduction: str = "mean") -> Tensor:
    """Softmax cross-entropy of logits (..., C) against integer class ids (...).

    Targets equal to `ignore_index` add nothing, and "mean" averages over the others only.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"cross_entropy: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    target_data = targets.data if isinstance(targets, Tensor) else targets
    xp = backend.get_array_module(logits.data)
    target_data = backend.to_device(target_data, logits.device)
    if target_data.dtype.kind not in "iu":
        raise TypeError(f"cross_entropy: targets must be integer class ids, got dtype {target_data.dtype}")
    if logits.ndim < 1 or logits.shape[:-1] != target_data.shape:
        raise ValueError(
            f"cross_entropy: logits of shape {logits.shape} need targets of shape {logits.shape[:-1]}, "
            f"got {target_data.shape}"
        )
    num_classes = logits.shape[-1]
    with backend.device_scope(logits.device):  # the targets are checked where they are
        bad = ((target_data < 0) | (target_data >= num_classes)) & (target_data != ignore_index)
        if bool(bad.any()):
            first = int(target_data[bad].ravel()[0])
            raise IndexError(f"cross_entropy: target {first} is out of range for {num_classes} classes")
    flat_logits = logits.reshape(-1, num_classes)
    loss = CrossEntropy.apply(flat_logits, Tensor(target_data.reshape(-1)), ignore_index=ignore_index,
                              reduction=reduction)
    return loss.reshape(target_data.shape) if reduction == "none" else loss
