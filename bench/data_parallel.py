"""Data-parallel scaling on one machine: 1 process with 2 BLAS threads versus 2 MPI ranks with 1 thread each.

For nanoGPT's shakespeare_char configurations (cpu: 4 layers, 4 heads, width 128, block 64, batch 12; gpu: 6 layers,
6 heads, width 384, block 256, batch 64) it times training steps (forward, backward, gradient Allreduce, clipping,
AdamW) four ways: one process with the global batch B and 2 BLAS threads, the same with 1 thread, 2 ranks with B/2
each (the same training, split), and 2 ranks with B each (twice the batch per step). It prints tokens/s (medians
over the timed steps), the time per step spent in the gradient Allreduce (which includes waiting for the slower
rank) and the time of the same Allreduce alone, after a barrier. Needs the mpi extra (pip install 'tinytf[mpi]').

    python bench/data_parallel.py                                          # the cpu configuration
    python bench/data_parallel.py --configs gpu --batch-size 8 --steps 2   # on a CPU: batch 64 takes minutes a step
    python bench/data_parallel.py --configs gpu --device cuda              # with 2 GPUs: 1 GPU versus 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from tinytf import backend, distributed
from tinytf.data import BatchSampler, CharTokenizer, read_text
from tinytf.models import GPT, GPTConfig
from tinytf.optim import AdamW, clip_grad_norm_, weight_decay_groups

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {
    "cpu": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12),
    "gpu": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64),
}
RESULT_PREFIX = "RESULT "
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


# --- one measurement (runs on every rank) -----------------------------------------------------------------------------
def synchronize(model: GPT) -> None:
    """Wait for the device: copying one element to the host waits for every kernel queued before it."""
    backend.to_numpy(model.lm_head.weight.data.reshape(-1)[:1])


def measure(args: argparse.Namespace) -> dict:
    """Train args.warmup_steps + args.steps steps; the medians of the timed ones, agreed on by all ranks."""
    config = CONFIGS[args.config]
    device = backend.check_device(f"cuda:{distributed.local_rank()}" if args.device == "cuda" else args.device)
    text = read_text(args.data)
    tokenizer = CharTokenizer.from_text(text)
    tokens = tokenizer.encode(text)
    sampler = BatchSampler({"train": tokens}, args.batch_size * distributed.world_size(), config["block_size"], seed=0)
    backend.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, n_layer=config["n_layer"], n_head=config["n_head"],
                          n_embd=config["n_embd"], block_size=config["block_size"])).to(device)
    distributed.broadcast_parameters(model.parameters())
    averager = distributed.GradientAverager(model.parameters())
    optimizer = AdamW(weight_decay_groups(model.parameters(), 0.1), lr=1e-3, betas=(0.9, 0.99))

    step_seconds, allreduce_seconds = [], []
    for _ in range(args.warmup_steps + args.steps):
        distributed.barrier()  # every step starts together, so each is timed alike on every rank
        started = time.perf_counter()
        x, y = (distributed.shard(rows) for rows in sampler.get_batch("train"))
        _, loss = model(backend.to_device(x, device), backend.to_device(y, device))
        optimizer.zero_grad()
        loss.backward()
        synchronize(model)
        reduce_started = time.perf_counter()
        averager.average()
        synchronize(model)
        allreduce_seconds.append(time.perf_counter() - reduce_started)
        clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        synchronize(model)
        step_seconds.append(time.perf_counter() - started)

    # The same Allreduce with every rank already waiting: the transfer alone, without the wait for a slower rank.
    gradient_buffer = backend.get_array_module(model.lm_head.weight.data).zeros(model.num_parameters(), np.float32)
    alone_seconds = []
    for _ in range(5):
        distributed.barrier()
        started = time.perf_counter()
        distributed.all_reduce(gradient_buffer, op="mean")
        synchronize(model)
        alone_seconds.append(time.perf_counter() - started)

    timed = slice(args.warmup_steps, None)
    step = statistics.median(step_seconds[timed])
    return {
        "parameters": model.num_parameters(),
        "tokens_per_step": args.batch_size * distributed.world_size() * config["block_size"],
        "step_s": step,
        "allreduce_in_step_s": statistics.median(allreduce_seconds[timed]),
        "allreduce_alone_s": statistics.median(alone_seconds),
        "tokens_per_s": args.batch_size * distributed.world_size() * config["block_size"] / step,
    }


# --- the three runs per configuration ---------------------------------------------------------------------------------
def launch_measurement(args: argparse.Namespace, config: str, ranks: int, threads: int, batch_size: int) -> dict:
    """One measurement in a fresh process (or MPI job), with `threads` BLAS threads per process."""
    worker = [sys.executable, *(["-m", "mpi4py"] if ranks > 1 else []), str(Path(__file__).resolve()), "--worker",
              "--config", config, "--batch-size", str(batch_size), "--steps", str(args.steps),
              "--warmup-steps", str(args.warmup_steps), "--data", str(args.data), "--device", args.device]
    command = [str(Path(sys.executable).with_name("mpiexec")), "-n", str(ranks), *worker] if ranks > 1 else worker
    env = {**os.environ, **{variable: str(threads) for variable in THREAD_VARIABLES}}
    job = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    if job.returncode != 0:
        sys.exit(f"the measurement failed ({' '.join(command)}):\n{job.stderr}")
    result_line = next(line for line in job.stdout.splitlines() if line.startswith(RESULT_PREFIX))
    return json.loads(result_line[len(RESULT_PREFIX):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=["cpu"], help="configurations")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="global batch B per step (default: the configuration's own, 12 or 64)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run (the median is reported)")
    parser.add_argument("--warmup-steps", type=int, default=1, help="untimed steps first (allocation, caches)")
    parser.add_argument("--data", type=Path, default=REPO / "../shared/data/tinyshakespeare.txt",
                        help="text to train on")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (each rank takes the GPU of its local rank)")
    parser.add_argument("--ranks", type=int, default=2, help="MPI ranks, each with 1 BLAS thread")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one measurement, in a child
    parser.add_argument("--config", choices=sorted(CONFIGS), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        result = measure(args)
        if distributed.is_main():
            print(RESULT_PREFIX + json.dumps(result), flush=True)
        return

    print(f"{os.cpu_count()} CPU cores; medians of {args.steps} steps; the machine may be shared, so expect noise")
    header = (f"{'config':6} {'processes':>22} {'batch/step':>10} {'tokens/s':>9} {'vs 1':>5} {'step ms':>8} "
              f"{'allreduce ms':>12} {'alone ms':>8}")
    print(header)
    print("-" * len(header))
    for config in args.configs:
        batch = args.batch_size or CONFIGS[config]["batch_size"]
        if batch % args.ranks:
            sys.exit(f"the global batch {batch} does not split over {args.ranks} ranks")
        runs = [(f"1 x {args.ranks} threads", 1, args.ranks, batch),
                ("1 x 1 thread", 1, 1, batch),  # what BLAS threading itself buys
                (f"{args.ranks} ranks x 1 thread", args.ranks, 1, batch // args.ranks),
                (f"{args.ranks} ranks x 1 thread", args.ranks, 1, batch)]
        baseline = None
        for label, ranks, threads, per_rank_batch in runs:
            result = launch_measurement(args, config, ranks, threads, per_rank_batch)
            baseline = baseline or result["tokens_per_s"]
            communication = f"{result['allreduce_in_step_s'] * 1e3:12.1f} {result['allreduce_alone_s'] * 1e3:8.1f}"
            print(f"{config:6} {label:>22} {per_rank_batch * ranks:>10} {result['tokens_per_s']:9,.0f} "
                  f"{result['tokens_per_s'] / baseline:5.2f} {result['step_s'] * 1e3:8.0f} "
                  f"{communication if ranks > 1 else '':>21}", flush=True)
        print(f"{config:6} {result['parameters'] / 1e6:.2f}M parameters: one Allreduce of "
              f"{result['parameters'] * 4 / 1e6:.1f} MB of float32 gradients per step")


if __name__ == "__main__":
    main()
