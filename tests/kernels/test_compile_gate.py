"""The compile gate: every float32 kernel variant builds with NVRTC for sm_70, sm_75, sm_80 and sm_90, and every
tensor-core variant (bf16 and fp16) for sm_80, sm_86, sm_89 and sm_90, within its budgets, with exactly the options the
launcher gives CuPy. The float32 resource table is printed in the terminal summary."""

from __future__ import annotations

import re
import sys
import types

import ml_dtypes

import pytest

from tinytf.attention import cuda as cuda_attention_module
from tinytf.kernels import (
    FLASH_ATTENTION_SOURCE,
    FLASH_ATTENTION_TC_SOURCE,
    HEAD_DIMS,
    TENSOR_CORE_DTYPES,
    TENSOR_CORE_HEAD_DIMS,
    TENSOR_CORE_HEADER,
    FlashAttentionVariant,
    TensorCoreVariant,
    compile_gate,
    kernel_source,
    tensor_core_variant,
)

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


def test_head_dims_past_128_keep_one_column_tile_in_48_kib():
    """Two (32 x d+1) float32 column tiles alone take 2 * 32 * 257 * 4 = 65792 B at d = 256; one takes 32896 B, and
    with R = 2 forward rows (8 x 256 of Q, 8 x 32 of P: 9216 B) or R = 1 backward row (two 4 x 256 row tiles, two 4 x 32
    weight tiles: 9216 B) a block stays at 42112 B."""
    assert [FlashAttentionVariant(d).column_tiles for d in HEAD_DIMS] == [2 if d <= 128 else 1 for d in HEAD_DIMS]
    variant = FlashAttentionVariant(256)
    assert "-DCOLUMN_TILES=1" in variant.options and "-DCOLUMN_TILES=2" in FlashAttentionVariant(128).options
    assert (variant.forward_rows_per_warp, variant.backward_rows_per_warp) == (2, 1)
    assert max(HEAD_DIMS) == 256


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_gate_builds_what_the_launcher_asks_cupy_for(monkeypatch, dtype):
    """The launcher's cupy.RawModule calls, recorded through a stand-in for CuPy, against the gate's code and options:
    the .cu file with its headers inlined (CuPy's cache of builds sees only the code), the variant's options."""
    built = []
    fake_cupy = types.SimpleNamespace(
        RawModule=lambda code, options: built.append((code, options)) or types.SimpleNamespace(get_function=str),
        cuda=types.SimpleNamespace(Device=lambda index: None),
    )
    monkeypatch.setattr(cuda_attention_module.backend, "cupy_module", lambda: fake_cupy)
    cuda_attention_module._cupy_kernels.cache_clear()
    try:
        cuda_attention_module._cupy_kernels(64, dtype, 0)
    finally:
        cuda_attention_module._cupy_kernels.cache_clear()
    variant = cuda_attention_module.kernel_variant(64, dtype)
    assert [code for code, _ in built] == [kernel_source(source) for source in variant.sources]
    assert not any(re.search(r'^#include "', code, re.MULTILINE) for code, _ in built)
    gate = compile_gate.gate_options(variant, 80)
    for _, options in built:
        assert options == variant.options == gate[: len(options)]
    headers = (f"-I{compile_gate.cuda_include_dir()}",) if dtype != "float32" else ()
    assert gate[len(variant.options):] == (*compile_gate.CUPY_ADDED_OPTIONS, *headers, "-arch=sm_80", "-Xptxas=-v")


def test_kernel_source_inlines_the_headers_once_and_keeps_line_numbers():
    text = kernel_source(FLASH_ATTENTION_TC_SOURCE)
    assert not re.search(r'^#include "|^#pragma once', text, re.MULTILINE)
    for header in (TENSOR_CORE_HEADER, TENSOR_CORE_HEADER.with_name("flash_attention_tc.cuh")):
        first_line = header.read_text().splitlines()[0]
        assert text.count(f'#line 1 "{header.name}"\n{first_line}\n') == 1, header.name
    lines = FLASH_ATTENTION_TC_SOURCE.read_text().splitlines()
    include = lines.index('#include "flash_attention_tc.cuh"')
    after = text.split(f'#line {include + 2} "{FLASH_ATTENTION_TC_SOURCE.name}"\n', 1)[1]
    assert after.splitlines()[0] == lines[include + 1]
    float32 = kernel_source(FLASH_ATTENTION_SOURCE)
    mask_header = FLASH_ATTENTION_SOURCE.with_name("attention_mask.cuh")
    assert not re.search(r'^#include "|^#pragma once', float32, re.MULTILINE)
    assert float32.count(f'#line 1 "{mask_header.name}"\n{mask_header.read_text().splitlines()[0]}\n') == 1


def test_a_compile_error_shows_the_nvrtc_log():
    broken = kernel_source(FLASH_ATTENTION_SOURCE).replace("constexpr int kWarps = 4;", "constexpr int kWarps = ;")
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


def test_sm_86_and_89_occupancy_follows_their_smaller_sms():
    """sm_86 and sm_89 hold 48 warps and 100 KiB of shared memory per SM (CUDA programming guide)."""
    kernel = compile_gate.KernelResources(128, 86, "k", registers=96, shared_bytes=34816, spill_store_bytes=0,
                                          spill_load_bytes=0, stack_frame_bytes=0, threads_per_block=128,
                                          register_limit=255)
    # 96 x 32 = 3072 registers per warp -> 21 warps -> 5 blocks; (34816 + 1024) B in 100 KiB -> 2 blocks: 8/48 warps.
    assert kernel.occupancy() == (2, 8 / 48)
    small = compile_gate.KernelResources(128, 89, "k", 32, 0, 0, 0, 0, threads_per_block=32, register_limit=255)
    assert small.occupancy() == (24, 24 / 48)  # sm_89's 24-block limit, one warp each


def test_launch_bounds_in_the_ptx_set_the_register_limit():
    ptx = """
.visible .entry a(.param .u64 a_param_0)
.maxntid 128, 1, 1
.minnctapersm 4
{ mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 x; mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 y; }
.visible .entry b(.param .u64 b_param_0)
.maxntid 128, 1, 1
.minnctapersm 3
{ }
.visible .entry c(.param .u64 c_param_0)
.maxntid 64, 2, 1
{ }
"""
    # 65536 / (4 x 128) = 128; 65536 / (3 x 128) = 170.7 -> 168 in steps of 8; no block count: the 255 cap.
    assert compile_gate._launch_bounds_and_mma(ptx, 80) == {"a": (128, 128, 2), "b": (128, 168, 0), "c": (128, 255, 0)}
    with pytest.raises(compile_gate.NvrtcError, match="d has no __launch_bounds__"):
        compile_gate._launch_bounds_and_mma(".visible .entry d(.param .u64 d_param_0)\n{ }", 80)


def test_a_tensor_core_build_without_mma_breaks_the_budget():
    no_mma = compile_gate.KernelResources(64, 80, "k", 64, 0, 0, 0, 0, register_limit=255)
    result = compile_gate.GateResult(64, 80, (), (no_mma,), (), dtype="bfloat16", source="x.cu")
    assert result.violations() == ["x.cu bfloat16 d=64, sm_80: no mma.sync in the PTX: the build does not use tensor "
                                   "cores"]
    with_mma = compile_gate.KernelResources(64, 80, "k", 64, 0, 0, 0, 0, register_limit=255, mma_instructions=8)
    assert compile_gate.GateResult(64, 80, (), (with_mma,), (), dtype="bfloat16").violations() == []
    no_hmma = compile_gate.GateResult(64, 80, (), (with_mma,), (), dtype="bfloat16", hmma_instructions=0)
    assert "no HMMA in the SASS" in no_hmma.violations()[0]


@pytest.mark.parametrize(
    "head_dim, dtype, expected",
    [(48, "bfloat16", "support head dims (32, 64, 96, 128), got 48"),
     (64, "bf16", "take dtypes ('bfloat16', 'float16'), got 'bf16'"),
     (64, "float32", "got 'float32'; float32 inputs go to the float32 kernels")],
)
def test_tensor_core_variants_name_the_bad_value(head_dim, dtype, expected):
    with pytest.raises(ValueError, match=re.escape(expected)):
        TensorCoreVariant(head_dim, dtype)


def test_tensor_core_options_follow_the_kernels_convention():
    assert TensorCoreVariant(96, "float16").options == ("--std=c++17", "-DHEAD_DIM=96", "-DELEMENT_FP16")
    assert tensor_core_variant(64, ml_dtypes.bfloat16) == TensorCoreVariant(64, "bfloat16")
    gate = compile_gate.gate_options(TensorCoreVariant(64, "bfloat16"), 89)
    assert gate == (*TensorCoreVariant(64, "bfloat16").options, *compile_gate.CUPY_ADDED_OPTIONS,
                    f"-I{compile_gate.cuda_include_dir()}", "-arch=sm_89", "-Xptxas=-v")
    assert (compile_gate.cuda_include_dir() / "cuda_bf16.h").is_file()


def test_the_gate_builds_only_the_tensor_core_files_that_exist(monkeypatch, tmp_path):
    monkeypatch.setattr(compile_gate, "TENSOR_CORE_SOURCES", (tmp_path / "absent.cu", FLASH_ATTENTION_SOURCE))
    assert compile_gate.tensor_core_sources() == (FLASH_ATTENTION_SOURCE,)
    assert compile_gate.check_all_tensor_core(sources=()) == []


TENSOR_CORE_KERNELS = {
    "flash_attention_tc.cu": {"flash_attention_tc_forward"},
    "flash_attention_tc_backward.cu": {"flash_attention_tc_backward_delta", "flash_attention_tc_backward_dq",
                                       "flash_attention_tc_backward_dkdv"},
}


@pytest.mark.parametrize("arch", compile_gate.TENSOR_CORE_ARCHITECTURES, ids=lambda arch: f"sm_{arch}")
@pytest.mark.parametrize("head_dim", TENSOR_CORE_HEAD_DIMS)
@pytest.mark.parametrize("dtype", TENSOR_CORE_DTYPES)
@pytest.mark.parametrize("source", [source.name for source in compile_gate.TENSOR_CORE_SOURCES])
def test_every_tensor_core_variant_builds_within_budget_on_tensor_cores(tensor_core_gate_results, source, dtype,
                                                                        head_dim, arch):
    result = tensor_core_gate_results[(source, dtype, head_dim, arch)]
    assert {kernel.kernel for kernel in result.kernels} == TENSOR_CORE_KERNELS[source]
    assert result.violations() == []
    assert {"bfloat16": "-DELEMENT_BF16", "float16": "-DELEMENT_FP16"}[dtype] in result.options
    for kernel in result.kernels:
        assert kernel.register_limit < 256 and kernel.threads_per_block % 32 == 0, kernel
        if not kernel.kernel.endswith("_delta"):  # the delta kernel is a row-wise dot product, on CUDA cores
            assert kernel.mma_instructions > 0, kernel
