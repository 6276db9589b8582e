"""The emulator must catch real kernel bugs: each test breaks a copy of tinytf/kernels/flash_attention.cu (or of the
attention_mask.cuh it includes) in one place.

The copies are made by editing the source text (the kernel carries no test switches), so a test fails loudly if the
line it breaks is ever rewritten. Outcomes per schedule are printed in the terminal summary. Lockstep may miss a
missing barrier between warps; running one warp at a time must not.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import pytest

from kernels.flash_cases import assert_matches_reference, make_case
from tinytf.attention.cuda import FlashAttentionKernels
from tinytf.kernels.emulator import SCHEDULES, EmulatedModule, EmulatorError, cache_dir
from tinytf.kernels import FLASH_ATTENTION_SOURCE, KERNELS_DIR, flash_attention_variant

HEAD_DIM = 16
TILE_BARRIER = (
    "        __syncthreads();  // every warp is done with the previous K/V tile (and the first time: Q is loaded)\n"
)
WARP_BARRIER = "        __syncwarp();  // each lane reads the P of all 32 columns\n"
MASK_HEADER = KERNELS_DIR / "attention_mask.cuh"
CAUSAL_TEST = "(window_right < 0 || key <= position + window_right)"  # in attention_mask.cuh
WARP_ROWS = "    const float* my_q_rows = q_rows + warp * R * kHeadDim;\n"

# name -> (text to find in the forward kernel, or else in the header, its replacement)
BREAKAGES = {
    "drop the K/V tile __syncthreads": (TILE_BARRIER, ""),
    "drop the __syncwarp before P V": (WARP_BARRIER, ""),
    "causal mask shifted by one": (CAUSAL_TEST, "(window_right < 0 || key < position + window_right)"),
    "idle warps return early": (WARP_ROWS, WARP_ROWS + "    if (warp_first_query >= query_len) return;\n"),
}


def broken_sources(name: str) -> dict[str, str]:
    """{file name: text} of the kernel file and its header, one of them broken."""
    source, header = FLASH_ATTENTION_SOURCE.read_text(), MASK_HEADER.read_text()
    find, replace = BREAKAGES[name]
    assert source.count(find) + header.count(find) >= 1, \
        f"the kernel no longer contains the line this test breaks: {find.strip()!r}"
    if find in header:
        header = header.replace(find, replace, 1)
    else:
        forward_end = source.index("flash_attention_backward_delta(")
        source = source[:forward_end].replace(find, replace, 1) + source[forward_end:]
    return {FLASH_ATTENTION_SOURCE.name: source, MASK_HEADER.name: header}


@pytest.fixture(scope="module")
def broken_paths():
    """{name: path of the broken kernel file}, built for the emulator two at a time. Each copy lives, with its header,
    in a folder of the emulator's cache, so that their builds are reused from one test run to the next."""
    paths = {}
    for name in BREAKAGES:
        folder = cache_dir() / "broken-kernels" / re.sub(r"\W+", "_", name).strip("_")
        folder.mkdir(parents=True, exist_ok=True)
        for file_name, text in broken_sources(name).items():
            if not (folder / file_name).exists() or (folder / file_name).read_text() != text:
                (folder / file_name).write_text(text)
        paths[name] = folder / FLASH_ATTENTION_SOURCE.name
    options = flash_attention_variant(HEAD_DIM).options
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(lambda path: EmulatedModule(path, options), paths.values()))
    return paths


def outcome(path, schedule: str, case) -> tuple[str, str]:
    """("reported", message) | ("wrong output", message) | ("missed", "") for the case under the schedule."""
    variant = flash_attention_variant(HEAD_DIM)
    module = EmulatedModule(path, variant.options, schedule=schedule, poison_outputs=True)
    kernels = FlashAttentionKernels((module,), variant)
    try:
        out, logsumexp = kernels.forward(case.q, case.k, case.v, case.key_keep, case.scale, case.is_causal)
    except EmulatorError as error:
        return "reported", str(error)
    try:
        assert_matches_reference(case, out, logsumexp)
    except AssertionError as error:
        return "wrong output", str(error)
    return "missed", ""


def record(outcomes: dict, name: str, path, case) -> dict[str, tuple[str, str]]:
    """Runs the case under every schedule; notes each outcome for the terminal summary."""
    results = {schedule: outcome(path, schedule, case) for schedule in SCHEDULES}
    outcomes.update({(name, schedule): kind for schedule, (kind, _) in results.items()})
    return results


def test_a_missing_barrier_between_warps_gives_wrong_output_one_warp_at_a_time(broken_paths, broken_kernel_outcomes):
    name = "drop the K/V tile __syncthreads"
    results = record(broken_kernel_outcomes, name, broken_paths[name], make_case(17, 97, HEAD_DIM, is_causal=False))
    for schedule in ("warps-forward", "warps-reverse", "warps-random"):
        assert results[schedule][0] == "wrong output", (schedule, results[schedule])


def test_a_missing_syncwarp_gives_wrong_output_under_every_schedule(broken_paths, broken_kernel_outcomes):
    name = "drop the __syncwarp before P V"
    results = record(broken_kernel_outcomes, name, broken_paths[name], make_case(17, 97, HEAD_DIM, is_causal=False))
    assert all(kind == "wrong output" for kind, _ in results.values()), results


def test_a_causal_mask_off_by_one_gives_wrong_output_under_every_schedule(broken_paths, broken_kernel_outcomes):
    name = "causal mask shifted by one"
    results = record(broken_kernel_outcomes, name, broken_paths[name], make_case(17, 97, HEAD_DIM, is_causal=True))
    assert all(kind == "wrong output" for kind, _ in results.values()), results


def test_a_syncthreads_some_warps_never_reach_is_reported_with_file_and_line(broken_paths, broken_kernel_outcomes):
    name = "idle warps return early"
    path = broken_paths[name]
    barrier_line = path.read_text().split("\n").index(TILE_BARRIER.rstrip("\n")) + 1
    case = make_case(17, 97, HEAD_DIM, is_causal=False)  # the rows of warp 3 (24 to 31) all lie past T
    results = record(broken_kernel_outcomes, name, path, case)
    for schedule, (kind, message) in results.items():
        assert kind == "reported", (schedule, kind, message)
        assert f"{path.name}:{barrier_line}: __syncthreads reached by 96 of 128 threads" in message, message
