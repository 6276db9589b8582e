"""Optimizers (SGD, AdamW), gradient clipping, dynamic loss scaling and nanoGPT's warmup + cosine schedule.

The updates are PyTorch's, formula for formula, and run in place on each parameter's array (NumPy or CuPy): SGD's
with `out=` ufuncs into one scratch buffer shared by all parameters, AdamW's as one fused expression over all the
parameters of a step (ElementwiseExpression.foreach). State arrays are allocated once, on a parameter's first step, so
a step allocates next to nothing.

Mixed precision: a bfloat16 or float16 parameter is updated through a float32 master copy kept in its state
("master"), with float32 optimizer state; the parameter then takes the master's value rounded to nearest even. An
update below half a unit in the last place of the weight (2^-9 to 2^-8 of its value in bfloat16) would round away
if applied to the 16-bit weight itself; on the master copy it accumulates. `GradScaler` keeps float16's small
gradients from flushing to zero.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping

from .backend import device_of, device_scope, get_array_module, is_half, to_device, to_numpy
from .functional.expression import ElementwiseExpression
from .tensor import Tensor


class Optimizer:
    """Parameter groups and state bookkeeping; subclasses write `_check` and `_update` (one parameter's step) or
    `_update_all` (every parameter of a step, together).

    `param_groups` is a list of dicts: "params" (a list of Tensors) and the options of that group, which default to
    the optimizer's own (`defaults`). Change `group["lr"]` to schedule the learning rate.
    """

    state_keys: frozenset[str] = frozenset()  # what a parameter's state holds once it has taken a step
    # ... plus, for a bfloat16 or float16 parameter, its float32 master copy
    master_key = "master"

    def __init__(self, params, defaults: dict):
        if isinstance(params, Tensor):
            raise TypeError("params must be an iterable of Tensors or of parameter-group dicts, got a single Tensor")
        self.defaults = defaults
        self.param_groups: list[dict] = []
        self.state: dict[int, dict] = {}  # id(parameter) -> its state; ids, because Tensors compare elementwise
        self._scratch: dict[tuple, object] = {}
        groups = list(params)
        if not groups:
            raise ValueError("the optimizer got an empty parameter list")
        if not isinstance(groups[0], Mapping):
            groups = [{"params": groups}]
        for group in groups:
            self.add_param_group(group)

    def add_param_group(self, group: Mapping) -> None:
        if not isinstance(group, Mapping) or "params" not in group:
            raise TypeError(f"a parameter group must be a dict with a 'params' entry, got {group!r:.80}")
        unknown = set(group) - set(self.defaults) - {"params"}
        if unknown:
            raise ValueError(
                f"unknown option(s) {sorted(unknown)} for {type(self).__name__}; "
                f"its options are {sorted(self.defaults)}"
            )
        params = group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        seen = {id(p) for existing in self.param_groups for p in existing["params"]}
        for index, param in enumerate(params):
            if not isinstance(param, Tensor):
                raise TypeError(f"parameter {index} of group {len(self.param_groups)} is a {type(param).__name__}, "
                                "expected a Tensor")
            if id(param) in seen:
                raise ValueError(f"parameter {index} of group {len(self.param_groups)} (shape {param.shape}) appears "
                                 "more than once in the optimizer; pass each parameter once")
            seen.add(id(param))
        options = {**self.defaults, **{key: value for key, value in group.items() if key != "params"}}
        self._check(options)
        self.param_groups.append({"params": params, **options})

    def _check(self, options: dict) -> None:
        """Raise a ValueError naming any invalid option value."""
        raise NotImplementedError

    def _update(self, param, grad, state: dict, group: dict) -> None:
        """Update the array `param` in place from `grad`, creating `state` on the first step."""
        raise NotImplementedError

    def _update_all(self, updates: list[tuple]) -> None:
        """_update for each (param, grad, state, group) of a step; a subclass may update them together instead."""
        for param, grad, state, group in updates:
            with device_scope(device_of(param)):
                self._update(param, grad, state, group)

    def zero_grad(self) -> None:
        for group in self.param_groups:
            for param in group["params"]:
                param.grad = None

    def step(self) -> None:
        """Update every parameter that has a gradient; parameters whose grad is None are left alone.

        A bfloat16/float16 parameter steps its float32 master copy in its state (made on the first step from the
        parameter's value), and then takes the master's value rounded to nearest even, in place."""
        updates, low_precision = [], []
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    state = self.state.setdefault(id(param), {})
                    if is_half(param.data.dtype):
                        xp = get_array_module(param.data)
                        with device_scope(param.device):  # the master copy goes where the parameter is
                            master = state.get(self.master_key)
                            if master is None:
                                master = state[self.master_key] = param.data.astype(xp.float32)
                            updates.append((master, _at_least_float32(xp, param.grad), state, group))
                        low_precision.append((param, master))
                    else:
                        updates.append((param.data, param.grad, state, group))
        self._update_all(updates)
        for param, master in low_precision:
            with device_scope(param.device):
                param.data[...] = master  # the cast rounds to nearest even, as astype does

    def _scratch_like(self, array):
        """A scratch array of `array`'s shape, dtype and device: a view into one buffer per (device, dtype)."""
        key = (device_of(array), array.dtype)
        buffer = self._scratch.get(key)
        if buffer is None or buffer.size < array.size:
            # Sized for the largest parameter at once, so the first step does not grow it parameter by parameter.
            largest = max(p.data.size for group in self.param_groups for p in group["params"])
            buffer = get_array_module(array).empty(max(largest, array.size), dtype=array.dtype)
            self._scratch[key] = buffer
        return buffer[: array.size].reshape(array.shape)

    def _parameters(self) -> list[Tensor]:
        return [param for group in self.param_groups for param in group["params"]]

    def state_dict(self) -> dict:
        """{"state": one dict per parameter (in group order), "param_groups": options with "params" as positions}.

        The state arrays are copies, so the result stays a snapshot while training goes on.
        """
        parameters = self._parameters()
        state = [
            {key: value.copy() if hasattr(value, "copy") else value for key, value in self.state.get(id(p), {}).items()}
            for p in parameters
        ]
        groups, position = [], 0
        for group in self.param_groups:
            options = {key: value for key, value in group.items() if key != "params"}
            options["params"] = list(range(position, position + len(group["params"])))
            position += len(group["params"])
            groups.append(options)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: Mapping) -> None:
        """Restore a `state_dict()` (possibly read back from a checkpoint) for the same parameters, in the same order.

        Options (lr, betas, ...) come from the saved groups, as in PyTorch. Nothing changes unless all of it is valid.
        """
        saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"the saved state has {len(saved_groups)} parameter groups, this optimizer has "
                             f"{len(self.param_groups)}")
        for index, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"group {index} has {len(saved['params'])} parameters in the saved state, "
                                 f"{len(group['params'])} in this optimizer")
        parameters = self._parameters()
        if len(saved_state) != len(parameters):
            raise ValueError(
                f"the saved state has {len(saved_state)} parameter states for {len(parameters)} parameters"
            )

        new_options = []
        for saved in saved_groups:
            # JSON turned tuples (betas) into lists.
            options = {key: tuple(value) if isinstance(value, list) else value
                       for key, value in saved.items() if key in self.defaults}
            self._check({**self.defaults, **options})
            new_options.append(options)
        new_state = {id(param): self._restored_state(index, param, saved)
                     for index, (param, saved) in enumerate(zip(parameters, saved_state))}

        for group, options in zip(self.param_groups, new_options):
            group.update(options)
        self.state = new_state

    def _restored_state(self, index: int, param: Tensor, saved: Mapping) -> dict:
        low_precision = is_half(param.dtype)
        expected = self.state_keys | {self.master_key} if low_precision else self.state_keys
        if saved and set(saved) != expected:
            raise ValueError(f"the saved state of parameter {index} has entries {sorted(saved)}, expected "
                             f"{sorted(expected)} for {type(self).__name__} and a {param.dtype} parameter")
        state_dtype = "float32" if low_precision else param.dtype
        state = {}
        for key, value in saved.items():
            if hasattr(value, "shape"):
                if tuple(value.shape) != param.shape:
                    raise ValueError(f"the saved {key!r} of parameter {index} has shape {tuple(value.shape)}, "
                                     f"the parameter has shape {param.shape}")
                # A copy on the parameter's device: the optimizer must own its state, not share the caller's arrays.
                value = to_device(to_numpy(value).astype(state_dtype, copy=True), param.device)
            else:
                value = int(value)
            state[key] = value
        return state


class SGD(Optimizer):
    """Stochastic gradient descent with momentum, Nesterov momentum and L2 weight decay, as torch.optim.SGD:

        g = grad + weight_decay * p
        b = g                      on the first step, then  b = momentum * b + g
        g = g + momentum * b       with nesterov, else      g = b
        p = p - lr * g
    """

    state_keys = frozenset({"momentum_buffer"})

    def __init__(self, params, lr: float, momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay))

    def _check(self, options: dict) -> None:
        _require_non_negative(options, "lr", "momentum", "weight_decay")
        if options["nesterov"] and options["momentum"] <= 0:
            raise ValueError(f"nesterov=True needs momentum > 0, got momentum={options['momentum']!r}")

    def _update(self, param, grad, state: dict, group: dict) -> None:
        xp = get_array_module(param)
        lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
        scratch = self._scratch_like(param)
        update = grad
        if weight_decay != 0:
            # SGD's decay is L2 (added to the gradient, unlike AdamW's); computed aside so p.grad stays as it was.
            update = xp.multiply(param, weight_decay, out=scratch)
            update += grad
        if momentum != 0:
            buffer = state.get("momentum_buffer")
            if buffer is None:
                buffer = state["momentum_buffer"] = update.copy()
            else:
                buffer *= momentum
                buffer += update
            update = xp.add(update, momentum * buffer, out=scratch) if group["nesterov"] else buffer
        xp.multiply(update, lr, out=scratch)
        param -= scratch


# AdamW's step on one parameter p with gradient g, fused: m += (1 - beta1) (g - m) is PyTorch's lerp form of the
# moving average; the decay of p and its Adam step are one pass, p (1 - lr wd) - lr / bc1 * m / (sqrt(v / bc2) + eps)
ADAMW_UPDATE = ElementwiseExpression("adamw_update", """
    m = (g - m) * (1 - beta1) + m
    v = v * beta2 + g * g * (1 - beta2)
    p = p * (1 - lr * weight_decay) - m / (sqrt(v) / sqrt(bias_correction2) + eps) * (lr / bias_correction1)
""", inputs=("g",), outputs=("m", "v", "p"),
    scalars=("lr", "weight_decay", "beta1", "beta2", "eps", "bias_correction1", "bias_correction2"))


class AdamW(Optimizer):
    """Adam with decoupled weight decay (Loshchilov & Hutter), exactly as torch.optim.AdamW:

        p = p * (1 - lr * weight_decay)
        m = beta1 * m + (1 - beta1) * grad,    v = beta2 * v + (1 - beta2) * grad²
        p = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
    """

    state_keys = frozenset({"step", "exp_avg", "exp_avg_sq"})

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    def _check(self, options: dict) -> None:
        _require_non_negative(options, "lr", "eps", "weight_decay")
        betas = options["betas"]
        if len(betas) != 2 or not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")

    def _update_all(self, updates: list[tuple]) -> None:
        """All the parameters of a step through ADAMW_UPDATE.foreach, one call per group, device, dtype and step
        count (which sets the bias corrections; a group's parameters share it unless some missed steps without a
        gradient): one call shares the blocks of all the parameters out to the worker threads, where a call per
        parameter leaves the second core idle on every small one and pays the call's checks each time."""
        batches: dict[tuple, tuple[dict, list]] = {}
        for param, grad, state, group in updates:
            device = device_of(param)
            if "step" not in state:  # the state may hold a master copy already
                with device_scope(device):
                    xp = get_array_module(param)
                    state.update(step=0, exp_avg=xp.zeros_like(param), exp_avg_sq=xp.zeros_like(param))
            state["step"] += 1
            key = (id(group), device, param.dtype, state["step"])
            batches.setdefault(key, (group, []))[1].append((param, grad, state))
        for (_, device, _, step), (group, batch) in batches.items():
            beta1, beta2 = group["betas"]
            with device_scope(device):
                ADAMW_UPDATE.foreach([(grad,) for _, grad, _ in batch],
                                     [(state["exp_avg"], state["exp_avg_sq"], param) for param, _, state in batch],
                                     lr=group["lr"], weight_decay=group["weight_decay"], beta1=beta1, beta2=beta2,
                                     eps=group["eps"], bias_correction1=1.0 - beta1 ** step,
                                     bias_correction2=1.0 - beta2 ** step)


class GradScaler:
    """Dynamic loss scaling for float16 training, with torch.amp.GradScaler's interface and defaults.

    float16 flushes magnitudes below 6e-8 to zero (and loses precision below 6e-5), where many gradients of a
    language model lie. Scaling the loss by S scales every gradient by S, lifting them into range; the gradients are
    divided by S again (in float32) before the step. Too large an S overflows instead: then some gradient is inf or
    NaN, the step is skipped and S halved. After `growth_interval` good steps in a row S doubles, so it settles just
    below the overflow point. One step:

        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)        # optional: before clipping, so the clip sees the true gradients
        clip_grad_norm_(params, 1.0)
        scaler.step(optimizer)            # unscales if not done yet; skipped when any gradient is inf or NaN
        scaler.update()                   # adjusts the scale for the next step

    Unscaling replaces each bfloat16/float16 gradient by a float32 one (dividing back into float16 would flush the
    small gradients the scale protected); float32 gradients are divided in place. With enabled=False every method
    passes straight through (`step` just steps), so one training loop serves every dtype.
    """

    def __init__(self, init_scale: float = 2.0**16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000, enabled: bool = True):
        if not (isinstance(init_scale, numbers.Real) and 0 < init_scale < math.inf):
            raise ValueError(f"init_scale must be a positive finite number, got {init_scale!r}")
        if not (isinstance(growth_factor, numbers.Real) and 1 < growth_factor < math.inf):
            raise ValueError(f"growth_factor must be a finite number above 1, got {growth_factor!r}")
        if not (isinstance(backoff_factor, numbers.Real) and 0 < backoff_factor < 1):
            raise ValueError(f"backoff_factor must be in (0, 1), got {backoff_factor!r}")
        if not (isinstance(growth_interval, numbers.Integral) and growth_interval >= 1):
            raise ValueError(f"growth_interval must be a whole number >= 1, got {growth_interval!r}")
        self._enabled = bool(enabled)
        self._scale = float(init_scale)
        self._growth_factor, self._backoff_factor = float(growth_factor), float(backoff_factor)
        self._growth_interval = int(growth_interval)
        self._growth_tracker = 0  # good steps in a row since the scale last changed
        # id(optimizer) -> {"unscaled": bool, "stepped": bool, "found_inf": bool}, cleared by update()
        self._per_optimizer: dict[int, dict] = {}

    def is_enabled(self) -> bool:
        return self._enabled

    def get_scale(self) -> float:
        """The current scale (1.0 when disabled)."""
        return self._scale if self._enabled else 1.0

    def scale(self, loss: Tensor) -> Tensor:
        """The loss times the current scale, to call backward() on (the loss itself when disabled)."""
        return loss * self._scale if self._enabled else loss

    def _record(self, optimizer: Optimizer) -> dict:
        return self._per_optimizer.setdefault(id(optimizer), {"unscaled": False, "stepped": False, "found_inf": False})

    def unscale_(self, optimizer: Optimizer) -> None:
        """Divide the gradients of `optimizer`'s parameters by the scale, in float32, and record whether any is inf
        or NaN. At most once per optimizer between two update()s, and before step()."""
        if not self._enabled:
            return
        record = self._record(optimizer)
        if record["unscaled"]:  # also after step(), which unscales
            raise RuntimeError("unscale_() has already been called on this optimizer since the last update()")
        params = [param for param in optimizer._parameters() if param.grad is not None]
        finite_flags = []
        for param in params:
            with device_scope(param.device):
                xp = get_array_module(param.grad)
                grad = _at_least_float32(xp, param.grad)  # a new float32 array, or the float32 gradient itself
                grad /= self._scale
                param.grad = grad
                finite_flags.append(xp.isfinite(grad).all())
        if finite_flags:  # one host sync for the whole model (on one device, as in clip_grad_norm_)
            xp = get_array_module(params[0].grad)
            with device_scope(params[0].device):
                record["found_inf"] = not bool(xp.stack(finite_flags).all())
        record["unscaled"] = True

    def step(self, optimizer: Optimizer) -> None:
        """optimizer.step() unless a gradient is inf or NaN (then parameters and optimizer state stay untouched);
        unscales first if unscale_() was not called. Once per optimizer between two update()s."""
        if not self._enabled:
            optimizer.step()
            return
        record = self._record(optimizer)
        if record["stepped"]:
            raise RuntimeError("step() has already been called on this optimizer since the last update()")
        if not record["unscaled"]:
            self.unscale_(optimizer)
        if not record["found_inf"]:
            optimizer.step()
        record["stepped"] = True

    def update(self, new_scale: float | None = None) -> None:
        """Set the scale for the next step: `new_scale` if given; else halve it (backoff_factor) if this step found
        an inf or NaN, or double it (growth_factor) after growth_interval good steps in a row."""
        if not self._enabled:
            return
        if new_scale is not None:
            if not (isinstance(new_scale, numbers.Real) and 0 < new_scale < math.inf):
                raise ValueError(f"new_scale must be a positive finite number, got {new_scale!r}")
            self._scale = float(new_scale)
        else:
            records = [record for record in self._per_optimizer.values() if record["unscaled"]]
            if not records:
                raise RuntimeError("update() found no inf/NaN check since the last update(): call step(optimizer) "
                                   "(or unscale_) first")
            if any(record["found_inf"] for record in records):
                self._scale *= self._backoff_factor
                self._growth_tracker = 0
            else:
                self._growth_tracker += 1
                if self._growth_tracker == self._growth_interval:
                    grown = self._scale * self._growth_factor
                    self._scale = grown if math.isfinite(grown) else self._scale
                    self._growth_tracker = 0
        self._per_optimizer.clear()

    def state_dict(self) -> dict:
        """PyTorch's entries: scale, growth_factor, backoff_factor, growth_interval, _growth_tracker ({} when
        disabled)."""
        if not self._enabled:
            return {}
        return {"scale": self._scale, "growth_factor": self._growth_factor, "backoff_factor": self._backoff_factor,
                "growth_interval": self._growth_interval, "_growth_tracker": self._growth_tracker}

    def load_state_dict(self, state_dict: Mapping) -> None:
        """Restore a `state_dict()`; nothing changes unless all of it is valid. A disabled scaler ignores it."""
        if not self._enabled:
            return
        if not state_dict:
            raise ValueError("the GradScaler state is empty: it was saved from a disabled GradScaler")
        restored = GradScaler(state_dict["scale"], state_dict["growth_factor"], state_dict["backoff_factor"],
                              state_dict["growth_interval"])
        tracker = state_dict["_growth_tracker"]
        if not (isinstance(tracker, numbers.Integral) and 0 <= tracker < restored._growth_interval):
            raise ValueError(f"_growth_tracker must be a whole number in [0, growth_interval), got {tracker!r}")
        self._scale, self._growth_factor = restored._scale, restored._growth_factor
        self._backoff_factor, self._growth_interval = restored._backoff_factor, restored._growth_interval
        self._growth_tracker = int(tracker)


def _require_non_negative(options: dict, *names: str) -> None:
    for name in names:
        value = options[name]
        if not isinstance(value, numbers.Real) or not value >= 0:  # `not >=` also rejects NaN
            raise ValueError(f"{name} must be a non-negative number, got {value!r}")


def weight_decay_groups(params: Iterable[Tensor], weight_decay: float) -> list[dict]:
    """nanoGPT's rule: decay matrices (ndim >= 2: linear and embedding weights), not biases or norm gains.

    Returns the parameter groups (trainable parameters only, empty groups dropped) for an optimizer.
    """
    trainable = [p for p in params if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if len(p.shape) >= 2], "weight_decay": weight_decay},
        {"params": [p for p in trainable if len(p.shape) < 2], "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]


def clip_grad_norm_(params, max_norm: float) -> float:
    """Scale all gradients in place so that their joint L2 norm is at most `max_norm`; return the norm before.

    As torch.nn.utils.clip_grad_norm_: the scale is max_norm / (norm + 1e-6), applied only when below 1. The norm is
    accumulated in float32 (or wider if the gradients are). A NaN or infinite norm is returned and nothing is scaled.
    """
    if not isinstance(max_norm, numbers.Real) or not max_norm >= 0:
        raise ValueError(f"max_norm must be a non-negative number, got {max_norm!r}")
    params = [params] if isinstance(params, Tensor) else params
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    xp = get_array_module(*grads)
    with device_scope(device_of(grads[0])):
        # vdot: one fused pass per gradient with no temporary, and one host sync for the total.
        squares = [xp.vdot(g.ravel(), g.ravel()) for g in (_at_least_float32(xp, g) for g in grads)]
        total_norm = float(xp.sqrt(xp.sum(xp.stack(squares))))
        scale = max_norm / (total_norm + 1e-6)
        if scale < 1.0 and math.isfinite(total_norm):
            for grad in grads:
                grad *= scale
    return total_norm


def _at_least_float32(xp, array):
    return array.astype(xp.float32) if array.dtype.itemsize < 4 else array


def lr_at(iteration: int, *, lr: float, min_lr: float, warmup_iters: int, decay_iters: int) -> float:
    """nanoGPT's get_lr: linear warmup to `lr` over `warmup_iters`, cosine decay to `min_lr` at `decay_iters`.

    Warmup starts at lr / (warmup_iters + 1), not 0, so the first step already moves the weights.
    """
    if iteration < 0:
        raise ValueError(f"iteration must be >= 0, got {iteration}")
    if not 0 <= warmup_iters <= decay_iters:
        raise ValueError(f"need 0 <= warmup_iters <= decay_iters, got warmup_iters={warmup_iters}, "
                         f"decay_iters={decay_iters}")
    if iteration < warmup_iters:
        return lr * (iteration + 1) / (warmup_iters + 1)
    if iteration >= decay_iters:
        return min_lr
    progress = (iteration - warmup_iters) / (decay_iters - warmup_iters)  # 0 -> 1
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)
