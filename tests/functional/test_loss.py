import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from op_check import check_op, random_array

import tinytf
import tinytf.functional as F

seeds = st.integers(0, 2**32 - 1)


def _reference(logits, targets, ignore_index, reduction):
    flat, flat_targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    shifted = flat - flat.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    kept = flat_targets != ignore_index
    losses = np.where(kept, -logp[np.arange(len(flat)), np.where(kept, flat_targets, 0)], 0.0)
    if reduction == "none":
        return losses.reshape(targets.shape)
    return losses.sum() / max(kept.sum(), 1) if reduction == "mean" else losses.sum()


@given(seed=seeds, leading=st.lists(st.integers(1, 4), min_size=1, max_size=2), classes=st.integers(1, 6),
       reduction=st.sampled_from(["mean", "sum", "none"]), ignore=st.booleans())
def test_cross_entropy_matches_reference(seed, leading, classes, reduction, ignore):
    logits = random_array(seed, (*leading, classes)) * 3
    targets = np.random.default_rng(seed).integers(0, classes, size=leading)
    if ignore:
        targets.reshape(-1)[0] = -100
    check_op(lambda x: F.cross_entropy(x, targets, reduction=reduction),
             lambda x: _reference(x, targets, -100, reduction), logits)


def test_cross_entropy_handles_huge_logits():
    logits = tinytf.tensor([[1e4, -1e4, 0.0]], requires_grad=True)
    loss = F.cross_entropy(logits, tinytf.tensor([1]))
    np.testing.assert_allclose(loss.item(), 2e4, rtol=1e-6)
    loss.backward()
    np.testing.assert_allclose(logits.grad, [[1.0, -1.0, 0.0]], atol=1e-6)


def test_cross_entropy_errors():
    logits = tinytf.randn(4, 3)
    with pytest.raises(IndexError, match="target 3 is out of range for 3 classes"):
        F.cross_entropy(logits, tinytf.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match=r"need targets of shape \(4,\)"):
        F.cross_entropy(logits, tinytf.tensor([0, 1]))
    with pytest.raises(TypeError, match="integer class ids"):
        F.cross_entropy(logits, tinytf.tensor([0.0, 1.0, 2.0, 0.0]))
    with pytest.raises(ValueError, match="reduction"):
        F.cross_entropy(logits, tinytf.tensor([0, 1, 2, 0]), reduction="avg")
