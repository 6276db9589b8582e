"""tinytf's CUDA code: the kernel sources (the .cu files beside this one) and the options every build of them gets.

    flash_attention.cu    FlashAttention-2 in float32 on CUDA cores (sm_70+): forward, and backward in three kernels
    attention_mask.cuh    what every attention kernel shares: the argument list of windows, per-batch lengths,
                          softcap, ALiBi and dropout, the visible key and query ranges, and Philox4x32-10
    flash_attention_tc.cu, flash_attention_tc_backward.cu
                          FlashAttention-2 in bf16/fp16 on tensor cores (sm_80+), forward and backward
    tensor_core.cuh       mma.sync, ldmatrix, cp.async and bf16/fp16 packing: inline PTX, and their emulated meaning
    compile_gate.py       python -m tinytf.kernels.compile_gate: every variant through NVRTC, resources checked
    emulator/             runs the unchanged .cu files on the CPU (g++ and cuda_emulator.h), to test them without a GPU

The wheel carries the sources (pyproject.toml's package data: *.cu and *.cuh headers here, the emulator's *.h).
The launcher (tinytf.attention.cuda), the compile gate and the emulator all take the options from here, so all three
build the same code. A new kernel adds its source beside this file and a variant class like FlashAttentionVariant.
The tensor-core kernels include tensor_core.cuh: the launcher and the gate compile kernel_source(path), the file with
that header inlined (g++ finds it beside the file); the CUDA headers they include on the GPU (cuda_bf16.h, cuda_fp16.h)
come from the include path CuPy adds (see compile_gate.cuda_include_dir).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

KERNELS_DIR = Path(__file__).parent
FLASH_ATTENTION_SOURCE = KERNELS_DIR / "flash_attention.cu"
FLASH_ATTENTION_TC_SOURCE = KERNELS_DIR / "flash_attention_tc.cu"
FLASH_ATTENTION_TC_BACKWARD_SOURCE = KERNELS_DIR / "flash_attention_tc_backward.cu"
TENSOR_CORE_HEADER = KERNELS_DIR / "tensor_core.cuh"
HEAD_DIMS = (16, 32, 64, 96, 128, 160, 192, 224, 256)
TWO_COLUMN_TILES_MAX_HEAD_DIM = 128  # past it the float32 kernels keep one column tile in shared memory
TENSOR_CORE_BLOCK_ROWS = 64  # the tensor-core kernels' Br: 4 warps x the 16 rows of an mma.m16n8k16
THREADS_PER_BLOCK = 128
WARPS_PER_BLOCK = THREADS_PER_BLOCK // 32
COLUMN_TILE = 32  # Bc: one column per lane of a warp
# A thread's R x ceil(d / 32) output accumulators, at most: with 128 registers, d = 160 at R = 8 (40) spilled on sm_70.
MAX_ACCUMULATORS = 32
STATIC_SHARED_LIMIT = 48 * 1024  # the static shared memory a block may use without opting in to more
# CuPy's RawModule adds these to the options it is given (plus include paths the kernels do not use): the gate and the
# emulator must see the same build. --std is given explicitly, so CuPy does not add its own.
CUPY_ADDED_OPTIONS = ("-ftz=true",)


@dataclass(frozen=True)
class FlashAttentionVariant:
    """The build of tinytf/kernels/flash_attention.cu for one head dim: its rows per warp R, block shapes and options."""

    head_dim: int
    dtype = "float32"  # of Q, K, V, O and their gradients
    sources = (FLASH_ATTENTION_SOURCE,)  # the forward and the backward kernels
    kernel_prefix = "flash_attention_"

    def __post_init__(self):
        if self.head_dim not in HEAD_DIMS:
            raise ValueError(
                f"the CUDA FlashAttention kernels support head dims {HEAD_DIMS}, got {self.head_dim}; "
                "pad the head dim up to a supported one, or use another attention backend"
            )

    @property
    def column_tiles(self) -> int:
        """2: the (32 x d) tiles of K and V (Q and dO in dK/dV) side by side; 1: one buffer, refilled in turn."""
        return 2 if self.head_dim <= TWO_COLUMN_TILES_MAX_HEAD_DIM else 1

    @property
    def forward_rows_per_warp(self) -> int:
        return _rows_per_warp(self.head_dim, row_tiles=1, column_tiles=self.column_tiles, weight_tiles=1)  # Q|K, V|P

    @property
    def backward_rows_per_warp(self) -> int:  # Q, dO | K, V | P, dS
        return _rows_per_warp(self.head_dim, row_tiles=2, column_tiles=self.column_tiles, weight_tiles=2)

    @property
    def forward_block_rows(self) -> int:
        """Br of the forward kernel: queries per block."""
        return WARPS_PER_BLOCK * self.forward_rows_per_warp

    @property
    def backward_block_rows(self) -> int:
        """Br of the backward kernels: queries per dQ block, keys per dK/dV block."""
        return WARPS_PER_BLOCK * self.backward_rows_per_warp

    @property
    def options(self) -> tuple[str, ...]:
        """What the launcher passes to cupy.RawModule."""
        return (
            "--std=c++17",
            f"-DHEAD_DIM={self.head_dim}",
            f"-DFORWARD_ROWS_PER_WARP={self.forward_rows_per_warp}",
            f"-DBACKWARD_ROWS_PER_WARP={self.backward_rows_per_warp}",
            f"-DCOLUMN_TILES={self.column_tiles}",
        )


def flash_attention_variant(head_dim: int) -> FlashAttentionVariant:
    return FlashAttentionVariant(int(head_dim))


# The tensor-core kernels: d a multiple of 16 (the k of mma.m16n8k16) whose tiles fit in STATIC_SHARED_LIMIT.
TENSOR_CORE_HEAD_DIMS = (32, 64, 96, 128)
TENSOR_CORE_DTYPES = ("bfloat16", "float16")
_ELEMENT_DEFINES = {"bfloat16": "-DELEMENT_BF16", "float16": "-DELEMENT_FP16"}


@dataclass(frozen=True)
class TensorCoreVariant:
    """The build of flash_attention_tc.cu and flash_attention_tc_backward.cu for one head dim and element type."""

    head_dim: int
    dtype: str  # one of TENSOR_CORE_DTYPES: the element type of Q, K, V, O and their gradients
    sources = (FLASH_ATTENTION_TC_SOURCE, FLASH_ATTENTION_TC_BACKWARD_SOURCE)  # the forward kernel; the backward ones
    kernel_prefix = "flash_attention_tc_"
    forward_block_rows = TENSOR_CORE_BLOCK_ROWS  # Br of the forward and dQ kernels, keys per dK/dV block
    backward_block_rows = TENSOR_CORE_BLOCK_ROWS

    def __post_init__(self):
        if self.head_dim not in TENSOR_CORE_HEAD_DIMS:
            raise ValueError(
                f"the tensor-core FlashAttention kernels support head dims {TENSOR_CORE_HEAD_DIMS}, got "
                f"{self.head_dim}; pad the head dim up to a supported one, or use the float32 kernels"
            )
        if self.dtype not in TENSOR_CORE_DTYPES:
            raise ValueError(
                f"the tensor-core FlashAttention kernels take dtypes {TENSOR_CORE_DTYPES}, got {self.dtype!r}; "
                "float32 inputs go to the float32 kernels (FlashAttentionVariant)"
            )

    @property
    def options(self) -> tuple[str, ...]:
        """What the launcher passes to cupy.RawModule (and the emulator to g++)."""
        return ("--std=c++17", f"-DHEAD_DIM={self.head_dim}", _ELEMENT_DEFINES[self.dtype])


def tensor_core_variant(head_dim: int, dtype) -> TensorCoreVariant:
    """dtype: a name ("bfloat16", "float16") or anything numpy.dtype() accepts, such as ml_dtypes.bfloat16."""
    name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    return TensorCoreVariant(int(head_dim), name)


_LOCAL_INCLUDE = re.compile(r'^#include "([^"]+)"[ \t]*$', re.MULTILINE)
_PRAGMA_ONCE = re.compile(r"^#pragma once[ \t]*$", re.MULTILINE)


def kernel_source(path: Path) -> str:
    """The text of a .cu file with the #include "..." headers of this folder inlined (theirs too, each once), as the
    launcher gives it to cupy.RawModule: CuPy keys its cache of builds by the code alone, so a header's text must be
    part of it. #line directives keep compiler messages pointing at the real files."""
    inlined: set[str] = set()

    def expand(path: Path) -> str:
        text = path.read_text()

        def inline(match: re.Match) -> str:
            header = path.parent / match.group(1)
            line = text.count("\n", 0, match.start()) + 2  # the line after the #include
            if header.name in inlined:
                return f'#line {line} "{path.name}"'
            inlined.add(header.name)
            body = _PRAGMA_ONCE.sub("", expand(header))  # in the one file left, it would mean that file
            return f'#line 1 "{header.name}"\n{body}\n#line {line} "{path.name}"'

        return _LOCAL_INCLUDE.sub(inline, text)

    return expand(Path(path))


def _shared_bytes(head_dim: int, rows: int, row_tiles: int, column_tiles: int, weight_tiles: int) -> int:
    """float32 tiles: (Br x d) row tiles, (32 x d+1) padded column tiles, one (R x 32) weight tile per warp."""
    block_rows = WARPS_PER_BLOCK * rows
    return 4 * (
        row_tiles * block_rows * head_dim
        + column_tiles * COLUMN_TILE * (head_dim + 1)
        + weight_tiles * block_rows * COLUMN_TILE
    )


def _rows_per_warp(head_dim: int, row_tiles: int, column_tiles: int, weight_tiles: int) -> int:
    """The largest R of 8, 4, 2, 1 whose tiles fit in STATIC_SHARED_LIMIT and whose accumulators in MAX_ACCUMULATORS:
    more rows per block reuse each K/V tile more."""
    for rows in (8, 4, 2, 1):
        fits_registers = rows * -(-head_dim // COLUMN_TILE) <= MAX_ACCUMULATORS
        shared_bytes = _shared_bytes(head_dim, rows, row_tiles, column_tiles, weight_tiles)
        if fits_registers and shared_bytes <= STATIC_SHARED_LIMIT:
            return rows
    raise ValueError(f"no tiling of head dim {head_dim} fits in {STATIC_SHARED_LIMIT} bytes of shared memory")
