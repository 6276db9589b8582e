"""The compile gate: build every kernel variant with NVRTC for each target GPU, as CuPy would, and check its resources.

    python -m tinytf.kernels.compile_gate          # prints the resource table; exits 1 if a budget is broken

NVRTC comes from the nvidia-cuda-nvrtc-cu12 wheel (the dev extra) and is called through ctypes: it compiles without a
GPU or a driver, which cupy.cuda.compiler cannot (it asks the driver which GPU to target). CUDA 12 is the last
release that still targets sm_70. The options are the launcher's (tinytf.kernels.FlashAttentionVariant.options) plus
what CuPy adds, plus -Xptxas=-v for ptxas's report of registers, spills and shared memory per kernel.

Budgets, per kernel and arch: no compiler warnings (but the notice that sm_70 is deprecated), 0 bytes of spill
stores and loads, no stack frame, at most MAX_REGISTERS registers per thread (what the launch bounds allow) and
at most STATIC_SHARED_LIMIT bytes of static shared memory. Occupancy is computed, printed, and not gated.
"""

from __future__ import annotations

import ctypes
import importlib.util
import math
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from . import (
    CUPY_ADDED_OPTIONS,
    FLASH_ATTENTION_SOURCE,
    HEAD_DIMS,
    STATIC_SHARED_LIMIT,
    THREADS_PER_BLOCK,
    FlashAttentionVariant,
)

ARCHITECTURES = (70, 75, 80, 90)
MAX_REGISTERS = 128  # __launch_bounds__(128 threads, 4 blocks): 65536 registers / 512 threads
# NVRTC 12 says this for every sm_70 build, and no option silences only it.
EXPECTED_NOTICES = {70: "Architectures prior to '<compute/sm>_75' are deprecated"}


@dataclass(frozen=True)
class SMLimits:
    """What one streaming multiprocessor offers (CUDA C Programming Guide, compute capabilities table)."""

    max_warps: int
    max_blocks: int
    shared_bytes: int  # the largest carve-out of the unified L1/shared memory
    shared_reserved_per_block: int  # taken by the system from each block's share (sm_80 and later)
    shared_unit: int = 128  # shared memory is allocated in these steps
    registers: int = 65536
    register_unit: int = 256  # registers are allocated per warp in these steps


SM_LIMITS = {
    70: SMLimits(max_warps=64, max_blocks=32, shared_bytes=96 * 1024, shared_reserved_per_block=0),
    75: SMLimits(max_warps=32, max_blocks=16, shared_bytes=64 * 1024, shared_reserved_per_block=0),
    80: SMLimits(max_warps=64, max_blocks=32, shared_bytes=164 * 1024, shared_reserved_per_block=1024),
    90: SMLimits(max_warps=64, max_blocks=32, shared_bytes=228 * 1024, shared_reserved_per_block=1024),
}


class NvrtcError(RuntimeError):
    """NVRTC is missing, or a build failed; a failed build's message carries the NVRTC log."""


@dataclass(frozen=True)
class KernelResources:
    head_dim: int
    arch: int
    kernel: str
    registers: int
    shared_bytes: int
    spill_store_bytes: int
    spill_load_bytes: int
    stack_frame_bytes: int

    def occupancy(self) -> tuple[int, float]:
        """(resident blocks per SM, theoretical occupancy) for blocks of THREADS_PER_BLOCK threads."""
        limits = SM_LIMITS[self.arch]
        warps = THREADS_PER_BLOCK // 32
        registers_per_warp = _round_up(max(self.registers, 1) * 32, limits.register_unit)
        shared = _round_up(self.shared_bytes + limits.shared_reserved_per_block, limits.shared_unit)
        blocks = min(
            limits.max_blocks,
            limits.max_warps // warps,
            (limits.registers // registers_per_warp) // warps,
            limits.shared_bytes // shared if shared else limits.max_blocks,
        )
        return blocks, blocks * warps / limits.max_warps

    def budget_violations(self) -> list[str]:
        checks = [
            (self.registers <= MAX_REGISTERS, f"{self.registers} registers > {MAX_REGISTERS}"),
            (self.shared_bytes <= STATIC_SHARED_LIMIT, f"{self.shared_bytes} B shared > {STATIC_SHARED_LIMIT}"),
            (self.spill_store_bytes == 0 and self.spill_load_bytes == 0,
             f"spills {self.spill_store_bytes} B stored, {self.spill_load_bytes} B loaded"),
            (self.stack_frame_bytes == 0, f"{self.stack_frame_bytes} B stack frame"),
        ]
        return [f"{self.kernel} (d={self.head_dim}, sm_{self.arch}): {problem}" for ok, problem in checks if not ok]


@dataclass(frozen=True)
class GateResult:
    head_dim: int
    arch: int
    options: tuple[str, ...]
    kernels: tuple[KernelResources, ...]
    warnings: tuple[str, ...]  # compiler messages other than the expected notice

    def violations(self) -> list[str]:
        problems = [f"d={self.head_dim}, sm_{self.arch}: compiler says {warning!r}" for warning in self.warnings]
        for kernel in self.kernels:
            problems += kernel.budget_violations()
        return problems


def gate_options(variant: FlashAttentionVariant, arch: int) -> tuple[str, ...]:
    """The launcher's options, CuPy's additions, the target, and the request for ptxas's resource report."""
    return (*variant.options, *CUPY_ADDED_OPTIONS, f"-arch=sm_{arch}", "-Xptxas=-v")


def check_variant(head_dim: int, arch: int) -> GateResult:
    options = gate_options(FlashAttentionVariant(head_dim), arch)
    log = compile_with_nvrtc(FLASH_ATTENTION_SOURCE.read_text(), FLASH_ATTENTION_SOURCE.name, options)
    expected = EXPECTED_NOTICES.get(arch)
    warnings = tuple(
        line.strip()
        for line in log.splitlines()
        if "warning" in line.lower() and not (expected and expected in line)
    )
    return GateResult(head_dim, arch, options, tuple(_parse_ptxas_report(log, head_dim, arch)), warnings)


def check_all(head_dims=HEAD_DIMS, arches=ARCHITECTURES, workers: int = 2) -> list[GateResult]:
    """Every (head dim, arch) build; NVRTC releases the GIL, so builds run side by side."""
    pairs = [(head_dim, arch) for head_dim in head_dims for arch in arches]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda pair: check_variant(*pair), pairs))


def resource_table(results: list[GateResult]) -> str:
    """Markdown: per head dim and kernel, shared memory, then registers and occupancy for each arch."""
    arches = sorted({result.arch for result in results})
    arch_names = "/".join(str(arch) for arch in arches)
    by_key = {(k.head_dim, k.kernel, k.arch): k for result in results for k in result.kernels}
    lines = [
        f"| head dim | kernel | static smem (B) | registers sm_{arch_names} | blocks/SM sm_{arch_names} "
        f"| occupancy sm_{arch_names} | spills |",
        "|---:|---|---:|---|---|---|---:|",
    ]
    for head_dim, kernel in dict.fromkeys((k.head_dim, k.kernel) for k in by_key.values()):
        row = [by_key[(head_dim, kernel, arch)] for arch in arches]
        occupancy = [r.occupancy() for r in row]
        spills = sum(r.spill_store_bytes + r.spill_load_bytes for r in row)
        lines.append(
            f"| {head_dim} | {kernel} | {row[0].shared_bytes} | {'/'.join(str(r.registers) for r in row)} "
            f"| {'/'.join(str(blocks) for blocks, _ in occupancy)} "
            f"| {'/'.join(f'{fraction:.0%}' for _, fraction in occupancy)} | {spills} |"
        )
    return "\n".join(lines)


# ---- NVRTC through ctypes ------------------------------------------------------------------------------------------
_nvrtc = None


def nvrtc_library() -> ctypes.CDLL:
    """libnvrtc from the nvidia-cuda-nvrtc-cu12 wheel."""
    global _nvrtc
    if _nvrtc is None:
        spec = importlib.util.find_spec("nvidia.cuda_nvrtc")
        if spec is None or not spec.submodule_search_locations:
            raise NvrtcError("NVRTC is not installed: pip install -e '.[dev]' (it brings nvidia-cuda-nvrtc-cu12)")
        package = Path(list(spec.submodule_search_locations)[0])
        candidates = sorted(package.glob("lib/libnvrtc.so.12")) + sorted(package.glob("bin/nvrtc64_*.dll"))
        if not candidates:
            raise NvrtcError(f"no NVRTC library in {package}")
        _nvrtc = ctypes.CDLL(str(candidates[0]))
    return _nvrtc


def nvrtc_version() -> tuple[int, int]:
    major, minor = ctypes.c_int(), ctypes.c_int()
    nvrtc_library().nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    return major.value, minor.value


def compile_with_nvrtc(source: str, name: str, options: tuple[str, ...]) -> str:
    """Compile `source` to a cubin with NVRTC and return the compiler's log; a failed build raises with the log."""
    nvrtc = nvrtc_library()
    program = ctypes.c_void_p()
    _check(nvrtc, nvrtc.nvrtcCreateProgram(ctypes.byref(program), source.encode(), name.encode(), 0, None, None))
    try:
        encoded = [option.encode() for option in options]
        status = nvrtc.nvrtcCompileProgram(program, len(encoded), (ctypes.c_char_p * len(encoded))(*encoded))
        size = ctypes.c_size_t()
        _check(nvrtc, nvrtc.nvrtcGetProgramLogSize(program, ctypes.byref(size)))
        log = ctypes.create_string_buffer(size.value)
        _check(nvrtc, nvrtc.nvrtcGetProgramLog(program, log))
        if status != 0:
            raise NvrtcError(f"NVRTC could not compile {name} with {' '.join(options)}:\n{log.value.decode()}")
        return log.value.decode()
    finally:
        nvrtc.nvrtcDestroyProgram(ctypes.byref(program))


def _check(nvrtc, status: int) -> None:
    if status != 0:
        nvrtc.nvrtcGetErrorString.restype = ctypes.c_char_p
        raise NvrtcError(f"NVRTC call failed: {nvrtc.nvrtcGetErrorString(status).decode()}")


_ENTRY = re.compile(r"Compiling entry function '(\w+)' for 'sm_(\d+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USAGE = re.compile(r"Used (\d+) registers")
_SHARED = re.compile(r"(\d+) bytes smem")


def _parse_ptxas_report(log: str, head_dim: int, arch: int) -> list[KernelResources]:
    """ptxas -v prints, per kernel: the entry name, its stack frame and spills, then registers and shared memory."""
    kernels, name, frame = [], None, None
    for line in log.splitlines():
        if match := _ENTRY.search(line):
            name = match.group(1)
        elif match := _FRAME.search(line):
            frame = tuple(int(group) for group in match.groups())
        elif (match := _USAGE.search(line)) and name is not None and frame is not None:
            shared = _SHARED.search(line)
            kernels.append(
                KernelResources(head_dim, arch, name, int(match.group(1)), int(shared.group(1)) if shared else 0,
                                spill_store_bytes=frame[1], spill_load_bytes=frame[2], stack_frame_bytes=frame[0])
            )
            name = frame = None
    if not kernels:
        raise NvrtcError(f"no ptxas resource report in the NVRTC log:\n{log}")
    return sorted(kernels, key=lambda kernel: kernel.kernel)


def _round_up(value: int, unit: int) -> int:
    return math.ceil(value / unit) * unit


def main() -> int:
    results = check_all()
    major, minor = nvrtc_version()
    example = results[0]
    print(f"NVRTC {major}.{minor}; options for d={example.head_dim}, sm_{example.arch}: {' '.join(example.options)}")
    print(resource_table(results))
    problems = [problem for result in results for problem in result.violations()]
    for problem in problems:
        print("BUDGET:", problem)
    print("compile gate:", "FAILED" if problems else f"passed ({len(results)} builds)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
