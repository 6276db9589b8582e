"""Tensor and the reverse-mode autograd engine.

A Tensor wraps one NumPy or CuPy array. Every differentiable op is a `Function`: `forward` computes on raw arrays
and saves what `backward` needs; `apply` records the Function as the output's creator, so the outputs of a
computation form a graph back to its inputs. `Tensor.backward` orders that graph topologically and walks it once,
from the output to the leaves, calling each Function's `backward` with the gradient of its output.

The operators and methods (`+`, `@`, `.sum()`, `.softmax()`, ...) are attached to Tensor by `tinytf.functional`,
which holds the Functions; this file is only the engine.
"""

from __future__ import annotations

import contextlib

import numpy as np

from . import backend

_grad_enabled = True


def is_grad_enabled() -> bool:
    return _grad_enabled


class _GradMode(contextlib.ContextDecorator):
    """Sets whether ops record the graph, and restores the previous mode on exit."""

    enabled: bool

    def __enter__(self):
        global _grad_enabled
        self._previous = _grad_enabled
        _grad_enabled = self.enabled

    def __exit__(self, *exc_info):
        global _grad_enabled
        _grad_enabled = self._previous


class no_grad(_GradMode):
    """Context manager and decorator: ops inside record no graph (inference, optimizer updates)."""

    enabled = False


class enable_grad(_GradMode):
    """Context manager and decorator: record the graph again inside a `no_grad` region."""

    enabled = True


# While `record_modules()` is active: the Modules whose calls are running, outermost first; None otherwise.
_module_calls: tuple | None = None


@contextlib.contextmanager
def record_modules():
    """While active, each Function that joins the graph inside a Module call keeps `module_calls`: the Modules whose
    calls were running, outermost first (tinytf.viz groups a graph's ops by module with it)."""
    global _module_calls
    previous, _module_calls = _module_calls, ()
    try:
        yield
    finally:
        _module_calls = previous


def recording_modules() -> bool:
    return _module_calls is not None


@contextlib.contextmanager
def module_call(module):
    """Module.__call__ runs forward inside this while `record_modules()` is active."""
    global _module_calls
    outer, _module_calls = _module_calls, _module_calls + (module,)
    try:
        yield
    finally:
        _module_calls = outer


class Function:
    """One differentiable op: `forward` on raw arrays, `backward` beside it.

    Subclasses implement `forward(self, *arrays, **params) -> array` and `backward(self, grad_output) -> grads`,
    one gradient per Tensor input (a tuple for several; None where `needs_input_grad` is False).
    """

    # Class-level defaults rather than an __init__: under no_grad (inference) a Function only runs forward and is
    # dropped, and the graph fields below are set only when `apply` records it.
    inputs: tuple[Tensor, ...] = ()
    saved_tensors: tuple = ()
    needs_input_grad: tuple[bool, ...] = ()
    module_calls: tuple = ()  # set only under record_modules()
    _released = False
    # The subclass to run instead when an input is float16 or bfloat16 (set by functional.common.computes_in_float32
    # on ops that accumulate): it computes in float32 and rounds once.
    half_precision_variant: type | None = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.half_precision_variant = None  # a subclass of a decorated op is not its variant, unless decorated too

    def save_for_backward(self, *arrays) -> None:
        self.saved_tensors = arrays

    def forward(self, *arrays, **params):
        raise NotImplementedError

    def backward(self, grad_output):
        raise NotImplementedError

    @classmethod
    def apply(cls, *inputs: Tensor, **params) -> Tensor:
        """Run forward on the inputs' arrays; record the graph when gradients are needed."""
        # Every op passes here, so it is written for speed: one pass over the inputs, the device scope only for
        # GPU arrays, and the output wrapped without Tensor.__init__'s checks (forward returns an array).
        arrays = [tensor.data for tensor in inputs]
        if cls.half_precision_variant is not None and _has_half_precision(arrays):
            cls = cls.half_precision_variant
        function = cls()
        for array in arrays:
            if type(array) is not np.ndarray:  # only then can devices differ, or CuPy need its current device set
                with backend.device_scope(_common_device(cls.__name__, inputs)):
                    output = _wrap(function.forward(*arrays, **params))
                break
        else:
            output = _wrap(function.forward(*arrays, **params))
        if _grad_enabled:
            needs = tuple([tensor.requires_grad for tensor in inputs])
            if True in needs:
                function.needs_input_grad, function.inputs = needs, inputs
                output.requires_grad, output._creator = True, function
                if _module_calls:
                    function.module_calls = _module_calls
        return output

    def release(self) -> None:
        """Drop the saved arrays, the links to the inputs and whatever else forward stored, so the graph's memory is
        freed after backward."""
        self.__dict__.clear()
        self._released = True


def _has_half_precision(arrays) -> bool:
    for array in arrays:
        dtype = array.dtype
        if dtype.itemsize == 2 and backend.is_half(dtype):
            return True
    return False


def _common_device(op_name: str, tensors) -> str:
    """The one device of the tensors; a RuntimeError when they differ."""
    devices = [tensor.device for tensor in tensors]
    for device in devices[1:]:
        if device != devices[0]:
            raise RuntimeError(
                f"{op_name}: tensors are on different devices, {devices[0]} and {device}; "
                "move them to one device with .to(device)"
            )
    return devices[0]


class Tensor:
    """An n-dimensional array (NumPy or CuPy) that can record the ops applied to it for autograd."""

    __slots__ = ("data", "grad", "requires_grad", "_creator", "_retains_grad", "__weakref__")
    # Makes NumPy defer `ndarray + Tensor` to Tensor.__radd__ instead of looping over the tensor.
    __array_priority__ = 1000

    def __init__(self, data, requires_grad: bool = False):
        if not isinstance(data, np.ndarray) and not backend.is_cupy_array(data):
            data = np.asarray(data)  # also turns NumPy scalars, which 0-d ops return, back into arrays
        self.data = data
        self.grad = None
        self._creator: Function | None = None
        self._retains_grad = False
        self.requires_grad = False
        if requires_grad:
            self.requires_grad_(True)

    # --- properties ---------------------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def device(self) -> str:
        return backend.device_of(self.data)

    @property
    def is_leaf(self) -> bool:
        return self._creator is None

    @property
    def grad_fn(self) -> Function | None:
        return self._creator

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def numel(self) -> int:
        return int(self.data.size)

    def __len__(self) -> int:
        if self.ndim == 0:
            raise TypeError("len() of a 0-d tensor")
        return self.shape[0]

    __hash__ = object.__hash__

    def __bool__(self) -> bool:
        if self.data.size != 1:
            raise RuntimeError(f"the truth value of a tensor of shape {self.shape} is ambiguous; use .any() or .all()")
        return bool(self.data)

    # --- autograd -----------------------------------------------------------------------------------------------
    def requires_grad_(self, requires_grad: bool = True) -> Tensor:
        if requires_grad and not backend.is_floating(self.dtype):
            raise TypeError(f"only floating-point tensors can require gradients, got dtype {self.dtype}")
        if not requires_grad and self._creator is not None:
            raise RuntimeError("requires_grad can only be switched off on a leaf tensor; use .detach()")
        self.requires_grad = requires_grad
        return self

    def retain_grad(self) -> None:
        """Keep `.grad` on this non-leaf tensor after backward (leaves always keep theirs)."""
        self._retains_grad = True

    def detach(self) -> Tensor:
        """A tensor sharing this one's data, cut from the graph."""
        return Tensor(self.data)

    def backward(self, grad=None, retain_graph: bool = False) -> None:
        """Accumulate d(self)/d(leaf) into the `.grad` of every leaf that requires grad.

        `grad` is d(loss)/d(self); it may be omitted only for a tensor with one element (a scalar loss).
        """
        if not self.requires_grad:
            raise RuntimeError("backward() on a tensor that does not require grad (no input required grad)")
        with backend.device_scope(self.device):  # CuPy computes on its current device: make it this tensor's
            self._backpropagate(self._output_grad(grad), retain_graph)

    def _output_grad(self, grad):
        """d(loss)/d(self) as an array like self.data: ones for a scalar loss, else `grad` checked."""
        xp = backend.get_array_module(self.data)
        if grad is None:
            if self.data.size != 1:
                raise RuntimeError(
                    f"backward() without a gradient needs a scalar output, got shape {self.shape}; "
                    "pass grad= with the same shape"
                )
            grad = xp.ones_like(self.data)
        else:
            grad = grad.data if isinstance(grad, Tensor) else xp.asarray(grad, dtype=self.dtype)
            if grad.shape != self.shape:
                raise ValueError(f"backward(): grad has shape {grad.shape}, expected the tensor's shape {self.shape}")
        return grad

    def _backpropagate(self, grad, retain_graph: bool) -> None:
        """The reverse sweep: each node's gradient, complete, handed to its creator's backward."""
        # A node may feed several later nodes; its gradient is the sum over all of them, so it must be complete
        # before the node passes it on. Visiting nodes in reverse topological order guarantees that every consumer
        # of a node has already contributed when the node itself is reached.
        grads = GradientSums(self, grad)
        for node in reversed(_topological_order(self)):
            node_grad = grads.pop(node)
            if node_grad is None:
                continue
            creator = node._creator
            if creator is None:
                node._accumulate_grad(node_grad)
                continue
            if node._retains_grad:
                node._accumulate_grad(node_grad)
            if creator._released:
                raise RuntimeError(
                    "backward through a graph whose saved arrays were already freed by an earlier backward(); "
                    "pass retain_graph=True to the first call if you need to go through it twice"
                )
            input_grads = creator.backward(node_grad)
            if type(input_grads) is not tuple:
                input_grads = (input_grads,)
            for parent, parent_grad in zip(creator.inputs, input_grads):
                if parent_grad is not None and parent.requires_grad:
                    if parent_grad.shape != parent.data.shape:
                        raise _misshaped_gradient(creator, parent, parent_grad)
                    grads.add(parent, parent_grad)
            if not retain_graph:
                creator.release()

    def _accumulate_grad(self, grad) -> None:
        if grad.shape != self.shape:
            raise RuntimeError(f"internal error: gradient of shape {grad.shape} for a tensor of shape {self.shape}")
        if self.grad is None:
            # A copy: backward may hand the same array to several inputs, and optimizers update .grad in place.
            self.grad = grad.astype(self.dtype, copy=True)
        else:
            self.grad += grad

    # --- conversion ---------------------------------------------------------------------------------------------
    def numpy(self) -> np.ndarray:
        """The data as a NumPy array on the host (copied from the GPU if needed)."""
        return backend.to_numpy(self.data)

    def item(self):
        if self.data.size != 1:
            raise ValueError(f"item() needs a tensor with one element, got shape {self.shape}")
        return self.data.item()

    def tolist(self):
        return self.numpy().tolist()

    def __repr__(self) -> str:
        body = np.array2string(self.numpy(), separator=", ", prefix="tensor(", threshold=200)
        extras = []
        if self.dtype != backend.DEFAULT_DTYPE and self.dtype != np.int64 and self.dtype != np.bool_:
            extras.append(f"dtype={self.dtype}")
        if self.device != "cpu":
            extras.append(f"device='{self.device}'")
        if self._creator is not None:
            extras.append(f"grad_fn={type(self._creator).__name__}")
        elif self.requires_grad:
            extras.append("requires_grad=True")
        return "tensor(" + ", ".join([body] + extras) + ")"


_new_tensor = object.__new__


def array_of(value):
    """The array a Tensor holds, or `value` itself (an array, a list, a number). Not getattr(value, "data"): a
    CuPy array's .data is its device memory pointer and a NumPy array's a memoryview."""
    return value.data if isinstance(value, Tensor) else value


def _wrap(array) -> Tensor:
    """An op's output array as a new Tensor, without Tensor.__init__'s argument handling (the engine's fast path);
    NumPy scalars, which 0-d ops return, become 0-d arrays."""
    if not isinstance(array, np.ndarray) and not backend.is_cupy_array(array):  # keeps ndarray subclasses
        array = np.asarray(array)
    tensor = _new_tensor(Tensor)
    tensor.data, tensor.grad, tensor._creator = array, None, None
    tensor.requires_grad = tensor._retains_grad = False
    return tensor


class SliceGrad:
    """A gradient that is zero but at `index` (basic indexing: ints and slices), where it is `values`.

    Indexing's backward returns one, so the gradients of several slices of one tensor (q, k and v split from one
    projection) are written into a single array, not each padded with zeros to the full shape and then summed.
    """

    __slots__ = ("index", "values", "shape")

    def __init__(self, index, values, shape: tuple[int, ...]):
        self.index, self.values, self.shape = index, values, shape

    def dense(self, dtype=None):
        full = backend.get_array_module(self.values).zeros(self.shape, dtype=dtype or self.values.dtype)
        full[self.index] = self.values
        return full


class GradientSums:
    """The gradient flowing into each node of one backward pass, summed over the node's consumers as they report.

    Arrays that ops return may be shared (Add hands one array to both inputs), so a node's first sum goes into a new
    array, and only arrays allocated here are added into in place. A SliceGrad stays sparse while it is alone, and
    later slices of the same node are written into one buffer.
    """

    def __init__(self, root: Tensor, grad):
        self._sums = {id(root): grad}
        self._owned: set[int] = set()  # ids whose sum is an array this pass allocated

    def add(self, node: Tensor, grad) -> None:
        key = id(node)
        total = self._sums.get(key)
        if total is None:
            self._sums[key] = grad
            return
        if key not in self._owned:
            total = self._sums[key] = self._fresh_sum(total, grad)
            self._owned.add(key)
        if isinstance(grad, SliceGrad):
            total[grad.index] += grad.values
        else:
            total += grad

    def pop(self, node: Tensor):
        """The complete gradient of `node` as a dense array (None if nothing flowed into it), forgotten here.

        A popped node is never added to again in the same pass (its consumers all came before it), so its id may
        stay in `_owned`."""
        total = self._sums.pop(id(node), None)
        return total.dense() if type(total) is SliceGrad else total

    @staticmethod
    def _fresh_sum(total, grad):
        """A new dense array holding `total`, in the dtype that can hold total + grad."""
        values = grad.values if isinstance(grad, SliceGrad) else grad
        xp = backend.get_array_module(values)
        dtype = xp.result_type(total.values if isinstance(total, SliceGrad) else total, values)
        # xp.array, not astype: ops on 0-d arrays return NumPy scalars, which cannot be added into
        return total.dense(dtype) if isinstance(total, SliceGrad) else xp.array(total, dtype=dtype, copy=True)


def _misshaped_gradient(function: Function, parent: Tensor, grad) -> RuntimeError:
    """The error for a backward that returned a gradient whose shape is not its input's (a broadcast input's
    gradient must be summed back to the input's shape: functional.common.sum_to)."""
    index = next(i for i, input_ in enumerate(function.inputs) if input_ is parent)
    return RuntimeError(f"{type(function).__name__}.backward returned a gradient of shape {tuple(grad.shape)} for "
                        f"its input {index} of shape {parent.shape}; a broadcast input's gradient must be summed back "
                        "to its shape (sum_to)")


def _topological_order(root: Tensor) -> list[Tensor]:
    """Nodes that require grad, each after all of its inputs (iterative DFS: deep graphs do not hit recursion limits)."""
    order: list[Tensor] = []
    visited: set[int] = set()
    stack: list[tuple[Tensor, bool]] = [(root, False)]
    while stack:
        node, inputs_done = stack.pop()
        if inputs_done:
            order.append(node)
            continue
        if id(node) in visited:
            continue
        visited.add(id(node))
        stack.append((node, True))
        if node._creator is not None:
            for parent in node._creator.inputs:
                if parent.requires_grad and id(parent) not in visited:
                    stack.append((parent, False))
    return order
