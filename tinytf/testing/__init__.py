"""Checking gradients against finite differences, for tinytf's own tests and for users' functions."""

from __future__ import annotations

import numpy as np

from .. import backend
from ..tensor import Tensor, no_grad


class GradcheckError(AssertionError):
    """An analytic gradient disagrees with its finite-difference estimate."""


def gradcheck(fn, *inputs, eps: float = 1e-6, atol: float = 1e-5, rtol: float = 1e-3, max_elements: int = 256,
              directions: int = 3, seed: int = 0) -> bool:
    """Compare the gradients autograd gives for `fn(*inputs)` with central differences, in float64.

    The output is reduced to L = sum(w * fn(*inputs)) with fixed random weights w, so one backward pass gives
    dL/dx for every input. The check then uses two kinds of finite differences:
    - per element, (L(x + eps e_i) - L(x - eps e_i)) / 2 eps for up to `max_elements` elements of each input
      (all of them for small inputs, a random subset for large ones);
    - per random direction v, which perturbs every element at once: (L(x + eps v) - L(x - eps v)) / 2 eps must
      equal sum(dL/dx * v), so no element goes unchecked however large the input.
    Inputs that are floating Tensors with requires_grad=True are checked; the rest are passed through unchanged.
    Raises GradcheckError naming the input, the worst element and both values; returns True otherwise.
    """
    devices = [value.device for value in inputs if isinstance(value, Tensor)]
    with backend.device_scope(devices[0] if devices else "cpu"):  # CuPy perturbs and reduces on its current device
        return _gradcheck(fn, inputs, eps, atol, rtol, max_elements, directions, seed)


def _gradcheck(fn, inputs, eps, atol, rtol, max_elements, directions, seed) -> bool:
    rng = np.random.default_rng(seed)
    inputs = [_as_float64(value) for value in inputs]
    checked = [i for i, value in enumerate(inputs) if isinstance(value, Tensor) and value.requires_grad]
    if not checked:
        raise ValueError("gradcheck: no input is a floating Tensor with requires_grad=True")

    output = fn(*inputs)
    if not isinstance(output, Tensor):
        raise TypeError(f"gradcheck: fn must return a Tensor, got {type(output).__name__}")
    xp = backend.get_array_module(output.data)
    weights = xp.asarray(rng.standard_normal(output.shape))
    output.backward(weights)

    def objective() -> float:
        with no_grad():
            return float((fn(*inputs).data.astype(np.float64) * weights).sum())

    for position in checked:
        tensor = inputs[position]
        analytic = tensor.grad if tensor.grad is not None else xp.zeros_like(tensor.data)
        flat = tensor.data.reshape(-1)
        size = flat.shape[0]
        elements = np.arange(size) if size <= max_elements else rng.choice(size, max_elements, replace=False)
        numeric = np.empty(len(elements))
        for k, element in enumerate(elements):
            original = flat[element].item()
            flat[element] = original + eps
            plus = objective()
            flat[element] = original - eps
            minus = objective()
            flat[element] = original
            numeric[k] = (plus - minus) / (2 * eps)
        picked = backend.to_numpy(analytic).reshape(-1)[elements]
        _compare(f"input {position}", elements, tensor.shape, picked, numeric, atol, rtol)

        original = tensor.data.copy()
        for d in range(directions):
            direction = xp.asarray(rng.standard_normal(tensor.shape))
            tensor.data = original + eps * direction
            plus = objective()
            tensor.data = original - eps * direction
            minus = objective()
            tensor.data = original
            numeric_slope = (plus - minus) / (2 * eps)
            analytic_slope = float((analytic * direction).sum())
            _compare(f"input {position} along random direction {d}", None, None,
                     np.array([analytic_slope]), np.array([numeric_slope]), atol * np.sqrt(size), rtol)
    return True


def _as_float64(value):
    if isinstance(value, Tensor) and backend.is_floating(value.dtype):
        return Tensor(value.data.astype(np.float64), requires_grad=value.requires_grad)
    return value


def _compare(label: str, elements, shape, analytic, numeric, atol: float, rtol: float) -> None:
    error = np.abs(analytic - numeric) - (atol + rtol * np.abs(numeric))
    if np.all(error <= 0) and np.all(np.isfinite(analytic)):
        return
    worst = int(np.nanargmax(np.where(np.isfinite(analytic), error, np.inf)))
    where = "" if elements is None else f" at index {tuple(int(i) for i in np.unravel_index(int(elements[worst]), shape))}"
    failed = int(np.sum(~(error <= 0)))
    raise GradcheckError(
        f"gradcheck: {label}{where}: analytic gradient {analytic[worst]:.8g}, numeric {numeric[worst]:.8g} "
        f"(difference {abs(analytic[worst] - numeric[worst]):.3g}, allowed {atol + rtol * abs(numeric[worst]):.3g}; "
        f"{failed} of {len(analytic)} checked values fail)"
    )
