import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from op_check import check_op, random_array

import tinytf
from tinytf import backend
from tinytf.functional import common
from devices import DEVICES
from tinytf.functional.loss import (
    binary_cross_entropy,
    binary_cross_entropy_with_logits,
    cross_entropy,
    cross_entropy_study,
    huber_loss,
    kl_div,
    l1_loss,
    mse_loss,
    nll_loss,
    smooth_l1_loss,
)

seeds = st.integers(0, 2**32 - 1)
reductions = st.sampled_from(["mean", "sum", "none"])
# (C,), (N, C) and (N, C, d1, ...): the layouts PyTorch accepts, classes in dimension 1
score_shapes = st.one_of(
    st.tuples(st.integers(1, 5)),
    st.tuples(st.integers(1, 4), st.integers(1, 5)),
    st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 3)),
    st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 2), st.integers(1, 2)),
)


def _log_softmax_over_classes(scores):
    axis = 0 if scores.ndim == 1 else 1
    shifted = scores - scores.max(axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis, keepdims=True))


def _reference_class_loss(log_probs, targets, weight, ignore_index, smoothing, reduction):
    """Loop over predictions: -(1 - s) w_t log p_t - (s / C) sum_c w_c log p_c, and the weight sum of the targets."""
    per_class = np.moveaxis(log_probs, 0 if log_probs.ndim == 1 else 1, -1)
    num_classes = per_class.shape[-1]
    weight = np.ones(num_classes) if weight is None else weight
    losses, weight_sum = np.zeros(targets.shape), 0.0
    for index in np.ndindex(targets.shape):
        target = targets[index]
        if target == ignore_index:
            continue
        row = per_class[index]
        losses[index] = -(1 - smoothing) * weight[target] * row[target] - smoothing / num_classes * (weight * row).sum()
        weight_sum += weight[target]
    if reduction == "none":
        return losses
    return losses.sum() / weight_sum if reduction == "mean" else losses.sum()


def _class_targets(seed, shape, ignore):
    classes = shape[0] if len(shape) == 1 else shape[1]
    targets = np.random.default_rng(seed).integers(0, classes, size=shape[:1] + shape[2:] if len(shape) > 1 else ())
    if ignore and targets.size > 1:  # all targets ignored gives nan for "mean": its own test
        targets.reshape(-1)[0] = -100
    return targets, classes


@given(seed=seeds, shape=score_shapes, reduction=reductions, ignore=st.booleans(),
       smoothing=st.sampled_from([0.0, 0.3]), weighted=st.booleans())
def test_cross_entropy_matches_reference(seed, shape, reduction, ignore, smoothing, weighted):
    logits = random_array(seed, shape) * 3
    targets, classes = _class_targets(seed, shape, ignore)
    weight = np.random.default_rng(seed + 1).uniform(0.2, 2.0, classes) if weighted else None
    check_op(lambda x: cross_entropy(x, targets, weight=weight, reduction=reduction, label_smoothing=smoothing),
             lambda x: _reference_class_loss(_log_softmax_over_classes(x), targets, weight, -100, smoothing,
                                             reduction), logits)


@given(seed=seeds, shape=score_shapes, reduction=reductions, smoothing=st.sampled_from([0.0, 0.2]),
       weighted=st.booleans())
def test_cross_entropy_with_probability_targets_matches_reference(seed, shape, reduction, smoothing, weighted):
    class_axis = 0 if len(shape) == 1 else 1
    logits = random_array(seed, shape) * 3
    probabilities = random_array(seed + 1, shape, low=0.0, high=1.0)
    probabilities /= probabilities.sum(class_axis, keepdims=True)
    classes = shape[class_axis]
    weight = np.random.default_rng(seed).uniform(0.2, 2.0, classes) if weighted else None

    def reference(x, p):
        weight_shape = [1] * len(shape)
        weight_shape[class_axis] = classes
        class_weights = np.ones(weight_shape) if weight is None else weight.reshape(weight_shape)
        smoothed = (1 - smoothing) * p + smoothing / classes
        losses = -(class_weights * smoothed * _log_softmax_over_classes(x)).sum(class_axis)
        rows = 1 if len(shape) == 1 else losses.size
        return {"none": losses, "sum": losses.sum(), "mean": losses.sum() / rows}[reduction]

    # the targets are an input too: gradcheck checks d loss / d probabilities
    check_op(lambda x, p: cross_entropy(x, p, weight=weight, reduction=reduction, label_smoothing=smoothing),
             reference, logits, probabilities)


@given(seed=seeds, shape=score_shapes, reduction=reductions, ignore=st.booleans(), weighted=st.booleans())
def test_nll_loss_matches_reference(seed, shape, reduction, ignore, weighted):
    log_probs = random_array(seed, shape)
    targets, classes = _class_targets(seed, shape, ignore)
    weight = np.random.default_rng(seed + 1).uniform(0.2, 2.0, classes) if weighted else None
    check_op(lambda x: nll_loss(x, targets, weight=weight, reduction=reduction),
             lambda x: _reference_class_loss(x, targets, weight, -100, 0.0, reduction), log_probs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("loss", [cross_entropy, nll_loss])
def test_all_ignored_targets_give_nan_mean_and_zero_gradients(loss, device):
    scores = tinytf.randn(3, 4, device=device, requires_grad=True)
    ignored = tinytf.tensor([-100, -100, -100], device=device)
    mean = loss(scores, ignored)
    assert np.isnan(mean.item())  # 0 / 0, as PyTorch
    mean.backward()
    np.testing.assert_array_equal(backend.to_numpy(scores.grad), np.zeros((3, 4)))
    assert loss(scores, ignored, reduction="sum").item() == 0
    np.testing.assert_array_equal(loss(scores, ignored, reduction="none").numpy(), np.zeros(3))


def test_cross_entropy_handles_huge_logits():
    logits = tinytf.tensor([[1e4, -1e4, 0.0]], requires_grad=True)
    loss = cross_entropy(logits, tinytf.tensor([1]))
    np.testing.assert_allclose(loss.item(), 2e4, rtol=1e-6)
    loss.backward()
    np.testing.assert_allclose(logits.grad, [[1.0, -1.0, 0.0]], atol=1e-6)


@pytest.mark.parametrize("dtype, tolerance", [(np.float64, 1e-12), (np.float32, 1e-6)])
def test_cross_entropy_matches_the_study_version(monkeypatch, device, dtype, tolerance):
    """The training step's shape, (B*T, classes), in the default cache blocks (the row maxima by common.row_max's
    tree); the study version is independent of the fused op."""
    monkeypatch.setattr(common, "BLOCK_BYTES", 256 * 1024)
    rng = np.random.default_rng(5)
    logits, targets = (rng.standard_normal((768, 64)) * 4).astype(dtype), rng.integers(0, 64, 768)
    tensor = tinytf.tensor(logits, device=device, requires_grad=True)
    loss = cross_entropy(tensor, tinytf.tensor(targets, device=device))
    loss.backward()
    expected_loss, expected_grad = cross_entropy_study(logits, targets)
    np.testing.assert_allclose(loss.item(), expected_loss, rtol=tolerance)
    np.testing.assert_allclose(backend.to_numpy(tensor.grad), expected_grad, rtol=tolerance, atol=tolerance / 768)


def test_cross_entropy_backward_twice_gives_the_same_gradient():
    """backward must leave the saved probabilities as they are: with retain_graph it runs again on them."""
    logits = tinytf.tensor(np.random.default_rng(6).standard_normal((6, 5)), requires_grad=True)
    loss = cross_entropy(logits, tinytf.tensor([0, 1, 2, 3, 4, -100]))
    loss.backward(retain_graph=True)
    first = logits.grad.copy()
    loss.backward()
    np.testing.assert_allclose(logits.grad, 2 * first, rtol=1e-12)
    assert not first[-1].any()  # the ignored row


def test_cross_entropy_with_one_hot_probabilities_equals_class_ids():
    logits = random_array(0, (5, 4))
    ids = np.array([0, 3, 1, 1, 2])
    with_ids = cross_entropy(tinytf.tensor(logits), ids, label_smoothing=0.1, reduction="none")
    with_probabilities = cross_entropy(tinytf.tensor(logits), np.eye(4)[ids], label_smoothing=0.1, reduction="none")
    np.testing.assert_allclose(with_ids.numpy(), with_probabilities.numpy(), rtol=1e-12)


# --- elementwise losses: independent NumPy references ---------------------------------------------------------------


def _reduce(losses, reduction):
    return {"none": losses, "sum": losses.sum(), "mean": losses.mean()}[reduction]


def _huber_reference(difference, delta):
    size = np.abs(difference)
    return np.where(size < delta, 0.5 * difference**2, delta * (size - 0.5 * delta))


def _differences_off_kinks(seed, shape, kinks):
    """Values whose magnitudes stay 0.1 away from each kink, so central differences see one smooth piece."""
    rng = np.random.default_rng(seed)
    magnitude = rng.uniform(0.1, 2.0, shape)
    for kink in kinks:
        magnitude = np.where(np.abs(magnitude - kink) < 0.1, kink + 0.15, magnitude)
    return magnitude * rng.choice([-1.0, 1.0], shape)


@given(seed=seeds, shape=st.tuples(st.integers(1, 3), st.integers(1, 4)), reduction=reductions,
       weighted=st.booleans())
def test_binary_cross_entropy_matches_reference(seed, shape, reduction, weighted):
    probs = random_array(seed, shape, low=0.05, high=0.95)
    targets = random_array(seed + 1, shape, low=0.0, high=1.0)
    weight = random_array(seed + 2, shape[-1:], low=0.5, high=2.0) if weighted else None
    scale = 1.0 if weight is None else weight
    check_op(lambda p, t: binary_cross_entropy(p, t, weight=weight, reduction=reduction),
             lambda p, t: _reduce(-scale * (t * np.log(p) + (1 - t) * np.log(1 - p)), reduction), probs, targets)


def test_binary_cross_entropy_floors_each_log_at_minus_100():
    probs = tinytf.tensor([0.0, 1.0, 0.0, 1.0], requires_grad=True)
    losses = binary_cross_entropy(probs, tinytf.tensor([1.0, 0.0, 0.0, 1.0]), reduction="none")
    np.testing.assert_array_equal(losses.numpy(), [100.0, 100.0, 0.0, 0.0])
    losses.sum().backward()
    # PyTorch's derivative (p - t) / max(p (1 - p), 1e-12): finite at the ends
    np.testing.assert_allclose(probs.grad, [-1e12, 1e12, 0.0, 0.0])


@given(seed=seeds, shape=st.tuples(st.integers(1, 3), st.integers(1, 4)), reduction=reductions,
       weighted=st.booleans(), positive_weighted=st.booleans())
def test_binary_cross_entropy_with_logits_matches_reference(seed, shape, reduction, weighted, positive_weighted):
    logits = random_array(seed, shape) * 3
    targets = random_array(seed + 1, shape, low=0.0, high=1.0)
    weight = random_array(seed + 2, shape[-1:], low=0.5, high=2.0) if weighted else None
    pos_weight = random_array(seed + 3, shape[-1:], low=0.5, high=3.0) if positive_weighted else None

    def reference(x, t):
        p = 1 / (1 + np.exp(-x))
        positive = 1.0 if pos_weight is None else pos_weight
        return _reduce(-(1.0 if weight is None else weight) * (positive * t * np.log(p) + (1 - t) * np.log(1 - p)),
                       reduction)

    check_op(lambda x, t: binary_cross_entropy_with_logits(x, t, weight=weight, reduction=reduction,
                                                            pos_weight=pos_weight), reference, logits, targets)


def test_binary_cross_entropy_with_logits_is_stable_and_exact_at_zero():
    logits = tinytf.tensor([1000.0, -1000.0, 0.0], requires_grad=True)
    losses = binary_cross_entropy_with_logits(logits, tinytf.tensor([0.0, 1.0, 1.0]), reduction="none")
    np.testing.assert_allclose(losses.numpy(), [1000.0, 1000.0, np.log(2)])
    losses.sum().backward()
    np.testing.assert_allclose(logits.grad, [1.0, -1.0, -0.5])  # sigmoid(x) - t, also at the kinkless 0


@pytest.mark.parametrize("loss, reference", [
    (mse_loss, lambda d: d**2),
    (l1_loss, np.abs),
    (lambda x, t, reduction: huber_loss(x, t, reduction=reduction, delta=0.7), lambda d: _huber_reference(d, 0.7)),
    (lambda x, t, reduction: smooth_l1_loss(x, t, reduction=reduction, beta=0.7),
     lambda d: _huber_reference(d, 0.7) / 0.7),
    (lambda x, t, reduction: smooth_l1_loss(x, t, reduction=reduction, beta=0.0), np.abs),
], ids=["mse", "l1", "huber", "smooth_l1", "smooth_l1_beta_0"])
@given(seed=seeds, shape=st.tuples(st.integers(1, 3), st.integers(1, 4)), reduction=reductions)
def test_regression_losses_match_reference(loss, reference, seed, shape, reduction):
    targets = random_array(seed, shape)
    inputs = targets + _differences_off_kinks(seed + 1, shape, kinks=[0.7])
    check_op(lambda x, t: loss(x, t, reduction=reduction),
             lambda x, t: _reduce(reference(x - t), reduction), inputs, targets)


@given(seed=seeds, shape=st.tuples(st.integers(1, 3), st.integers(1, 4)),
       reduction=st.sampled_from(["mean", "sum", "none", "batchmean"]), log_target=st.booleans())
def test_kl_div_matches_reference(seed, shape, reduction, log_target):
    log_probs = np.log(random_array(seed, shape, low=0.05, high=1.0))
    targets = random_array(seed + 1, shape, low=0.05, high=1.0)

    def reference(x, t):
        probabilities = np.exp(t) if log_target else t
        losses = probabilities * (np.log(probabilities) - x)
        return losses.sum() / shape[0] if reduction == "batchmean" else _reduce(losses, reduction)

    check_op(lambda x, t: kl_div(x, t, reduction=reduction, log_target=log_target), reference, log_probs,
             np.log(targets) if log_target else targets)


def test_kl_div_is_zero_where_the_target_is_zero():
    log_probs = tinytf.tensor([-1.0, -0.5], requires_grad=True)
    loss = kl_div(log_probs, tinytf.tensor([0.0, 0.5]), reduction="sum")
    np.testing.assert_allclose(loss.item(), 0.5 * (np.log(0.5) + 0.5))
    loss.backward()
    np.testing.assert_allclose(log_probs.grad, [0.0, -0.5])


# --- errors -----------------------------------------------------------------------------------------------------------


def test_class_target_errors():
    logits = tinytf.randn(4, 3)
    for loss in (cross_entropy, nll_loss):
        with pytest.raises(IndexError, match="target 3 is out of range for 3 classes"):
            loss(logits, tinytf.tensor([0, 1, 2, 3]))
        with pytest.raises(IndexError, match="target -1 is out of range"):
            loss(logits, tinytf.tensor([0, 1, 2, -1]))
        with pytest.raises(ValueError, match=r"needs targets of shape \(4,\), got \(2,\)"):
            loss(logits, tinytf.tensor([0, 1]))
        with pytest.raises(ValueError, match=r"needs targets of shape \(2, 5\)"):
            loss(tinytf.randn(2, 3, 5), tinytf.zeros(2, 3, dtype="int64"))
        with pytest.raises(ValueError, match=r"weight must have shape \(3,\)"):
            loss(logits, tinytf.tensor([0, 1, 2, 0]), weight=np.ones(4))
        with pytest.raises(ValueError, match="0-d"):
            loss(tinytf.tensor(1.0), tinytf.tensor(0))
    with pytest.raises(TypeError, match="integer class ids"):
        nll_loss(logits, tinytf.tensor([0.0, 1.0, 2.0, 0.0]))


def test_cross_entropy_errors():
    logits = tinytf.randn(4, 3)
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        cross_entropy(logits, tinytf.tensor([0, 1, 2, 0]), label_smoothing=1.5)
    with pytest.raises(ValueError, match=r"target of shape \(4,\) does not match the input's shape \(4, 3\)"):
        cross_entropy(logits, tinytf.tensor([0.0, 1.0, 2.0, 0.0]))
    with pytest.raises(ValueError, match="ignore_index=0 needs class ids"):
        cross_entropy(logits, tinytf.ones(4, 3) / 3, ignore_index=0)


@pytest.mark.parametrize("loss", [cross_entropy, nll_loss, binary_cross_entropy, binary_cross_entropy_with_logits,
                                  mse_loss, l1_loss, smooth_l1_loss, huber_loss, kl_div])
def test_losses_reject_an_unknown_reduction(loss):
    with pytest.raises(ValueError, match="reduction must be one of .*got 'avg'"):
        loss(tinytf.ones(2, 3) / 3, tinytf.tensor([0, 1]) if loss in (cross_entropy, nll_loss) else tinytf.ones(2, 3),
             reduction="avg")


def test_elementwise_loss_errors():
    with pytest.raises(ValueError, match="batchmean"):
        mse_loss(tinytf.ones(2), tinytf.ones(2), reduction="batchmean")
    with pytest.raises(ValueError, match=r"target of shape \(3,\) does not match the input's shape \(2,\)"):
        l1_loss(tinytf.ones(2), tinytf.ones(3))
    with pytest.raises(ValueError, match="probabilities in \\[0, 1\\]"):
        binary_cross_entropy(tinytf.tensor([0.5, 1.5]), tinytf.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="delta must be positive, got 0"):
        huber_loss(tinytf.ones(2), tinytf.ones(2), delta=0.0)
    with pytest.raises(ValueError, match="beta must not be negative, got -1"):
        smooth_l1_loss(tinytf.ones(2), tinytf.ones(2), beta=-1.0)
