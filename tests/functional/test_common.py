"""The helpers the tuned ops share: map_row_blocks hands runs of cache-sized blocks to the worker threads, and the
ops that use it give the same results with one worker thread or several; row_max's halving tree gives exactly the
row maxima of max(axis=-1). (tests/functional runs with blocks of a row or two, conftest.py: every array here spans
many blocks.)"""

import contextlib
import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import tinytf
import tinytf.functional as F
from tinytf import backend
from tinytf.functional import common
from tinytf.functional.common import ROW_MAX_TREE_WIDTH, map_row_blocks, row_blocks, row_max, row_max_study
from tinytf.functional.normalization import layer_norm_study_backward, layer_norm_study_forward

MANY_BLOCKS = (512, 64)


@pytest.fixture
def threads():
    """set_num_threads(n) inside the test, the defaults restored after it."""
    yield tinytf.set_num_threads
    tinytf.set_num_threads(None)


def test_map_row_blocks_gives_each_thread_one_contiguous_run_in_order(threads):
    threads(2)
    array = np.zeros(MANY_BLOCKS, dtype=np.float32)
    seen = []

    def work(run):
        seen.append(threading.current_thread().name)
        time.sleep(0.05)  # long enough that one thread cannot take both runs
        return run

    runs = map_row_blocks(work, array)
    assert len(runs) == 2 and [block for run in runs for block in run] == row_blocks(array)
    assert runs[0][-1].stop == runs[1][0].start  # contiguous, in row order
    assert len(set(seen)) == 2 and threading.current_thread().name in seen  # the caller works, beside one worker


def test_map_row_blocks_keeps_small_arrays_on_the_calling_thread(threads):
    threads(2)
    one_block = np.zeros((1, 4), dtype=np.float32)
    assert len(row_blocks(one_block)) == 1
    names = map_row_blocks(lambda run: threading.current_thread().name, one_block)
    assert names == [threading.current_thread().name]
    assert map_row_blocks(lambda run: run, np.zeros((0, 8), dtype=np.float32)) == []


def _results(dtype) -> dict:
    """Forward and backward of the blocked ops on arrays of many blocks."""
    rng = np.random.default_rng(0)
    x = tinytf.tensor(rng.standard_normal(MANY_BLOCKS).astype(dtype), requires_grad=True)
    weight = tinytf.tensor(rng.standard_normal(MANY_BLOCKS[1]).astype(dtype), requires_grad=True)
    bias = tinytf.tensor(rng.standard_normal(MANY_BLOCKS[1]).astype(dtype), requires_grad=True)
    keep = np.tril(np.ones((MANY_BLOCKS[1], MANY_BLOCKS[1]), dtype=bool))
    scores = x.reshape(8, MANY_BLOCKS[0] // 8, MANY_BLOCKS[1])[:, : MANY_BLOCKS[1]]
    outputs = {
        "gelu": F.gelu(x, approximate="tanh"),
        "silu": F.silu(x),
        "layer_norm": F.layer_norm(x, MANY_BLOCKS[1], weight, bias),
        "rms_norm": F.rms_norm(x, MANY_BLOCKS[1], weight),
        "masked_softmax": F.masked_softmax(scores, keep, 0.125),
    }
    results = {}
    for name, output in outputs.items():
        x.grad = weight.grad = bias.grad = None
        output.backward(np.random.default_rng(1).standard_normal(output.shape).astype(dtype))
        results[name] = [output.numpy(), x.grad.copy()] + [p.grad.copy() for p in (weight, bias) if p.grad is not None]
    return results


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_blocked_ops_give_the_same_results_on_one_or_two_threads(threads, dtype):
    threads(1)
    one = _results(dtype)
    threads(2)
    two = _results(dtype)
    for name in one:
        for index, (single, split) in enumerate(zip(one[name], two[name])):
            if index < 2:  # each row's output and input gradient come from that row alone: identical
                np.testing.assert_array_equal(single, split, err_msg=name)
            elif dtype == np.float64:  # dL/dw and dL/db sum over rows, one partial sum per thread: only the order
                np.testing.assert_allclose(single, split, rtol=1e-12, atol=1e-12, err_msg=name)


def test_threaded_layer_norm_matches_the_study_version(threads):
    threads(2)
    rng = np.random.default_rng(3)
    x = rng.standard_normal(MANY_BLOCKS)
    weight, bias, grad = rng.standard_normal(MANY_BLOCKS[1]), rng.standard_normal(MANY_BLOCKS[1]), rng.standard_normal(
        MANY_BLOCKS)
    tensors = [tinytf.tensor(a, requires_grad=True) for a in (x, weight, bias)]
    out = F.layer_norm(tensors[0], MANY_BLOCKS[1], tensors[1], tensors[2])
    out.backward(grad)
    y, x_hat, rstd = layer_norm_study_forward(x, weight, bias)
    np.testing.assert_allclose(out.numpy(), y, rtol=1e-12, atol=1e-12)
    for tensor, expected in zip(tensors, layer_norm_study_backward(grad, x_hat, rstd, weight)):
        np.testing.assert_allclose(tensor.grad, expected, rtol=1e-10, atol=1e-10)


@contextlib.contextmanager
def tree_for_any_row_count():
    """row_max takes its tree however few rows it gets (the training step's blocks have hundreds)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(common, "ROW_MAX_TREE_MIN_ROWS", 1)
        yield


# Rows of every width up to past the tree's limit, odd ones included, with NaN, infinities and signed zeros among
# ordinary values, so that a row's maximum can sit anywhere and NaN must win wherever it is.
_ROW_VALUES = st.one_of(st.floats(-1e3, 1e3, width=32), st.sampled_from([np.nan, np.inf, -np.inf, 0.0, -0.0]))


@settings(max_examples=60, deadline=None)
@given(rows=hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=7)
                       .flatmap(lambda shape: st.integers(1, ROW_MAX_TREE_WIDTH + 3).map(lambda c: shape[:-1] + (c,))),
                       elements=_ROW_VALUES))
def test_row_max_equals_the_study_version(rows):
    with tree_for_any_row_count():
        np.testing.assert_array_equal(row_max(rows), row_max_study(rows))


@pytest.mark.parametrize("width", [2, 3, 17, 64, 65, ROW_MAX_TREE_WIDTH])
def test_row_max_propagates_nan_and_keeps_rows_of_minus_infinity(device, width):
    rows = np.full((4, width), -np.inf, dtype=np.float32)
    rows[1, width // 2] = np.nan
    rows[2, -1] = np.nan
    rows[3, :] = np.arange(width)
    on_device = tinytf.tensor(rows, device=device)
    with tree_for_any_row_count(), backend.device_scope(on_device.device):
        maxima = backend.to_numpy(row_max(on_device.data))
    np.testing.assert_array_equal(maxima[:, 0], [-np.inf, np.nan, np.nan, width - 1])


def test_row_max_reads_rows_that_are_not_contiguous():
    block = np.random.default_rng(4).standard_normal((6, 40)).astype(np.float32)
    with tree_for_any_row_count():
        for view in (block[:, ::2], block.T[:16], block[::2, 3:35]):
            np.testing.assert_array_equal(row_max(view), view.max(axis=-1, keepdims=True))
