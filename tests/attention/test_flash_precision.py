"""The flash backward's float32 precision as the scores grow, against PyTorch's CPU FlashAttention kernel.

Issue 17 measured flash's dV error growing with the score scale to about 4x torch's CPU flash kernel at q x 20 (shape
2x2x5x64, causal, float32). The backward recomputes P = exp(S - L); when S and L are not rounded the way the forward
rounded them (L stored in float32 natural log and converted back to base 2, and subtracted inside the matmul that
forms S), P moves by a rounding of |S| and |L|, which the forward's own normalization never saw. The reference here is
float64 softmax attention with its backward written out in plain NumPy; the errors are the largest over a few seeds,
and flash's must stay within 2x of torch's from the same run.
"""

from __future__ import annotations

import numpy as np
import pytest

from tinytf.attention.flash import flash_attention_backward, flash_attention_forward

torch = pytest.importorskip("torch", reason="the precision bar is torch's CPU flash kernel (the `dev` extra)")
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402


def float64_causal_attention_gradients(q, k, v, dO, scale):
    """dq, dk, dv of softmax(q k^T * scale, causal) v in float64: the truth."""
    q, k, v, dO = (x.astype(np.float64) for x in (q, k, v, dO))
    T, S = q.shape[2], k.shape[2]
    scores = np.where(np.tril(np.ones((T, S), bool), S - T), q @ k.swapaxes(-1, -2) * scale, -np.inf)
    P = np.exp(scores - scores.max(axis=-1, keepdims=True))
    P /= P.sum(axis=-1, keepdims=True)
    dP = dO @ v.swapaxes(-1, -2)
    dS = P * (dP - (P * dP).sum(axis=-1, keepdims=True))
    return dS @ k * scale, dS.swapaxes(-1, -2) @ q * scale, P.swapaxes(-1, -2) @ dO


def torch_flash_gradients(q, k, v, dO, scale):
    q, k, v = (torch.from_numpy(x).requires_grad_() for x in (q, k, v))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    out.backward(torch.from_numpy(dO))
    return q.grad.numpy(), k.grad.numpy(), v.grad.numpy()


def flash_gradients(q, k, v, dO, scale, block):
    O, L = flash_attention_forward(q, k, v, scale, True, None, block, block)
    return flash_attention_backward(dO, q, k, v, O, L, scale, True, None, block, block)


@pytest.mark.parametrize("T, block, n_seeds", [(5, None, 10), (64, 16, 3)])  # the shape; many tiles a row
@pytest.mark.parametrize("q_factor", [1, 5, 20])
def test_flash_gradients_are_within_2x_of_torch_flash_as_scores_grow(q_factor, T, block, n_seeds):
    scale = 1 / 8
    flash_errors, torch_errors = np.zeros(3), np.zeros(3)
    for seed in range(n_seeds):
        rng = np.random.default_rng(seed)
        q, k, v, dO = rng.standard_normal((4, 2, 2, T, 64), dtype=np.float32)
        q *= np.float32(q_factor)
        truth = float64_causal_attention_gradients(q, k, v, dO, scale)
        for errors, grads in ((flash_errors, flash_gradients(q, k, v, dO, scale, block)),
                              (torch_errors, torch_flash_gradients(q, k, v, dO, scale))):
            errors[:] = np.maximum(errors, [np.abs(g - t).max() for g, t in zip(grads, truth)])
    for name, flash_error, torch_error in zip(("dQ", "dK", "dV"), flash_errors, torch_errors):
        assert flash_error <= 2 * torch_error, f"{name}: flash {flash_error:.3g}, torch flash {torch_error:.3g}"
