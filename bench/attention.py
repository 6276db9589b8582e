"""Benchmark causal attention: tinytf's naive and flash backends, and PyTorch's CPU SDPA when torch is installed.

    python bench/attention.py                      the table: B=1, H=8, d=64, causal, T = 512 ... 16384
    python bench/attention.py --T 512 1024 2048    fewer lengths (the big ones take a while)
    python bench/attention.py --tiles              sweep flash tile sizes (Br, Bc) at one length
    python bench/attention.py --auto               naive vs flash at short lengths: where "auto" should switch
    python bench/attention.py --blas               which matmul sizes BLAS splits across its own threads

Times are medians of --reps runs, in seconds; forward runs under no_grad, forward+backward builds the graph and
back-propagates a fixed random dO. Peak extra memory is the largest amount of NumPy memory allocated above what
existed before the call, traced by tracemalloc in a separate, untimed run (NumPy reports its allocations there).
Naive is skipped where its measured memory, extrapolated quadratically, would take more than half the machine's
available memory; the table then shows the estimate. torch (the `bench` extra; its columns are left out when it is
not installed) runs torch.nn.functional.scaled_dot_product_attention on the CPU in the same run, and the ratio columns
are tinytf flash time / torch time. --threads N sets flash's and torch's thread counts.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import threading
import time
import tracemalloc

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import tinytf  # noqa: E402
from tinytf.attention import scaled_dot_product_attention  # noqa: E402
from tinytf.attention import AUTO_FLASH_MIN_SCORES, flash  # noqa: E402

try:
    import torch
except ImportError:  # the `bench` extra is optional: its columns are left out
    torch = None

GiB = 1 << 30
MiB = 1 << 20


def make_inputs(B, H, T, d, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((B, H, T, d), dtype=np.float32) for _ in range(4)]  # q, k, v, dO


def run_tinytf(backend, arrays, backward, **options):
    """A closure that runs the op (and its backward) on tensors made beforehand, so only the op is measured."""
    q, k, v, dO = arrays
    if not backward:
        inputs = [tinytf.tensor(a) for a in (q, k, v)]

        def forward():
            with tinytf.no_grad():
                scaled_dot_product_attention(*inputs, is_causal=True, backend=backend, **options)
        return forward
    inputs = [tinytf.tensor(a, requires_grad=True) for a in (q, k, v)]

    def forward_backward():
        for tensor in inputs:
            tensor.grad = None
        scaled_dot_product_attention(*inputs, is_causal=True, backend=backend, **options).backward(dO)
    return forward_backward


def run_torch(arrays, backward):
    q, k, v, dO = (torch.from_numpy(a) for a in arrays)
    if not backward:
        def forward():
            with torch.no_grad():
                torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return forward
    inputs = [x.clone().requires_grad_() for x in (q, k, v)]

    def forward_backward():
        for tensor in inputs:
            tensor.grad = None
        torch.nn.functional.scaled_dot_product_attention(*inputs, is_causal=True).backward(dO)
    return forward_backward


def median_times(closures: dict, reps: int) -> dict:
    """Median seconds of each closure; the closures take turns, so load from other processes hits them alike."""
    times = {name: [] for name in closures}
    for _ in range(reps):
        for name, fn in closures.items():
            gc.collect()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def peak_extra_bytes(fn):
    """Largest NumPy allocation above the starting point during fn() (tracemalloc sees NumPy's buffers)."""
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        fn()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def available_bytes():
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * GiB


def fmt_time(seconds):
    return "-" if seconds is None else f"{seconds:.3f}"


def fmt_bytes(n, estimated=False):
    if n is None:
        return "-"
    text = f"{n / GiB:.1f} GiB" if n >= GiB else f"{n / MiB:.0f} MiB"
    return f"~{text} (est.)" if estimated else text


def fmt_ratio(a, b):
    return "-" if a is None or b is None else f"{a / b:.2f}x"


def table(args):
    B, H, d = 1, args.heads, args.head_dim
    with_torch = torch is not None and not args.no_torch
    print(f"causal attention, B={B}, H={H}, d={d}, float32; times in s (median of {args.reps}, runs interleaved); "
          f"flash tiles (Br, Bc)={flash.default_tile_sizes(1, d)}, threads={tinytf.get_num_threads()}")
    header = ["T", "naive fwd", "naive f+b", "naive peak", "flash fwd", "flash f+b", "flash peak",
              "flash peak / naive scores", "naive/flash f+b"]
    if with_torch:
        header += ["torch fwd", "torch f+b", "flash/torch fwd", "flash/torch f+b"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    naive_per_score = None  # naive's peak bytes per score entry, from the largest length that ran
    for T in args.T:
        arrays = make_inputs(B, H, T, d)
        scores_bytes = B * H * T * T * 4
        row = {"T": str(T)}
        closures, peaks = {}, {}
        estimate = None if naive_per_score is None else naive_per_score * B * H * T * T
        run_naive = estimate is None or estimate < 0.5 * available_bytes()
        backends = ["naive", "flash"] if run_naive else ["flash"]
        for backend in backends:
            closures[backend + " fwd"] = run_tinytf(backend, arrays, False)
            closures[backend + " f+b"] = run_tinytf(backend, arrays, True)
            peaks[backend] = peak_extra_bytes(closures[backend + " f+b"])  # doubles as the warm-up
            closures[backend + " fwd"]()
        if with_torch:
            closures["torch fwd"], closures["torch f+b"] = run_torch(arrays, False), run_torch(arrays, True)
            closures["torch fwd"](), closures["torch f+b"]()
        times = median_times(closures, args.reps)
        if run_naive:
            naive_per_score = peaks["naive"] / (B * H * T * T)
            row["naive peak"] = fmt_bytes(peaks["naive"])
        else:
            row["naive peak"] = fmt_bytes(estimate, estimated=True) + ", skipped"
        row.update({name: fmt_time(seconds) for name, seconds in times.items()})
        row["flash peak"] = fmt_bytes(peaks["flash"])
        row["flash peak / naive scores"] = f"{100 * peaks['flash'] / scores_bytes:.1f}% of {fmt_bytes(scores_bytes)}"
        row["naive/flash f+b"] = fmt_ratio(times.get("naive f+b"), times["flash f+b"])
        if with_torch:
            row["flash/torch fwd"] = fmt_ratio(times["flash fwd"], times["torch fwd"])
            row["flash/torch f+b"] = fmt_ratio(times["flash f+b"], times["torch f+b"])
        print("| " + " | ".join(row.get(h, "-") for h in header) + " |", flush=True)


def tiles(args):
    T = args.T[0] if args.T != DEFAULT_T else 4096
    B, H, d = 1, args.heads, args.head_dim
    q, k, v, dO = make_inputs(B, H, T, d)
    print(f"flash forward+backward, causal, B={B}, H={H}, T={T}, d={d}: median of {args.reps} (interleaved), s; "
          f"'-' where Br * Bc * d > {flash.BLAS_SINGLE_THREAD_MACS} (BLAS would thread each tile)")

    def run(Br, Bc):
        O, L = flash.flash_attention_forward(q, k, v, d ** -0.5, True, None, Br, Bc)
        flash.flash_attention_backward(dO, q, k, v, O, L, d ** -0.5, True, None, Br, Bc)

    closures = {(Br, Bc): (lambda Br=Br, Bc=Bc: run(Br, Bc)) for Br in args.sizes for Bc in args.sizes
                if Br * Bc * d <= flash.BLAS_SINGLE_THREAD_MACS}
    for closure in closures.values():
        closure()  # warm-up
    times = median_times(closures, args.reps)
    print("| Br \\ Bc | " + " | ".join(str(Bc) for Bc in args.sizes) + " |")
    print("|" + "---|" * (len(args.sizes) + 1))
    for Br in args.sizes:
        print(f"| {Br} | " + " | ".join(fmt_time(times.get((Br, Bc))) for Bc in args.sizes) + " |")


def auto(args):
    """Forward+backward of flash and naive at the short lengths where "auto" switches between them: the ratio
    flash / naive crosses 1 near the threshold tinytf.attention.AUTO_FLASH_MIN_SCORES should be set to."""
    lengths = args.T if args.T != DEFAULT_T else [128, 192, 256, 320, 384, 512]
    B, H, d = args.batch, args.heads, args.head_dim
    print(f"causal forward+backward, B={B}, H={H}, d={d}: median of {args.reps} (interleaved), s; "
          f"auto switches to flash at T * S >= {AUTO_FLASH_MIN_SCORES}")
    print("| T | naive f+b | flash f+b | flash / naive | auto picks |")
    print("|---|---|---|---|---|")
    for T in lengths:
        arrays = make_inputs(B, H, T, d)
        closures = {backend: run_tinytf(backend, arrays, True) for backend in ("naive", "flash")}
        for closure in closures.values():
            closure()  # warm-up
        times = median_times(closures, args.reps)
        picked = "flash" if T * T >= AUTO_FLASH_MIN_SCORES else "naive"
        print(f"| {T} | {fmt_time(times['naive'])} | {fmt_time(times['flash'])} | "
              f"{fmt_ratio(times['flash'], times['naive'])} | {picked} |", flush=True)


def blas_threads(args):
    """Run many matmuls of each size and read the CPU time of the process's other threads (BLAS's workers) from
    /proc: it stays 0 for sizes BLAS keeps on the calling thread. Independent of load from other processes."""
    def other_threads_ticks():
        me, total = threading.get_native_id(), 0
        for tid in os.listdir("/proc/self/task"):
            if int(tid) != me:
                with open(f"/proc/self/task/{tid}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])  # utime + stime
        return total

    rng = np.random.default_rng(0)
    print("| m x n x k | multiply-adds | right operand | BLAS worker threads busy |")
    print("|---|---|---|---|")
    sizes = [(64, 64, 64), (128, 64, 64), (64, 64, 128), (96, 96, 64), (96, 128, 64), (120, 128, 64),
             (128, 128, 61), (128, 128, 62), (128, 128, 64), (256, 64, 64)]
    for (m, n, k), transposed in [(size, False) for size in sizes] + [((64, 64, 64), True), ((64, 128, 64), True)]:
        a = rng.standard_normal((m, k), dtype=np.float32)
        b = rng.standard_normal((n, k), dtype=np.float32).T if transposed else rng.standard_normal((k, n), a.dtype)
        time.sleep(0.5)  # BLAS workers spin a while after their last job: let them settle before counting
        before = other_threads_ticks()
        for _ in range(int(2e9 / (m * n * k))):
            a @ b
        busy = "yes" if other_threads_ticks() > before else "no"
        print(f"| {m} x {n} x {k} | {m * n * k} | {'transposed' if transposed else 'contiguous'} | {busy} |")


DEFAULT_T = [512, 1024, 2048, 4096, 8192, 16384]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--T", type=int, nargs="+", default=DEFAULT_T, help="sequence lengths")
    parser.add_argument("--reps", type=int, default=3, help="timed runs per cell (the median is shown)")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1, help="batch size for --auto (the table uses 1)")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--no-torch", action="store_true", help="leave out torch even when it is installed")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for flash and torch (default: flash one per core, torch its own default)")
    parser.add_argument("--tiles", action="store_true", help="sweep flash tile sizes instead of the table")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 96, 128, 192], help="tile sizes for --tiles")
    parser.add_argument("--auto", action="store_true", help="naive vs flash at short lengths instead of the table")
    parser.add_argument("--blas", action="store_true", help="which matmul sizes BLAS runs on its own threads")
    args = parser.parse_args()
    if args.threads:
        tinytf.set_num_threads(args.threads)
        if torch is not None:
            torch.set_num_threads(args.threads)
    print(f"numpy {np.__version__}" + (f", torch {torch.__version__} ({torch.get_num_threads()} threads)"
                                       if torch is not None else ", torch not installed"))
    if args.blas:
        blas_threads(args)
    elif args.tiles:
        tiles(args)
    elif args.auto:
        auto(args)
    else:
        table(args)


if __name__ == "__main__":
    main()
