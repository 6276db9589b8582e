"""tinytf.kernels.emulator on the small kernels of emulator_probe.cu: what it computes, reports and refuses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tinytf.kernels.emulator import SCHEDULES, EmulatedModule, EmulatorError

PROBE = Path(__file__).with_name("emulator_probe.cu")


@pytest.fixture(scope="module")
def probe():
    return EmulatedModule(PROBE)


def reported_line(marker: str) -> str:
    """'emulator_probe.cu:N' for the line marked `// REPORTED: marker`."""
    lines = PROBE.read_text().split("\n")
    return f"{PROBE.name}:{next(i for i, line in enumerate(lines) if line.endswith('REPORTED: ' + marker)) + 1}"


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_shuffles_barriers_and_votes_compute_what_a_gpu_computes(probe, schedule):
    x = np.arange(128, dtype=np.float32)
    sums = np.zeros(4, dtype=np.float32)
    probe.get_function("warp_sums", schedule=schedule)((1,), (128,), (x, sums))
    np.testing.assert_array_equal(sums, x.reshape(4, 32).sum(axis=1))

    y = np.zeros(256, dtype=np.float32)
    probe.get_function("reverse_through_shared", schedule=schedule)((1,), (256,), (x.repeat(2), y))
    np.testing.assert_array_equal(y, x.repeat(2)[::-1])

    ballots = np.zeros(2, dtype=np.uint32)
    probe.get_function("odd_lane_ballot", schedule=schedule)((1,), (64,), (ballots,))
    np.testing.assert_array_equal(ballots, [0xAAAAAAAA, 0xAAAAAAAA])


def test_atomics_lose_no_update_across_os_threads():
    module = EmulatedModule(PROBE, workers=2)
    count, total = np.zeros(1, dtype=np.int32), np.zeros(1, dtype=np.float32)
    module.get_function("count_threads")((50, 2), (96,), (count, total))
    assert count[0] == 50 * 2 * 96 and total[0] == 50 * 2 * 96 / 2


@pytest.mark.parametrize(
    "kernel, expected",
    [
        ("exit_before_barrier", "__syncthreads reached by 64 of 128 threads; the other 64 have exited"),
        ("barrier_in_branches", "threads of one block wait at different __syncthreads"),
        ("shuffle_with_half_mask", "which leaves the calling lane out"),
        ("shuffle_outside_mask", "reads lane 20, which is outside the mask"),
    ],
)
@pytest.mark.parametrize("schedule", ["lockstep", "warps-reverse"])
def test_synchronization_errors_are_reported_with_file_and_line(probe, kernel, expected, schedule):
    with pytest.raises(EmulatorError) as raised:
        probe.get_function(kernel, schedule=schedule)((2,), (128,), (np.zeros(128, dtype=np.float32),))
    assert expected in str(raised.value) and reported_line(kernel) in str(raised.value), str(raised.value)


def test_writes_past_the_end_of_an_array_are_reported(probe):
    kernel = probe.get_function("write_unchecked")
    kernel((1,), (64,), (np.zeros(64, dtype=np.float32), np.int32(64)))
    with pytest.raises(EmulatorError, match=r"argument 0 \(float\* x\): the kernel wrote past the end of the array"):
        kernel((1,), (64,), (np.zeros(60, dtype=np.float32), np.int32(60)))


def test_poisoned_outputs_show_elements_the_kernel_did_not_write():
    module = EmulatedModule(PROBE, poison_outputs=True)
    x = np.zeros(64, dtype=np.float32)
    module.get_function("write_unchecked")((1,), (32,), (x, np.int32(64)))
    assert (x[:32] == 64).all() and np.isnan(x[32:]).all()


@pytest.mark.parametrize(
    "args, expected",
    [
        ((np.zeros(64, dtype=np.float32), 64), r"argument 1 \(int n\): pass numpy.int32, got int"),
        ((np.zeros(64, dtype=np.float32), np.int64(64)), r"argument 1 \(int n\): pass numpy.int32, got int64"),
        ((np.zeros(64, dtype=np.float64), np.int32(64)), r"argument 0 \(float\* x\): expected dtype float32"),
        ((np.zeros((64, 2), dtype=np.float32)[:, 0], np.int32(64)), "C-contiguous"),
        ((np.zeros(64, dtype=np.float32),), "takes 2 arguments, got 1"),
    ],
)
def test_arguments_are_checked_against_the_kernel_parameters(probe, args, expected):
    with pytest.raises(TypeError, match=expected):
        probe.get_function("write_unchecked")((1,), (64,), args)


def test_read_only_arrays_are_refused_behind_non_const_pointers(probe):
    x = np.zeros(64, dtype=np.float32)
    x.flags.writeable = False
    with pytest.raises(TypeError, match="read-only"):
        probe.get_function("write_unchecked")((1,), (64,), (x, np.int32(64)))


def test_the_portable_ucontext_fibers_run_the_same_kernels():
    """The build used where the x86-64 context switch is not available (other CPUs, macOS)."""
    module = EmulatedModule(PROBE, options=("-DTINYTF_EMULATOR_UCONTEXT",), schedule="warps-random")
    x = np.arange(64, dtype=np.float32)
    sums = np.zeros(2, dtype=np.float32)
    module.get_function("warp_sums")((1,), (64,), (x, sums))
    np.testing.assert_array_equal(sums, x.reshape(2, 32).sum(axis=1))


def test_a_changed_header_is_rebuilt_not_taken_from_the_cache(tmp_path, monkeypatch):
    """Builds are keyed by the headers a kernel includes (tensor_core.cuh for the tensor-core kernels) too."""
    monkeypatch.setenv("TINYTF_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "include").mkdir()
    header = tmp_path / "include" / "value.cuh"
    source = tmp_path / "kernel.cu"
    source.write_text('#include "value.cuh"\n'
                      'extern "C" __global__ void write_value(float* x) { x[threadIdx.x] = kValue; }\n')
    for value in (1.0, 2.0):
        header.write_text(f"constexpr float kValue = {value};\n")
        x = np.zeros(32, dtype=np.float32)
        EmulatedModule(source, options=(f"-I{tmp_path / 'include'}",)).get_function("write_value")((1,), (32,), (x,))
        assert (x == value).all()
