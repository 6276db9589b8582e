"""Parameter, Module and ModuleList: the containers every layer and model is built from."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np

from .. import backend
from ..tensor import Tensor, array_of, module_call, recording_modules

_init_skipped = False


@contextlib.contextmanager
def skip_init():
    """Build modules whose parameters are left uninitialized, for a checkpoint to overwrite at once: drawing a large
    model's random initial weights takes longer than loading the real ones (and would move the seeded generator)."""
    global _init_skipped
    previous, _init_skipped = _init_skipped, True
    try:
        yield
    finally:
        _init_skipped = previous


def init_skipped() -> bool:
    """True inside `skip_init()`: a module that draws its own initial weights (a layer, GPT._init_weights) leaves
    them unset, since a checkpoint is about to overwrite them."""
    return _init_skipped


class Parameter(Tensor):
    """A Tensor that a Module owns and trains: assigning one to a Module attribute registers it."""

    def __init__(self, data, requires_grad: bool = True):
        super().__init__(array_of(data), requires_grad=requires_grad)

    def __repr__(self) -> str:
        return "Parameter containing:\n" + super().__repr__()


class Module:
    """Base class of layers and models. Parameters and submodules assigned as attributes are found by
    `parameters()`, `state_dict()`, `to()` and `train()` / `eval()`, in the order they were assigned."""

    def __init__(self):
        object.__setattr__(self, "_parameters", {})
        object.__setattr__(self, "_modules", {})
        object.__setattr__(self, "_buffers", {})
        object.__setattr__(self, "_persistent_buffers", set())
        object.__setattr__(self, "training", True)

    def __setattr__(self, name: str, value) -> None:
        if "_parameters" not in self.__dict__:
            raise RuntimeError(f"{type(self).__name__}.__init__ must call super().__init__() before assigning {name!r}")
        for registry in (self._parameters, self._modules, self._buffers):
            registry.pop(name, None)
        if isinstance(value, Parameter):
            self._parameters[name] = value
        elif isinstance(value, Module):
            self._modules[name] = value
        object.__setattr__(self, name, value)

    def register_buffer(self, name: str, array, persistent: bool = True) -> None:
        """An array that belongs to the module's state but is not trained (a mask, a table of positions)."""
        setattr(self, name, array)
        self._buffers[name] = array
        if persistent:
            self._persistent_buffers.add(name)

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} has no forward()")

    def __call__(self, *args, **kwargs):
        if not recording_modules():
            return self.forward(*args, **kwargs)
        with module_call(self):
            return self.forward(*args, **kwargs)

    # --- traversal ----------------------------------------------------------------------------------------------
    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, Module]]:
        yield prefix, self
        for name, module in self._modules.items():
            yield from module.named_modules(f"{prefix}.{name}" if prefix else name)

    def modules(self) -> Iterator[Module]:
        for _, module in self.named_modules():
            yield module

    def children(self) -> Iterator[Module]:
        yield from self._modules.values()

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Parameter]]:
        """Each parameter once, under the first name it was reached by (tied weights appear once)."""
        seen: set[int] = set()
        for module_name, module in self.named_modules(prefix):
            for name, parameter in module._parameters.items():
                if id(parameter) not in seen:
                    seen.add(id(parameter))
                    yield (f"{module_name}.{name}" if module_name else name), parameter

    def parameters(self) -> Iterator[Parameter]:
        for _, parameter in self.named_parameters():
            yield parameter

    def num_parameters(self) -> int:
        return sum(parameter.numel() for parameter in self.parameters())

    # --- modes and devices --------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> Module:
        for module in self.modules():
            object.__setattr__(module, "training", mode)
        return self

    def eval(self) -> Module:
        return self.train(False)

    def zero_grad(self) -> None:
        for parameter in self.parameters():
            parameter.grad = None

    def to(self, device=None, dtype=None) -> Module:
        """Move every parameter (with its gradient) and buffer to `device`, and/or cast the floating ones to the
        floating `dtype`, in place; returns self. Like PyTorch: `to("cuda")`, `to(tinytf.bfloat16)`,
        `to("cuda", tinytf.bfloat16)`; integer and bool buffers keep their dtype."""
        if dtype is None and device is not None and not backend.is_device_name(device):
            device, dtype = None, device
        device = None if device is None else backend.check_device(device)
        if dtype is not None:
            dtype = backend.as_dtype(dtype)
            if not backend.is_floating(dtype):
                raise TypeError(f"Module.to: dtype must be floating (parameters carry gradients), got {dtype}")
        for module in self.modules():
            for parameter in module._parameters.values():
                parameter.data = _moved(parameter.data, device, dtype)
                if parameter.grad is not None:
                    parameter.grad = _moved(parameter.grad, device, dtype)
            for name, buffer in list(module._buffers.items()):
                module.register_buffer(name, _moved(buffer, device, dtype), name in module._persistent_buffers)
        return self

    def half(self) -> Module:
        """Cast floating parameters and buffers to float16, in place."""
        return self.to(dtype=backend.FLOAT16)

    def bfloat16(self) -> Module:
        """Cast floating parameters and buffers to bfloat16, in place."""
        return self.to(dtype=backend.BFLOAT16)

    def float(self) -> Module:
        """Cast floating parameters and buffers to float32, in place."""
        return self.to(dtype=backend.DEFAULT_DTYPE)

    def double(self) -> Module:
        """Cast floating parameters and buffers to float64, in place."""
        return self.to(dtype=np.float64)

    # --- state --------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, object]:
        """Name -> array for every parameter (tied ones under each of their names) and persistent buffer."""
        state = {}
        for module_name, module in self.named_modules():
            dot = f"{module_name}." if module_name else ""
            for name, parameter in module._parameters.items():
                state[dot + name] = parameter.data
            for name in module._persistent_buffers:
                state[dot + name] = module._buffers[name]
        return state

    def load_state_dict(self, state: dict, strict: bool = True) -> tuple[list[str], list[str]]:
        """Copy arrays from `state` into this module's parameters and buffers, keeping their dtype and device.

        With strict=True any missing, unexpected or mis-shaped key raises one KeyError that lists them all;
        otherwise the missing and unexpected keys are returned. Mis-shaped tensors are always an error.
        """
        own = self.state_dict()
        missing = [name for name in own if name not in state]
        unexpected = [name for name in state if name not in own]
        misshaped = [
            f"{name}: checkpoint {_shape_of(state[name])}, model {tuple(own[name].shape)}"
            for name in own
            if name in state and _shape_of(state[name]) != tuple(own[name].shape)
        ]
        if misshaped or (strict and (missing or unexpected)):
            problems = []
            if missing:
                problems.append("missing keys: " + ", ".join(missing))
            if unexpected:
                problems.append("unexpected keys: " + ", ".join(unexpected))
            if misshaped:
                problems.append("mis-shaped keys: " + "; ".join(misshaped))
            raise KeyError(f"load_state_dict for {type(self).__name__}: " + " | ".join(problems))
        for module_name, module in self.named_modules():
            dot = f"{module_name}." if module_name else ""
            for name, parameter in module._parameters.items():
                if dot + name in state:
                    parameter.data = _converted(state[dot + name], parameter.data)
            for name in module._persistent_buffers:
                if dot + name in state:
                    module.register_buffer(name, _converted(state[dot + name], module._buffers[name]))
        return missing, unexpected

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__}({self.extra_repr()}"]
        for name, module in self._modules.items():
            child = repr(module).replace("\n", "\n  ")
            lines.append(f"  ({name}): {child}")
        return "\n".join(lines) + ("\n)" if self._modules else ")")


def _moved(array, device: str | None, dtype):
    """`array` on `device` (None: where it is), cast to `dtype` if it is floating (None: keep its dtype)."""
    if device is not None:
        array = backend.to_device(array, device)
    if dtype is not None and backend.is_floating(array.dtype) and array.dtype != dtype:
        with backend.device_scope(backend.device_of(array)):  # CuPy casts on its current device
            array = array.astype(dtype)
    return array


def _shape_of(value) -> tuple[int, ...]:
    """The shape of an array of any device, a Tensor or nested lists (np.shape would pull a GPU array to the host)."""
    return tuple(value.shape) if hasattr(value, "shape") else np.shape(value)


def _converted(value, like):
    """`value` as a fresh array with the dtype and on the device of `like`."""
    value = array_of(value)
    # Cast on the host, then one copy to the device: no kernel runs on a device that may not be the current one.
    return backend.to_device(backend.to_numpy(value).astype(like.dtype, copy=True), backend.device_of(like))


class ModuleList(Module):
    """A list of modules, registered under the names "0", "1", ..."""

    def __init__(self, modules=()):
        super().__init__()
        for module in modules:
            self.append(module)

    def append(self, module: Module) -> ModuleList:
        setattr(self, str(len(self._modules)), module)
        return self

    def __getitem__(self, index: int) -> Module:
        return list(self._modules.values())[index]

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[Module]:
        return iter(self._modules.values())
