"""How many threads tinytf's CPU work uses: one explicit setting for every pool, never changed behind your back.

    tinytf.set_num_threads(4)      BLAS (matmuls), numexpr (when installed) and flash attention's workers: 4 each
    tinytf.set_num_threads(None)   back to what they were: BLAS and numexpr their own defaults, flash one per core

BLAS is limited through threadpoolctl, which finds the BLAS library NumPy loaded (OpenBLAS, MKL, BLIS) and calls its
own set-threads function; the limit object is kept here, so it lasts until the next call. Nothing in tinytf calls
set_num_threads itself: a library that changed a process-wide thread count on import would surprise its user.

`run_on_workers` is the one pool of worker threads that tinytf's own CPU kernels share (flash attention's tiles, the
blocks of the fused elementwise expressions): NumPy releases the GIL inside each ufunc and BLAS call, so Python
threads that each run a chain of them keep several cores busy.
"""

from __future__ import annotations

import itertools
import os
from concurrent.futures import ThreadPoolExecutor

from threadpoolctl import threadpool_limits

try:
    import numexpr
except ImportError:  # an optional extra: tinytf[cpu]
    numexpr = None

_num_threads: int | None = None
_blas_limits = None  # the threadpool_limits in force, which restores the original BLAS setting on request
_numexpr_default: int | None = None


def set_num_threads(n: int | None) -> None:
    """Use n threads for BLAS, numexpr and the flash attention backend's worker pool; None restores the defaults."""
    global _num_threads, _blas_limits, _numexpr_default
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"set_num_threads: expected a positive integer or None, got {n!r}")
    if _blas_limits is not None:
        _blas_limits.restore_original_limits()
        _blas_limits = None
    if n is not None:
        _blas_limits = threadpool_limits(n, user_api="blas")
    if numexpr is not None:
        if n is None:
            if _numexpr_default is not None:
                numexpr.set_num_threads(_numexpr_default)
                _numexpr_default = None
        else:
            previous = numexpr.set_num_threads(n)
            if _numexpr_default is None:
                _numexpr_default = previous
    _num_threads = n


def get_num_threads() -> int:
    """The threads set by set_num_threads, or, without one, the CPUs this process may run on (flash's default)."""
    if _num_threads is not None:
        return _num_threads
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


_pools: dict[int, ThreadPoolExecutor] = {}
# A forked child inherits the pools but not their threads: work handed to them would wait forever. It starts afresh.
os.register_at_fork(after_in_child=_pools.clear)


def run_on_workers(work, items: list, n_threads: int) -> list:
    """[work(item) for item in items], the items taken one at a time, as each frees up, by the calling thread and
    n_threads - 1 worker threads.

    The calling thread works too rather than wait: no hand-off for it, and when another process holds the other
    cores it still gets through the items alone. The pool of each size is made once and kept. Callers make each
    result depend only on its item, so results never depend on which thread ran what.
    """
    if n_threads == 1 or len(items) == 1:
        return [work(item) for item in items]
    results = [None] * len(items)
    next_index = itertools.count()  # next() on it is one C call: atomic under the GIL

    def take_items() -> None:
        for index in next_index:
            if index >= len(items):
                return
            results[index] = work(items[index])

    if n_threads not in _pools:
        _pools[n_threads] = ThreadPoolExecutor(max_workers=n_threads - 1, thread_name_prefix="tinytf-worker")
    helpers = [_pools[n_threads].submit(take_items) for _ in range(n_threads - 1)]
    take_items()
    for helper in helpers:
        helper.result()  # waits, and raises what the helper raised
    return results
