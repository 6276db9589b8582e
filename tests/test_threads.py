"""tinytf.set_num_threads sets BLAS, numexpr and flash attention's pool together, and None restores them."""

import multiprocessing

import numpy as np
import pytest
from threadpoolctl import threadpool_info

import tinytf
from tinytf.attention import flash


def blas_threads() -> list[int]:
    return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]


def flash_threads() -> int:
    """The worker threads flash attention plans for a problem big enough to use them."""
    big = (1, 8, 1024, 64)
    _, n_threads = flash._plan(big, big, False, None, None, None, np)
    return n_threads


@pytest.fixture
def restored():
    yield
    tinytf.set_num_threads(None)


def test_set_num_threads_sets_blas_numexpr_and_flash_and_none_restores(restored):
    numexpr = pytest.importorskip("numexpr")
    before = (blas_threads(), numexpr.get_num_threads(), flash_threads())
    assert before[0], "NumPy's BLAS is not visible to threadpoolctl"
    tinytf.set_num_threads(1)
    assert (blas_threads(), numexpr.get_num_threads(), flash_threads(), tinytf.get_num_threads()) == (
        [1] * len(before[0]), 1, 1, 1)
    tinytf.set_num_threads(3)  # a second call replaces the first limit, it does not stack on it
    assert (blas_threads(), numexpr.get_num_threads(), flash_threads()) == ([3] * len(before[0]), 3, 3)
    tinytf.set_num_threads(None)
    assert (blas_threads(), numexpr.get_num_threads(), flash_threads()) == before


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_set_num_threads_rejects_what_is_not_a_positive_integer(bad, restored):
    with pytest.raises(ValueError, match="positive integer"):
        tinytf.set_num_threads(bad)


def _run_on_two_workers(results) -> None:
    results.put(tinytf.threads.run_on_workers(lambda item: item * 2, [1, 2, 3, 4], 2))


def test_a_forked_child_gets_its_own_worker_pool(restored):
    """A child forked after the parent used the pool inherits the pool object without its threads; it must make its
    own rather than wait forever on work nobody takes."""
    assert tinytf.threads.run_on_workers(lambda item: item, [1, 2], 2) == [1, 2]  # the parent's pool exists
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    child = context.Process(target=_run_on_two_workers, args=(results,))
    child.start()
    child.join(timeout=30)
    if child.is_alive():
        child.kill()
    assert child.exitcode == 0 and results.get(timeout=5) == [2, 4, 6, 8]
