"""tinytf's CUDA code: the kernel sources (the .cu files beside this one) and the options every build of them gets.

    flash_attention.cu    FlashAttention-2 in float32 on CUDA cores (sm_70+): forward, and backward in three kernels
    compile_gate.py       python -m tinytf.kernels.compile_gate: every variant through NVRTC, resources checked
    emulator/             runs the unchanged .cu files on the CPU (g++ and cuda_emulator.h), to test them without a GPU

The wheel carries the sources (pyproject.toml's package data: *.cu and *.cuh headers here, the emulator's *.h).
The launcher (tinytf.attention.cuda), the compile gate and the emulator all take the options from here, so all three
build the same code. A new kernel adds its source beside this file and a variant class like FlashAttentionVariant.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

FLASH_ATTENTION_SOURCE = Path(__file__).with_name("flash_attention.cu")
HEAD_DIMS = (16, 32, 64, 96, 128)
THREADS_PER_BLOCK = 128
WARPS_PER_BLOCK = THREADS_PER_BLOCK // 32
COLUMN_TILE = 32  # Bc: one column per lane of a warp
STATIC_SHARED_LIMIT = 48 * 1024  # the static shared memory a block may use without opting in to more
# CuPy's RawModule adds these to the options it is given (plus include paths the kernels do not use): the gate and the
# emulator must see the same build. --std is given explicitly, so CuPy does not add its own.
CUPY_ADDED_OPTIONS = ("-ftz=true",)


@dataclass(frozen=True)
class FlashAttentionVariant:
    """The build of tinytf/kernels/flash_attention.cu for one head dim: its rows per warp R, block shapes and options."""

    head_dim: int

    def __post_init__(self):
        if self.head_dim not in HEAD_DIMS:
            raise ValueError(
                f"the CUDA FlashAttention kernels support head dims {HEAD_DIMS}, got {self.head_dim}; "
                "pad the head dim up to a supported one, or use another attention backend"
            )

    @property
    def forward_rows_per_warp(self) -> int:
        return _rows_per_warp(self.head_dim, row_tiles=1, column_tiles=2, weight_tiles=1)  # Q | K, V | P

    @property
    def backward_rows_per_warp(self) -> int:
        return _rows_per_warp(self.head_dim, row_tiles=2, column_tiles=2, weight_tiles=2)  # Q, dO | K, V | P, dS

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
        )


def flash_attention_variant(head_dim: int) -> FlashAttentionVariant:
    return FlashAttentionVariant(int(head_dim))


def _shared_bytes(head_dim: int, rows: int, row_tiles: int, column_tiles: int, weight_tiles: int) -> int:
    """float32 tiles: (Br x d) row tiles, (32 x d+1) padded column tiles, one (R x 32) weight tile per warp."""
    block_rows = WARPS_PER_BLOCK * rows
    return 4 * (
        row_tiles * block_rows * head_dim
        + column_tiles * COLUMN_TILE * (head_dim + 1)
        + weight_tiles * block_rows * COLUMN_TILE
    )


def _rows_per_warp(head_dim: int, row_tiles: int, column_tiles: int, weight_tiles: int) -> int:
    """The largest R of 8, 4, 2 whose tiles fit in STATIC_SHARED_LIMIT: more rows per block reuse each K/V tile more."""
    for rows in (8, 4, 2):
        if _shared_bytes(head_dim, rows, row_tiles, column_tiles, weight_tiles) <= STATIC_SHARED_LIMIT:
            return rows
    raise ValueError(f"no tiling of head dim {head_dim} fits in {STATIC_SHARED_LIMIT} bytes of shared memory")
