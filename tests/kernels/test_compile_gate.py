"""The compile gate: every kernel variant builds with NVRTC for sm_70, sm_75, sm_80 and sm_90 within its budgets,
with exactly the options the launcher gives CuPy. The resource table is printed in the terminal summary."""

from __future__ import annotations

import sys
import types

import pytest

from tinytf.attention import cuda as cuda_attention_module
from tinytf.kernels import FLASH_ATTENTION_SOURCE, HEAD_DIMS, FlashAttentionVariant, compile_gate

if not sys.platform.startswith(("linux", "win")):
    pytest.skip("the nvidia-cuda-nvrtc-cu12 wheel exists for Linux and Windows only", allow_module_level=True)


@pytest.mark.parametrize("arch", compile_gate.ARCHITECTURES, ids=lambda arch: f"sm_{arch}")
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_every_variant_builds_within_budget(gate_results_by_build, head_dim, arch):
    result = gate_results_by_build[(head_dim, arch)]
    assert {kernel.kernel for kernel in result.kernels} == {
        "flash_attention_forward", "flash_attention_backward_delta", "flash_attention_backward_dq",
        "flash_attention_backward_dkdv",
    }
    assert result.violations() == []


def test_the_gate_builds_what_the_launcher_asks_cupy_for(monkeypatch):
    """The launcher's cupy.RawModule call, recorded through a stand-in for CuPy, against the gate's options."""
    built = []
    fake_cupy = types.SimpleNamespace(
        RawModule=lambda code, options: built.append((code, options)) or types.SimpleNamespace(get_function=str),
        cuda=types.SimpleNamespace(Device=lambda index: None),
    )
    monkeypatch.setattr(cuda_attention_module.backend, "cupy_module", lambda: fake_cupy)
    cuda_attention_module._cupy_kernels.cache_clear()
    try:
        cuda_attention_module._cupy_kernels(64, 0)
    finally:
        cuda_attention_module._cupy_kernels.cache_clear()
    [(code, options)] = built
    variant = FlashAttentionVariant(64)
    assert code == FLASH_ATTENTION_SOURCE.read_text()
    gate = compile_gate.gate_options(variant, 80)
    assert gate[: len(options)] == options
    assert gate[len(options):] == (*compile_gate.CUPY_ADDED_OPTIONS, "-arch=sm_80", "-Xptxas=-v")


def test_a_compile_error_shows_the_nvrtc_log():
    broken = FLASH_ATTENTION_SOURCE.read_text().replace("constexpr int kWarps = 4;", "constexpr int kWarps = ;")
    with pytest.raises(compile_gate.NvrtcError, match=r"flash_attention\.cu\(\d+\): error"):
        compile_gate.compile_with_nvrtc(broken, FLASH_ATTENTION_SOURCE.name,
                                        compile_gate.gate_options(FlashAttentionVariant(16), 80))


def test_budget_and_occupancy_arithmetic():
    kernel = compile_gate.KernelResources(head_dim=128, arch=80, kernel="k", registers=128, shared_bytes=43264,
                                          spill_store_bytes=0, spill_load_bytes=0, stack_frame_bytes=0)
    # sm_80: (43264 + 1024 reserved) B per block in 164 KiB -> 3 blocks of 4 warps of 64 -> 19 %.
    assert kernel.occupancy() == (3, 12 / 64)
    assert kernel.budget_violations() == []
    spilling = compile_gate.KernelResources(128, 80, "k", 130, 50000, 8, 8, 16)
    assert len(spilling.budget_violations()) == 4
