"""The compile gate: build every kernel variant with NVRTC for each target GPU, as CuPy would, and check its resources.

    python -m tinytf.kernels.compile_gate          # prints the resource tables; exits 1 if a budget is broken

NVRTC comes from the nvidia-cuda-nvrtc-cu12 wheel (the dev extra) and is called through ctypes: it compiles without a
GPU or a driver, which cupy.cuda.compiler cannot (it asks the driver which GPU to target). CUDA 12 is the last
release that still targets sm_70. The options are the launcher's (FlashAttentionVariant.options, or
TensorCoreVariant.options) plus what CuPy adds, plus -Xptxas=-v for ptxas's report of registers, spills and shared
memory per kernel. The tensor-core kernels include cuda_bf16.h and cuda_fp16.h, which NVRTC 12.9 does not carry:
CuPy adds CUDA's include folder to its builds, and the gate adds the same folder (cuda_include_dir).

Builds: the float32 kernels (flash_attention.cu, each head dim of HEAD_DIMS, 16 to 256) for sm_70, 75, 80 and 90;
the tensor-core kernels (flash_attention_tc.cu, flash_attention_tc_backward.cu, those of them that exist) in bf16 and
fp16 for sm_80, 86, 89 and 90. Budgets, per kernel and arch: no compiler warnings (but the notice that sm_70 is
deprecated), 0 bytes of spill stores and loads, no stack frame, no more registers per thread than the kernel's
__launch_bounds__ allow (read from the PTX: .maxntid and .minnctapersm), at most STATIC_SHARED_LIMIT bytes of static
shared memory, and for the tensor-core builds, mma.sync instructions in the PTX. HMMA in the SASS is counted too when
a disassembler (cuobjdump or nvdisasm) is on the PATH. Occupancy is computed, printed, and not gated.
"""

from __future__ import annotations

import ctypes
import importlib.util
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from . import (
    CUPY_ADDED_OPTIONS,
    FLASH_ATTENTION_SOURCE,
    FLASH_ATTENTION_TC_BACKWARD_SOURCE,
    FLASH_ATTENTION_TC_SOURCE,
    HEAD_DIMS,
    STATIC_SHARED_LIMIT,
    TENSOR_CORE_DTYPES,
    TENSOR_CORE_HEAD_DIMS,
    THREADS_PER_BLOCK,
    FlashAttentionVariant,
    TensorCoreVariant,
    kernel_source,
)

ARCHITECTURES = (70, 75, 80, 90)
TENSOR_CORE_ARCHITECTURES = (80, 86, 89, 90)  # mma.sync with bf16 and cp.async need sm_80
TENSOR_CORE_SOURCES = (FLASH_ATTENTION_TC_SOURCE, FLASH_ATTENTION_TC_BACKWARD_SOURCE)
# The float32 forward and dQ kernels: __launch_bounds__(128 threads, 4 blocks): 65536 registers / 512 threads. Each
# kernel's own limit is read from its PTX (dK/dV asks for 3 blocks: 168); this is the default where none is given.
MAX_REGISTERS = 128
MAX_REGISTERS_PER_THREAD = 255
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
    86: SMLimits(max_warps=48, max_blocks=16, shared_bytes=100 * 1024, shared_reserved_per_block=1024),
    89: SMLimits(max_warps=48, max_blocks=24, shared_bytes=100 * 1024, shared_reserved_per_block=1024),
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
    threads_per_block: int = THREADS_PER_BLOCK  # the launch bounds' .maxntid
    register_limit: int = MAX_REGISTERS  # what the launch bounds allow
    mma_instructions: int = 0  # mma.sync in the kernel's PTX

    def occupancy(self) -> tuple[int, float]:
        """(resident blocks per SM, theoretical occupancy) for blocks of threads_per_block threads."""
        limits = SM_LIMITS[self.arch]
        warps = -(-self.threads_per_block // 32)
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
            (self.registers <= self.register_limit,
             f"{self.registers} registers > {self.register_limit} (the launch bounds' limit)"),
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
    dtype: str = "float32"
    source: str = FLASH_ATTENTION_SOURCE.name
    hmma_instructions: int | None = None  # HMMA in the SASS; None where no disassembler is available

    @property
    def uses_tensor_cores(self) -> bool:
        return self.dtype != "float32"

    @property
    def name(self) -> str:
        dtype = "" if self.dtype == "float32" else f"{self.dtype} "
        return f"{self.source} {dtype}d={self.head_dim}, sm_{self.arch}"

    def violations(self) -> list[str]:
        problems = [f"{self.name}: compiler says {warning!r}" for warning in self.warnings]
        for kernel in self.kernels:
            problems += kernel.budget_violations()
        if self.uses_tensor_cores and not any(kernel.mma_instructions for kernel in self.kernels):
            problems.append(f"{self.name}: no mma.sync in the PTX: the build does not use tensor cores")
        if self.uses_tensor_cores and self.hmma_instructions == 0:
            problems.append(f"{self.name}: no HMMA in the SASS: the build does not use tensor cores")
        return problems


def gate_options(variant: FlashAttentionVariant | TensorCoreVariant, arch: int) -> tuple[str, ...]:
    """The launcher's options, CuPy's additions (with CUDA's headers for the tensor-core kernels), the target, and the
    request for ptxas's resource report."""
    headers = (f"-I{cuda_include_dir()}",) if isinstance(variant, TensorCoreVariant) else ()
    return (*variant.options, *CUPY_ADDED_OPTIONS, *headers, f"-arch=sm_{arch}", "-Xptxas=-v")


def check_build(source: Path, variant: FlashAttentionVariant | TensorCoreVariant, arch: int) -> GateResult:
    """One NVRTC build of `source` for `variant` and `arch`, with its resources per kernel."""
    options = gate_options(variant, arch)
    build = compile_with_nvrtc(kernel_source(source), source.name, options)  # the code the launcher gives CuPy
    expected = EXPECTED_NOTICES.get(arch)
    warnings = tuple(
        line.strip()
        for line in build.log.splitlines()
        if "warning" in line.lower() and not (expected and expected in line)
    )
    kernels = _parse_ptxas_report(build.log, variant.head_dim, arch, _launch_bounds_and_mma(build.ptx, arch))
    dtype = variant.dtype
    hmma = sass_hmma_count(build.cubin) if dtype != "float32" else None
    return GateResult(variant.head_dim, arch, options, tuple(kernels), warnings, dtype, source.name, hmma)


def check_variant(head_dim: int, arch: int) -> GateResult:
    return check_build(FLASH_ATTENTION_SOURCE, FlashAttentionVariant(head_dim), arch)


def check_all(head_dims=HEAD_DIMS, arches=ARCHITECTURES, workers: int = 2) -> list[GateResult]:
    """Every float32 (head dim, arch) build; NVRTC releases the GIL, so builds run side by side."""
    pairs = [(head_dim, arch) for head_dim in head_dims for arch in arches]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda pair: check_variant(*pair), pairs))


def tensor_core_sources() -> tuple[Path, ...]:
    """The tensor-core kernel files that exist (the gate builds whichever are there)."""
    return tuple(source for source in TENSOR_CORE_SOURCES if source.is_file())


def check_all_tensor_core(head_dims=TENSOR_CORE_HEAD_DIMS, dtypes=TENSOR_CORE_DTYPES,
                          arches=TENSOR_CORE_ARCHITECTURES, sources=None, workers: int = 2) -> list[GateResult]:
    """Every (source, dtype, head dim, arch) build of the tensor-core kernels."""
    builds = [(source, TensorCoreVariant(head_dim, dtype), arch)
              for source in (tensor_core_sources() if sources is None else sources)
              for dtype in dtypes for head_dim in head_dims for arch in arches]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda build: check_build(*build), builds))


def resource_table(results: list[GateResult]) -> str:
    """Markdown: per build and kernel, shared memory, then registers (and their limit) and occupancy for each arch;
    for tensor-core builds also the mma.sync instructions in the PTX."""
    arches = sorted({result.arch for result in results})
    arch_names = "/".join(str(arch) for arch in arches)
    tensor_cores = any(result.uses_tensor_cores for result in results)
    by_key = {(result.source, result.dtype, k.head_dim, k.kernel, k.arch): k
              for result in results for k in result.kernels}
    lines = [
        ("| dtype " if tensor_cores else "")
        + f"| head dim | kernel | static smem (B) | registers sm_{arch_names} | register limit "
        f"| blocks/SM sm_{arch_names} | occupancy sm_{arch_names} | spills |" + (" mma.sync |" if tensor_cores else ""),
        ("|---" if tensor_cores else "") + "|---:|---|---:|---|---:|---|---|---:|" + ("---:|" if tensor_cores else ""),
    ]
    for source, dtype, head_dim, kernel in dict.fromkeys(key[:4] for key in by_key):
        row = [by_key[(source, dtype, head_dim, kernel, arch)] for arch in arches]
        occupancy = [r.occupancy() for r in row]
        spills = sum(r.spill_store_bytes + r.spill_load_bytes for r in row)
        lines.append(
            (f"| {dtype} " if tensor_cores else "")
            + f"| {head_dim} | {kernel} | {row[0].shared_bytes} | {'/'.join(str(r.registers) for r in row)} "
            f"| {row[0].register_limit} | {'/'.join(str(blocks) for blocks, _ in occupancy)} "
            f"| {'/'.join(f'{fraction:.0%}' for _, fraction in occupancy)} | {spills} |"
            + (f" {row[0].mma_instructions} |" if tensor_cores else "")
        )
    return "\n".join(lines)


def cuda_include_dir() -> Path:
    """The folder with CUDA's cuda_bf16.h and cuda_fp16.h, as CuPy finds it: the nvidia-cuda-runtime-cu12 wheel's
    (CuPy's CUDA wheels use it; its version matches NVRTC's), else $CUDA_PATH or $CUDA_HOME, else /usr/local/cuda."""
    spec = importlib.util.find_spec("nvidia.cuda_runtime")
    candidates = [Path(location) / "include" for location in (spec.submodule_search_locations or [])] if spec else []
    candidates += [Path(os.environ[name]) / "include" for name in ("CUDA_PATH", "CUDA_HOME") if os.environ.get(name)]
    candidates.append(Path("/usr/local/cuda/include"))
    for candidate in candidates:
        if (candidate / "cuda_bf16.h").is_file() and (candidate / "cuda_fp16.h").is_file():
            return candidate
    raise NvrtcError(
        "the tensor-core kernels include cuda_bf16.h and cuda_fp16.h, which NVRTC does not carry; install them with "
        "pip install nvidia-cuda-runtime-cu12 (or point $CUDA_PATH at a CUDA toolkit). Looked in: "
        + ", ".join(str(candidate) for candidate in candidates)
    )


def sass_disassembler() -> list[str] | None:
    """The command that prints a cubin's SASS, or None: neither cuobjdump nor nvdisasm is on the PATH."""
    if tool := shutil.which("cuobjdump"):
        return [tool, "-sass"]
    if tool := shutil.which("nvdisasm"):
        return [tool]
    return None


def sass_hmma_count(cubin: bytes) -> int | None:
    """HMMA instructions in the cubin's SASS; None without a disassembler."""
    command = sass_disassembler()
    if command is None or not cubin:
        return None
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "build.cubin"
        path.write_bytes(cubin)
        result = subprocess.run([*command, str(path)], capture_output=True, text=True)
    if result.returncode != 0:
        raise NvrtcError(f"{' '.join(command)} could not disassemble the build:\n{result.stderr}")
    return len(re.findall(r"\bHMMA\b", result.stdout))


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


@dataclass(frozen=True)
class NvrtcBuild:
    log: str  # the compiler's messages, with ptxas's resource report when -Xptxas=-v is given
    ptx: str
    cubin: bytes  # empty when the target is a virtual architecture (compute_XX)


def compile_with_nvrtc(source: str, name: str, options: tuple[str, ...]) -> NvrtcBuild:
    """Compile `source` with NVRTC; a failed build raises with the log."""
    nvrtc = nvrtc_library()
    program = ctypes.c_void_p()
    _check(nvrtc, nvrtc.nvrtcCreateProgram(ctypes.byref(program), source.encode(), name.encode(), 0, None, None))
    try:
        encoded = [option.encode() for option in options]
        status = nvrtc.nvrtcCompileProgram(program, len(encoded), (ctypes.c_char_p * len(encoded))(*encoded))
        log = _read(nvrtc, program, "ProgramLog").decode()
        if status != 0:
            raise NvrtcError(f"NVRTC could not compile {name} with {' '.join(options)}:\n{log}")
        cubin = _read(nvrtc, program, "CUBIN") if any(o.startswith("-arch=sm_") for o in options) else b""
        return NvrtcBuild(log, _read(nvrtc, program, "PTX").decode(), cubin)
    finally:
        nvrtc.nvrtcDestroyProgram(ctypes.byref(program))


def _read(nvrtc, program, what: str) -> bytes:
    """nvrtcGet<what>Size, then nvrtcGet<what>: the log, the PTX or the cubin, without the C string's final NUL."""
    size = ctypes.c_size_t()
    _check(nvrtc, getattr(nvrtc, f"nvrtcGet{what}Size")(program, ctypes.byref(size)))
    buffer = ctypes.create_string_buffer(size.value)
    _check(nvrtc, getattr(nvrtc, f"nvrtcGet{what}")(program, buffer))
    return buffer.raw[: size.value].rstrip(b"\0") if what != "CUBIN" else buffer.raw[: size.value]


def _check(nvrtc, status: int) -> None:
    if status != 0:
        nvrtc.nvrtcGetErrorString.restype = ctypes.c_char_p
        raise NvrtcError(f"NVRTC call failed: {nvrtc.nvrtcGetErrorString(status).decode()}")


_ENTRY = re.compile(r"Compiling entry function '(\w+)' for 'sm_(\d+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USAGE = re.compile(r"Used (\d+) registers")
_SHARED = re.compile(r"(\d+) bytes smem")


_PTX_ENTRY = re.compile(r"\.entry\s+(\w+)")


def _launch_bounds_and_mma(ptx: str, arch: int) -> dict[str, tuple[int, int, int]]:
    """{kernel: (threads per block, register limit, mma.sync count)} from the PTX. __launch_bounds__(T, B) becomes
    .maxntid T and .minnctapersm B; ptxas then keeps each thread within the registers B blocks of T threads can
    share (allocated in steps of 8 per thread), and never above 255."""
    pieces = _PTX_ENTRY.split(ptx)
    kernels = {}
    for name, body in zip(pieces[1::2], pieces[2::2]):
        threads = re.search(r"\.maxntid\s+(\d+)(?:,\s*(\d+))?(?:,\s*(\d+))?", body)
        blocks = re.search(r"\.minnctapersm\s+(\d+)", body)
        if threads is None:
            raise NvrtcError(f"{name} has no __launch_bounds__: its register budget is unknown")
        count = math.prod(int(group) for group in threads.groups() if group)
        share = SM_LIMITS[arch].registers // (_round_up(count, 32) * (int(blocks.group(1)) if blocks else 1))
        kernels[name] = (count, min(MAX_REGISTERS_PER_THREAD, share // 8 * 8), body.count("mma.sync.aligned"))
    return kernels


def _parse_ptxas_report(log: str, head_dim: int, arch: int,
                        launch_bounds: dict[str, tuple[int, int, int]] | None = None) -> list[KernelResources]:
    """ptxas -v prints, per kernel: the entry name, its stack frame and spills, then registers and shared memory.
    launch_bounds: _launch_bounds_and_mma of the same build (without it, the float32 kernels' figures are assumed)."""
    kernels, name, frame = [], None, None
    for line in log.splitlines():
        if match := _ENTRY.search(line):
            name = match.group(1)
        elif match := _FRAME.search(line):
            frame = tuple(int(group) for group in match.groups())
        elif (match := _USAGE.search(line)) and name is not None and frame is not None:
            shared = _SHARED.search(line)
            bounds = (launch_bounds or {}).get(name, (THREADS_PER_BLOCK, MAX_REGISTERS, 0))
            kernels.append(
                KernelResources(head_dim, arch, name, int(match.group(1)), int(shared.group(1)) if shared else 0,
                                spill_store_bytes=frame[1], spill_load_bytes=frame[2], stack_frame_bytes=frame[0],
                                threads_per_block=bounds[0], register_limit=bounds[1], mma_instructions=bounds[2])
            )
            name = frame = None
    if not kernels:
        raise NvrtcError(f"no ptxas resource report in the NVRTC log:\n{log}")
    return sorted(kernels, key=lambda kernel: kernel.kernel)


def _round_up(value: int, unit: int) -> int:
    return math.ceil(value / unit) * unit


def main() -> int:
    major, minor = nvrtc_version()
    print(f"NVRTC {major}.{minor}")
    results = []
    for kind, batch in (("float32", check_all), ("tensor cores", check_all_tensor_core)):
        built = batch()
        if not built:
            print(f"\n{kind}: no kernel files ({', '.join(source.name for source in TENSOR_CORE_SOURCES)} missing)")
            continue
        print(f"\n{kind}; options for {built[0].name}: {' '.join(built[0].options)}")
        print(resource_table(built))
        results += built
    missing = [source.name for source in TENSOR_CORE_SOURCES if not source.is_file()]
    if missing:
        print(f"not built, missing: {', '.join(missing)}")
    if sass_disassembler() is None:
        print("SASS not checked: neither cuobjdump nor nvdisasm is on the PATH (the PTX's mma.sync is checked)")
    else:
        tensor_core = [result for result in results if result.uses_tensor_cores]
        print(f"SASS: HMMA in every tensor-core build ({sum(r.hmma_instructions or 0 for r in tensor_core)} in all)")
    problems = [problem for result in results for problem in result.violations()]
    for problem in problems:
        print("BUDGET:", problem)
    print("compile gate:", "FAILED" if problems else f"passed ({len(results)} builds)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
