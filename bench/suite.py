"""tinytf against PyTorch on the CPU, back to back, in one command; prints one markdown table of ratios.

    python bench/suite.py                          every section (about an hour on 2 busy cores)
    python bench/suite.py --quick                  fewer repetitions, smaller sizes, no 2,000-step run (~5 minutes)
    python bench/suite.py --only step,generate     some sections: step, train, attention, generate, autograd
    python bench/suite.py --threads 1              BLAS threads of both (default: what NumPy's BLAS uses)
    python bench/suite.py --data FILE --json FILE  the training text; also save every sample as JSON

Needs the bench extra (`pip install -e '.[bench]'`: torch==2.13.0 and threadpoolctl, which reports NumPy's BLAS and
lets --threads differ from its default). The sections, each tinytf against an eager PyTorch twin of the same
shapes (bench/torch_reference.py, checked to compute the same numbers by `python bench/torch_reference.py --check`):

    step       one training step (forward, loss.item(), backward, clip 1.0, AdamW), GPT-2 and Llama presets, for
               nanoGPT's CPU shakespeare_char config (4 layers, 4 heads, width 128, block 64, batch 12) and its GPU
               config (6 layers, 6 heads, width 384, block 256, batch 64; dropout 0 in both)
    train      2,000 iterations of the CPU config on tinyshakespeare: `python -m tinytf.train` against
               `bench/torch_reference.py` with the same flags, seeds and batches; wall time and final val loss
    attention  causal attention, B=1, H=8, d=64, T = 512 ... 8192: forward, forward+backward (tinytf's flash
               backend against torch SDPA, through bench/attention.py), and peak extra memory of forward+backward
    generate   500 new tokens, greedy, 16-token prompt, batch 1 and 8, with the KV cache (tinytf's and a simple one
               for torch) and with full recomputation; the CPU config's widths with block_size 1024 so that the cache
               never refills
    autograd   bench/autograd_overhead.py's chain of 2,000 tiny ops, forward+backward, against torch autograd

How it measures. Each framework runs in its own worker process: two thread pools in one process fight over the
cores (each spins while the other works). The driver alternates between the workers repetition by repetition (and
flips the order each time), so machine noise hits both alike; rows give the median, min-max, and the ratio of
medians tinytf / torch (below 1: tinytf is faster). The load average is sampled before every measurement and printed
with the table: on a shared machine, read the ratios, not the absolute times.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
SECTIONS = ("step", "train", "attention", "generate", "autograd")
FRAMEWORKS = ("tinytf", "torch")
MiB = 1 << 20

# nanoGPT's shakespeare_char configurations (dropout 0: the step times compare the same arithmetic).
CONFIGS = {
    "CPU": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12),
    "GPU": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64),
}
VOCAB_SIZE = 65  # tinyshakespeare's characters
SCHEDULE = dict(lr=1e-3, min_lr=1e-4, warmup_iters=100, decay_iters=2000)  # the CPU config's; each side its own lr_at
GENERATION_BLOCK = 1024


# --- workers: one process per framework ----------------------------------------------------------------------------
def load_bench_module(name: str, hide_torch: bool = False):
    """Import bench/<name>.py (reused as is); hide_torch makes its optional `import torch` fail, so that the tinytf
    worker never loads torch."""
    hidden = hide_torch and "torch" not in sys.modules
    if hidden:
        sys.modules["torch"] = None  # `import torch` raises ImportError while this entry is None
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        if hidden:
            del sys.modules["torch"]


def attention_op(run, *args):
    """bench/attention.py's run_tinytf / run_torch as a callable that runs the op once. That file has had two forms:
    run_*(...) runs the op, or returns a closure that runs it on inputs made beforehand; either works here."""
    closure = run(*args)  # in the first form this call is the warm-up
    return closure if callable(closure) else (lambda: run(*args))


def random_batches(config: dict, count: int = 8, seed: int = 0) -> list:
    """`count` (x, y) int64 batches of random token ids; both frameworks get the same arrays."""
    import numpy as np

    rng = np.random.default_rng(seed)
    windows = [rng.integers(0, VOCAB_SIZE, (config["batch_size"], config["block_size"] + 1)) for _ in range(count)]
    return [(np.ascontiguousarray(w[:, :-1]), np.ascontiguousarray(w[:, 1:])) for w in windows]


class Stopwatch:
    """Wall time and this process's CPU time (all its threads) of a block: `with Stopwatch() as watch: ...`, then
    `watch.sample` is (wall seconds, CPU seconds). With one thread and a busy machine, CPU time is the steadier
    measure of work: it leaves out the time the scheduler gave to other processes."""

    def __enter__(self):
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc_info):
        self.sample = (time.perf_counter() - self._wall, time.process_time() - self._cpu)


def memory_status(field: str) -> int | None:
    """A size from /proc/self/status in bytes: "VmRSS" (resident now) or "VmHWM" (its high-water mark); None off
    Linux."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Restart VmHWM from the current resident size (Linux 4.0+: write 5 to clear_refs); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def unmap_large_blocks() -> None:
    """Make glibc give every block of 128 KiB or more its own mapping, returned to the system on free. By default
    glibc raises that threshold after the first large free and keeps later blocks in its heap, where freed memory
    stays resident and hides what a call needs. Called only in the processes that measure memory."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD; setting it turns the dynamic threshold off
        libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD: give the heap's free top back too
    except (OSError, AttributeError):
        pass


def measure_peak_extra(run, release, warmups: int = 2) -> int | None:
    """Peak resident memory above the current level while run() executes, in bytes (None off Linux), after
    `warmups` calls that pay the one-time costs (thread pools, their malloc arenas, kernel set-up); release() drops
    what a call leaves behind (gradients). The same measure for both frameworks: it sees every allocation, NumPy's,
    torch's and the allocators' own."""
    unmap_large_blocks()
    for _ in range(warmups):
        run()
        release()
    gc.collect()
    base = memory_status("VmRSS")
    if base is None or not reset_peak_rss():
        return None
    run()
    peak = memory_status("VmHWM")
    return None if peak is None else max(0, peak - base)


class Runner:
    """What both workers do the same way; subclasses supply the framework's model, optimizer step and arrays."""

    framework: str

    def __init__(self):
        import numpy as np

        self.np = np
        self.states = {}

    def _model(self, preset: str, config: dict, block_size: int | None = None):
        from tinytf.models.gpt import GPTConfig  # both frameworks take their shapes from tinytf's config

        shape = {k: v for k, v in config.items() if k != "batch_size"}
        if block_size:
            shape["block_size"] = block_size
        return self._build(GPTConfig.from_preset(preset, vocab_size=VOCAB_SIZE, **shape))

    def train_steps(self, preset: str, config_name: str, steps: int, warmup: int) -> list[tuple]:
        key = (preset, config_name)
        if key not in self.states:
            model = self._model(preset, CONFIGS[config_name])
            batches = [tuple(self._array(a) for a in batch) for batch in random_batches(CONFIGS[config_name])]
            self.states[key] = dict(model=model, optimizer=self._optimizer(model), batches=batches, iteration=0)
        state = self.states[key]
        samples = []
        for index in range(warmup + steps):
            iteration = state["iteration"]
            x, y = state["batches"][iteration % len(state["batches"])]
            with Stopwatch() as watch:
                self._train_step(state["model"], state["optimizer"], iteration, x, y)
            state["iteration"] += 1
            if index >= warmup:
                samples.append(watch.sample)
        return samples

    def drop_training_state(self) -> None:
        self.states.clear()
        gc.collect()

    def generate(self, preset: str, batch_size: int, new_tokens: int, use_cache: bool, prompt_tokens: int) -> tuple:
        key = ("generate", preset)
        if key not in self.states:
            self.states[key] = self._model(preset, CONFIGS["CPU"], GENERATION_BLOCK).eval()
        model = self.states[key]
        prompt = self._array(self.np.random.default_rng(0).integers(0, VOCAB_SIZE, (batch_size, prompt_tokens)))
        with Stopwatch() as watch:
            model.generate(prompt, new_tokens, temperature=0.0, use_cache=use_cache)
        return watch.sample

    def attention(self, T: int, backward: bool, reps: int) -> list[tuple]:
        run = self._attention_op(load_bench_module("attention", hide_torch=self.framework == "tinytf"), T, backward)
        run()  # warm-up
        samples = []
        for _ in range(reps):
            with Stopwatch() as watch:
                run()
            samples.append(watch.sample)
        return samples


class TinytfRunner(Runner):
    framework = "tinytf"

    def __init__(self, threads: int):
        super().__init__()
        import tinytf

        self.tinytf = tinytf
        tinytf.set_num_threads(threads)  # BLAS, numexpr and the flash backend's worker threads, for the worker's life

    def info(self) -> dict:
        info = {"numpy": self.np.__version__, "tinytf": self.tinytf.__version__}
        try:
            from threadpoolctl import threadpool_info

            blas = [pool for pool in threadpool_info() if pool["user_api"] == "blas"]
            info["blas"] = ", ".join(f"{p['internal_api']} {p['version']} ({p.get('architecture')}, "
                                     f"{p['num_threads']} threads)" for p in blas)
            info["threads"] = blas[0]["num_threads"] if blas else None
        except ImportError:
            info["blas"], info["threads"] = "unknown (pip install threadpoolctl to see it)", None
        info["blas"] += f"; flash attention: {self.tinytf.get_num_threads()} worker threads"
        return info

    def _build(self, config):
        from tinytf.models.gpt import GPT

        self.tinytf.manual_seed(0)
        return GPT(config)

    def _optimizer(self, model):
        from tinytf.optim import AdamW, weight_decay_groups

        return AdamW(weight_decay_groups(model.parameters(), 0.1), lr=SCHEDULE["lr"], betas=(0.9, 0.99))

    def _array(self, array):
        return array

    def _train_step(self, model, optimizer, iteration: int, x, y) -> None:
        from tinytf.optim import clip_grad_norm_, lr_at

        for group in optimizer.param_groups:  # tinytf.train's loop body
            group["lr"] = lr_at(iteration, **SCHEDULE)
        _, loss = model(x, y)
        loss.item()
        optimizer.zero_grad()
        loss.backward()
        clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    def _attention_op(self, attention, T: int, backward: bool):
        return attention_op(attention.run_tinytf, "flash", attention.make_inputs(1, 8, T, 64), backward)

    def attention_peak_memory(self, T: int) -> int | None:
        from tinytf.attention import scaled_dot_product_attention

        attention = load_bench_module("attention", hide_torch=True)
        q, k, v, dO = attention.make_inputs(1, 8, T, 64)
        q, k, v = (self.tinytf.tensor(a, requires_grad=True) for a in (q, k, v))

        def release():
            for tensor in (q, k, v):
                tensor.grad = None

        return measure_peak_extra(lambda: scaled_dot_product_attention(q, k, v, is_causal=True, backend="flash").backward(dO), release)

    def autograd_chain(self, ops: int, size: int, reps: int) -> dict:
        overhead = load_bench_module("autograd_overhead")
        x0 = self.np.random.default_rng(0).standard_normal(size).astype(self.np.float32)
        engine, raw = [], []
        overhead.tinytf_chain(x0, 0.999, 0.001, ops)
        for _ in range(reps):
            with Stopwatch() as watch:
                overhead.tinytf_chain(x0, 0.999, 0.001, ops)
            engine.append(watch.sample)
            with Stopwatch() as watch:
                overhead.numpy_chain(x0, 0.999, 0.001, ops)
            raw.append(watch.sample)
        return {"engine": engine, "numpy": raw}


class TorchRunner(Runner):
    framework = "torch"

    def __init__(self, threads: int):
        super().__init__()
        import torch

        import torch_reference

        self.torch, self.reference = torch, torch_reference
        torch.set_num_threads(threads)

    def info(self) -> dict:
        torch = self.torch
        blas = "MKL" if torch.backends.mkl.is_available() else "not MKL"
        return {"torch": torch.__version__, "threads": torch.get_num_threads(),
                "blas": f"{blas}, oneDNN {'on' if torch.backends.mkldnn.is_available() else 'off'}, "
                        f"{torch.backends.cpu.get_cpu_capability()}"}

    def _build(self, config):
        self.torch.manual_seed(0)
        return self.reference.GPT(config)

    def _optimizer(self, model):
        return self.reference.make_optimizer(model, SCHEDULE["lr"], (0.9, 0.99), 0.1)

    def _array(self, array):
        return self.torch.from_numpy(array)

    def _train_step(self, model, optimizer, iteration: int, x, y) -> None:
        self.reference.train_step(model, optimizer, x, y, self.reference.lr_at(iteration, **SCHEDULE), 1.0)

    def _attention_op(self, attention, T: int, backward: bool):
        return attention_op(attention.run_torch, attention.make_inputs(1, 8, T, 64), backward)

    def attention_peak_memory(self, T: int) -> int | None:
        torch = self.torch
        attention = load_bench_module("attention")
        q, k, v, dO = (torch.from_numpy(a) for a in attention.make_inputs(1, 8, T, 64))
        q, k, v = (x.requires_grad_() for x in (q, k, v))

        def release():
            for tensor in (q, k, v):
                tensor.grad = None

        return measure_peak_extra(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).backward(dO), release)

    def autograd_chain(self, ops: int, size: int, reps: int) -> dict:
        x0 = self.np.random.default_rng(0).standard_normal(size).astype(self.np.float32)
        self.reference.autograd_chain(x0, 0.999, 0.001, ops)
        samples = []
        for _ in range(reps):
            with Stopwatch() as watch:
                self.reference.autograd_chain(x0, 0.999, 0.001, ops)
            samples.append(watch.sample)
        return {"engine": samples}


def worker_main(framework: str, connection, threads: int) -> None:
    """Serve (method, kwargs) requests from the driver until it sends None."""
    import traceback

    sys.path.insert(0, str(BENCH))
    sys.path.insert(0, str(REPO))
    try:
        runner = (TinytfRunner if framework == "tinytf" else TorchRunner)(threads)
    except BaseException:  # noqa: BLE001 - reported to the driver, which stops with the traceback
        connection.send(("error", traceback.format_exc()))
        return
    connection.send(("ok", None))
    while True:
        request = connection.recv()
        if request is None:
            return
        method, kwargs = request
        try:
            connection.send(("ok", getattr(runner, method)(**kwargs)))
        except BaseException:  # noqa: BLE001
            connection.send(("error", traceback.format_exc()))


class Worker:
    """A framework's process; `call` runs one of its runner's methods there and returns the result."""

    def __init__(self, framework: str, threads: int, monitor: LoadMonitor):
        self.framework, self.monitor = framework, monitor
        context = multiprocessing.get_context("spawn")
        self.connection, child = context.Pipe()
        self.process = context.Process(target=worker_main, args=(framework, child, threads), daemon=True)
        self.process.start()
        child.close()
        self._receive("start")

    def call(self, method: str, **kwargs):
        self.monitor.sample()
        self.connection.send((method, kwargs))
        return self._receive(method)

    def _receive(self, method: str):
        try:
            status, value = self.connection.recv()
        except EOFError:
            raise RuntimeError(f"the {self.framework} worker died during {method} (exit code "
                               f"{self.process.exitcode}; out of memory?)") from None
        if status == "error":
            raise RuntimeError(f"the {self.framework} worker failed in {method}:\n{value}")
        return value

    def close(self) -> None:
        if self.process.is_alive():
            self.connection.send(None)
            self.process.join(timeout=30)


class Workers:
    """One worker per framework; `alternate` runs the same call on both, `repetitions` times, flipping the order."""

    def __init__(self, threads: int, monitor: LoadMonitor):
        self.threads, self.monitor = threads, monitor
        self.pool = {name: Worker(name, threads, monitor) for name in FRAMEWORKS}

    def alternate(self, method: str, repetitions: int, first_kwargs: dict | None = None, **kwargs) -> dict[str, list]:
        results = {name: [] for name in FRAMEWORKS}
        for rep in range(repetitions):
            order = FRAMEWORKS if rep % 2 == 0 else FRAMEWORKS[::-1]
            for name in order:
                extra = first_kwargs if (first_kwargs and not results[name]) else {}
                time.sleep(0.2)  # let the other process's spinning BLAS / OpenMP threads go to sleep
                value = self.pool[name].call(method, **{**kwargs, **extra})
                results[name].extend(value if isinstance(value, list) else [value])
        return results

    def both(self, method: str, **kwargs) -> dict:
        return {name: self.pool[name].call(method, **kwargs) for name in FRAMEWORKS}

    def close(self) -> None:
        for worker in self.pool.values():
            worker.close()


class LoadMonitor:
    """The 1-minute load average, sampled before every measurement: the noise context of the table."""

    def __init__(self):
        self.samples: list[float] = []

    def sample(self) -> None:
        try:
            self.samples.append(os.getloadavg()[0])
        except OSError:
            pass

    def summary(self) -> str:
        if not self.samples:
            return "load average not available"
        return (f"load average (1 min) over the run: median {statistics.median(self.samples):.1f}, "
                f"min {min(self.samples):.1f}, max {max(self.samples):.1f} on {os.cpu_count()} cores")


# --- the table -------------------------------------------------------------------------------------------------------
@dataclass
class Row:
    """One benchmark: samples of each framework in `unit`, as (wall, CPU) pairs (CPU None where not measured)."""

    section: str
    name: str
    unit: str
    tinytf: list[tuple]
    torch: list[tuple]
    note: str = ""
    kind: str = "time"  # "time" and "memory": ratio tinytf / torch; "loss": difference tinytf - torch


def scaled(samples: list[tuple], factor: float) -> list[tuple]:
    return [tuple(None if value is None else value * factor for value in sample) for sample in samples]


def median_of(samples: list[tuple], index: int = 0) -> float | None:
    values = [sample[index] for sample in samples if sample[index] is not None]
    return statistics.median(values) if values else None


def fmt_number(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3f}" if abs(value) < 1 else f"{value:.2f}"


def fmt_samples(samples: list[tuple], kind: str = "time") -> str:
    walls = [sample[0] for sample in samples if sample[0] is not None]
    if not walls:
        return "-"
    if len(walls) == 1:
        return f"{walls[0]:.3f}" if kind == "loss" else fmt_number(walls[0])
    return f"{fmt_number(statistics.median(walls))} ({fmt_number(min(walls))}–{fmt_number(max(walls))})"


def fmt_ratio(row: Row, index: int = 0) -> str:
    ours, theirs = median_of(row.tinytf, index), median_of(row.torch, index)
    if ours is None or theirs is None:
        return "-"
    if row.kind == "loss":
        return f"{ours - theirs:+.3f} (difference)"
    if theirs <= 0:
        return "-"
    return f"**{ours / theirs:.2f}**" if index == 0 else f"{ours / theirs:.2f}"


def print_table(rows: list[Row], file=sys.stdout) -> None:
    print("| benchmark | unit | tinytf median (min–max) | torch median (min–max) | tinytf / torch | "
          "CPU-time ratio | notes |", file=file)
    print("|---|---|---|---|---|---|---|", file=file)
    for row in rows:
        print(f"| {row.name} | {row.unit} | {fmt_samples(row.tinytf, row.kind)} | {fmt_samples(row.torch, row.kind)} | {fmt_ratio(row)} | "
              f"{fmt_ratio(row, 1) if row.kind == 'time' else '-'} | {row.note} |", file=file)


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- sections --------------------------------------------------------------------------------------------------------
def section_step(workers: Workers, settings: dict) -> list[Row]:
    rows = []
    for config_name in settings["step_configs"]:
        config = CONFIGS[config_name]
        reps, steps, warmup = settings["step_reps"][config_name]
        tokens = config["batch_size"] * config["block_size"]
        for preset in ("gpt2", "llama"):
            progress(f"step: {preset}, {config_name} config, {reps} repetitions x {steps} steps")
            samples = workers.alternate("train_steps", reps, first_kwargs={"warmup": warmup}, preset=preset,
                                        config_name=config_name, steps=steps, warmup=0)
            rate = {name: tokens / median_of(samples[name]) for name in FRAMEWORKS}
            shape = (f"{config['n_layer']}L {config['n_head']}H {config['n_embd']}w, B{config['batch_size']} "
                     f"T{config['block_size']}")
            rows.append(Row("step", f"training step, {preset}, {config_name} config ({shape})", "ms",
                            scaled(samples["tinytf"], 1e3), scaled(samples["torch"], 1e3),
                            f"{rate['tinytf']:,.0f} vs {rate['torch']:,.0f} tokens/s; {reps}x{steps} steps each"))
        workers.both("drop_training_state")
    return rows


def section_attention(workers: Workers, settings: dict, threads: int, monitor: LoadMonitor) -> list[Row]:
    rows = []
    for T in settings["attention_T"]:
        for backward in (False, True):
            label = "forward+backward" if backward else "forward"
            progress(f"attention: T={T}, {label}")
            samples = workers.alternate("attention", settings["attention_reps"], T=T, backward=backward, reps=1)
            rows.append(Row("attention", f"causal attention {label}, T={T}", "ms",
                            scaled(samples["tinytf"], 1e3), scaled(samples["torch"], 1e3),
                            "tinytf flash vs torch SDPA; B=1 H=8 d=64"))
        progress(f"attention: T={T}, peak memory (a fresh process for each framework)")
        peaks = {}
        for name in FRAMEWORKS:  # fresh, so that nothing from earlier runs sits in the allocators
            worker = Worker(name, threads, monitor)
            try:
                peaks[name] = worker.call("attention_peak_memory", T=T)
            finally:
                worker.close()
        rows.append(Row("attention", f"peak extra memory, forward+backward, T={T}", "MiB",
                        [(None if peaks["tinytf"] is None else peaks["tinytf"] / MiB, None)],
                        [(None if peaks["torch"] is None else peaks["torch"] / MiB, None)],
                        "resident high-water mark (VmHWM) above the inputs, output and grads included, 3rd call", kind="memory"))
    return rows


def section_generate(workers: Workers, settings: dict) -> list[Row]:
    rows = []
    new_tokens, prompt_tokens = settings["new_tokens"], 16
    for preset in ("gpt2", "llama"):
        for batch_size in (1, 8):
            seconds = {}
            for use_cache in (True, False):
                mode = "KV cache" if use_cache else "full recompute"
                reps = settings["generate_reps"] if use_cache else settings["generate_full_reps"]
                progress(f"generate: {preset}, batch {batch_size}, {mode}, {reps} repetitions")
                kwargs = dict(preset=preset, batch_size=batch_size, use_cache=use_cache, prompt_tokens=prompt_tokens)
                workers.both("generate", new_tokens=8, **kwargs)  # warm-up: builds the model
                seconds[use_cache] = workers.alternate("generate", reps, new_tokens=new_tokens, **kwargs)
            cached = {name: median_of(samples) for name, samples in seconds[True].items()}
            full = {name: median_of(samples) for name, samples in seconds[False].items()}
            for use_cache in (True, False):
                mode = "KV cache" if use_cache else "full recompute"
                rate = {name: batch_size * new_tokens / median_of(samples)
                        for name, samples in seconds[use_cache].items()}
                note = f"{rate['tinytf']:,.0f} vs {rate['torch']:,.0f} tokens/s"
                if use_cache:
                    note += (f"; the cache is {full['tinytf'] / cached['tinytf']:.1f}x faster in tinytf, "
                             f"{full['torch'] / cached['torch']:.1f}x in torch; tinytf cached / torch full-recompute "
                             f"time {cached['tinytf'] / full['torch']:.2f}")
                elif settings["generate_full_reps"] == 1:
                    note += "; one run each"
                rows.append(Row("generate", f"{new_tokens} tokens, {preset}, batch {batch_size}, {mode}",
                                "ms/step", scaled(seconds[use_cache]["tinytf"], 1e3 / new_tokens),
                                scaled(seconds[use_cache]["torch"], 1e3 / new_tokens), note))
    return rows


def section_autograd(workers: Workers, settings: dict) -> list[Row]:
    ops, size = 1000, 16
    progress(f"autograd: chain of {2 * ops} ops, {settings['autograd_reps']} repetitions")
    results = workers.alternate("autograd_chain", settings["autograd_reps"], ops=ops, size=size, reps=1)
    ours = scaled([r["engine"][0] for r in results["tinytf"]], 1e3)
    theirs = scaled([r["engine"][0] for r in results["torch"]], 1e3)
    numpy_ms = median_of(scaled([r["numpy"][0] for r in results["tinytf"]], 1e3))
    per_op = {name: median_of(samples) / (2 * ops) * 1e3 for name, samples in (("tinytf", ours), ("torch", theirs))}
    return [Row("autograd", f"autograd: chain of {2 * ops} ops on {size} floats, forward+backward", "ms", ours,
                theirs, f"{per_op['tinytf']:.1f} vs {per_op['torch']:.1f} us/op; raw NumPy, no graph: "
                        f"{numpy_ms:.2f} ms")]


def section_train(settings: dict, threads: int, default_threads: int, data: Path, out: Path,
                  monitor: LoadMonitor) -> list[Row]:
    import resource

    if not data.is_file():
        raise SystemExit(f"suite.py: error: training data not found: {data} (pass --data)")
    flags = ["--data", str(data), "--preset", "gpt2", "--iters", str(settings["train_iters"])]
    env = dict(os.environ)
    if threads != default_threads:  # asked for with --threads: the tinytf process reads it when NumPy loads
        env["OPENBLAS_NUM_THREADS"] = str(threads)
    commands = {
        "tinytf": [sys.executable, "-m", "tinytf.train", *flags, "--out", str(out / "tinytf")],
        "torch": [sys.executable, str(BENCH / "torch_reference.py"), *flags, "--out", str(out / "torch"),
                  "--threads", str(threads)],
    }
    results = {}
    for name, command in commands.items():
        progress(f"train: {settings['train_iters']} iterations with {name} (log: {out / (name + '.log')})")
        (out / name).mkdir(parents=True, exist_ok=True)
        (out / name / "metrics.jsonl").unlink(missing_ok=True)
        monitor.sample()
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        with open(out / f"{name}.log", "w") as log:
            status = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - children.ru_utime) + (after.ru_stime - children.ru_stime)
        if status != 0:
            raise RuntimeError(f"{' '.join(command)} failed with exit code {status}; see {out / (name + '.log')}")
        lines = (out / name / "metrics.jsonl").read_text().splitlines()
        results[name] = dict(wall=wall, cpu=cpu, **json.loads(lines[-1]))
    iters = settings["train_iters"]
    return [
        Row("train", f"{iters} iterations, gpt2, CPU config: wall time", "s",
            [(results["tinytf"]["wall"], results["tinytf"]["cpu"])],
            [(results["torch"]["wall"], results["torch"]["cpu"])],
            f"whole process (start-up, data, evaluations, checkpoints); training loop "
            f"{results['tinytf']['elapsed_s']:.0f} vs {results['torch']['elapsed_s']:.0f} s; one run each"),
        Row("train", f"{iters} iterations, gpt2, CPU config: final val loss", "nats/char",
            [(results["tinytf"]["val_loss"], None)], [(results["torch"]["val_loss"], None)],
            f"same batches and schedule, different initial weights; train loss {results['tinytf']['train_loss']:.3f} "
            f"vs {results['torch']['train_loss']:.3f}", kind="loss"),
    ]


# --- the machine -----------------------------------------------------------------------------------------------------
def default_blas_threads() -> int:
    try:
        import numpy  # noqa: F401 - threadpoolctl sees only loaded libraries
        from threadpoolctl import threadpool_info

        for pool in threadpool_info():
            if pool["user_api"] == "blas":
                return int(pool["num_threads"])
    except ImportError:
        pass
    for variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        if os.environ.get(variable, "").isdigit():
            return int(os.environ[variable])
    return os.cpu_count() or 1


def machine_description(info: dict, threads: int) -> list[str]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        commit = f"{commit}{' + uncommitted changes' if dirty else ''}" if commit else "unknown"
    except OSError:
        commit = "unknown"
    tinytf_info, torch_info = info.get("tinytf", {}), info.get("torch", {})
    return [
        f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; tinytf {commit}",
        f"machine: {cpu}, {os.cpu_count()} cores, Linux {platform.release()}, Python {platform.python_version()}",
        f"tinytf: numpy {tinytf_info.get('numpy', '?')}, BLAS {tinytf_info.get('blas', '?')}",
        f"torch {torch_info.get('torch', '?')}: {torch_info.get('threads', '?')} threads, {torch_info.get('blas', '?')}",
        f"threads: {threads} for both (NumPy's BLAS default here: {default_blas_threads()})",
    ]


def settings_for(quick: bool) -> dict:
    if quick:
        return dict(step_configs=("CPU",), step_reps={"CPU": (5, 3, 3)}, attention_T=(512, 1024, 2048),
                    attention_reps=3, new_tokens=100, generate_reps=3, generate_full_reps=1, autograd_reps=5)
    # (repetitions, timed steps per repetition, warm-up steps before the first)
    return dict(step_configs=("CPU", "GPU"), step_reps={"CPU": (10, 3, 5), "GPU": (3, 1, 1)},
                attention_T=(512, 1024, 2048, 4096, 8192), attention_reps=3, new_tokens=500, generate_reps=3,
                generate_full_reps=1, autograd_reps=15)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and sizes; skips train unless --only")
    parser.add_argument("--only", default=None, help=f"comma-separated sections among {','.join(SECTIONS)}")
    parser.add_argument("--threads", type=int, default=None, help="threads of both frameworks (default: NumPy's)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="text for the train section")
    parser.add_argument("--train-iters", type=int, default=2000, help="iterations of the train section")
    parser.add_argument("--train-out", type=Path, default=None,
                        help="folder for the train section's runs (default: a new folder under /tmp)")
    parser.add_argument("--json", type=Path, default=None, help="also write the machine and every sample here")
    args = parser.parse_args(argv)

    if args.only:
        sections = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = set(sections) - set(SECTIONS)
        if unknown:
            parser.error(f"unknown section(s) {sorted(unknown)}; choose among {', '.join(SECTIONS)}")
    else:
        sections = [s for s in SECTIONS if not (args.quick and s == "train")]
    default_threads = default_blas_threads()
    threads = args.threads or default_threads
    if threads != default_threads and importlib.util.find_spec("threadpoolctl") is None:
        parser.error("--threads different from NumPy's default needs threadpoolctl: pip install threadpoolctl")
    settings = settings_for(args.quick)
    settings["train_iters"] = args.train_iters

    monitor = LoadMonitor()
    workers = Workers(threads, monitor)
    rows: list[Row] = []
    started = time.perf_counter()
    try:
        info = workers.both("info")
        for section in sections:  # in the order given
            if section == "step":
                rows += section_step(workers, settings)
            elif section == "attention":
                rows += section_attention(workers, settings, threads, monitor)
            elif section == "generate":
                rows += section_generate(workers, settings)
            elif section == "autograd":
                rows += section_autograd(workers, settings)
            elif section == "train":
                workers.both("drop_training_state")
                out = args.train_out or Path(f"/tmp/tinytf-bench-train-{os.getpid()}")
                rows += section_train(settings, threads, default_threads, args.data, out, monitor)
    finally:
        workers.close()

    header = machine_description(info, threads)
    header.append(f"{monitor.summary()}; suite took {(time.perf_counter() - started) / 60:.1f} min")
    print()
    for line in header:
        print(f"- {line}")
    print()
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps({"machine": header, "settings": settings, "threads": threads,
                                         "rows": [row.__dict__ for row in rows]}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
