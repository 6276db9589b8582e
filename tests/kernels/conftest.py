"""Shared by the kernel tests: emulator builds made once per session, and two tables for the terminal summary.

The compile gate's resource table and the broken-kernel outcomes are printed at the end of a run that computed them,
so a CI log shows what was checked, not only that it passed.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor

import pytest

from tinytf.attention.cuda import FlashAttentionKernels
from tinytf.kernels.emulator import SCHEDULES, EmulatedModule
from tinytf.kernels import FLASH_ATTENTION_SOURCE, compile_gate, flash_attention_variant

EMULATED_HEAD_DIMS = (16, 64, 128)

gate_results: list = []  # filled by the gate_results_by_build fixture
tensor_core_gate_results_made: list = []  # filled by the tensor_core_gate_results fixture
outcomes_of_broken_kernels: dict = {}  # (variant, schedule) -> "reported" | "wrong output" | "missed"


@pytest.fixture(scope="session")
def emulated_flash_kernels():
    """emulated_flash_kernels(head_dim, schedule) -> FlashAttentionKernels on the emulator, outputs poisoned with NaN.

    The first use builds every head dim of EMULATED_HEAD_DIMS at once (two g++ side by side); later modules of the
    same head dim load that build from the cache.
    """
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(lambda head_dim: emulated_module(head_dim, "lockstep"), EMULATED_HEAD_DIMS))

    @functools.cache
    def kernels(head_dim: int, schedule: str) -> FlashAttentionKernels:
        return FlashAttentionKernels((emulated_module(head_dim, schedule),), flash_attention_variant(head_dim))

    return kernels


def emulated_module(head_dim: int, schedule: str) -> EmulatedModule:
    options = flash_attention_variant(head_dim).options
    return EmulatedModule(FLASH_ATTENTION_SOURCE, options, schedule=schedule, poison_outputs=True)


@pytest.fixture(scope="session")
def gate_results_by_build():
    """{(head dim, arch): GateResult} for every variant and target: one NVRTC build each, two at a time."""
    results = compile_gate.check_all()
    gate_results.extend(results)
    return {(result.head_dim, result.arch): result for result in results}


@pytest.fixture(scope="session")
def tensor_core_gate_results():
    """{(source file name, dtype, head dim, arch): GateResult} for every tensor-core build: one NVRTC build each, two
    at a time, shared by the gate's tests and the tests of each kernel file."""
    results = compile_gate.check_all_tensor_core()
    tensor_core_gate_results_made.extend(results)
    return {(result.source, result.dtype, result.head_dim, result.arch): result for result in results}


@pytest.fixture(scope="session")
def broken_kernel_outcomes() -> dict:
    """Where test_broken_kernels.py notes what the emulator made of each broken kernel, for the summary."""
    return outcomes_of_broken_kernels


def pytest_terminal_summary(terminalreporter):
    for results, kind in ((gate_results, "float32"), (tensor_core_gate_results_made, "tensor-core bf16/fp16")):
        if results:
            terminalreporter.write_sep("-", f"CUDA compile gate (NVRTC), {kind} kernels: resources per kernel, target")
            terminalreporter.write_line(compile_gate.resource_table(results))
    if outcomes_of_broken_kernels:
        terminalreporter.write_sep("-", "deliberately broken kernels under the emulator")
        variants = sorted({variant for variant, _ in outcomes_of_broken_kernels})
        terminalreporter.write_line("| broken variant | " + " | ".join(SCHEDULES) + " |")
        terminalreporter.write_line("|---|" + "---|" * len(SCHEDULES))
        for variant in variants:
            cells = [outcomes_of_broken_kernels.get((variant, schedule), "-") for schedule in SCHEDULES]
            terminalreporter.write_line(f"| {variant} | " + " | ".join(cells) + " |")
