"""Run CUDA kernels on the CPU: the unchanged .cu file, built by g++ against cuda_emulator.h, called through ctypes.

    module = EmulatedModule("tinytf/kernels/flash_attention.cu", options=("-DHEAD_DIM=64",), schedule="warps-random")
    kernel = module.get_function("flash_attention_forward")
    kernel((n_query_tiles, batch * heads), (128,), (q, k, v, ..., numpy.int32(query_len), numpy.float32(scale)))

The calls have the shape of cupy.RawModule and cupy.RawKernel, with NumPy arrays where CuPy takes device arrays, so a
launcher can run on either. A launch also checks what a GPU would accept silently:
- every argument against the kernel's parameter type: numpy.int32 for `int`, numpy.float32 for `float` (CuPy passes a
  Python int as 64 bits and a Python float as a double, which the kernel would misread), arrays of the pointee's dtype
  (numpy.float16 for `__half`, ml_dtypes.bfloat16 for `__nv_bfloat16`), C-contiguous, and writable behind a non-const
  pointer;
- writes past either end of an array: each array is copied between guard zones (NaN for floating-point types, 0xAB
  bytes otherwise) that must come back untouched. Reads of a floating-point guard bring NaN into the results.
- with poison_outputs=True, elements a kernel forgets to write: arrays behind non-const pointers reach the kernel
  filled with NaN (0xAB bytes for integers) instead of their contents. Only for kernels that never read their outputs.
How the threads are scheduled, and what is reported with file and line, is described in cuda_emulator.h.

Builds are cached in $TINYTF_CACHE_DIR/cuda_emulator (default ~/.cache/tinytf/cuda_emulator), keyed by the source,
the headers it includes with `#include "..."`, the emulator's header, the options and the compiler, so only the
first launch of a variant waits for g++ (a few seconds).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import ml_dtypes
import numpy as np

HEADER = Path(__file__).with_name("cuda_emulator.h")
SCHEDULES = ("lockstep", "warps-forward", "warps-reverse", "warps-random")
CXXFLAGS = ("-std=c++17", "-O1", "-shared", "-fPIC", "-pthread")  # -O1: builds twice as fast as -O2, runs as fast
GUARD_ELEMENTS = 256

_NUMPY_TYPES = {
    "float": np.float32,
    "double": np.float64,
    "bool": np.bool_,
    "signed char": np.int8,
    "unsigned char": np.uint8,
    "short": np.int16,
    "unsigned short": np.uint16,
    "int": np.int32,
    "unsigned int": np.uint32,
    "long long": np.int64,
    "unsigned long long": np.uint64,
    "__half": np.float16,
    "__nv_bfloat16": ml_dtypes.bfloat16,
}
_FLOATING_TYPES = {np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float32), np.dtype(np.float64)}
_LOCAL_INCLUDE = re.compile(r'^\s*#\s*include\s*"([^"]+)"', re.MULTILINE)
_KERNEL_PATTERN = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?(\w+)\s*\(')


class EmulatorError(RuntimeError):
    """A kernel did something a GPU would get wrong or hang on; the message names the file and line."""


class EmulatorBuildError(RuntimeError):
    """g++ could not build the kernel; the message carries its output."""


def cache_dir() -> Path:
    root = os.environ.get("TINYTF_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tinytf"
    )
    return Path(root) / "cuda_emulator"


class EmulatedModule:
    """A CPU build of the `extern "C" __global__` kernels of one .cu file, like cupy.RawModule(path=..., options=...).

    options: the NVRTC options the GPU build gets; -D, -U and -I options reach g++, the rest only name the GPU target.
    schedule: one of SCHEDULES, the default for the module's kernels; seed drives "warps-random".
    workers: OS threads that run blocks side by side (default: the CPUs this process may use, at most 8).
    poison_outputs: hand kernels NaN-filled outputs (see the module docstring).
    """

    def __init__(self, path, options=(), *, schedule: str = "lockstep", seed: int = 0, workers: int | None = None,
                 poison_outputs: bool = False):
        _check_schedule(schedule)
        self.path = Path(path).resolve()
        source = self.path.read_text()
        self.kernel_names = _KERNEL_PATTERN.findall(source)
        if not self.kernel_names:
            raise EmulatorBuildError(f'{self.path}: no extern "C" __global__ kernels found')
        self._parameter_names = {name: _parameter_names(source, name) for name in self.kernel_names}
        defines = tuple(option for option in options if option.startswith(("-D", "-U", "-I")))
        include_dirs = [self.path.parent] + [Path(option[2:]) for option in defines if option.startswith("-I")]
        headers = _local_headers(source, include_dirs)
        self._library = _load(_build(self.path, source, headers, self.kernel_names, defines))
        self.schedule, self.seed, self.poison_outputs = schedule, seed, poison_outputs
        usable_cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self.workers = workers or min(usable_cpus, 8)

    def get_function(self, name: str, *, schedule: str | None = None, seed: int | None = None) -> EmulatedKernel:
        if name not in self.kernel_names:
            raise AttributeError(f"{self.path.name} has no kernel {name!r}; it has {', '.join(self.kernel_names)}")
        return EmulatedKernel(self, name, schedule or self.schedule, self.seed if seed is None else seed)


class EmulatedKernel:
    """One kernel, called like cupy.RawKernel: kernel(grid, block, args)."""

    def __init__(self, module: EmulatedModule, name: str, schedule: str, seed: int):
        _check_schedule(schedule)
        self.name, self.schedule, self.seed, self.workers = name, schedule, seed, module.workers
        self.poison_outputs = module.poison_outputs
        signature = getattr(module._library, f"tinytf_signature_{name}")
        signature.restype = ctypes.c_char_p
        self.parameter_types = signature().decode().split(";")
        names = module._parameter_names[name]
        self.parameter_names = names if len(names) == len(self.parameter_types) else [""] * len(self.parameter_types)
        self._launch = getattr(module._library, f"tinytf_launch_{name}")
        self._launch.restype = ctypes.c_char_p
        self._launch.argtypes = [
            ctypes.POINTER(ctypes.c_uint), ctypes.POINTER(ctypes.c_uint), ctypes.POINTER(ctypes.c_void_p),
            ctypes.c_int, ctypes.c_uint, ctypes.c_int,
        ]

    def __call__(self, grid, block, args, shared_mem: int = 0) -> None:
        if shared_mem:
            raise EmulatorError(f"{self.name}: dynamic shared memory is not emulated; use static __shared__ arrays")
        if len(args) != len(self.parameter_types):
            raise TypeError(f"{self.name} takes {len(self.parameter_types)} arguments, got {len(args)}")
        slots = (ctypes.c_void_p * len(args))()  # slot i points at the value of argument i
        keep_alive, guarded = [], []  # keep_alive: the values the slots point at must outlive the call
        for i, arg in enumerate(args):
            if self.parameter_types[i].endswith("*"):
                buffer = self._guarded_copy(i, arg)
                value = ctypes.c_void_p(buffer.ctypes.data + GUARD_ELEMENTS * buffer.itemsize)
                slots[i] = ctypes.addressof(value)
                guarded.append((i, arg, buffer))
            else:
                value = np.array(self._checked_scalar(i, arg))
                slots[i] = value.ctypes.data
            keep_alive.append(value)
        error = self._launch(_dim3(grid), _dim3(block), slots, SCHEDULES.index(self.schedule), self.seed,
                             self.workers).decode()
        if error:
            raise EmulatorError(f"{self.name} ({self.schedule}): {error}")
        for i, arg, buffer in guarded:
            self._check_guards(i, buffer)
            if not self.parameter_types[i].startswith("const "):
                arg.reshape(-1)[...] = buffer[GUARD_ELEMENTS:-GUARD_ELEMENTS]

    def _describe(self, i: int) -> str:
        return f"{self.name} argument {i} ({self.parameter_types[i]} {self.parameter_names[i]})".replace(" )", ")")

    def _dtype(self, i: int) -> np.dtype:
        return np.dtype(_NUMPY_TYPES[self.parameter_types[i].removeprefix("const ").rstrip("*")])

    def _checked_scalar(self, i: int, arg):
        want = self._dtype(i)
        if not isinstance(arg, np.generic) or arg.dtype != want:
            raise TypeError(f"{self._describe(i)}: pass numpy.{want.name}, got {type(arg).__name__} "
                            "(CuPy would pass a Python int as 64 bits, a Python float as a double)")
        return arg

    def _guarded_copy(self, i: int, arg) -> np.ndarray:
        """The array's elements between two guard zones."""
        want = self._dtype(i)
        if not isinstance(arg, np.ndarray):
            raise TypeError(f"{self._describe(i)}: expected a numpy array, got {type(arg).__name__}")
        if arg.dtype != want:
            raise TypeError(f"{self._describe(i)}: expected dtype {want}, got {arg.dtype}")
        if not arg.flags.c_contiguous:
            raise TypeError(f"{self._describe(i)}: the array must be C-contiguous")
        if not self.parameter_types[i].startswith("const ") and not arg.flags.writeable:
            raise TypeError(f"{self._describe(i)}: the kernel writes through this pointer, but the array is read-only")
        buffer = np.empty(arg.size + 2 * GUARD_ELEMENTS, dtype=want)
        _fill_guard(buffer)
        if self.parameter_types[i].startswith("const ") or not self.poison_outputs:
            buffer[GUARD_ELEMENTS:-GUARD_ELEMENTS] = arg.reshape(-1)
        return buffer

    def _check_guards(self, i: int, buffer: np.ndarray) -> None:
        for side, guard in (("before", buffer[:GUARD_ELEMENTS]), ("past the end of", buffer[-GUARD_ELEMENTS:])):
            expected = np.empty_like(guard)
            _fill_guard(expected)
            if guard.tobytes() != expected.tobytes():
                raise EmulatorError(f"{self._describe(i)}: the kernel wrote {side} the array")


def _fill_guard(guard: np.ndarray) -> None:
    if guard.dtype in _FLOATING_TYPES:
        guard.fill(np.nan)
    else:
        guard.view(np.uint8).fill(0xAB)


def _dim3(shape):
    shape = tuple(int(n) for n in (shape if isinstance(shape, tuple | list) else (shape,)))
    if not 1 <= len(shape) <= 3:
        raise ValueError(f"a grid or block shape has 1 to 3 dimensions, got {shape}")
    return (ctypes.c_uint * 3)(*(shape + (1,) * (3 - len(shape))))


def _check_schedule(schedule: str) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")


def _parameter_names(source: str, kernel: str) -> list[str]:
    """The parameter names of `kernel` as written in the source, for error messages."""
    match = re.search(rf"\b{kernel}\s*\(([^)]*)\)", source)
    return [re.findall(r"\w+", parameter)[-1] for parameter in match.group(1).split(",")] if match else []


@functools.cache
def _compiler() -> tuple[str, str]:
    compiler = os.environ.get("CXX") or shutil.which("g++")
    if not compiler:
        raise EmulatorBuildError("the CUDA emulator needs g++ (C++17); install it, or point $CXX at a compiler")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    return compiler, version


def _local_headers(source: str, include_dirs: list[Path], seen: dict[Path, str] | None = None) -> dict[Path, str]:
    """{path: text} of every header `source` includes with #include "..." (found as g++ would), recursively."""
    seen = {} if seen is None else seen
    for name in _LOCAL_INCLUDE.findall(source):
        found = next((directory / name for directory in include_dirs if (directory / name).is_file()), None)
        if found is not None and found.resolve() not in seen:
            text = found.read_text()
            seen[found.resolve()] = text
            _local_headers(text, [found.parent, *include_dirs], seen)
    return seen


def _build(path: Path, source: str, headers: dict[Path, str], kernel_names: list[str],
           defines: tuple[str, ...]) -> Path:
    compiler, version = _compiler()
    unit = "\n".join(
        [f'#include "{HEADER}"', f'#include "{path}"']
        + [f"TINYTF_EMULATOR_EXPORT({name})" for name in kernel_names]
    ) + "\n"
    flags = (*CXXFLAGS, *defines)
    key = hashlib.sha256(
        "\0".join([unit, source, *headers.values(), HEADER.read_text(), *flags, version]).encode()
    ).hexdigest()[:20]
    directory = cache_dir()
    library = directory / f"{path.stem}-{key}.so"
    if library.exists():
        return library
    directory.mkdir(parents=True, exist_ok=True)
    unit_path = directory / f"{path.stem}-{key}.cpp"
    unit_path.write_text(unit)
    partial = directory / f"{path.stem}-{key}.{os.getpid()}.so"
    result = subprocess.run([compiler, *flags, str(unit_path), "-o", str(partial)], capture_output=True, text=True)
    if result.returncode != 0:
        raise EmulatorBuildError(f"g++ could not build {path} for the emulator:\n{result.stderr[-6000:]}")
    os.replace(partial, library)  # atomic: a concurrent build of the same key is never seen half-written
    return library


@functools.cache
def _load(library: Path) -> ctypes.CDLL:
    return ctypes.CDLL(str(library))
