"""tinytf/kernels/flash_attention_tc.cu, the bf16/fp16 tensor-core forward kernel: emulated against float64 (with the
features of issue 17: window, softcap, ALiBi, per-batch lengths, dropout), broken copies that must fail, and NVRTC
builds for every target.

Tolerance, as FlashAttention's tests set it: the kernel's largest error against float64 attention (of the same
bf16/fp16 inputs) may be at most ERROR_MULTIPLE times the largest error of a naive attention that rounds where the
kernel rounds (tensor_core_reference.naive_rounded_attention), with no additive floor. Outputs reach the kernel filled
with NaN, so an element it fails to write shows.
"""

from __future__ import annotations

import functools
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from kernels.tensor_core_reference import (
    ELEMENT_TYPES,
    FEATURE_CASES,
    assert_forward_matches_float64,
    backward_case,
    element_case,
    launch_forward,
    padding_poisoned,
)
from tinytf.kernels import (
    FLASH_ATTENTION_TC_SOURCE,
    TensorCoreVariant,
    compile_gate,
    kernel_source,
    tensor_core_variant,
)
from tinytf.kernels.emulator import EmulatedModule, EmulatorError, cache_dir

KERNEL = "flash_attention_tc_forward"
KEY_TILE = {32: 64, 64: 64, 96: 32, 128: 32}  # Bc of the kernel per head dim (its header)
HEAD_DIMS = (32, 64, 96, 128)
ARCHITECTURES = compile_gate.TENSOR_CORE_ARCHITECTURES  # 80, 86, 89, 90
REGISTER_LIMITS = {32: 128, 64: 168, 96: 168, 128: 168}  # 65536 / (128 threads x the kernel's kMinBlocksPerSM)
SHARED_BYTES = {32: 20480, 64: 36864, 96: 26624, 128: 34816}  # the kernel header's figures

# (T, S, causal): T == S, T < S (causal aligned bottom-right), T > S (causal: the first T - S queries see no key),
# lengths that are not multiples of Br = 64 or Bc = 32/64, and one query.
GRID = (
    (1, 1, False),
    (1, 256, True),
    (17, 97, True),
    (97, 17, False),
    (97, 97, True),
    (17, 256, False),
    (256, 97, True),
    (256, 256, True),
)
PER_WARP_GRID = ((17, 97, True), (97, 256, False), (256, 256, True))


# ---- running the kernel on the emulator ---------------------------------------------------------------------------

def variant(head_dim: int, element: str) -> TensorCoreVariant:
    return tensor_core_variant(head_dim, ELEMENT_TYPES[element])


@functools.cache
def emulated_module(head_dim: int, element: str, schedule: str = "lockstep", path=None) -> EmulatedModule:
    return EmulatedModule(path or FLASH_ATTENTION_TC_SOURCE, variant(head_dim, element).options, schedule=schedule,
                          poison_outputs=True)


def build_two_at_a_time(builds) -> None:
    """Runs the g++ builds of emulated_module(*build) for each build, two side by side (later calls hit the cache)."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(lambda build: emulated_module(*build), builds))


@pytest.fixture(scope="module")
def emulated_builds():
    build_two_at_a_time([(head_dim, element) for head_dim in HEAD_DIMS for element in ELEMENT_TYPES])


def run_forward(module: EmulatedModule, case, element: str, inputs=None) -> tuple[np.ndarray, np.ndarray]:
    """The kernel's (out as float32 (B, Hq, T, d), logsumexp (B, Hq, T)) for the case, launched by
    tinytf.attention.cuda's launcher as on a GPU; `inputs`: (q, k, v) to launch with instead of the case's."""
    assert case.q.dtype == ELEMENT_TYPES[element]
    out, logsumexp = launch_forward(module, case, inputs=inputs)
    return out.astype(np.float32), logsumexp


# ---- emulated results -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("element", ELEMENT_TYPES)
@pytest.mark.parametrize("head_dim", (64, 128))
@pytest.mark.parametrize("T, S, is_causal", GRID)
def test_lockstep_matches_float64_on_ragged_lengths(emulated_builds, T, S, is_causal, head_dim, element):
    case = element_case(T, S, head_dim, is_causal, ELEMENT_TYPES[element])  # two query heads share one K/V head
    assert_forward_matches_float64(case, element, *run_forward(emulated_module(head_dim, element), case, element))


@pytest.mark.parametrize("element", ELEMENT_TYPES)
@pytest.mark.parametrize("head_dim", (32, 96))
def test_head_dims_32_and_96_match_float64(emulated_builds, head_dim, element):
    case = element_case(97, 130, head_dim, True, ELEMENT_TYPES[element], seed=1)
    assert_forward_matches_float64(case, element, *run_forward(emulated_module(head_dim, element), case, element))


@pytest.mark.parametrize("schedule, element, head_dim", [
    ("warps-random", "bfloat16", 64), ("warps-reverse", "float16", 128), ("warps-forward", "bfloat16", 128),
])
@pytest.mark.parametrize("T, S, is_causal", PER_WARP_GRID)
def test_one_warp_at_a_time_matches_float64(emulated_builds, T, S, is_causal, schedule, element, head_dim):
    case = element_case(T, S, head_dim, is_causal, ELEMENT_TYPES[element], seed=2)
    module = emulated_module(head_dim, element, schedule)
    assert_forward_matches_float64(case, element, *run_forward(module, case, element))


@pytest.mark.parametrize("element", ELEMENT_TYPES)
@pytest.mark.parametrize("n_kv_heads", (2, 1), ids=["GQA", "MQA"])
def test_head_groups_and_key_padding_match_float64(emulated_builds, n_kv_heads, element):
    """Hq = 4 query heads on fewer K/V heads; batch 0 masks every key (zeros, L = -inf), batch 1 its last 40 keys."""
    case = element_case(33, 70, 64, True, ELEMENT_TYPES[element], batch=2, n_query_heads=4, n_kv_heads=n_kv_heads,
                        hidden_keys=40, seed=3)
    case.key_keep[0] = 0
    out, logsumexp = run_forward(emulated_module(64, element, "warps-random"), case, element)
    assert not out[0].any() and np.all(logsumexp[0] == -np.inf)
    assert_forward_matches_float64(case, element, out, logsumexp)


@pytest.mark.parametrize("element", ELEMENT_TYPES)
@pytest.mark.parametrize("name", FEATURE_CASES)
def test_features_match_float64(emulated_builds, name, element):
    """Each feature of issue 17 alone, then all together; rows and keys past a batch entry's lengths hold NaN, which
    the kernel must never read."""
    T, S, is_causal, options = FEATURE_CASES[name]
    case = backward_case(T, S, 64, is_causal, element, seed=6, **options)
    out, logsumexp = run_forward(emulated_module(64, element, "warps-random"), case, element,
                                 padding_poisoned(case)[:3])
    assert_forward_matches_float64(case, element, out, logsumexp)


def test_all_features_together_at_head_dim_128(emulated_builds):
    """Bc = 32 key tiles instead of 64: other tile edges for the window and the lengths."""
    T, S, is_causal, options = FEATURE_CASES["all together"]
    case = backward_case(T, S, 128, is_causal, "float16", seed=9, **options)
    out, logsumexp = run_forward(emulated_module(128, "float16", "warps-reverse"), case, "float16",
                                 padding_poisoned(case)[:3])
    assert_forward_matches_float64(case, "float16", out, logsumexp)


def test_key_tiles_outside_the_window_are_never_read(emulated_builds):
    """One query at the end of 256 keys with a causal window of 16 sees keys 239..255, all in the last key tile
    (Bc = 64): the keys of the other tiles hold NaN, which a kernel that masked those tiles instead of skipping them
    would carry into the output (0 x NaN)."""
    case = backward_case(1, 256, 64, True, "bfloat16", seed=7, window=(16, -1))
    q, k, v = case.q, case.k.copy(), case.v.copy()
    k[:, :, :192] = v[:, :, :192] = np.nan
    out, logsumexp = run_forward(emulated_module(64, "bfloat16"), case, "bfloat16", (q, k, v))
    assert_forward_matches_float64(case, "bfloat16", out, logsumexp)


def test_results_are_identical_under_every_schedule(emulated_builds):
    """Each output element is summed in one fixed order, whatever order the warps run in."""
    case = element_case(97, 97, 64, True, ELEMENT_TYPES["bfloat16"], seed=4)
    first, *others = [run_forward(emulated_module(64, "bfloat16", schedule), case, "bfloat16")
                      for schedule in ("lockstep", "warps-forward", "warps-reverse", "warps-random")]
    for other in others:
        np.testing.assert_array_equal(first[0], other[0])
        np.testing.assert_array_equal(first[1], other[1])


# ---- broken copies of the kernel must fail ------------------------------------------------------------------------
# Each copy edits the source text in one place (the kernel carries no test switches), so a test fails loudly if the
# line it breaks is ever rewritten. A missing barrier between warps is checked one warp at a time only: in lockstep
# every warp waits for its own copies before any warp reads the tile, which hides it (as cuda_emulator.h says).

TILE_WAIT = "        cp_async_wait<0>();  // this thread's copies of tile `tile` have landed\n"
TILE_BARRIER = "        __syncthreads();\n        const int tile_first_key"
P_FRAGMENT_A1 = "            pack2<Element>(p[2 * step][2], p[2 * step][3]),\n"
BREAKAGES = {  # name -> (text to find, its replacement)
    "no cp_async_wait before reading the tile": (TILE_WAIT, ""),
    "P's a1 fragment taken from the wrong n tile": (P_FRAGMENT_A1, P_FRAGMENT_A1.replace("2 * step]", "2 * step + 1]")),
    "no __syncthreads after the tile lands": (TILE_BARRIER, "        const int tile_first_key"),
}
BROKEN_HEAD_DIM = 64


@functools.cache
def broken_copy(name: str):
    """The source with one breakage, in the emulator's cache folder (so its build is reused between runs)."""
    find, replace = BREAKAGES[name]
    source = kernel_source(FLASH_ATTENTION_TC_SOURCE)  # tensor_core.cuh inlined: the copy lives in another folder
    assert source.count(find) == 1, f"the kernel no longer contains the text this test breaks: {find.strip()!r}"
    folder = cache_dir() / "broken-tensor-core-kernels"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (re.sub(r"\W+", "_", name).strip("_") + ".cu")
    text = source.replace(find, replace)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    return path


@pytest.fixture(scope="module")
def broken_builds():
    build_two_at_a_time([(BROKEN_HEAD_DIM, "bfloat16", "lockstep", broken_copy(name)) for name in BREAKAGES])


def outcome(name: str, schedule: str, case) -> str:
    """"reported" (an emulator error), "wrong output", or "missed" for the broken copy under the schedule."""
    try:
        module = emulated_module(BROKEN_HEAD_DIM, "bfloat16", schedule, broken_copy(name))
        out, logsumexp = run_forward(module, case, "bfloat16")
    except EmulatorError:
        return "reported"
    try:
        assert_forward_matches_float64(case, "bfloat16", out, logsumexp)
    except AssertionError:
        return "wrong output"
    return "missed"


@pytest.mark.parametrize("name, schedules", [
    ("no cp_async_wait before reading the tile", ("lockstep", "warps-forward")),
    ("P's a1 fragment taken from the wrong n tile", ("lockstep", "warps-random")),
    ("no __syncthreads after the tile lands", ("warps-forward", "warps-reverse", "warps-random")),
])
def test_broken_copies_fail(broken_builds, name, schedules, broken_kernel_outcomes):
    case = element_case(40, 200, BROKEN_HEAD_DIM, False, ELEMENT_TYPES["bfloat16"], seed=5)  # 4 key tiles, one partial
    results = {schedule: outcome(name, schedule, case) for schedule in schedules}
    broken_kernel_outcomes.update({(f"tensor cores: {name}", schedule): kind for schedule, kind in results.items()})
    assert "missed" not in results.values(), results


# ---- NVRTC builds ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("element", ELEMENT_TYPES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_nvrtc_builds_use_tensor_cores_within_budget(tensor_core_gate_results, head_dim, element, arch):
    """The compile gate's build (the launcher's options, CuPy's additions, ptxas -v): no warnings, no spills, no stack
    frame, registers within the launch bounds, the header's shared memory, and every mma of one unrolled tile."""
    result = tensor_core_gate_results[(FLASH_ATTENTION_TC_SOURCE.name, element, head_dim, arch)]
    assert result.options == compile_gate.gate_options(variant(head_dim, element), arch)
    assert not result.violations(), result.violations()
    (kernel,) = result.kernels
    assert kernel.kernel == KERNEL
    assert kernel.register_limit == REGISTER_LIMITS[head_dim], kernel
    assert kernel.shared_bytes == SHARED_BYTES[head_dim], kernel
    # Q K^T: Bc/8 n tiles x d/16 k steps; P V: d/8 n tiles x Bc/16 k steps.
    assert kernel.mma_instructions == KEY_TILE[head_dim] * head_dim // 64, kernel
