"""A stand-in for CuPy on the CPU, strict where CuPy is strict: the GPU rehearsal.

    TINYTF_CUDA_STANDIN=1 python -m pytest           every device-parametrized test also runs on "cuda"
    TINYTF_CUDA_STANDIN=1 python -m tinytf.train --device cuda

With the variable set, tinytf.backend imports this module where it would import `cupy`. Its arrays hold host memory
and compute with NumPy, but they are not NumPy arrays, and they refuse what CuPy refuses:
- implicit conversion to NumPy: np.asarray(x), x.__array__(), NumPy functions and ufuncs on x raise TypeError
  (`.get()`, `asnumpy`, `.item()`, `.tolist()` and float()/int()/bool() of one element work, as in CuPy);
- a NumPy array (not a scalar) in an operation with stand-in arrays raises TypeError, as CuPy does;
- arrays of two devices in one operation raise ValueError; so does an operation on arrays of a device other than
  the current one (`with cupy.cuda.Device(i):` changes it), as CuPy does without peer access;
- reductions give 0-d arrays, not NumPy scalars;
- bfloat16 (ml_dtypes) arrays work where CuPy 14's "minimal support for bfloat16" works, and fail where its
  follow-up issue (cupy#9630, and cupy#10317 for matmul) lists gaps: batched matmul (an operand with more than two
  dimensions), the rounding functions (around, round), divmod, and ufunc.at scatters;
- RawModule / RawKernel launches run the unchanged .cu source through tinytf.kernels.emulator, checking every
  argument against the kernel's parameter types (a Python int or float is an error, as it is wrong on a GPU);
- an ElementwiseKernel's operation is compiled too: CuPy's rules (types named or left to a placeholder such as T,
  `raw` parameters, the index i, broadcasting, outputs allocated when not passed) make one `__global__` kernel of
  it (_elementwise_source), which the emulator builds and runs, a thread per element.
It does no maths of its own: every result is NumPy's. It has only names real CuPy has, and it records every name
tinytf touches (`touched`), so a test can check each one against the real `cupy` module.

TINYTF_CUDA_STANDIN_DEVICES sets the number of devices (default 2, so cross-device errors are testable).
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import time
import types
import weakref

import numpy as _np

from ..kernels.emulator import _NUMPY_TYPES, EmulatedModule, cache_dir

__version__ = "14.2.0"  # the CuPy release whose names it follows

DEVICE_COUNT = int(os.environ.get("TINYTF_CUDA_STANDIN_DEVICES", "2"))
# Every public CuPy name used, as "cupy.exp", "cupy.ndarray.sum", "cupy.cuda.Device", with where it was first used.
touched: dict[str, str] = {}

_IMPLICIT_CONVERSION = ("Implicit conversion to a NumPy array is not allowed. Please use `.get()` to construct a "
                        "NumPy array explicitly.")


def _touch(name: str) -> None:
    """Note that `name` was used, and where: the first caller outside this module."""
    if name not in touched:
        frame = sys._getframe(1)
        while frame is not None and frame.f_code.co_filename == __file__:
            frame = frame.f_back
        touched[name] = f"{frame.f_code.co_filename}:{frame.f_lineno}" if frame is not None else "?"


class _RecordingModule(types.ModuleType):
    """A module that notes each public attribute read from it in `touched`."""

    def __getattribute__(self, name: str):
        if not name.startswith("_"):
            _touch(f"{object.__getattribute__(self, '__name__').replace(__name__, 'cupy')}.{name}")
        return super().__getattribute__(name)


# --- devices, streams, memory ---------------------------------------------------------------------------------


class _CurrentDevice(threading.local):
    """CuPy's current device is per thread; a new thread starts on device 0."""

    current = 0


_DeviceState = _CurrentDevice()


class Device:
    """cupy.cuda.Device: `with Device(i):` makes device i current; `.use()` makes it current for good."""

    def __init__(self, device=None):
        self.id = _DeviceState.current if device is None else int(device)
        if not 0 <= self.id < DEVICE_COUNT:
            raise runtime.CUDARuntimeError(f"cudaErrorInvalidDevice: invalid device ordinal {self.id}")
        self._previous: list[int] = []

    def use(self) -> None:
        _DeviceState.current = self.id

    def __enter__(self):
        self._previous.append(_DeviceState.current)
        _DeviceState.current = self.id
        return self

    def __exit__(self, *exc_info):
        _DeviceState.current = self._previous.pop()

    def synchronize(self) -> None:
        """Work runs at once on the CPU: nothing to wait for."""

    @property
    def compute_capability(self) -> str:
        return "90"

    @property
    def mem_info(self) -> tuple[int, int]:
        total = 80 << 30
        return total - _memory_pool.used_bytes(), total

    def __eq__(self, other) -> bool:
        return isinstance(other, Device) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    def __repr__(self) -> str:
        return f"<CUDA Device {self.id}>"


class Stream:
    """cupy.cuda.Stream: work is done when it is issued, so synchronizing returns at once."""

    null: Stream

    def __init__(self, null: bool = False, non_blocking: bool = False, ptds: bool = False, priority=None):
        self.device_id = _DeviceState.current

    def synchronize(self) -> None:
        """Nothing is pending on the CPU."""

    def use(self) -> Stream:
        _streams[_DeviceState.current] = self
        return self

    @property
    def done(self) -> bool:
        return True

    def __enter__(self):
        self._previous = _streams.get(_DeviceState.current)
        _streams[_DeviceState.current] = self
        return self

    def __exit__(self, *exc_info):
        _streams[_DeviceState.current] = self._previous


Stream.null = Stream(null=True)
_streams: dict[int, Stream] = {}


def _get_current_stream(device_id: int | None = None) -> Stream:
    return _streams.get(_DeviceState.current if device_id is None else device_id, Stream.null)


class Event:
    """cupy.cuda.Event, timed by the host clock (work is done when issued)."""

    def __init__(self, block: bool = False, disable_timing: bool = False, interprocess: bool = False):
        self.time = None

    def record(self, stream=None) -> None:
        self.time = time.perf_counter()

    def synchronize(self) -> None:
        """Recorded events are complete at once."""


def _get_elapsed_time(start: Event, end: Event) -> float:
    return (end.time - start.time) * 1e3


class MemoryPool:
    """cupy.cuda.MemoryPool's statistics over the stand-in's live arrays."""

    def __init__(self):
        self._used = 0

    def _allocated(self, array: _np.ndarray) -> None:
        self._used += array.nbytes
        weakref.finalize(array, self._freed, array.nbytes)

    def _freed(self, nbytes: int) -> None:
        self._used -= nbytes

    def used_bytes(self) -> int:
        return self._used

    def total_bytes(self) -> int:
        return self._used

    def free_bytes(self) -> int:
        return 0

    def free_all_blocks(self, stream=None) -> None:
        """Freed memory goes straight back to the host allocator: there are no cached blocks."""


_memory_pool = MemoryPool()


def get_default_memory_pool() -> MemoryPool:
    return _memory_pool


class _Runtime:
    class CUDARuntimeError(RuntimeError):
        pass

    @staticmethod
    def getDeviceCount() -> int:
        return DEVICE_COUNT

    @staticmethod
    def deviceSynchronize() -> None:
        """Nothing is pending on the CPU."""

    @staticmethod
    def runtimeGetVersion() -> int:
        return 12090

    @staticmethod
    def driverGetVersion() -> int:
        return 12090

    @staticmethod
    def getDeviceProperties(device: int) -> dict:
        return {"name": b"tinytf CUDA stand-in (CPU)", "major": 9, "minor": 0, "totalGlobalMem": 80 << 30,
                "multiProcessorCount": 132}


# --- arrays ----------------------------------------------------------------------------------------------------


class MemoryPointer:
    """cupy.cuda.MemoryPointer: what `x.data` is on a CuPy array (device memory, not the values), so code that
    takes `.data` of an array it thinks is a Tensor gets an object CuPy cannot make an array of."""

    def __init__(self, array: _np.ndarray, device_id: int):
        self.ptr, self.device_id = array.__array_interface__["data"][0], device_id

    @property
    def device(self) -> Device:
        return Device(self.device_id)


class ndarray:
    """cupy.ndarray on host memory: NumPy computes, CuPy's rules apply (see the module docstring)."""

    __array_ufunc__ = None  # NumPy ufuncs refuse stand-in arrays, and `numpy_array + x` reaches x's reflected op
    __hash__ = None

    def __init__(self, shape, dtype=float, memptr=None, strides=None, order="C"):
        self._array = _np.ndarray(shape, dtype, order=order)
        self._device_id = _DeviceState.current
        _memory_pool._allocated(self._array)

    @classmethod
    def _wrap(cls, array: _np.ndarray, device_id: int) -> ndarray:
        out = cls.__new__(cls)
        out._array, out._device_id = array, device_id
        if array.base is None:
            _memory_pool._allocated(array)
        return out

    def __getattribute__(self, name: str):
        if not name.startswith("_"):
            _touch(f"cupy.ndarray.{name}")
        return object.__getattribute__(self, name)

    def __array__(self, *args, **kwargs):
        raise TypeError(_IMPLICIT_CONVERSION)

    def __array_function__(self, func, types, args, kwargs):
        raise TypeError(f"numpy.{func.__name__} on a cupy.ndarray: {_IMPLICIT_CONVERSION}")

    # --- what an array is
    shape = property(lambda self: self._array.shape)
    dtype = property(lambda self: self._array.dtype)
    ndim = property(lambda self: self._array.ndim)
    size = property(lambda self: self._array.size)
    strides = property(lambda self: self._array.strides)
    itemsize = property(lambda self: self._array.itemsize)
    nbytes = property(lambda self: self._array.nbytes)
    flags = property(lambda self: _Flags(self._array))
    device = property(lambda self: Device(self._device_id))
    T = property(lambda self: self._wrap(self._array.T, self._device_id))
    mT = property(lambda self: self._wrap(_np.swapaxes(self._array, -1, -2), self._device_id))
    data = property(lambda self: MemoryPointer(self._array, self._device_id))

    @property
    def base(self):
        return None if self._array.base is None else self._wrap(self._array.base, self._device_id)

    def get(self, stream=None, order="C", out=None, blocking=True) -> _np.ndarray:
        """A NumPy copy on the host."""
        if out is not None:
            out[...] = self._array
            return out
        return _np.array(self._array, order=order, copy=True)

    def set(self, arr: _np.ndarray, stream=None) -> None:
        if not isinstance(arr, _np.ndarray):
            raise TypeError(f"Only numpy.ndarray can be set to cupy.ndarray, got {type(arr)}")
        self._array[...] = arr

    def item(self):
        return self._array.item()

    def tolist(self):
        return self._array.tolist()

    def __len__(self) -> int:
        return len(self._array)

    def __iter__(self):
        if self.ndim == 0:
            raise TypeError("iteration over a 0-d array")
        return (self[i] for i in range(len(self)))

    def __bool__(self) -> bool:
        return bool(self._array)

    def __float__(self) -> float:
        return float(self._array)

    def __int__(self) -> int:
        return int(self._array)

    def __complex__(self) -> complex:
        return complex(self._array)

    def __repr__(self) -> str:
        return repr(self._array)

    def __str__(self) -> str:
        return str(self._array)

    def __format__(self, spec: str) -> str:
        return format(self._array.item() if self._array.ndim == 0 else self._array, spec)

    def __getitem__(self, key):
        if _is_basic_index(key):
            return _wrap(self._array[key], self._device_id)  # a view, as in CuPy, whichever device is current
        device = _operand_device((self, _host_arrays_dropped(key)))
        return _wrap(self._array[_unwrap(key)], device)

    def __setitem__(self, key, value) -> None:
        # The index may hold NumPy arrays (CuPy copies them over); the value may not be one.
        _operand_device((self, _host_arrays_dropped(key), value))
        self._array[_unwrap(key)] = _unwrap(value)

    def copy(self, order="C"):
        """A copy on the current device, from any device (CuPy's way to move an array between GPUs)."""
        return ndarray._wrap(self._array.copy(order=order), _DeviceState.current)

    def __getattr__(self, name: str):
        """The array methods CuPy has, computed by NumPy's method of the same name."""
        if name not in _NDARRAY_METHODS:
            raise AttributeError(f"'cupy.ndarray' object has no attribute {name!r}")
        method = getattr(self._array, name)
        return _wrapped_call(method, f"ndarray.{name}", bound_to=self)


def _binary(name: str, reflected: bool = False, in_place: bool = False):
    def operator(self, other):
        if not isinstance(other, (ndarray, _np.ndarray, _np.generic, int, float, complex, bool)):
            return NotImplemented
        device = _operand_device((self, other))
        _check_bfloat16_support(name, (self, other))
        left, right = (other, self) if reflected else (self, other)
        result = getattr(_np, name)(_unwrap(left), _unwrap(right), **({"out": self._array} if in_place else {}))
        return self if in_place else _wrap(result, device)

    return operator


_OPERATORS = {"add": "add", "sub": "subtract", "mul": "multiply", "truediv": "true_divide",
              "floordiv": "floor_divide", "mod": "remainder", "pow": "power", "matmul": "matmul", "and": "bitwise_and",
              "or": "bitwise_or", "xor": "bitwise_xor", "lshift": "left_shift", "rshift": "right_shift"}
for _name, _ufunc in _OPERATORS.items():
    setattr(ndarray, f"__{_name}__", _binary(_ufunc))
    setattr(ndarray, f"__r{_name}__", _binary(_ufunc, reflected=True))
    if _name != "matmul":
        setattr(ndarray, f"__i{_name}__", _binary(_ufunc, in_place=True))
for _name, _ufunc in {"eq": "equal", "ne": "not_equal", "lt": "less", "le": "less_equal", "gt": "greater",
                      "ge": "greater_equal"}.items():
    setattr(ndarray, f"__{_name}__", _binary(_ufunc))
for _name, _ufunc in {"neg": "negative", "pos": "positive", "abs": "absolute", "invert": "invert"}.items():
    setattr(ndarray, f"__{_name}__", lambda self, _ufunc=_ufunc: _wrap(getattr(_np, _ufunc)(self._array),
                                                                       _operand_device((self,))))

# cupy.ndarray's public methods (CuPy 14), beyond the ones written out above.
_NDARRAY_METHODS = frozenset({
    "all", "any", "argmax", "argmin", "argpartition", "argsort", "astype", "byteswap", "choose", "clip", "compress",
    "conj", "conjugate", "cumprod", "cumsum", "diagonal", "dot", "dump", "dumps", "fill", "flatten", "max",
    "mean", "min", "nonzero", "partition", "prod", "ptp", "put", "ravel", "repeat", "reshape", "round",
    "searchsorted", "sort", "squeeze", "std", "sum", "swapaxes", "take", "tobytes", "tofile", "trace", "transpose",
    "var", "view",
})


class _Flags:
    """cupy.ndarray.flags: read-only."""

    def __init__(self, array: _np.ndarray):
        self.c_contiguous = array.flags.c_contiguous
        self.f_contiguous = array.flags.f_contiguous
        self.owndata = array.flags.owndata

    def __getitem__(self, name: str) -> bool:
        return {"C_CONTIGUOUS": self.c_contiguous, "F_CONTIGUOUS": self.f_contiguous, "OWNDATA": self.owndata}[name]


# --- bfloat16: what CuPy 14 cannot do yet ----------------------------------------------------------------------

_BFLOAT16_MATMULS = frozenset({"matmul", "dot", "ndarray.dot", "tensordot", "einsum", "inner"})
_BFLOAT16_MISSING = frozenset({"around", "round", "round_", "ndarray.round", "divmod", "at"})


def _check_bfloat16_support(name: str, operands) -> None:
    """A TypeError where CuPy 14 has no bfloat16 kernel: batched matmul (2-D ones go to cuBLAS), the rounding
    functions, divmod and ufunc.at (bfloat16 follow-ups, cupy#9630 and cupy#10317)."""
    if name not in _BFLOAT16_MATMULS and name.rpartition(".")[2] not in _BFLOAT16_MISSING:
        return
    arrays = [value for value in _flat([operands]) if isinstance(value, ndarray)]
    if not any(array.dtype.name == "bfloat16" for array in arrays):  # an ml_dtypes.bfloat16 array
        return
    if name in _BFLOAT16_MATMULS:
        if all(array.ndim <= 2 for array in arrays):
            return
        raise TypeError(f"cupy.{name}: batched bfloat16 matmul is not supported in CuPy 14 (operand shapes "
                        f"{[array.shape for array in arrays]}); cast to float32 first")
    raise TypeError(f"cupy.{name}: no bfloat16 kernel in CuPy 14; cast to float32 first")


# --- moving operands in and results out ------------------------------------------------------------------------


def _operand_device(operands) -> int:
    """The one device of the stand-in arrays among `operands` (nested in lists, tuples, dicts), which must be the
    current device; TypeError for a NumPy array among them, as in CuPy."""
    devices = set()

    def visit(value):
        if isinstance(value, ndarray):
            devices.add(value._device_id)
        elif isinstance(value, _np.ndarray):
            raise TypeError(f"Unsupported type {type(value)}: a numpy.ndarray cannot be an operand of a CuPy "
                            "operation; move it with cupy.asarray() first")
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)

    visit(operands)
    if len(devices) > 1:
        raise ValueError(f"arrays on devices {sorted(devices)} in one operation: CuPy needs them on one device")
    device = devices.pop() if devices else _DeviceState.current
    if device != _DeviceState.current:
        raise ValueError(f"Array device must be same as the current device: array device = {device} while current "
                         f"= {_DeviceState.current}")
    return device


def _unwrap(value):
    if isinstance(value, ndarray):
        return value._array
    if isinstance(value, (list, tuple)):
        return type(value)(_unwrap(item) for item in value)
    if isinstance(value, dict):
        return {key: _unwrap(item) for key, item in value.items()}
    return value


def _host_arrays_dropped(key):
    """An index without its NumPy arrays: CuPy copies index arrays from the host, so only its own are checked."""
    if isinstance(key, tuple):
        return tuple(_host_arrays_dropped(item) for item in key)
    return None if isinstance(key, _np.ndarray) else key


def _wrap(value, device: int):
    """NumPy results as CuPy returns them: arrays (and NumPy scalars, as 0-d arrays) on `device`."""
    if isinstance(value, _np.ndarray):
        return ndarray._wrap(value, device)
    if isinstance(value, _np.generic):
        return ndarray._wrap(_np.asarray(value), device)
    if isinstance(value, (list, tuple)):
        return type(value)(_wrap(item, device) for item in value)
    return value


# Calls that CuPy answers with a view where the memory layout allows one: no kernel runs, so they work on arrays of
# any device; where they must copy instead (a reshape of a non-contiguous array), CuPy runs a kernel, and the device
# rule applies.
_VIEW_CALLS = frozenset({
    "ndarray.reshape", "ndarray.ravel", "ndarray.squeeze", "ndarray.swapaxes", "ndarray.transpose", "ndarray.view",
    "ndarray.diagonal", "reshape", "ravel", "squeeze", "swapaxes", "transpose", "moveaxis", "rollaxis",
    "expand_dims", "broadcast_to", "atleast_1d", "atleast_2d", "atleast_3d", "diagonal",
})


def _is_basic_index(key) -> bool:
    """Integers, slices, None and Ellipsis only: NumPy's basic indexing, which CuPy answers with a view."""
    parts = key if isinstance(key, tuple) else (key,)
    return all(isinstance(part, slice) or part is None or part is Ellipsis
               or (isinstance(part, (int, _np.integer)) and not isinstance(part, (bool, _np.bool_))) for part in parts)


def _is_view_of(result, array: ndarray) -> bool:
    return isinstance(result, _np.ndarray) and _np.may_share_memory(result, array._array)


def _wrapped_call(function, name: str, bound_to: ndarray | None = None):
    def call(*args, **kwargs):
        if name in _VIEW_CALLS:
            viewed = bound_to if bound_to is not None else args[0]
            result = function(*_unwrap(args), **_unwrap(kwargs))
            views = result if isinstance(result, (list, tuple)) else [result]
            if isinstance(viewed, ndarray) and all(_is_view_of(view, viewed) for view in views):
                return _wrap(result, viewed._device_id)
        device = _operand_device((bound_to, args, kwargs))
        _check_bfloat16_support(name, (bound_to, args, kwargs))
        result = function(*_unwrap(args), **_unwrap(kwargs))
        out = kwargs.get("out")
        if isinstance(out, ndarray) and result is out._array:
            return out  # `out=` gives back the array it was handed, as CuPy does
        return _wrap(result, device)

    call.__name__ = call.__qualname__ = name
    return call


class ufunc:
    """cupy.ufunc: called, or through reduce / accumulate / outer / at, on stand-in arrays only."""

    def __init__(self, numpy_ufunc: _np.ufunc):
        self._ufunc = numpy_ufunc
        self.__name__ = self.name = numpy_ufunc.__name__
        self.nin, self.nout, self.nargs = numpy_ufunc.nin, numpy_ufunc.nout, numpy_ufunc.nargs

    def __call__(self, *args, **kwargs):
        _touch(f"cupy.{self.name}")
        return _wrapped_call(self._ufunc, self.name)(*args, **kwargs)

    def __getattr__(self, method: str):
        if method not in ("reduce", "accumulate", "reduceat", "outer", "at"):
            raise AttributeError(f"'cupy.ufunc' object has no attribute {method!r}")
        _touch(f"cupy.{self.name}.{method}")
        if method == "at":
            return self._at
        return _wrapped_call(getattr(self._ufunc, method), f"{self.name}.{method}")

    def _at(self, a, indices, b=None) -> None:
        """ufunc.at(a, indices, b): the indices as an index (CuPy copies NumPy index arrays over)."""
        _operand_device((a, _host_arrays_dropped(indices), b))
        _check_bfloat16_support(f"{self.name}.at", (a, b))
        self._ufunc.at(_unwrap(a), _unwrap(indices), *(() if b is None else (_unwrap(b),)))


def _numpy_function(name: str):
    """cupy.<name> as NumPy's function of that name, on stand-in arrays."""
    value = getattr(_np, name)
    if isinstance(value, _np.ufunc):
        return ufunc(value)
    if isinstance(value, type) or not callable(value):
        return value  # dtypes and scalar types (CuPy re-exports NumPy's), constants
    return _wrapped_call(value, name)


def array(obj, dtype=None, copy=True, order="K", subok=False, ndmin=0):
    """cupy.array: host data (NumPy arrays, lists, scalars) or a CuPy array of any device, onto the current one."""
    if isinstance(obj, ndarray):
        if not copy and (dtype is None or _np.dtype(dtype) == obj.dtype):
            return obj  # as in CuPy: no copy, even from another device
        return ndarray._wrap(_np.array(obj._array, dtype=dtype, copy=True, order=order, ndmin=ndmin),
                             _DeviceState.current)
    if isinstance(obj, (list, tuple)):  # nested host data, perhaps with CuPy arrays of the current device in it
        _operand_device([item for item in _flat(obj) if isinstance(item, ndarray)])
        obj = _unwrap(obj)
    host = _np.array(obj, dtype=dtype, copy=True, order=order, ndmin=ndmin)
    if host.dtype == object:
        raise ValueError("Unsupported dtype object")
    return ndarray._wrap(host, _DeviceState.current)


def asarray(a, dtype=None, order=None):
    """cupy.asarray: cupy.array without a copy where none is needed."""
    return array(a, dtype=dtype, copy=False, order=order or "K")


def _flat(items):
    for item in items:
        if isinstance(item, (list, tuple)):
            yield from _flat(item)
        else:
            yield item


def asnumpy(a, stream=None, order="C", out=None, blocking=True):
    """A NumPy copy of a stand-in array (NumPy input is returned as it is, as CuPy does)."""
    if isinstance(a, ndarray):
        return a.get(order=order, out=out)
    return _np.asarray(a, order=order)


def get_array_module(*args):
    return sys.modules[__name__] if any(isinstance(arg, ndarray) for arg in args) else _np


# cupy.<name> for NumPy's names, made once per name. Not cached in the module's globals: names such as all, any, min,
# max and round would then shadow the builtins this module itself calls.
_numpy_functions: dict[str, object] = {}


def __getattr__(name: str):
    if name.startswith("_") or not hasattr(_np, name):
        raise AttributeError(f"module 'cupy' has no attribute {name!r}")
    if name not in _numpy_functions:
        _numpy_functions[name] = _numpy_function(name)
    return _numpy_functions[name]


# --- random ----------------------------------------------------------------------------------------------------


class Generator:
    """cupy.random.Generator over NumPy's generator of the same seed (a stand-in's streams are NumPy's)."""

    def __init__(self, bit_generator):
        self._generator = _np.random.Generator(bit_generator)
        self._device_id = _DeviceState.current

    def __getattr__(self, name: str):
        if name not in _GENERATOR_METHODS:
            raise AttributeError(f"'cupy.random.Generator' object has no attribute {name!r}")
        _touch(f"cupy.random.Generator.{name}")
        return _wrapped_call(getattr(self._generator, name), f"Generator.{name}")


_GENERATOR_METHODS = frozenset({
    "beta", "binomial", "chisquare", "dirichlet", "exponential", "f", "gamma", "geometric", "hypergeometric",
    "integers", "logseries", "poisson", "power", "random", "standard_exponential", "standard_gamma",
    "standard_normal", "uniform",
})


def _default_rng(seed=None) -> Generator:
    return Generator(_np.random.PCG64(seed))


# --- kernels ---------------------------------------------------------------------------------------------------


class RawModule:
    """cupy.RawModule: the CUDA source built for the CPU by tinytf.kernels.emulator, with the same options."""

    def __init__(self, code: str | None = None, path: str | None = None, options=(), backend: str = "nvrtc",
                 translate_cucomplex: bool = False, enable_cooperative_groups: bool = False, name_expressions=None,
                 log_stream=None, jitify: bool = False):
        if (code is None) == (path is None):
            raise TypeError("One of code or path must be given")
        if code is not None:
            path = _source_file(code)
        self.code, self.file_path, self.options = code, path, tuple(options)
        self.module = EmulatedModule(path, self.options)

    def get_function(self, name: str) -> RawKernel:
        return RawKernel(self.module.get_function(name), name)


class RawKernel:
    """cupy.RawKernel's call: kernel(grid, block, args, shared_mem=0), arguments on the current device."""

    def __init__(self, emulated_kernel, name: str):
        self._kernel, self.name = emulated_kernel, name

    def __call__(self, grid, block, args, *, shared_mem: int = 0, stream=None,
                 enable_cooperative_groups: bool = False) -> None:
        _operand_device(tuple(args))
        for arg in args:
            if not isinstance(arg, (ndarray, _np.generic, int, float, bool)):
                raise TypeError(f"Unsupported type {type(arg)} as a kernel argument")
        self._kernel(grid, block, tuple(_unwrap(list(args))), shared_mem=shared_mem)


class ElementwiseKernel:
    """cupy.ElementwiseKernel: `operation` runs once per element i of the broadcast non-raw arguments, through the
    emulator (see _elementwise_source)."""

    def __init__(self, in_params: str, out_params: str, operation: str, name: str = "kernel", reduce_dims=True,
                 preamble: str = "", no_return: bool = False, return_tuple: bool = False, loop_prep: str = "",
                 after_loop: str = ""):
        if loop_prep or after_loop:
            raise NotImplementedError("the stand-in's ElementwiseKernel runs no loop_prep or after_loop code")
        self.in_params, self.out_params = _elementwise_params(in_params), _elementwise_params(out_params)
        self.nin, self.nout = len(self.in_params), len(self.out_params)
        self.nargs = self.nin + self.nout
        self.operation, self.name, self.preamble = operation, name, preamble
        self.no_return, self.return_tuple = no_return, return_tuple
        self._modules: dict[str, EmulatedModule] = {}

    def __call__(self, *args, size=None, block_size=None):
        if size is not None:
            raise NotImplementedError("the stand-in's ElementwiseKernel takes its size from the arrays")
        if len(args) not in (self.nin, self.nargs):
            raise TypeError(f"Wrong number of arguments for {self.name!r}: expected {self.nin} or {self.nargs}, "
                            f"got {len(args)}")
        device = _operand_device(args)
        types = self._checked_types(args)
        arrays = [(param, arg._array) for param, arg in zip(self.in_params + self.out_params, args)
                  if isinstance(arg, ndarray) and not param[0]]
        shape = _np.broadcast_shapes(*[array.shape for _, array in arrays]) if arrays else ()
        outputs = list(args[self.nin:])
        for param in self.out_params[len(outputs):]:
            outputs.append(ndarray._wrap(_np.empty(shape, dtype=_elementwise_dtype(param[1], types)), device))
        for param, out in zip(self.out_params, outputs):
            if not isinstance(out, ndarray):
                raise TypeError(f"{self.name}: output {param[2]!r} must be a cupy.ndarray, got {type(out).__name__}")
            if not param[0] and out.shape != shape:
                raise ValueError(f"Out shape is mismatched: {param[2]!r} has {out.shape}, the arguments broadcast "
                                 f"to {shape}")
        size = int(_np.prod(shape))
        if size:
            self._launch(args[:self.nin], outputs, shape, size, types)
        if self.no_return:
            return None
        if self.nout == 1 and not self.return_tuple:
            return outputs[0]
        return tuple(outputs)

    def _checked_types(self, args) -> dict[str, _np.dtype]:
        """CuPy's typing (_decide_params_type_core): the outputs passed, then the input arrays, must have the dtype
        their parameter names, and a placeholder takes the dtype of the first of them bound to it; a placeholder bound
        to scalars only takes the first scalar's."""
        types: dict[str, _np.dtype] = {}
        bound = [*zip(self.out_params, args[self.nin:]), *zip(self.in_params, args[:self.nin])]
        for (_, type_name, name), arg in bound:
            if isinstance(arg, ndarray):
                placeholder = _is_placeholder(type_name)
                expected = types.setdefault(type_name, arg.dtype) if placeholder else _np.dtype(type_name)
                if arg.dtype != expected:
                    raise TypeError(f"Type is mismatched. {name} {arg.dtype} {expected}")
        for (_, type_name, _), arg in zip(self.in_params, args):
            if _is_placeholder(type_name) and not isinstance(arg, ndarray):
                types.setdefault(type_name, _np.asarray(arg).dtype)
        for _, type_name, _ in self.in_params + self.out_params:
            if _is_placeholder(type_name) and type_name not in types:
                raise TypeError(f"{self.name}: cannot determine the type of {type_name!r}")
        return types

    def _launch(self, inputs, outputs, shape, size, types) -> None:
        scalar_params = {param[2] for param, arg in zip(self.in_params, inputs) if not isinstance(arg, ndarray)}
        source = _elementwise_source(self.in_params, self.out_params, self.operation, self.name, types, scalar_params,
                                    self.preamble)
        if source not in self._modules:
            self._modules[source] = EmulatedModule(_source_file(source))
        kernel_args, write_back = [], []
        for param, arg in zip(self.in_params + self.out_params, [*inputs, *outputs]):
            dtype = _elementwise_dtype(param[1], types)
            if not isinstance(arg, ndarray):
                kernel_args.append(dtype.type(arg))  # CuPy casts a scalar argument to its parameter's type
                continue
            output = param in self.out_params
            array = arg._array if param[0] or output else _np.broadcast_to(arg._array, shape)
            contiguous = _np.ascontiguousarray(array)
            if output and contiguous is not arg._array:
                write_back.append((arg._array, contiguous))
            kernel_args.append(contiguous)
        kernel_args.append(_np.int64(size))
        block = 128
        self._modules[source].get_function(self.name)(((size + block - 1) // block,), (block,), tuple(kernel_args))
        for target, contiguous in write_back:
            target[...] = contiguous


_C_NAMES = {_np.dtype(dtype): name for name, dtype in reversed(list(_NUMPY_TYPES.items()))}


def _elementwise_params(text: str) -> list[tuple[bool, str, str]]:
    """CuPy's parameter list "T x, raw float32 y" -> [(is_raw, type, name)]."""
    params = []
    for item in (part.split() for part in text.split(",") if part.strip()):
        raw = item[0] == "raw"
        if len(item) != 2 + raw:
            raise ValueError(f"Syntax error: {' '.join(item)!r}")
        params.append((raw, item[-2], item[-1]))
    return params


def _is_placeholder(type_name: str) -> bool:
    """CuPy's rule: a one-letter type (T, X) is a placeholder; any other is a NumPy dtype name, so "float" is
    float64 there, as in numpy.dtype("float"), not C's float."""
    return len(type_name) == 1


def _elementwise_dtype(type_name: str, types: dict) -> _np.dtype:
    return types[type_name] if _is_placeholder(type_name) else _np.dtype(type_name)


def _elementwise_source(in_params, out_params, operation: str, name: str, types: dict, scalar_params=(),
                       preamble: str = "") -> str:
    """The `__global__` kernel an ElementwiseKernel stands for: thread i binds each non-raw array parameter to its
    element i (a reference, constant for inputs), a raw one to the whole array, a scalar to its value, and runs
    `operation`; the placeholders (T) are typedefs. NVRTC compiles it as it is (tests/functional)."""
    signature, bindings = [], []
    for param in in_params + out_params:
        raw, type_name, param_name = param
        ctype = _C_NAMES[_elementwise_dtype(type_name, types)]
        constant = "const " if param in in_params else ""
        if param_name in scalar_params:
            signature.append(f"{ctype} {param_name}")
        elif raw:
            signature.append(f"{constant}{ctype}* {param_name}")
        else:
            signature.append(f"{constant}{ctype}* _raw_{param_name}")
            bindings.append(f"    {constant}{ctype}& {param_name} = _raw_{param_name}[i];")
    typedefs = "".join(f"typedef {_C_NAMES[dtype]} {placeholder};\n" for placeholder, dtype in types.items())
    return (f"{typedefs}{preamble}\n"
            f'extern "C" __global__ void {name}({", ".join(signature)}, long long _ind_size) {{\n'
            "    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;\n"
            "    if (i >= _ind_size) return;\n"
            + "\n".join(bindings) + f"\n    {operation};\n}}\n")


def _source_file(code: str) -> str:
    """CUDA source text saved under the emulator's cache (the emulator builds from files), keyed by its hash."""
    directory = cache_dir() / "sources"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{hashlib.sha256(code.encode()).hexdigest()[:20]}.cu"
    if not path.exists():
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(code)
        os.replace(partial, path)
    return str(path)


# --- the submodules: cupy.cuda, cupy.cuda.runtime, cupy.random --------------------------------------------------


def _submodule(name: str, **attributes) -> types.ModuleType:
    module = _RecordingModule(f"{__name__}.{name}")
    module.__dict__.update(attributes)
    sys.modules[module.__name__] = module
    return module


runtime = _submodule("cuda.runtime", CUDARuntimeError=_Runtime.CUDARuntimeError,
                     getDeviceCount=_Runtime.getDeviceCount, deviceSynchronize=_Runtime.deviceSynchronize,
                     runtimeGetVersion=_Runtime.runtimeGetVersion, driverGetVersion=_Runtime.driverGetVersion,
                     getDeviceProperties=_Runtime.getDeviceProperties)
cuda = _submodule("cuda", Device=Device, Stream=Stream, Event=Event, MemoryPool=MemoryPool,
                  MemoryPointer=MemoryPointer, runtime=runtime,
                  get_current_stream=_get_current_stream, get_elapsed_time=_get_elapsed_time,
                  is_available=lambda: True)
random = _submodule("random", Generator=Generator, default_rng=_default_rng)
# CuPy's nccl module imports without the NCCL library and then says so in `available`: the stand-in has none.
nccl = _submodule("cuda.nccl", available=False)

sys.modules[__name__].__class__ = _RecordingModule
