"""Per-op overhead of tinytf's autograd engine against the same arithmetic in raw NumPy.

A chain of 1,000 small ops (y = y * a + b on a vector of 16 floats: 2,000 elementwise ops), forward and backward.
The NumPy side computes the same forward values and the same backward formulas by hand, with no graph.

    python bench/autograd_overhead.py [--ops 1000] [--size 16] [--repeats 15]
"""

import argparse
import statistics
import time

import numpy as np

import tinytf


def tinytf_chain(x0: np.ndarray, a: float, b: float, steps: int) -> np.ndarray:
    x = tinytf.tensor(x0, requires_grad=True)
    y = x
    for _ in range(steps):
        y = y * a + b
    y.sum().backward()
    return x.grad


def numpy_chain(x0: np.ndarray, a: float, b: float, steps: int) -> np.ndarray:
    y = x0
    saved = []
    for _ in range(steps):
        saved.append(y)  # what Mul keeps for its backward
        y = y * a + b
    grad = np.ones_like(y)
    for _ in reversed(saved):
        grad = grad * a  # d(y*a + b)/dy, by hand
    return grad


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", type=int, default=1000, help="length of the chain (each link is a * and a +)")
    parser.add_argument("--size", type=int, default=16, help="number of float32 elements in the vector")
    parser.add_argument("--repeats", type=int, default=15, help="timed repetitions; the median is reported")
    args = parser.parse_args()

    x0 = np.random.default_rng(0).standard_normal(args.size).astype(np.float32)
    a, b = 0.999, 0.001
    np.testing.assert_allclose(tinytf_chain(x0, a, b, args.ops), numpy_chain(x0, a, b, args.ops), rtol=1e-5)

    # Alternate the two so that noise on a shared machine hits both alike.
    engine, raw = [], []
    for _ in range(args.repeats):
        engine.append(median_seconds(lambda: tinytf_chain(x0, a, b, args.ops), 1))
        raw.append(median_seconds(lambda: numpy_chain(x0, a, b, args.ops), 1))
    engine_s, raw_s = statistics.median(engine), statistics.median(raw)
    ops = 2 * args.ops  # forward ops in the chain; each also runs one backward
    print(f"| chain of {ops} ops, {args.size} floats, forward+backward | median | per op |")
    print("|---|---|---|")
    print(f"| tinytf autograd | {engine_s * 1e3:.2f} ms | {engine_s / ops * 1e6:.2f} us |")
    print(f"| raw NumPy, same arithmetic | {raw_s * 1e3:.2f} ms | {raw_s / ops * 1e6:.2f} us |")
    print(f"| ratio tinytf / NumPy | {engine_s / raw_s:.2f}x | engine overhead {(engine_s - raw_s) / ops * 1e6:.2f} us per op |")


if __name__ == "__main__":
    main()
