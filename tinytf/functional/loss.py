"""Losses, with PyTorch's names, arguments and semantics.

Softmax cross-entropy is fused, with a backward derived on paper. Give row i of the logits z a weight q_ic on each
class c (its one-hot target class, times the class weight; smoothing moves a share of it to every class; an
ignored row has q_i = 0). Its loss and gradient are

    l_i = -sum_c q_ic log softmax(z_i)_c,        dl_i / dz_ij = softmax(z_i)_j * sum_c q_ic - q_ij,

which is softmax - onehot in the plain case (integer targets, no weights, no smoothing): the hot path of training.
The other losses are elementwise: a short Function where a stable formula or PyTorch's clamps need one, otherwise
composed from differentiable ops.
"""

from __future__ import annotations

import math

from .. import backend
from ..tensor import Function, Tensor, array_of
from .activation import sigmoid_array, softmax_rows_into
from .arithmetic import minimum, where
from .common import as_tensor, computes_in_float32, map_row_blocks, row_sum_vector

REDUCTIONS = ("mean", "sum", "none")


class RowLoss(Function):
    """A loss per row, then PyTorch's reduction: "none" keeps the rows, "sum" adds them, "mean" divides the sum by a
    denominator (the row count, or the summed weights of the targets)."""

    def reduce(self, losses, reduction: str, denominator: float):
        self.reduction, self.denominator = reduction, denominator
        if reduction == "none":
            return losses
        total = losses.sum()
        if reduction == "sum":
            return total
        if not denominator:  # every target ignored: 0 / 0, nan as in PyTorch
            return backend.get_array_module(losses).full((), math.nan, dtype=losses.dtype)
        return total / denominator

    def row_scale(self, grad):
        """d loss / d (loss of each row): one value for "mean" and "sum", one per row for "none"."""
        if self.reduction == "mean":
            # With nothing kept every row's weight is 0, so any finite scale gives PyTorch's zero gradient.
            return grad / (self.denominator or 1)
        return grad


def _target_class_weights(targets, class_weights, ignore_index: int):
    """Which rows count, their targets with ignored ones replaced by class 0 (so they can index), and each row's
    weight on its target: 1 or class_weights[target], 0 where ignored."""
    xp = backend.get_array_module(targets)
    kept = targets != ignore_index
    safe_targets = xp.where(kept, targets, 0)
    weights = kept if class_weights is None else class_weights[safe_targets] * kept
    return kept, safe_targets, weights


def cross_entropy_study(logits, targets):
    """The mean softmax cross-entropy of (N, C) logits z against (N,) class ids t, and its gradient, as the formulas
    read: l = mean_i (log sum_c exp(z_ic) - z_it) and dl/dz = (softmax(z) - onehot(t)) / N. The reference for
    CrossEntropy's plain case."""
    xp = backend.get_array_module(logits)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probs = shifted - xp.log(xp.exp(shifted).sum(axis=-1, keepdims=True))
    rows = xp.arange(logits.shape[0])
    grad = xp.exp(log_probs)
    grad[rows, targets] -= 1
    return -log_probs[rows, targets].mean(), grad / logits.shape[0]


@computes_in_float32
class CrossEntropy(RowLoss):
    """Softmax cross-entropy against class ids. Tuned: forward runs the softmax of each cache-sized block of rows in
    place (activation.softmax_rows_into: row maxima by a halving tree, row sums by BLAS) and reads log-sum-exp off
    its shifts and sums; backward of the plain case is one scaled copy of the probabilities and a scatter. The
    study version is cross_entropy_study above the class."""

    def forward(self, logits, targets, class_weights, ignore_index: int, label_smoothing: float, reduction: str):
        """(N, C) logits, (N,) class ids, (C,) class weights or None -> () for "mean"/"sum", (N,) for "none"."""
        xp = backend.get_array_module(logits)
        num_classes = logits.shape[1]
        kept, safe_targets, target_weights = _target_class_weights(targets, class_weights, ignore_index)
        probs = xp.empty_like(logits)
        shifts = xp.empty((logits.shape[0], 1), dtype=logits.dtype)
        totals = xp.empty_like(shifts)
        ones = row_sum_vector(num_classes, xp.promote_types(logits.dtype, xp.float32), xp)

        def softmax_blocks(blocks: list[slice]) -> None:
            for block in blocks:
                shifts[block], totals[block] = softmax_rows_into(logits[block], probs[block], ones)

        map_row_blocks(softmax_blocks, logits)
        shifts, log_totals = shifts[:, 0], xp.log(totals[:, 0])
        # -log softmax(logits)[t] = log(sum exp(shifted)) - shifted[t], shifted = logits - shift
        losses = (log_totals - (logits[xp.arange(logits.shape[0]), safe_targets] - shifts)) * target_weights
        if label_smoothing:
            if class_weights is None:
                class_weights = xp.ones(num_classes, dtype=logits.dtype)
            # -sum_c w_c log softmax_c = log(sum exp(shifted)) * sum_c w_c - shifted @ w
            shifted = logits - shifts[:, None]
            spread_losses = (log_totals * class_weights.sum() - shifted @ class_weights) * kept
            losses = (1 - label_smoothing) * losses + (label_smoothing / num_classes) * spread_losses
        self.save_for_backward(probs, safe_targets, target_weights, kept)
        self.class_weights, self.label_smoothing = class_weights, label_smoothing
        denominator = float(target_weights.sum()) if reduction == "mean" else 1.0
        return self.reduce(losses, reduction, denominator)

    def backward(self, grad):
        """dl_i/dz_ij = softmax(z_i)_j * sum_c q_ic - q_ij (the module's docstring), times d loss / d l_i."""
        probs, targets, target_weights, kept = self.saved_tensors
        xp = backend.get_array_module(probs)
        scale = self.row_scale(grad)
        # q_i = (1 - s) w_t onehot(t) + (s / C) w: its one-hot part gives probs * its sum and -q at the target,
        # subtracted there instead of building the one-hot.
        on_target = ((1 - self.label_smoothing) * scale * target_weights).astype(probs.dtype)
        if scale.ndim == 0 and self.class_weights is None and not self.label_smoothing:
            # The plain case: q_i is onehot(t_i) on kept rows, so the gradient is scale * (probs - onehot), one
            # multiplication by a scalar (no column of per-row factors to broadcast) and zeros on ignored rows.
            # A copy, not probs in place: backward may run again (retain_graph).
            grad_logits = xp.multiply(probs, scale.astype(probs.dtype))
            if not bool(kept.all()):
                grad_logits[~kept] = 0
        else:
            grad_logits = probs * on_target[:, None]
        if self.label_smoothing:
            spread = (self.label_smoothing / probs.shape[1] * scale * kept).astype(probs.dtype)
            grad_logits += spread[:, None] * (probs * self.class_weights.sum() - self.class_weights)
        grad_logits[xp.arange(probs.shape[0]), targets] -= on_target
        return grad_logits, None


@computes_in_float32
class CrossEntropyWithProbabilities(RowLoss):
    def forward(self, logits, target_weights, reduction: str):
        """(N, C) logits, (N, C) weights q (class probabilities, smoothed and class-weighted) -> () or (N,)."""
        xp = backend.get_array_module(logits)
        shifted = logits - logits.max(axis=-1, keepdims=True)
        log_probs = shifted - xp.log(xp.exp(shifted).sum(axis=-1, keepdims=True))
        self.save_for_backward(log_probs, target_weights)
        # "mean" divides by the row count even with class weights, as PyTorch does for probability targets.
        return self.reduce(-(target_weights * log_probs).sum(axis=-1), reduction, float(logits.shape[0]))

    def backward(self, grad):
        log_probs, target_weights = self.saved_tensors
        xp = backend.get_array_module(log_probs)
        scale = self.row_scale(grad)[..., None]
        grad_logits = grad_targets = None
        if self.needs_input_grad[0]:
            grad_logits = (xp.exp(log_probs) * target_weights.sum(axis=-1, keepdims=True) - target_weights) * scale
        if self.needs_input_grad[1]:
            grad_targets = -log_probs * scale
        return grad_logits, grad_targets


@computes_in_float32
class NLLLoss(RowLoss):
    def forward(self, log_probs, targets, class_weights, ignore_index: int, reduction: str):
        """(N, C) log-probabilities, (N,) class ids, (C,) class weights or None -> () or (N,)."""
        xp = backend.get_array_module(log_probs)
        _, safe_targets, target_weights = _target_class_weights(targets, class_weights, ignore_index)
        losses = -log_probs[xp.arange(log_probs.shape[0]), safe_targets] * target_weights
        self.save_for_backward(safe_targets, target_weights)
        self.input_shape, self.dtype = log_probs.shape, log_probs.dtype
        denominator = float(target_weights.sum()) if reduction == "mean" else 1.0
        return self.reduce(losses, reduction, denominator)

    def backward(self, grad):
        targets, target_weights = self.saved_tensors
        xp = backend.get_array_module(targets)
        grad_input = xp.zeros(self.input_shape, dtype=self.dtype)
        grad_input[xp.arange(self.input_shape[0]), targets] = -(self.row_scale(grad) * target_weights)
        return grad_input, None


def _clamped_log(a, xp):
    """log(a) floored at -100, PyTorch's guard in binary_cross_entropy, without log(0)'s warning."""
    positive = a > 0
    return xp.where(positive, xp.maximum(xp.log(xp.where(positive, a, 1)), -100), -100)


@computes_in_float32
class BinaryCrossEntropy(Function):
    def forward(self, probs, targets):
        """Probabilities and targets of one shape -> elementwise losses -(t log p + (1 - t) log(1 - p))."""
        xp = backend.get_array_module(probs)
        log_probs, log_complements = _clamped_log(probs, xp), _clamped_log(1 - probs, xp)
        self.save_for_backward(probs, targets, log_probs, log_complements)
        return -(targets * log_probs + (1 - targets) * log_complements)

    def backward(self, grad):
        probs, targets, log_probs, log_complements = self.saved_tensors
        xp = backend.get_array_module(probs)
        grad_probs = grad_targets = None
        if self.needs_input_grad[0]:
            # (p - t) / (p (1 - p)), its denominator kept off 0 by PyTorch's epsilon
            grad_probs = grad * (probs - targets) / xp.maximum(probs * (1 - probs), 1e-12)
        if self.needs_input_grad[1]:
            grad_targets = grad * (log_complements - log_probs)
        return grad_probs, grad_targets


@computes_in_float32
class BinaryCrossEntropyWithLogits(Function):
    def forward(self, logits, targets, pos_weight):
        """Logits and targets of one shape, pos_weight (broadcasting to them) or 1 -> elementwise losses
        (1 - t) x + (1 + (pw - 1) t) softplus(-x)."""
        xp = backend.get_array_module(logits)
        # softplus(-x) = log(1 + e^-x), written so that the exponential never overflows
        softplus_negative = xp.maximum(-logits, 0) + xp.log1p(xp.exp(-xp.abs(logits)))
        self.save_for_backward(logits, targets, softplus_negative)
        self.pos_weight = pos_weight
        return (1 - targets) * logits + (1 + (pos_weight - 1) * targets) * softplus_negative

    def backward(self, grad):
        logits, targets, softplus_negative = self.saved_tensors
        pos_weight = self.pos_weight
        grad_logits = grad_targets = None
        if self.needs_input_grad[0]:
            # d softplus(-x) / dx = sigmoid(x) - 1
            grad_logits = grad * ((1 + (pos_weight - 1) * targets) * sigmoid_array(logits) - pos_weight * targets)
        if self.needs_input_grad[1]:
            grad_targets = grad * ((pos_weight - 1) * softplus_negative - logits)
        return grad_logits, grad_targets


# --- argument checks and layouts ------------------------------------------------------------------------------------


def _check_reduction(op: str, reduction: str, allowed: tuple[str, ...] = REDUCTIONS) -> None:
    if reduction not in allowed:
        raise ValueError(f"{op}: reduction must be one of {', '.join(map(repr, allowed))}, got {reduction!r}")


def _batch_shape(op: str, input: Tensor) -> tuple[int, ...]:
    """The shape of the class-id targets of (C,), (N, C) or (N, C, d1, ...) scores: (), (N,) or (N, d1, ...)."""
    if input.ndim == 0:
        raise ValueError(f"{op}: input must have a class dimension, got a 0-d tensor")
    return input.shape[:1] + input.shape[2:] if input.ndim > 1 else ()


def _num_classes(scores: Tensor) -> int:
    return scores.shape[1 if scores.ndim > 1 else 0]


def _classes_last(scores: Tensor) -> Tensor:
    """(C,), (N, C) or (N, C, d1, ...) -> one row per prediction: (1, C), (N, C) or (N * d1 * ..., C)."""
    if scores.ndim == 1:
        return scores.reshape(1, -1)
    if scores.ndim > 2:
        scores = scores.permute(0, *range(2, scores.ndim), 1).reshape(-1, scores.shape[1])
    return scores


def _checked_class_ids(op: str, input: Tensor, target, ignore_index: int):
    """The target class ids as one flat array on the input's device, after checking dtype, shape and range."""
    ids = backend.to_device(array_of(target), input.device)
    if ids.dtype.kind not in "iu":
        raise TypeError(f"{op}: targets must be integer class ids, got dtype {ids.dtype}")
    expected = _batch_shape(op, input)
    if ids.shape != expected:
        raise ValueError(f"{op}: input of shape {input.shape} needs targets of shape {expected}, got {ids.shape} "
                         "(classes are dimension 1, as in PyTorch)")
    num_classes = _num_classes(input)
    with backend.device_scope(input.device):  # the targets are checked where they are
        bad = ((ids < 0) | (ids >= num_classes)) & (ids != ignore_index)
        if bool(bad.any()):
            first = int(ids[bad].ravel()[0])
            raise IndexError(f"{op}: target {first} is out of range for {num_classes} classes")
        return ids.reshape(-1)


def _constant_like(value, input: Tensor):
    """`value` (a Tensor, array or number) as an array on the input's device in its dtype: a weight, which gets no
    gradient."""
    with backend.device_scope(input.device):
        data = backend.to_device(array_of(value), input.device)
        return data.astype(input.dtype, copy=False)


def _checked_class_weights(op: str, weight, input: Tensor):
    """`weight` as a (C,) array on the input's device in its dtype, or None."""
    if weight is None:
        return None
    values = _constant_like(weight, input)
    num_classes = _num_classes(input)
    if values.shape != (num_classes,):
        raise ValueError(f"{op}: weight must have shape ({num_classes},), one per class, got {values.shape}")
    return values


def _checked_pair(op: str, input: Tensor, target) -> Tensor:
    """`target` as a Tensor on the input's device, of the input's shape (PyTorch only warns; it is usually a bug)."""
    target = as_tensor(target, input)
    if target.shape != input.shape:
        raise ValueError(f"{op}: target of shape {target.shape} does not match the input's shape {input.shape}")
    return target


def _weighted(losses: Tensor, weight) -> Tensor:
    """The losses times `weight` (broadcasting to them), or the losses alone."""
    return losses if weight is None else losses * Tensor(_constant_like(weight, losses))


def _reduce_elements(losses: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return losses
    return losses.mean() if reduction == "mean" else losses.sum()


# --- the losses -----------------------------------------------------------------------------------------------------


def cross_entropy(input: Tensor, target, weight=None, ignore_index: int = -100, reduction: str = "mean",
                  label_smoothing: float = 0.0) -> Tensor:
    """Softmax cross-entropy of logits (N, C), (C,) or (N, C, d1, ...) against class ids (N,), () or (N, d1, ...),
    or against class probabilities of the logits' shape. Returns () for "mean"/"sum", the ids' shape for "none".

    Targets equal to `ignore_index` add nothing; "mean" divides by the summed weights of the other targets (their
    count without `weight`), or by the number of rows for probability targets. `label_smoothing` s mixes each target
    with the uniform distribution: (1 - s) target + s / C.
    """
    _check_reduction("cross_entropy", reduction)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"cross_entropy: label_smoothing must be in [0, 1], got {label_smoothing}")
    batch_shape = _batch_shape("cross_entropy", input)
    logits = _classes_last(input)
    target = target if isinstance(target, Tensor) else Tensor(target)
    if backend.is_floating(target.dtype):
        if ignore_index != -100:
            raise ValueError(f"cross_entropy: ignore_index={ignore_index} needs class ids, "
                             "but the targets are probabilities")
        target = _checked_pair("cross_entropy", input, target)
        target_weights = _classes_last(target)
        if label_smoothing:
            target_weights = target_weights * (1 - label_smoothing) + label_smoothing / _num_classes(input)
        if weight is not None:
            target_weights = target_weights * Tensor(_checked_class_weights("cross_entropy", weight, input))
        loss = CrossEntropyWithProbabilities.apply(logits, target_weights, reduction=reduction)
    else:
        ids = _checked_class_ids("cross_entropy", input, target, ignore_index)
        class_weights = _checked_class_weights("cross_entropy", weight, input)
        loss = CrossEntropy.apply(logits, Tensor(ids), class_weights=class_weights, ignore_index=ignore_index,
                                  label_smoothing=label_smoothing, reduction=reduction)
    return loss.reshape(batch_shape) if reduction == "none" else loss


def nll_loss(input: Tensor, target, weight=None, ignore_index: int = -100, reduction: str = "mean") -> Tensor:
    """Negative log-likelihood of log-probabilities (N, C), (C,) or (N, C, d1, ...) at class ids (N,), () or
    (N, d1, ...): -weight[t] input[t]. Returns () for "mean"/"sum", the ids' shape for "none"; "mean" divides by the
    summed weights of the targets that are not `ignore_index`."""
    _check_reduction("nll_loss", reduction)
    batch_shape = _batch_shape("nll_loss", input)
    ids = _checked_class_ids("nll_loss", input, target, ignore_index)
    class_weights = _checked_class_weights("nll_loss", weight, input)
    loss = NLLLoss.apply(_classes_last(input), Tensor(ids), class_weights=class_weights, ignore_index=ignore_index,
                         reduction=reduction)
    return loss.reshape(batch_shape) if reduction == "none" else loss


def binary_cross_entropy(input: Tensor, target, weight=None, reduction: str = "mean") -> Tensor:
    """-weight (t log p + (1 - t) log(1 - p)) of probabilities p and targets t of one shape, each log floored at -100
    as in PyTorch; `weight` broadcasts to them. Returns () for "mean"/"sum", the input's shape for "none"."""
    _check_reduction("binary_cross_entropy", reduction)
    target = _checked_pair("binary_cross_entropy", input, target)
    with backend.device_scope(input.device):
        if bool(((input.data < 0) | (input.data > 1)).any()):
            raise ValueError("binary_cross_entropy: input must be probabilities in [0, 1]; for logits use "
                             "binary_cross_entropy_with_logits")
    return _reduce_elements(_weighted(BinaryCrossEntropy.apply(input, target), weight), reduction)


def binary_cross_entropy_with_logits(input: Tensor, target, weight=None, reduction: str = "mean",
                                     pos_weight=None) -> Tensor:
    """binary_cross_entropy(sigmoid(input), target), computed stably from the logits; `pos_weight` (broadcasting
    over the last dimension: one per class) scales the positive term. Returns () or the input's shape for "none"."""
    _check_reduction("binary_cross_entropy_with_logits", reduction)
    target = _checked_pair("binary_cross_entropy_with_logits", input, target)
    pos_weight = 1 if pos_weight is None else _constant_like(pos_weight, input)
    losses = BinaryCrossEntropyWithLogits.apply(input, target, pos_weight=pos_weight)
    return _reduce_elements(_weighted(losses, weight), reduction)


def mse_loss(input: Tensor, target, reduction: str = "mean") -> Tensor:
    """(input - target)^2 for two tensors of one shape, reduced."""
    _check_reduction("mse_loss", reduction)
    difference = input - _checked_pair("mse_loss", input, target)
    return _reduce_elements(difference * difference, reduction)


def l1_loss(input: Tensor, target, reduction: str = "mean") -> Tensor:
    """|input - target| for two tensors of one shape, reduced."""
    _check_reduction("l1_loss", reduction)
    return _reduce_elements((input - _checked_pair("l1_loss", input, target)).abs(), reduction)


def _huber(difference: Tensor, delta: float) -> Tensor:
    """0.5 d^2 where |d| < delta, else delta (|d| - delta / 2): quadratic near 0, linear beyond, smooth between.
    With m = min(|d|, delta) both pieces are 0.5 m^2 + delta (|d| - m), which needs no branch."""
    size = difference.abs()
    quadratic_part = minimum(size, delta)
    return 0.5 * quadratic_part * quadratic_part + delta * (size - quadratic_part)


def huber_loss(input: Tensor, target, reduction: str = "mean", delta: float = 1.0) -> Tensor:
    """The Huber loss of input - target (two tensors of one shape) at `delta` > 0, reduced."""
    _check_reduction("huber_loss", reduction)
    if not delta > 0:
        raise ValueError(f"huber_loss: delta must be positive, got {delta}")
    return _reduce_elements(_huber(input - _checked_pair("huber_loss", input, target), delta), reduction)


def smooth_l1_loss(input: Tensor, target, reduction: str = "mean", beta: float = 1.0) -> Tensor:
    """The Huber loss at `beta` divided by beta (so its slope far from 0 is 1); l1_loss for beta = 0."""
    _check_reduction("smooth_l1_loss", reduction)
    if beta < 0:
        raise ValueError(f"smooth_l1_loss: beta must not be negative, got {beta}")
    if beta == 0:
        return l1_loss(input, target, reduction)
    return _reduce_elements(_huber(input - _checked_pair("smooth_l1_loss", input, target), beta) / beta, reduction)


def kl_div(input: Tensor, target, reduction: str = "mean", log_target: bool = False) -> Tensor:
    """KL(target || distribution of `input`) elementwise, for log-probabilities `input` and probabilities `target`
    (log-probabilities if `log_target`) of one shape: target (log target - input), 0 where target = 0. "batchmean"
    divides the sum by the batch size input.shape[0], the true KL divergence per example; "mean" divides by the number
    of elements, as PyTorch."""
    _check_reduction("kl_div", reduction, REDUCTIONS + ("batchmean",))
    target = _checked_pair("kl_div", input, target)
    if log_target:
        losses = target.exp() * (target - input)
    else:
        with backend.device_scope(input.device):
            positive = target.data > 0
        # log(1) stands in at target 0, where target * (...) is 0 anyway, so log(0) never appears.
        losses = target * (where(positive, target, 1.0).log() - input)
    if reduction == "batchmean":
        return losses.sum() / (input.shape[0] if input.ndim else 1)
    return _reduce_elements(losses, reduction)
