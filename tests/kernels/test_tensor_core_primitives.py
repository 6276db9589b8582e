"""tensor_core.cuh under the emulator: mma.m16n8k16, ldmatrix and cp.async do what the PTX ISA says, lane by lane, and
misuse is reported with file and line; under NVRTC (sm_80) the same probe compiles to those PTX instructions.

The fragments are built here from the PTX ISA's tables ("Matrix Fragments for mma.m16n8k16" with .bf16/.f16, and
ldmatrix), written as formulas in the ISA's terms (groupID = lane >> 2, threadID_in_group = lane % 4), independently
of the emulator's code, which inverts them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from tinytf.kernels import KERNELS_DIR, compile_gate
from tinytf.kernels.emulator import SCHEDULES, EmulatedModule, EmulatorError

PROBE = Path(__file__).with_name("tensor_core_probe.cu")
LANE = np.arange(32)
GROUP_ID, THREAD_IN_GROUP = LANE >> 2, LANE % 4
DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
MMA_KERNELS = {"bfloat16": "mma_bfloat16", "float16": "mma_half"}


@pytest.fixture(scope="module")
def probe():
    return EmulatedModule(PROBE, options=(f"-I{KERNELS_DIR}",))


def reported_line(marker: str) -> str:
    lines = PROBE.read_text().split("\n")
    return f"{PROBE.name}:{next(i for i, line in enumerate(lines) if line.endswith('REPORTED: ' + marker)) + 1}"


def pack_pairs(low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Fragment registers: two 16-bit elements, `low` in bits 0-15."""
    return low.view(np.uint16).astype(np.uint32) | high.view(np.uint16).astype(np.uint32) << 16


# ---- mma.m16n8k16 ------------------------------------------------------------------------------------------------
def a_fragments(a: np.ndarray) -> np.ndarray:
    """(16, 16) row-major A -> (32 lanes, 4 registers). ISA: a0..a7 at row groupID (+8 for a2, a3, a6, a7), column
    threadID_in_group * 2 + (0, 1) (+8 for a4..a7); register r holds a(2r) low and a(2r+1) high."""
    registers = np.zeros((32, 4), dtype=np.uint32)
    for r in range(4):
        row = GROUP_ID + 8 * (r % 2)
        column = THREAD_IN_GROUP * 2 + 8 * (r // 2)
        registers[:, r] = pack_pairs(a[row, column], a[row, column + 1])
    return registers


def b_fragments(b: np.ndarray) -> np.ndarray:
    """(16, 8) B (k by n) -> (32, 2). ISA: b0..b3 at row (k) threadID_in_group * 2 + (0, 1) (+8 for b2, b3), column
    groupID."""
    registers = np.zeros((32, 2), dtype=np.uint32)
    for r in range(2):
        k = THREAD_IN_GROUP * 2 + 8 * r
        registers[:, r] = pack_pairs(b[k, GROUP_ID], b[k + 1, GROUP_ID])
    return registers


def c_positions() -> tuple[np.ndarray, np.ndarray]:
    """(rows, columns), each (32, 4), of the C/D fragment. ISA: c0, c1 at row groupID, c2, c3 at groupID + 8; column
    threadID_in_group * 2 + (i & 1)."""
    i = np.arange(4)
    rows = GROUP_ID[:, None] + 8 * (i[None, :] // 2)
    columns = THREAD_IN_GROUP[:, None] * 2 + i[None, :] % 2
    return rows, columns


def run_mma(probe, dtype: str, a: np.ndarray, b: np.ndarray, c: np.ndarray, schedule: str = "lockstep") -> np.ndarray:
    """D = A B + C (16 x 8) through the emulated mma, fragments in and out by the ISA's tables."""
    rows, columns = c_positions()
    d = np.zeros((32, 4), dtype=np.float32)
    probe.get_function(MMA_KERNELS[dtype], schedule=schedule)(
        (1,), (32,), (a_fragments(a).reshape(-1), b_fragments(b).reshape(-1), c[rows, columns].reshape(-1),
                      d.reshape(-1))
    )
    result = np.full((16, 8), np.nan, dtype=np.float32)
    result[rows, columns] = d
    return result


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_mma_matches_a_float32_matmul_exactly_when_every_sum_is_exact(probe, dtype, schedule):
    """Small integers times powers of two: every product and partial sum is exact in float32, so any element the
    fragments put in the wrong place changes the result."""
    random = np.random.default_rng(1)
    a = (random.integers(-16, 17, (16, 16)) * 2.0 ** random.integers(-3, 1, (16, 16))).astype(DTYPES[dtype])
    b = (random.integers(-16, 17, (16, 8)) * 2.0 ** random.integers(-3, 1, (16, 8))).astype(DTYPES[dtype])
    c = random.integers(-100, 101, (16, 8)).astype(np.float32)
    expected = a.astype(np.float32) @ b.astype(np.float32) + c
    np.testing.assert_array_equal(run_mma(probe, dtype, a, b, c, schedule), expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mma_rounds_once_from_the_exact_sum(probe, dtype):
    """Random inputs: the emulated mma adds exact products in double and rounds once, so its error against a float64
    reference is at most half a float32 ulp of the result plus double's summation error (16 additions of 2^-53
    each, relative to sum |a||b| + |c|). A float32 matmul, rounding after every addition, may be up to ~16 float32
    ulps of that sum away; the bound here is far tighter, which also pins the accumulator's placement."""
    random = np.random.default_rng(2)
    a = random.standard_normal((16, 16)).astype(DTYPES[dtype])
    b = random.standard_normal((16, 8)).astype(DTYPES[dtype])
    c = random.standard_normal((16, 8)).astype(np.float32)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    reference = a64 @ b64 + c
    magnitude = np.abs(a64) @ np.abs(b64) + np.abs(c)
    bound = 2.0**-24 * np.abs(reference) + 17 * 2.0**-53 * magnitude
    error = np.abs(run_mma(probe, dtype, a, b, c) - reference)
    assert (error <= bound).all(), float((error / bound).max())
    float32_matmul = a.astype(np.float32) @ b.astype(np.float32) + c
    assert np.abs(float32_matmul - reference).max() <= 17 * 2.0**-24 * magnitude.max()


# ---- ldmatrix -------------------------------------------------------------------------------------------------------
def ldmatrix_expected(tile: np.ndarray, rows: np.ndarray, matrices: int, transposed: bool) -> np.ndarray:
    """(32, matrices) registers. ISA: lanes 8m..8m+7 give the rows of matrix m; each lane receives row lane / 4,
    columns 2 (lane % 4) + (0, 1) of each matrix, of its transpose with .trans."""
    registers = np.zeros((32, matrices), dtype=np.uint32)
    for m in range(matrices):
        matrix = tile[rows[8 * m:8 * m + 8]]  # (8, 8)
        if transposed:
            matrix = matrix.T
        registers[:, m] = pack_pairs(matrix[LANE // 4, 2 * (LANE % 4)], matrix[LANE // 4, 2 * (LANE % 4) + 1])
    return registers


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_ldmatrix_delivers_the_isa_fragments_with_and_without_trans(probe, schedule):
    random = np.random.default_rng(3)
    tile = random.permutation(2**16)[: 32 * 8].astype(np.uint16).reshape(32, 8)  # distinct: any mix-up shows
    rows = random.permutation(32).astype(np.int32)  # lane L passes the address of row rows[L]
    registers = np.zeros((32, 12), dtype=np.uint32)
    probe.get_function("ldmatrix_all", schedule=schedule)((1,), (32,), (tile.reshape(-1), rows, registers.reshape(-1)))
    np.testing.assert_array_equal(registers[:, 0:4], ldmatrix_expected(tile, rows, 4, transposed=False))
    np.testing.assert_array_equal(registers[:, 4:8], ldmatrix_expected(tile, rows, 4, transposed=True))
    np.testing.assert_array_equal(registers[:, 8:10], ldmatrix_expected(tile, rows, 2, transposed=False))
    np.testing.assert_array_equal(registers[:, 10:12], ldmatrix_expected(tile, rows, 2, transposed=True))


# ---- cp.async -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_cp_async_lands_at_issue_or_when_its_group_is_waited_for(probe, schedule):
    """tensor_core_probe.cu's cp_async_stages: 64 threads, 48 in bounds. Sources hold only the in-bounds rows: a copy
    that read its source out of bounds would bring the emulator's NaN guard in instead of zeros. Lockstep lands copies
    at the wait, the latest moment a GPU may; the one-warp-at-a-time schedules at issue, the earliest."""
    threads, in_bounds = 64, 48
    first_source = np.arange(4 * in_bounds, dtype=np.float32) + 1
    second_source = -np.arange(4 * in_bounds, dtype=np.float32) - 1000
    seen = np.zeros((threads, 4, 2, 4), dtype=np.float32)  # thread, record, tile, 4 floats
    probe.get_function("cp_async_stages", schedule=schedule)(
        (1,), (threads,), (first_source, second_source, seen.reshape(-1), np.int32(in_bounds))
    )
    landed_first = np.zeros((threads, 4), dtype=np.float32)
    landed_first[:in_bounds] = first_source.reshape(in_bounds, 4)
    landed_second = np.zeros((threads, 4), dtype=np.float32)
    landed_second[:in_bounds] = second_source.reshape(in_bounds, 4)
    stale = np.full((threads, 4), -1.0, dtype=np.float32)
    at_wait = schedule == "lockstep"
    np.testing.assert_array_equal(seen[:, 0, 0], stale if at_wait else landed_first)  # before any wait
    np.testing.assert_array_equal(seen[:, 0, 1], stale if at_wait else landed_second)
    np.testing.assert_array_equal(seen[:, 1, 0], landed_first)  # wait<1>: the older group at the latest
    np.testing.assert_array_equal(seen[:, 1, 1], stale if at_wait else landed_second)
    np.testing.assert_array_equal(seen[:, 2, 0], landed_first)  # wait<0>: both
    np.testing.assert_array_equal(seen[:, 2, 1], landed_second)
    next_thread = (np.arange(threads) + 1) % threads  # after __syncthreads, other threads' copies too
    np.testing.assert_array_equal(seen[:, 3, 0], landed_first[next_thread])
    np.testing.assert_array_equal(seen[:, 3, 1], landed_second[next_thread])


# ---- misuse ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kernel, block, expected",
    [
        ("mma_with_absent_lanes", 32, "lane 16 is in the mask but exited before reaching this mma.sync.m16n8k16"),
        ("ldmatrix_in_branches", 32, "meet at different calls: ldmatrix.x"),
        ("ldmatrix_misaligned", 32, "passes a row address that is not 16-byte aligned"),
        ("exit_with_pending_copy", 32, "exits with 1 cp.async copies it never waited for"),
    ],
)
@pytest.mark.parametrize("schedule", ["lockstep", "warps-reverse"])
def test_tensor_core_misuse_is_reported_with_file_and_line(probe, kernel, block, expected, schedule):
    function = probe.get_function(kernel, schedule=schedule)
    arguments = {
        "mma_with_absent_lanes": (np.zeros(32, np.float32),),
        "ldmatrix_in_branches": (np.zeros(32, np.uint32),),
        "ldmatrix_misaligned": (np.zeros(32, np.uint32),),
        "exit_with_pending_copy": (np.zeros(128, np.float32), np.zeros(32, np.float32)),
    }[kernel]
    with pytest.raises(EmulatorError) as raised:
        function((1,), (block,), arguments)
    assert expected in str(raised.value) and reported_line(kernel) in str(raised.value), str(raised.value)


# ---- the GPU side: the same probe through NVRTC ---------------------------------------------------------------------
@pytest.mark.skipif(not sys.platform.startswith(("linux", "win")), reason="nvidia-cuda-nvrtc-cu12 is Linux/Windows")
def test_the_probe_compiles_to_tensor_core_instructions_for_sm_80():
    options = ("--std=c++17", f"-I{KERNELS_DIR}", f"-I{compile_gate.cuda_include_dir()}",
               *compile_gate.CUPY_ADDED_OPTIONS, "-arch=sm_80")
    ptx = compile_gate.compile_with_nvrtc(PROBE.read_text(), PROBE.name, options).ptx
    for instruction in ("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32",
                        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32",
                        "ldmatrix.sync.aligned.m8n8.x4.shared.b16", "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16",
                        "ldmatrix.sync.aligned.m8n8.x2.shared.b16", "ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16",
                        "cp.async.cg.shared.global", "cp.async.commit_group", "cp.async.wait_group 1",
                        "cp.async.wait_group 0", "cvt.rn.bf16x2.f32", "cvt.rn.f16.f32"):
        assert instruction in ptx, instruction
