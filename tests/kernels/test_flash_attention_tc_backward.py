"""tinytf/kernels/flash_attention_tc_backward.cu: the bf16/fp16 tensor-core backward, run by the emulator (with the
features of issue 17: window, softcap, ALiBi, per-batch lengths, dropout), and its broken copies
(tests/kernels/test_compile_gate.py checks its NVRTC builds).

The kernels get O and L from a float64 NumPy forward, rounded where the GPU forward rounds (O to the element type, L to
float32), so these tests do not depend on the forward kernel. The tolerance is FlashAttention's: each of dQ, dK, dV
may be at most ERROR_MULTIPLE (tensor_core_reference) times as far from the float64 gradient as a naive NumPy
backward that rounds at the same points as the kernels (inputs in the element type; scores, softmax and sums in
float32; P and dS rounded to the element type before their products; results rounded to it).
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from attention.attention_reference import reference_attention
from kernels.tensor_core_reference import (
    ELEMENT_TYPES,
    FEATURE_CASES,
    TensorCoreCase,
    assert_gradients_match,
    backward_case,
    exact_forward,
    exact_gradients,
    forward_as_the_gpu_saves_it,
    launch_backward,
    padding_poisoned,
    philox,
)
from tinytf.kernels import FLASH_ATTENTION_TC_BACKWARD_SOURCE as SOURCE
from tinytf.kernels import kernel_source, tensor_core_variant
from tinytf.kernels.emulator import EmulatedModule, EmulatorError, cache_dir


# ---- the three kernels on the emulator -----------------------------------------------------------------------------
def emulated_module(head_dim: int, dtype: str, schedule: str, path: Path = SOURCE) -> EmulatedModule:
    options = tensor_core_variant(head_dim, dtype).options
    return EmulatedModule(path, options, schedule=schedule, poison_outputs=True)


@pytest.fixture(scope="module")
def built_variants():
    """Builds every (head dim, dtype) the tests emulate, two g++ at a time; later modules load them from the cache."""
    variants = [(head_dim, dtype) for head_dim in (64, 128) for dtype in ELEMENT_TYPES]
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(lambda variant: emulated_module(*variant, "lockstep"), variants))


def run_case(case: TensorCoreCase, schedule: str, path: Path = SOURCE, inputs=None):
    """(O, L as the forward saves them, (dq, dk, dv)); `inputs`: (q, k, v, grad_out) to launch with instead."""
    out, logsumexp = forward_as_the_gpu_saves_it(case)
    module = emulated_module(case.q.shape[-1], case.q.dtype.name, schedule, path)
    return out, logsumexp, launch_backward(module, case, out, logsumexp, inputs=inputs)


# ---- results against float64 ---------------------------------------------------------------------------------------
# (T, S, head dim, causal): T < S, T == S and T > S; lengths that are not multiples of any tile, several tiles.
LOCKSTEP_CASES = [
    (1, 1, 64, False),
    (17, 97, 64, True),     # causal with T < S: the diagonal starts S - T keys in
    (97, 17, 128, False),
    (97, 97, 128, True),    # causal with T == S
    (256, 256, 64, False),  # several key blocks and query tiles
    (40, 17, 128, True),    # causal with T > S: the first 23 queries see no key, L = -inf
]
ONE_WARP_AT_A_TIME_CASES = [(97, 97, 64, True), (17, 256, 128, False)]


@pytest.mark.parametrize("dtype", ELEMENT_TYPES)
@pytest.mark.parametrize("T, S, head_dim, is_causal", LOCKSTEP_CASES)
def test_lockstep_matches_float64(built_variants, T, S, head_dim, is_causal, dtype):
    case = backward_case(T, S, head_dim, is_causal, dtype)
    assert_gradients_match(case, *run_case(case, "lockstep"))


@pytest.mark.parametrize("head_dim, dtype", [(32, "bfloat16"), (96, "float16")])
def test_head_dims_32_and_96_match_float64(head_dim, dtype):
    """Rows of 64 and 192 bytes, whose 16-byte chunks the kernels swizzle with other bits of the row index."""
    case = backward_case(70, 45, head_dim, True, dtype, seed=5)
    assert_gradients_match(case, *run_case(case, "warps-reverse"))


@pytest.mark.parametrize("dtype", ELEMENT_TYPES)
@pytest.mark.parametrize("T, S, head_dim, is_causal", ONE_WARP_AT_A_TIME_CASES)
def test_one_warp_at_a_time_matches_float64(built_variants, T, S, head_dim, is_causal, dtype):
    case = backward_case(T, S, head_dim, is_causal, dtype, seed=1)
    assert_gradients_match(case, *run_case(case, "warps-random"))


@pytest.mark.parametrize("dtype", ELEMENT_TYPES)
@pytest.mark.parametrize("n_kv_heads", [2, 1], ids=["GQA", "MQA"])
def test_head_groups_and_key_padding_match_float64(built_variants, n_kv_heads, dtype):
    """Batch entry 1 hides its last 30 keys, entry 2 all of them: its queries see nothing, its gradients are 0."""
    case = backward_case(33, 70, 64, True, dtype, batch=3, n_query_heads=4, n_kv_heads=n_kv_heads,
                     hidden_keys=(0, 30, 70), seed=2)
    out, logsumexp, grads = run_case(case, "warps-forward")
    assert np.isinf(logsumexp[2]).all()
    assert all(not grad[2].astype(np.float32).any() for grad in grads)
    assert_gradients_match(case, out, logsumexp, grads)


@pytest.mark.parametrize("dtype", ELEMENT_TYPES)
@pytest.mark.parametrize("name", FEATURE_CASES)
def test_features_match_float64(built_variants, name, dtype):
    """Each feature of issue 17 alone, then all together (softcap with its derivative, dropout with the forward's
    mask regenerated); rows and keys past a batch entry's lengths hold NaN, which the kernels must never read."""
    T, S, is_causal, options = FEATURE_CASES[name]
    case = backward_case(T, S, 64, is_causal, dtype, seed=6, **options)
    out, logsumexp, grads = run_case(case, "warps-random", inputs=padding_poisoned(case))
    query_lens, key_lens = case.lengths
    for batch, (query_len, key_len) in enumerate(zip(query_lens, key_lens)):
        padding = (grads[0][batch, :, query_len:], grads[1][batch, :, key_len:], grads[2][batch, :, key_len:])
        assert not any(grad.astype(np.float32).any() for grad in padding), "a padding row's gradient is not 0"
    assert_gradients_match(case, out, logsumexp, grads)


def test_all_features_together_at_head_dim_128(built_variants):
    """Streamed tiles of 16 rows instead of 32: other tile edges for the window and the lengths."""
    T, S, is_causal, options = FEATURE_CASES["all together"]
    case = backward_case(T, S, 128, is_causal, "bfloat16", seed=9, **options)
    assert_gradients_match(case, *run_case(case, "warps-reverse", inputs=padding_poisoned(case)))


def test_key_tiles_outside_the_window_are_never_read(built_variants):
    """One query at the end of 256 keys with a causal window of 16 sees keys 239..255: the dQ kernel must skip the
    key tiles before 224 (Bc = 32), whose keys hold NaN, which dQ += dS K would carry into the gradient (0 x NaN)
    if those tiles were masked instead. (The dK/dV blocks of keys 0..191 see no query: they write zeros.)"""
    case = backward_case(1, 256, 64, True, "bfloat16", seed=7, window=(16, -1))
    k, v = case.k.copy(), case.v.copy()
    k[:, :, :192] = v[:, :, :192] = np.nan
    out, logsumexp, grads = run_case(case, "lockstep", inputs=(case.q, k, v, case.grad_out))
    assert_gradients_match(case, out, logsumexp, grads)


def test_reference_philox_matches_the_random123_known_answers():
    """The known-answer vectors of Random123's philox4x32-10 (kat_vectors): the reference's dropout generator."""
    vectors = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    for counter, key, expected in vectors:
        assert tuple(int(word) for word in philox(counter, key)) == expected


def test_reference_gradients_match_the_plain_reference_and_finite_differences():
    """The float64 gradients the kernels are held to: equal to attention_reference's without features, and to central
    differences of the float64 forward with window, softcap, ALiBi and per-batch lengths (dropout's mask is fixed)."""
    case = backward_case(33, 70, 16, True, "bfloat16", batch=2, n_query_heads=4, n_kv_heads=2, hidden_keys=(0, 9))
    _, *expected = reference_attention(case.q, case.k, case.v, case.grad_out, scale=case.scale, is_causal=True,
                                       attn_mask=case.key_keep.astype(bool)[:, None, None, :], dtype=np.float64)
    for grad, want in zip(exact_gradients(case), expected):
        np.testing.assert_allclose(grad, want, rtol=1e-12, atol=1e-12)

    T, S, _, options = FEATURE_CASES["all together"]
    case = backward_case(7, 11, 4, False, "float16", seed=8, **{**options, "query_lens": (5, 7), "key_lens": (11, 6),
                                                                "hidden_keys": (0, 1), "window": (4, 2)})
    case.q, case.k, case.v, case.grad_out = (x.astype(np.float64) for x in (case.q, case.k, case.v, case.grad_out))
    grads = exact_gradients(case)
    step = 1e-6
    for index, name in enumerate(("q", "k", "v")):
        x = getattr(case, name)
        numeric = np.zeros_like(x)
        for position in np.ndindex(x.shape):
            saved = x[position]
            x[position] = saved + step
            plus = (exact_forward(case)[0] * case.grad_out).sum()
            x[position] = saved - step
            minus = (exact_forward(case)[0] * case.grad_out).sum()
            x[position] = saved
            numeric[position] = (plus - minus) / (2 * step)
        np.testing.assert_allclose(grads[index], numeric, rtol=1e-6, atol=1e-8, err_msg=f"d{name}")


def test_results_are_identical_under_every_schedule(built_variants):
    """No atomics: every output element is summed in one fixed order, whatever order the warps run in."""
    case = backward_case(70, 97, 64, True, "bfloat16", seed=3)
    first, *others = [run_case(case, schedule)[2] for schedule in ("lockstep", "warps-reverse", "warps-random")]
    for other in others:
        for a, b in zip(first, other):
            np.testing.assert_array_equal(a.view(np.uint16), b.view(np.uint16))


# ---- broken copies of the kernel must fail -------------------------------------------------------------------------
# name -> (text to find in the source, its replacement); each breaks the first place the text occurs (in dK/dV, or
# in a helper both kernels share).
BREAKAGES = {
    "no cp_async_wait": ("        cp_async_wait<1>();\n", ""),
    "wrong fragment index": (
        "a[step][1] = pack2<Element>(product[2 * step][2], product[2 * step][3]);",
        "a[step][1] = pack2<Element>(product[2 * step][0], product[2 * step][1]);",
    ),
    "no __syncthreads after the wait": (
        "        __syncthreads();  // every thread's copies of this tile (and the first time: of K and V) "
        "have landed\n",
        "",
    ),
    # The emulator catches this one because the one-warp-at-a-time schedules land a cp.async at issue: the first warp
    # refills the buffer the other warps have yet to read.
    "no __syncthreads before the buffer is refilled": (
        "        __syncthreads();  // every warp is done with this buffer before the next step refills it\n",
        "",
    ),
}


@pytest.fixture(scope="module")
def broken_paths():
    """{name: path of the broken copy}, in the emulator's cache folder so that their builds are reused across runs."""
    source = kernel_source(SOURCE)  # tensor_core.cuh inlined: the copy lives in another folder
    folder = cache_dir() / "broken-kernels"
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, (find, replace) in BREAKAGES.items():
        assert find in source, f"the kernel no longer contains the text this test breaks: {find.strip()!r}"
        path = folder / ("tc_backward_" + re.sub(r"\W+", "_", name).strip("_") + ".cu")
        text = source.replace(find, replace, 1)
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
        paths[name] = path
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(lambda path: emulated_module(64, "bfloat16", "lockstep", path), paths.values()))
    return paths


def outcome(path: Path, schedule: str) -> str:
    """"reported" (an emulator error), "wrong output", or "missed" for a causal T == S case in bf16."""
    case = backward_case(97, 97, 64, True, "bfloat16", seed=4)
    try:
        out, logsumexp, grads = run_case(case, schedule, path)
    except EmulatorError:
        return "reported"
    try:
        assert_gradients_match(case, out, logsumexp, grads)
    except AssertionError:
        return "wrong output"
    return "missed"


@pytest.mark.parametrize("name", BREAKAGES)
def test_a_broken_copy_fails_one_warp_at_a_time(broken_paths, name):
    """A missing barrier shows only when warps run apart; the other breakages fail under any schedule."""
    assert outcome(broken_paths[name], "warps-forward") in ("reported", "wrong output")


@pytest.mark.parametrize("name", ["no cp_async_wait", "wrong fragment index"])
def test_a_broken_copy_fails_in_lockstep(broken_paths, name):
    assert outcome(broken_paths[name], "lockstep") in ("reported", "wrong output")
