"""Array backends: NumPy on the CPU, CuPy on CUDA GPUs.

This is the only module that knows CuPy exists. Everything else asks for the array module of its inputs with
`get_array_module(*arrays)` and writes one formula for both backends (the dezero/Chainer idea).

With TINYTF_CUDA_STANDIN=1 in the environment, "CuPy" is tinytf.testing.cupy_standin: CuPy's names and rules on
host memory, so every GPU code path runs on a machine without a GPU (the GPU rehearsal; see that module).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re

import numpy as np

DEFAULT_DTYPE = np.dtype(np.float32)
FLOAT16 = np.dtype(np.float16)
# bfloat16 comes from ml_dtypes, the NumPy extension JAX and CuPy share, as `BFLOAT16` (made on first use: importing
# ml_dtypes takes about a second, more than the rest of tinytf). Its dtype.kind is "V", not "f", and NumPy's own
# tests (np.issubdtype(x, np.floating), np.finfo) do not know it: ask is_floating and finfo here instead. A bfloat16
# array can only exist once ml_dtypes is imported, so the checks below recognize it by name without importing it.


def __getattr__(name: str):
    if name == "BFLOAT16":
        import ml_dtypes

        globals()["BFLOAT16"] = np.dtype(ml_dtypes.bfloat16)
        return globals()["BFLOAT16"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

_cupy = None
_cupy_import_error: BaseException | None = None
_cupy_probed = False


STANDIN_VARIABLE = "TINYTF_CUDA_STANDIN"
STANDIN_MODULE = "tinytf.testing.cupy_standin"


def uses_cuda_standin() -> bool:
    """True when TINYTF_CUDA_STANDIN=1: the CuPy stand-in takes CuPy's place in this process."""
    return os.environ.get(STANDIN_VARIABLE) == "1"


def _load_cupy():
    """Import CuPy (or its stand-in) on first use; remember why it failed so errors can say it."""
    global _cupy, _cupy_import_error, _cupy_probed
    if not _cupy_probed:
        _cupy_probed = True
        try:
            # By name, like CuPy itself: the stand-in is a module in CuPy's place, not a layer backend builds on.
            _cupy = importlib.import_module(STANDIN_MODULE if uses_cuda_standin() else "cupy")
        except Exception as error:  # CuPy raises more than ImportError when CUDA libraries are broken
            _cupy_import_error = error
    return _cupy


def cupy_module():
    """The cupy module, or a RuntimeError saying how to install it."""
    cupy = _load_cupy()
    if cupy is None:
        raise RuntimeError(
            f"CUDA needs CuPy, which is not importable ({_cupy_import_error!r}). "
            "Install it with: pip install 'tinytf[gpu]' (CuPy for CUDA 12)."
        )
    return cupy


def cupy_submodule(name: str):
    """A submodule of CuPy (or of its stand-in) that `import cupy` does not load, such as "cuda.nccl"."""
    return importlib.import_module(f"{cupy_module().__name__}.{name}")


def get_array_module(*arrays):
    """numpy, or cupy when any argument is a CuPy array."""
    if _cupy is not None:
        for array in arrays:
            if isinstance(array, _cupy.ndarray):
                return _cupy
    return np


def elementwise_kernel(in_params: str, out_params: str, operation: str, name: str):
    """cupy.ElementwiseKernel(in_params, out_params, operation, name): one CUDA kernel for a fused elementwise op,
    compiled by CuPy on its first call (functional/expression.py prints the operation)."""
    return cupy_module().ElementwiseKernel(in_params, out_params, operation, name)


def is_cupy_array(array) -> bool:
    return _cupy is not None and isinstance(array, _cupy.ndarray)


_DEVICE_PATTERN = re.compile(r"^(cpu|cuda)(?::(\d+))?$")


def canonical_device(device) -> str:
    """'cpu', 'cuda' or 'cuda:N' -> 'cpu' or 'cuda:N'; anything else is a ValueError."""
    text = str(device)
    match = _DEVICE_PATTERN.match(text)
    if match is None or (match.group(1) == "cpu" and match.group(2) is not None):
        raise ValueError(f"unknown device {device!r}: expected 'cpu', 'cuda' or 'cuda:N'")
    if match.group(1) == "cpu":
        return "cpu"
    return f"cuda:{int(match.group(2) or 0)}"


def is_device_name(value) -> bool:
    """Whether `value` names a device ("cpu", "cuda", "cuda:1"), as opposed to a dtype ("bfloat16"): the two share
    the first argument of `Tensor.to` and `Module.to`."""
    return isinstance(value, str) and value.split(":")[0] in ("cpu", "cuda")


def _gpu_count(cupy) -> int:
    try:
        return cupy.cuda.runtime.getDeviceCount()
    except Exception:  # no driver, or a driver without devices
        return 0


def is_available(device: str = "cuda") -> bool:
    """True when arrays can be placed on `device`."""
    device = canonical_device(device)
    if device == "cpu":
        return True
    cupy = _load_cupy()
    return cupy is not None and int(device.split(":")[1]) < _gpu_count(cupy)


def check_device(device) -> str:
    """Canonical name of a usable device, or a RuntimeError that says what is missing."""
    device = canonical_device(device)
    if device == "cpu":
        return device
    cupy = cupy_module()
    count = _gpu_count(cupy)
    index = int(device.split(":")[1])
    if count == 0:
        raise RuntimeError(f"device {device!r} requested, but CuPy finds no CUDA GPU on this machine")
    if index >= count:
        raise RuntimeError(f"device {device!r} requested, but this machine has {count} CUDA GPU(s)")
    return device


def device_name(device: str) -> str:
    """The GPU's name as CUDA reports it ("NVIDIA H100 80GB HBM3"); "" for the CPU, and where CUDA cannot say."""
    device = canonical_device(device)
    if device == "cpu":
        return ""
    try:
        name = cupy_module().cuda.runtime.getDeviceProperties(int(device.split(":")[1]))["name"]
    except (AttributeError, KeyError, RuntimeError):
        return ""
    return name.decode() if isinstance(name, bytes) else str(name)


def device_of(array) -> str:
    if is_cupy_array(array):
        return f"cuda:{array.device.id}"
    return "cpu"


def to_device(array, device):
    """Copy `array` to `device` (no copy when it is already there)."""
    device = check_device(device)
    if device == "cpu":
        if is_cupy_array(array):
            return array.get()
        return np.asarray(array)
    with device_scope(device):
        if is_cupy_array(array) and f"cuda:{array.device.id}" != device:
            return array.copy()  # CuPy copies onto the current device; asarray would keep the array where it is
        return cupy_module().asarray(array)


def device_scope(device: str):
    """A context in which CuPy allocates and computes on `device` (a canonical name); nothing to do for the CPU.

    CuPy runs kernels on its current device, so an op on arrays of cuda:1 must run with cuda:1 current."""
    if device == "cpu":
        return contextlib.nullcontext()
    return cupy_module().cuda.Device(int(device.split(":")[1]))


def to_numpy(array) -> np.ndarray:
    return array.get() if is_cupy_array(array) else np.asarray(array)


def _is_bfloat16(dtype: np.dtype) -> bool:
    return dtype.kind == "V" and dtype.name == "bfloat16"


def is_floating(dtype) -> bool:
    """True for float16, bfloat16, float32 and float64."""
    dtype = dtype if isinstance(dtype, np.dtype) else as_dtype(dtype)
    return dtype.kind == "f" or _is_bfloat16(dtype)


def is_half(dtype: np.dtype) -> bool:
    """True for the 16-bit floating dtypes, float16 and bfloat16, which ops compute in float32 (compute_dtype)."""
    return dtype.itemsize == 2 and (dtype.kind == "f" or _is_bfloat16(dtype))


def compute_dtype(dtype) -> np.dtype:
    """The dtype an op computes in for inputs of `dtype`: float32 for float16 and bfloat16 (as PyTorch's kernels
    accumulate), the dtype itself otherwise."""
    dtype = dtype if isinstance(dtype, np.dtype) else as_dtype(dtype)
    return DEFAULT_DTYPE if is_half(dtype) else dtype


def finfo(dtype):
    """Machine limits (eps, max, tiny, ...) of a floating dtype, bfloat16 included (np.finfo does not know it)."""
    dtype = as_dtype(dtype)
    if not is_floating(dtype):
        raise TypeError(f"finfo: expected a floating dtype, got {dtype}")
    if _is_bfloat16(dtype):
        import ml_dtypes

        return ml_dtypes.finfo(dtype)
    return np.finfo(dtype)


# PyTorch's short names, beside NumPy's; NumPy's own names keep NumPy's meaning ("float" is float64 there).
_DTYPE_ALIASES = {"fp16": FLOAT16, "half": FLOAT16, "fp32": DEFAULT_DTYPE, "fp64": np.dtype(np.float64)}


def as_dtype(dtype) -> np.dtype:
    """np.dtype of anything NumPy accepts, "bfloat16" and PyTorch's short names ("bf16", "fp16", "half"), or a clear
    TypeError."""
    if isinstance(dtype, str):
        if dtype in ("bfloat16", "bf16"):
            return __getattr__("BFLOAT16")
        if dtype in _DTYPE_ALIASES:
            return _DTYPE_ALIASES[dtype]
    try:
        return np.dtype(dtype)
    except TypeError as error:
        raise TypeError(f"unknown dtype {dtype!r}: {error}") from None


_generators: dict[str, object] = {}


def manual_seed(seed: int) -> None:
    """Seed one generator per device, so runs are reproducible."""
    _generators.clear()
    _generators["cpu"] = np.random.default_rng(seed)
    _generators["seed"] = seed


def generator(device: str = "cpu"):
    """The seeded random generator of `device` (numpy.random.Generator or cupy.random.Generator)."""
    device = canonical_device(device)
    if device not in _generators:
        seed = _generators.get("seed")
        if device == "cpu":
            _generators[device] = np.random.default_rng(seed)
        else:
            cupy = cupy_module()
            with cupy.cuda.Device(int(device.split(":")[1])):
                _generators[device] = cupy.random.default_rng(seed)
    return _generators[device]


def get_rng_state() -> dict:
    """The CPU generator's state, JSON-able (for checkpoints)."""
    return generator("cpu").bit_generator.state


def set_rng_state(state: dict) -> None:
    rng = np.random.default_rng()
    rng.bit_generator.state = state
    _generators["cpu"] = rng
