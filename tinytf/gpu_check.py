"""Check tinytf on a real CUDA GPU in one command: `python -m tinytf.gpu_check --out DIR`.

Four sections, each saved to DIR/gpu_check.json (and as tables to DIR/gpu_check.md) as soon as it is done, so a run
cut short still leaves what it found:

    environment  GPUs (name, compute capability, memory), driver and runtime, CuPy and its wheel, NumPy, Python, torch
    tests        pytest on the source tree's tests/ with the CuPy stand-in off: the kernel tests of
                 tests/kernels/test_flash_attention_gpu.py and every test whose id says "cuda" (the device axis);
                 `--tests all` runs the whole suite, whose op tests also check each op on the GPU
    training     python -m tinytf.train --device cuda for the gpt2 and llama presets, the README's GPU configuration
                 (6 layers, 6 heads, width 384, block 256, batch 64), 200 iterations: losses, whether they fell,
                 tokens/s
    attention    forward and forward+backward at T = S = 512 ... 16384, D = 64 and 128, causal and not, B = 1, H = 16,
                 bfloat16 (tinytf's tensor-core kernels against torch's SDPA with its FlashAttention backend) and
                 float32 (tinytf's CUDA-core kernels against torch's default SDPA), and the naive path on CuPy
                 (cuBLAS matmuls + softmax) in both

Time: the sections share --time-limit (420 s). Each has a cap (tests 240 s, each training run 90 s, the benchmark
150 s, 60 s with --quick) and never takes the minimum promised to the sections after it (45 s per training run, 30 s
for the benchmark). A subprocess past its time gets Ctrl-C (pytest then writes the results so far, tinytf.train a
checkpoint) and is killed 15 s later, so a whole run stays under 8 minutes. Measured once, on an H100 (2026-12-05,
`--test-workers 8 --test-timeout 200 --train-iters 100 --bench-budget 90`): the whole run took 259 s; the tests
reached 350 of the 493 selected in 200 s (CuPy compiles each elementwise kernel on first use, per process), the
benchmark finished all 96 cases in its 90 s.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.metadata
import importlib.util
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ElementTree
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from . import __version__, backend
from .attention import scaled_dot_product_attention
from .cli import UserError, command_line
from .creation import randn
from .tensor import no_grad

PROG = "tinytf.gpu_check"
PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # the source tree, or site-packages for an installed wheel

REPORT_JSON, REPORT_MARKDOWN = "gpu_check.json", "gpu_check.md"
JUNIT_XML, PYTEST_LOG = "pytest-junit.xml", "pytest-output.txt"
PRESETS = ("gpt2", "llama")
# Everything a previous report consists of: what --overwrite replaces, and nothing else.
REPORT_ENTRIES = (REPORT_JSON, REPORT_MARKDOWN, JUNIT_XML, PYTEST_LOG, *(f"train-{preset}" for preset in PRESETS))

INSTALL_HINT = ("install CuPy on a machine with an NVIDIA GPU: pip install -e '.[gpu]' (CUDA 12 driver) or "
                "pip install -e '.[gpu-cuda13]' (CUDA 13 driver)")

# "cuda" selects the device axis's cuda ids and the CUDA backend's tests, "gpu" the kernel tests of
# tests/kernels/test_flash_attention_gpu.py; the emulator's module is named test_cuda_emulator but runs on the CPU.
GPU_TEST_KEYWORDS = "(cuda or gpu) and not emulator and not nvrtc"

# The README's GPU configuration (nanoGPT's shakespeare_char on a GPU): head dim 64, which the CUDA kernel takes.
TRAIN_BATCH_SIZE, TRAIN_BLOCK_SIZE = 64, 256
TRAIN_MODEL_FLAGS = ("--n-layer", "6", "--n-head", "6", "--n-embd", "384", "--block-size", str(TRAIN_BLOCK_SIZE),
                     "--batch-size", str(TRAIN_BATCH_SIZE))
TRAIN_EVALUATIONS, TRAIN_EVAL_ITERS = 4, 10

ATTENTION_BATCH, ATTENTION_HEADS = 1, 16  # at T = 16384: 128 MiB per (B, H, T, 128) float32 array
ATTENTION_LENGTHS = (512, 1024, 2048, 4096, 8192, 16384)
QUICK_MAX_LENGTH = 4096
ATTENTION_HEAD_DIMS = (64, 128)
ATTENTION_DTYPES = ("bfloat16", "float32")  # bfloat16 first: the tensor-core kernels are the ones to measure
TINYTF_KERNEL, CUPY_NAIVE, TORCH_SDPA = "tinytf cuda", "cupy naive", "torch sdpa"
# Score-sized float32 arrays the naive path holds at its peak (its softmax runs in float32 for every input dtype), with
# a margin: forward keeps the scores and their softmax (plus the causal bias, T x S); backward adds the gradients of
# the weights and of the scores.
NAIVE_SCORE_COPIES = {"forward": 3, "forward+backward": 5}
NAIVE_MEMORY_SHARE = 0.5  # run the naive path only where its estimate fits in this share of the free GPU memory

TIME_LIMIT_S = 420
TEST_TIMEOUT_S, TRAIN_TIMEOUT_S, BENCH_BUDGET_S, QUICK_BENCH_BUDGET_S = 240, 90, 150, 60
MIN_TRAIN_S, MIN_BENCH_S = 45, 30  # what the sections after the tests are promised
INTERRUPT_GRACE_S = 15

TIMING_METHOD = ("wall clock around each call, the device synchronized before and after (so it includes the Python "
                 "side of launching); median of the timed calls, after one warm-up call and one memory-measuring call")
MEMORY_METHOD = ("CuPy: the default memory pool's free blocks are released, then total_bytes() after one call minus "
                 "total_bytes() before (CuPy's pool keeps no peak counter; what it holds after the call is at least "
                 "the peak of live arrays, more where a freed block could not be reused for another size); "
                 "torch: max_memory_allocated() after one call minus memory_allocated() before, with the peak reset")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("gpu_check"), help="folder for the report")
    parser.add_argument("--overwrite", action="store_true", help="replace a previous report in --out")
    parser.add_argument("--quick", action="store_true",
                        help=f"attention up to T = {QUICK_MAX_LENGTH} within {QUICK_BENCH_BUDGET_S} s, 100 training "
                             "iterations")
    parser.add_argument("--time-limit", type=float, default=TIME_LIMIT_S, help="seconds all sections share")
    tests = parser.add_argument_group("tests")
    tests.add_argument("--skip-tests", action="store_true", help="leave the test suite out")
    tests.add_argument("--tests", choices=("gpu", "all"), default="gpu",
                       help=f"gpu: -k '{GPU_TEST_KEYWORDS}'; all: the whole suite")
    tests.add_argument("--test-timeout", type=float, default=TEST_TIMEOUT_S, help="seconds for the pytest run")
    tests.add_argument("--test-workers", type=int, default=0,
                       help="pytest processes through pytest-xdist (-n); 0: one process, without xdist")
    training = parser.add_argument_group("training")
    training.add_argument("--skip-training", action="store_true", help="leave the training runs out")
    training.add_argument("--data", type=Path, help="text file to train on; None: tinytf.train's offline text")
    training.add_argument("--train-iters", type=int, default=None, help="iterations per preset; None: 200, or 100 "
                                                                         "with --quick")
    training.add_argument("--train-timeout", type=float, default=TRAIN_TIMEOUT_S, help="seconds per training run")
    attention = parser.add_argument_group("attention benchmark")
    attention.add_argument("--skip-attention", action="store_true", help="leave the attention benchmark out")
    attention.add_argument("--bench-budget", type=float, default=None,
                           help=f"seconds for the benchmark; None: {BENCH_BUDGET_S}, or {QUICK_BENCH_BUDGET_S} with "
                                "--quick; cases that would not fit are recorded as skipped")
    attention.add_argument("--reps", type=int, default=3, help="timed calls per case (the median is reported)")
    return parser


def check_arguments(args: argparse.Namespace) -> None:
    """Fill the defaults that depend on --quick; UserError for values that cannot work."""
    if args.train_iters is None:
        args.train_iters = 100 if args.quick else 200
    if args.bench_budget is None:
        args.bench_budget = QUICK_BENCH_BUDGET_S if args.quick else BENCH_BUDGET_S
    for name in ("train_iters", "reps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.test_workers < 0:
        raise UserError(f"--test-workers must be 0 or more, got {args.test_workers}")
    for name in ("time_limit", "test_timeout", "train_timeout", "bench_budget"):
        if not getattr(args, name) > 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.data is not None and not args.data.is_file():
        raise UserError(f"--data {args.data}: no such file")


# --- before anything is written: the output folder, the GPU, the test tools -------------------------------------------
def check_output_folder(folder: Path, overwrite: bool) -> None:
    """UserError unless `folder` is new, empty, or (with --overwrite) holds a report we may replace."""
    if not folder.exists():
        return
    if not folder.is_dir():
        raise UserError(f"--out {folder} is a file, not a folder")
    entries = sorted(path.name for path in folder.iterdir())
    if not entries or overwrite:
        return
    if REPORT_JSON in entries or REPORT_MARKDOWN in entries:
        raise UserError(f"--out {folder} holds a previous report ({REPORT_JSON}); pass --overwrite to replace it, "
                        "or choose another folder")
    raise UserError(f"--out {folder} is not empty ({', '.join(entries[:3])}{', ...' if len(entries) > 3 else ''}); "
                    "choose a new folder, or pass --overwrite (only the report's own files are replaced)")


def prepare_output_folder(folder: Path) -> None:
    """Create `folder`, without the files of a previous report (train.py would append to their metrics.jsonl)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in REPORT_ENTRIES:
        path = folder / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def cupy_wheels() -> list[str]:
    """The installed distributions that provide the `cupy` package (cupy-cuda12x, cupy-cuda13x, ...)."""
    return sorted(set(importlib.metadata.packages_distributions().get("cupy", [])))


def find_gpu():
    """The cupy module when it sees at least one CUDA device; otherwise UserError saying what is missing."""
    if backend.uses_cuda_standin():
        raise UserError(f"no CUDA GPU: {backend.STANDIN_VARIABLE}=1 puts the CPU stand-in in CuPy's place, and the "
                        f"stand-in is not a GPU; unset it (or set {backend.STANDIN_VARIABLE}=0) on a machine with "
                        "a GPU")
    try:
        import cupy
    except ModuleNotFoundError:
        raise UserError(f"no CUDA GPU: CuPy is not installed; {INSTALL_HINT}") from None
    except Exception as error:  # CuPy raises more than ImportError when CUDA libraries are broken
        raise UserError(f"no CUDA GPU: CuPy does not import ({type(error).__name__}: {error}); "
                        f"{INSTALL_HINT}") from None
    wheels = ", ".join(cupy_wheels()) or "wheel unknown"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
        why = "getDeviceCount() is 0"
    except Exception as error:  # cudaErrorNoDevice, cudaErrorInsufficientDriver (no driver, or one too old)
        count, why = 0, str(error)
    if count == 0:
        raise UserError(f"no CUDA GPU: CuPy {cupy.__version__} ({wheels}) is installed but finds no device ({why}); "
                        "this check needs an NVIDIA GPU, its driver (nvidia-smi lists both) and the CuPy wheel "
                        "for the driver's CUDA: pip install -e '.[gpu]' (CUDA 12) or pip install -e "
                        "'.[gpu-cuda13]' (CUDA 13)")
    return cupy


def find_source_tree(package_root: Path = PACKAGE_ROOT) -> Path | None:
    """The repository tinytf was imported from (it has pyproject.toml and tests/conftest.py), or None (a wheel)."""
    if (package_root / "pyproject.toml").is_file() and (package_root / "tests" / "conftest.py").is_file():
        return package_root
    return None


def check_test_tools(workers: int = 0) -> None:
    missing = [name for name in ("pytest", "hypothesis") if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"the tests need {' and '.join(missing)}: pip install pytest hypothesis (or the dev extra, "
                        "pip install -e '.[dev]'), or pass --skip-tests")
    if workers and importlib.util.find_spec("xdist") is None:
        raise UserError(f"--test-workers {workers} needs pytest-xdist: pip install pytest-xdist, or pass "
                        "--test-workers 0")


# --- the report: one dict, saved whole after each step ----------------------------------------------------------------
def write_atomically(path: Path, text: str) -> None:
    """Write beside `path`, then rename over it: a reader (or a run cut short) sees the old file or the new one."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


def save_report(folder: Path, report: dict) -> None:
    write_atomically(folder / REPORT_JSON, json.dumps(report, indent=2) + "\n")
    write_atomically(folder / REPORT_MARKDOWN, render_markdown(report))


def now_utc() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class TimeBudget:
    """--time-limit, shared by the sections in order: each gets at most its own cap, and never the time promised to
    the sections after it."""

    def __init__(self, limit_s: float, clock: Callable[[], float] = time.monotonic):
        self.clock, self.deadline = clock, clock() + limit_s

    def remaining(self) -> float:
        return self.deadline - self.clock()

    def share(self, cap_s: float, promised_later_s: float) -> float:
        """Seconds the next section may take; 0 when nothing is left for it."""
        return max(0.0, min(cap_s, self.remaining() - promised_later_s))


# --- subprocesses -----------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class BoundedRun:
    exit_status: int
    timed_out: bool
    wall_s: float


def child_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment for a child that must use the real GPU and import this very tinytf (a relative
    PYTHONPATH=. would not survive the child's other working folder)."""
    env = dict(os.environ)
    env[backend.STANDIN_VARIABLE] = "0"
    env["PYTHONPATH"] = os.pathsep.join(part for part in (str(PACKAGE_ROOT), env.get("PYTHONPATH")) if part)
    env.update(extra or {})
    return env


def run_bounded(command: list[str], timeout_s: float, env: dict, cwd: Path, log_path: Path) -> BoundedRun:
    """Run `command` with stdout and stderr into `log_path`. Past `timeout_s` it gets SIGINT, the Ctrl-C that pytest
    and tinytf.train answer by saving what they have, and INTERRUPT_GRACE_S later SIGKILL."""
    started = time.perf_counter()
    timed_out = False
    with open(log_path, "w", encoding="utf-8") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        try:
            exit_status = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            process.send_signal(signal.SIGINT)
            try:
                exit_status = process.wait(timeout=INTERRUPT_GRACE_S)
            except subprocess.TimeoutExpired:
                process.kill()
                exit_status = process.wait()
    return BoundedRun(exit_status, timed_out, time.perf_counter() - started)


def log_tail(path: Path, lines: int = 12) -> list[str]:
    """The last lines of a log; progress bars redraw with carriage returns, so those split lines too."""
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8", errors="replace").replace("\r", "\n")
    return [line for line in text.splitlines() if line.strip()][-lines:]


# --- section 1: environment -------------------------------------------------------------------------------------------
def cuda_version_text(number: int) -> str:
    """CUDA's version integers (12090) as text ("12.9"); 0 means no driver."""
    return f"{number // 1000}.{number % 1000 // 10}" if number else "none"


def import_torch():
    """(torch, None), or (None, why torch cannot be used here)."""
    if importlib.util.find_spec("torch") is None:
        return None, "not installed"
    try:
        import torch
    except Exception as error:  # a broken install raises OSError for its CUDA libraries
        return None, f"does not import ({type(error).__name__}: {error})"
    return torch, None


def describe_environment(cupy, torch, torch_missing: str | None, source_tree: Path | None) -> dict:
    runtime = cupy.cuda.runtime
    devices = []
    for index in range(runtime.getDeviceCount()):
        properties = runtime.getDeviceProperties(index)
        with cupy.cuda.Device(index):
            free_bytes, total_bytes = runtime.memGetInfo()
        devices.append({
            "index": index,
            "name": properties["name"].decode() if isinstance(properties["name"], bytes) else properties["name"],
            "compute_capability": f"{properties['major']}.{properties['minor']}",
            "multiprocessors": properties["multiProcessorCount"],
            "memory_total_bytes": total_bytes,
            "memory_free_bytes": free_bytes,
        })
    wheels = cupy_wheels()
    environment = {
        "gpus": devices,
        "gpu_count": len(devices),
        "driver_cuda": cuda_version_text(runtime.driverGetVersion()),
        "runtime_cuda": cuda_version_text(runtime.runtimeGetVersion()),
        "nvrtc": nvrtc_version(cupy),
        "cupy": cupy.__version__,
        "cupy_wheels": {name: importlib.metadata.version(name) for name in wheels},
        "numpy": np.__version__,
        "python": f"{platform.python_version()} ({sys.executable})",
        "platform": platform.platform(),
        "tinytf": __version__,
        "tinytf_location": str(PACKAGE_ROOT / "tinytf"),
        "git_commit": git_commit(source_tree),
        "environment_variables": {name: os.environ.get(name) for name in ("CUDA_VISIBLE_DEVICES", "CUPY_TF32")},
    }
    if len(wheels) > 1:
        environment["warning"] = f"several CuPy wheels are installed ({', '.join(wheels)}); they overwrite each other"
    if torch is None:
        environment["torch"] = torch_missing
    else:
        environment["torch"] = torch.__version__
        environment["torch_cuda"] = torch.version.cuda
        environment["torch_cuda_available"] = torch.cuda.is_available()
    return environment


def nvrtc_version(cupy) -> str:
    """NVRTC compiles tinytf's kernels; a CuPy wheel without it still imports, so say so here."""
    try:
        return ".".join(map(str, cupy.cuda.nvrtc.getVersion()))
    except Exception as error:  # the library is missing or broken
        return f"unavailable ({type(error).__name__}: {error})"


def git_commit(source_tree: Path | None) -> str | None:
    """The source tree's commit, with "+changes" when files differ from it; None outside a git checkout."""
    if source_tree is None or not (source_tree / ".git").exists():
        return None
    try:
        commit = subprocess.run(["git", "-C", str(source_tree), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        changes = subprocess.run(["git", "-C", str(source_tree), "status", "--porcelain", "--untracked-files=no"],
                                 capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+changes" if changes else "")


# --- section 2: tests -------------------------------------------------------------------------------------------------
def summarize_junit(xml_text: str, max_listed: int = 20, message_lines: int = 3) -> dict:
    """Counts of a pytest --junitxml report, the failed and erroring tests with the first lines of their messages,
    and the skip reasons with how many tests each skipped."""
    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
    problems, skip_reasons = [], Counter()
    for case in ElementTree.fromstring(xml_text).iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        failure, error, skipped = case.find("failure"), case.find("error"), case.find("skipped")
        if failure is not None or error is not None:
            outcome = failure if failure is not None else error
            counts["failed" if failure is not None else "errors"] += 1
            message = outcome.get("message") or outcome.text or ""
            lines = [line[:200] for line in message.strip().splitlines()[:message_lines]]
            problems.append({"test": name, "outcome": "failed" if failure is not None else "error",
                             "message": lines})
        elif skipped is not None:
            counts["skipped"] += 1
            skip_reasons[skipped.get("message", "")] += 1
        else:
            counts["passed"] += 1
    return {**counts, "problems": problems[:max_listed], "problems_left_out": max(0, len(problems) - max_listed),
            "skip_reasons": dict(skip_reasons.most_common(10))}


def pytest_command(tests_folder: Path, junit_path: Path, selection: str, workers: int = 0) -> list[str]:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit_path}",
               "--durations=15"]
    if selection == "gpu":
        command += ["-k", GPU_TEST_KEYWORDS]
    if workers:
        command += ["-n", str(workers)]
    return command + [str(tests_folder)]


def run_tests(source_tree: Path, out: Path, selection: str, timeout_s: float, workers: int = 0) -> dict:
    junit_path = out / JUNIT_XML
    command = pytest_command(source_tree / "tests", junit_path, selection, workers)
    run = run_bounded(command, timeout_s, child_environment({"HYPOTHESIS_PROFILE": "ci"}), source_tree,
                      out / PYTEST_LOG)
    result = {"command": shlex.join(command), "selection": selection, "exit_status": run.exit_status,
              "timed_out": run.timed_out, "timeout_s": timeout_s, "wall_s": round(run.wall_s, 1), "log": PYTEST_LOG}
    try:
        result.update(summarize_junit(junit_path.read_text(encoding="utf-8")))
    except (OSError, ElementTree.ParseError) as error:
        result["junit_error"] = f"no readable {JUNIT_XML} ({error})"
        result["log_tail"] = log_tail(out / PYTEST_LOG)
    passed = run.exit_status == 0 and not run.timed_out and "junit_error" not in result
    result["status"] = "passed" if passed else "timed out" if run.timed_out else "failed"
    return result


# --- section 3: training ----------------------------------------------------------------------------------------------
def training_command(preset: str, folder: Path, iters: int, data: Path | None) -> list[str]:
    command = [sys.executable, "-m", "tinytf.train", "--device", "cuda", "--preset", preset, "--out", str(folder),
               "--iters", str(iters), "--eval-interval", str(max(1, iters // TRAIN_EVALUATIONS)),
               "--eval-iters", str(TRAIN_EVAL_ITERS), *TRAIN_MODEL_FLAGS]
    return command + (["--data", str(data.resolve())] if data is not None else [])


def summarize_metrics(metrics_path: Path, tokens_per_step: int) -> dict:
    """First and last evaluation of a tinytf.train metrics.jsonl, whether both losses fell between them, and the
    throughput: of the last window of steps (tinytf.train's own tokens_per_s, evaluations left out), and overall."""
    try:
        lines = metrics_path.read_text(encoding="utf-8").splitlines()
    except OSError:
        lines = []
    records = [json.loads(line) for line in lines if line.strip()]
    if not records:
        return {"evaluations": 0}
    first, last = records[0], records[-1]
    losses = ("iter", "train_loss", "val_loss")
    return {
        "evaluations": len(records),
        "first": {key: first[key] for key in losses},
        "last": {key: last[key] for key in losses},
        "loss_fell": (last["train_loss"] < first["train_loss"] and last["val_loss"] < first["val_loss"]
                      if len(records) > 1 else None),
        "training_s": last["elapsed_s"],
        "tokens_per_s_last_window": last["tokens_per_s"],
        "tokens_per_s_overall": last["iter"] * tokens_per_step / last["elapsed_s"] if last["elapsed_s"] > 0 else None,
    }


def run_training(preset: str, out: Path, iters: int, data: Path | None, timeout_s: float) -> dict:
    folder = out / f"train-{preset}"
    folder.mkdir()
    command = training_command(preset, folder, iters, data)
    run = run_bounded(command, timeout_s, child_environment(), folder, folder / "train.log")
    result = {"command": shlex.join(command), "iters": iters, "batch_size": TRAIN_BATCH_SIZE,
              "block_size": TRAIN_BLOCK_SIZE, "exit_status": run.exit_status, "timed_out": run.timed_out,
              "timeout_s": timeout_s, "wall_s": round(run.wall_s, 1), "log": f"{folder.name}/train.log",
              **summarize_metrics(folder / "metrics.jsonl", TRAIN_BATCH_SIZE * TRAIN_BLOCK_SIZE)}
    if run.exit_status != 0:
        result["log_tail"] = log_tail(folder / "train.log")
    if run.timed_out:
        result["status"] = "timed out"
    elif run.exit_status != 0:
        result["status"] = "failed"
    else:
        result["status"] = "done" if result.get("loss_fell") else "loss did not fall"
    return result


# --- section 4: attention benchmark -----------------------------------------------------------------------------------
def attention_flops(batch: int, heads: int, query_len: int, key_len: int, head_dim: int, is_causal: bool,
                    backward: bool) -> float:
    """FlashAttention's count: 4 B H T S D for the forward's two matmuls, x2.5 with the backward's five, halved when
    causal (half the scores are masked)."""
    flops = 4.0 * batch * heads * query_len * key_len * head_dim
    return flops * (2.5 if backward else 1.0) * (0.5 if is_causal else 1.0)


@dataclasses.dataclass(frozen=True)
class AttentionCase:
    implementation: str  # TINYTF_KERNEL, CUPY_NAIVE or TORCH_SDPA
    seq_len: int  # T = S
    head_dim: int
    is_causal: bool
    backward: bool  # forward+backward, or the forward alone
    dtype: str = "float32"
    batch: int = ATTENTION_BATCH
    heads: int = ATTENTION_HEADS

    @property
    def pass_name(self) -> str:
        return "forward+backward" if self.backward else "forward"

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return self.batch, self.heads, self.seq_len, self.head_dim

    @property
    def flops(self) -> float:
        return attention_flops(self.batch, self.heads, self.seq_len, self.seq_len, self.head_dim, self.is_causal,
                               self.backward)

    @property
    def configuration(self) -> tuple:
        """The case without its length: cases of one configuration scale with T^2."""
        return self.implementation, self.dtype, self.head_dim, self.is_causal, self.backward

    def as_dict(self) -> dict:
        return {"implementation": self.implementation, "dtype": self.dtype, "T": self.seq_len, "S": self.seq_len,
                "D": self.head_dim, "causal": self.is_causal, "pass": self.pass_name, "B": self.batch, "H": self.heads}


def attention_cases(lengths, head_dims, implementations, dtypes=("float32",)) -> list[AttentionCase]:
    """Shortest lengths first, so a spent budget leaves out the longest lengths of every configuration."""
    return [AttentionCase(implementation, seq_len, head_dim, is_causal, backward, dtype)
            for seq_len in lengths for dtype in dtypes for head_dim in head_dims for is_causal in (False, True)
            for backward in (False, True) for implementation in implementations]


def naive_memory_estimate(case: AttentionCase) -> int:
    """Bytes the naive path needs at its peak: NAIVE_SCORE_COPIES float32 (B, H, T, S) arrays."""
    return NAIVE_SCORE_COPIES[case.pass_name] * case.batch * case.heads * case.seq_len * case.seq_len * 4


def naive_memory_skip_reason(case: AttentionCase, free_bytes: int) -> str | None:
    """Why the naive path must not run this case in `free_bytes` of GPU memory, or None when it fits."""
    needed = naive_memory_estimate(case)
    if needed <= NAIVE_MEMORY_SHARE * free_bytes:
        return None
    return (f"skipped: would need ~{needed / 2**30:.0f} GiB ({NAIVE_SCORE_COPIES[case.pass_name]} score matrices), "
            f"more than {NAIVE_MEMORY_SHARE:.0%} of the {free_bytes / 2**30:.0f} GiB free")


@dataclasses.dataclass
class Timing:
    times_s: list[float]
    peak_extra_bytes: int


def time_calls(run: Callable[[], None], synchronize: Callable[[], None], reps: int,
               clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Seconds of `reps` calls of `run`, each between two synchronizations of the device."""
    times = []
    for _ in range(reps):
        synchronize()
        start = clock()
        run()
        synchronize()
        times.append(clock() - start)
    return times


def run_attention_cases(cases: list[AttentionCase], measure: Callable[[AttentionCase], Timing],
                        skip_reason: Callable[[AttentionCase], str | None], budget_s: float, calls_per_case: int,
                        clock: Callable[[], float] = time.monotonic,
                        on_result: Callable[[list[dict]], None] = lambda results: None) -> list[dict]:
    """One record per case, in order: measured, skipped (skip_reason, or the budget) or failed with its error.

    A case is left out when the budget is spent, or when its time, predicted from the last length of its
    configuration that ran (x (T / T_last)^2 per call, `calls_per_case` calls), would overrun what is left.
    """
    started = clock()
    results, last_ran = [], {}  # configuration -> (T, median seconds per call)
    for case in cases:
        record = case.as_dict()
        left_s = budget_s - (clock() - started)
        predicted_s = None
        if case.configuration in last_ran:
            last_len, last_median = last_ran[case.configuration]
            predicted_s = last_median * (case.seq_len / last_len) ** 2 * calls_per_case
        try:
            reason = skip_reason(case)
            if reason is None and (left_s <= 0 or (predicted_s is not None and predicted_s > left_s)):
                prediction = f"predicted {predicted_s:.0f} s, " if predicted_s is not None else ""
                reason = f"skipped: time budget ({prediction}{max(0.0, left_s):.0f} s of {budget_s:.0f} s left)"
            timing = None if reason is not None else measure(case)
        except Exception as error:  # out of memory, a launch failure: recorded, and the next case runs
            record["status"] = "error"
            record["error"] = f"{type(error).__name__}: {error}"[:500]
        else:
            if timing is None:
                record["status"] = reason
            else:
                median_s = statistics.median(timing.times_s)
                last_ran[case.configuration] = (case.seq_len, median_s)
                record.update(status="ok", median_s=median_s, times_s=timing.times_s,
                              tflops=case.flops / median_s / 1e12 if median_s > 0 else None,
                              peak_extra_bytes=timing.peak_extra_bytes)
        results.append(record)
        on_result(results)
    return results


class GpuAttentionTimer:
    """measure() and skip_reason() of run_attention_cases on the GPU: tinytf's two paths on CuPy, torch's SDPA."""

    def __init__(self, cupy, torch, reps: int):
        self.cupy, self.torch, self.reps = cupy, torch, reps

    def release_memory(self) -> None:
        """Hand the cached blocks of both pools back to the driver, so the next case sees all free memory."""
        gc.collect()
        self.cupy.get_default_memory_pool().free_all_blocks()
        if self.torch is not None:
            self.torch.cuda.empty_cache()

    def skip_reason(self, case: AttentionCase) -> str | None:
        if case.implementation != CUPY_NAIVE:
            return None
        self.release_memory()
        free_bytes, _ = self.cupy.cuda.runtime.memGetInfo()
        return naive_memory_skip_reason(case, free_bytes)

    def measure(self, case: AttentionCase) -> Timing:
        self.release_memory()
        if case.implementation == TORCH_SDPA:
            run, synchronize, peak_extra_bytes = self.torch_call(case), self.torch.cuda.synchronize, self.torch_peak
        else:
            run, synchronize, peak_extra_bytes = self.tinytf_call(case), self.cupy_synchronize, self.cupy_peak
        run()  # warm-up: compiles the kernels, and lets torch create its workspaces before memory is measured
        synchronize()
        peak = peak_extra_bytes(run)
        return Timing(time_calls(run, synchronize, self.reps), peak)

    def cupy_synchronize(self) -> None:
        self.cupy.cuda.get_current_stream().synchronize()

    def cupy_peak(self, run: Callable[[], None]) -> int:
        pool = self.cupy.get_default_memory_pool()
        self.cupy_synchronize()
        pool.free_all_blocks()
        before = pool.total_bytes()  # only blocks in use are left
        run()
        self.cupy_synchronize()
        return pool.total_bytes() - before

    def torch_peak(self, run: Callable[[], None]) -> int:
        cuda = self.torch.cuda
        cuda.synchronize()
        cuda.reset_peak_memory_stats()
        before = cuda.memory_allocated()
        run()
        cuda.synchronize()
        return cuda.max_memory_allocated() - before

    def tinytf_call(self, case: AttentionCase) -> Callable[[], None]:
        path = "cuda" if case.implementation == TINYTF_KERNEL else "naive"
        q, k, v = (randn(*case.shape, dtype=case.dtype, device="cuda", requires_grad=case.backward)
                   for _ in range(3))
        grad_out = randn(*case.shape, dtype=case.dtype, device="cuda")
        if not case.backward:
            def forward():
                with no_grad():
                    scaled_dot_product_attention(q, k, v, is_causal=case.is_causal, backend=path)
            return forward

        def forward_backward():
            for tensor in (q, k, v):
                tensor.grad = None
            scaled_dot_product_attention(q, k, v, is_causal=case.is_causal, backend=path).backward(grad_out)
        return forward_backward

    def torch_call(self, case: AttentionCase) -> Callable[[], None]:
        torch = self.torch
        dtype = getattr(torch, case.dtype)
        q, k, v = (torch.randn(case.shape, device="cuda", dtype=dtype, requires_grad=case.backward)
                   for _ in range(3))
        grad_out = torch.randn(case.shape, device="cuda", dtype=dtype)
        backends = torch_sdpa_backends(case.dtype)

        def sdpa():
            with importlib.import_module("torch.nn.attention").sdpa_kernel(backends):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=case.is_causal)

        if not case.backward:
            def forward():
                with torch.no_grad():
                    sdpa()
            return forward

        def forward_backward():
            for tensor in (q, k, v):
                tensor.grad = None
            sdpa().backward(grad_out)
        return forward_backward


def torch_sdpa_backends(dtype: str) -> list:
    """The SDPA backends torch may choose from for `dtype`. Half precision: only FlashAttention-2, the kernel tinytf's
    tensor-core kernels follow; float32, which that kernel does not take: all of them, torch's own choice."""
    backend_names = ("FLASH_ATTENTION",) if dtype in ("bfloat16", "float16") else \
        ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")
    sdp_backend = importlib.import_module("torch.nn.attention").SDPBackend
    return [getattr(sdp_backend, name) for name in backend_names]


def torch_on_gpu(torch, torch_missing: str | None):
    """(torch, None) when torch can run on this GPU, else (None, why not)."""
    if torch is None:
        return None, f"torch {torch_missing}"
    if not torch.cuda.is_available():
        return None, f"torch {torch.__version__} sees no CUDA device (a CPU-only build?)"
    return torch, None


def run_attention(cupy, torch, torch_missing: str | None, quick: bool, reps: int, budget_s: float,
                  on_progress: Callable[[dict], None]) -> dict:
    torch, torch_missing = torch_on_gpu(torch, torch_missing)
    implementations = [TINYTF_KERNEL, CUPY_NAIVE] + ([TORCH_SDPA] if torch is not None else [])
    lengths = [T for T in ATTENTION_LENGTHS if not quick or T <= QUICK_MAX_LENGTH]
    section = {"B": ATTENTION_BATCH, "H": ATTENTION_HEADS, "dtypes": list(ATTENTION_DTYPES), "lengths": lengths,
               "head_dims": list(ATTENTION_HEAD_DIMS), "implementations": implementations, "reps": reps,
               "budget_s": budget_s, "timing_method": TIMING_METHOD, "memory_method": MEMORY_METHOD,
               "naive_skip_rule": f"estimate {NAIVE_SCORE_COPIES} float32 score matrices; run where that fits in "
                                  f"{NAIVE_MEMORY_SHARE:.0%} of the free GPU memory",
               "torch": torch.__version__ if torch is not None else torch_missing, "results": []}
    timer = GpuAttentionTimer(cupy, torch, reps)

    def saved(results: list[dict]) -> None:
        section["results"] = results
        on_progress(section)

    cases = attention_cases(lengths, ATTENTION_HEAD_DIMS, implementations, ATTENTION_DTYPES)
    run_attention_cases(cases, timer.measure, timer.skip_reason, budget_s, calls_per_case=reps + 2,
                        on_result=saved)
    timer.release_memory()
    return section


# --- markdown ---------------------------------------------------------------------------------------------------------
def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def size_text(n_bytes) -> str:
    if n_bytes is None:
        return "-"
    return f"{n_bytes / 2**30:.1f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.0f} MiB"


def loss_text(evaluation: dict | None) -> str:
    if not evaluation:
        return "-"
    return f"iter {evaluation['iter']}: {evaluation['train_loss']:.3f} / {evaluation['val_loss']:.3f}"


def render_environment(environment: dict) -> str:
    rows = [[f"GPU {gpu['index']}", f"{gpu['name']}, compute capability {gpu['compute_capability']}, "
             f"{gpu['multiprocessors']} SMs, {size_text(gpu['memory_total_bytes'])} "
             f"({size_text(gpu['memory_free_bytes'])} free)"] for gpu in environment["gpus"]]
    wheels = ", ".join(f"{name} {version}" for name, version in environment["cupy_wheels"].items()) or "unknown"
    torch = environment["torch"]
    if "torch_cuda" in environment:
        seen = "seen" if environment["torch_cuda_available"] else "not seen"
        torch += f" (CUDA {environment['torch_cuda']}, GPU {seen})"
    rows += [["driver", f"CUDA {environment['driver_cuda']}"], ["CUDA runtime", environment["runtime_cuda"]],
             ["NVRTC", environment["nvrtc"]], ["CuPy", f"{environment['cupy']} (wheel: {wheels})"],
             ["NumPy", environment["numpy"]], ["Python", environment["python"]], ["platform", environment["platform"]],
             ["torch", torch],
             ["tinytf", f"{environment['tinytf']} at {environment['tinytf_location']}"
                        + (f", commit {environment['git_commit']}" if environment["git_commit"] else "")]]
    rows += [[name, value] for name, value in environment["environment_variables"].items() if value is not None]
    if "warning" in environment:
        rows.append(["warning", environment["warning"]])
    return markdown_table(["", ""], rows)


def render_tests(tests: dict) -> str:
    if "command" not in tests:
        return tests["status"]
    parts = [f"{tests['status']}: `{tests['command']}` (exit status {tests['exit_status']}, {tests['wall_s']} s of "
             f"at most {tests['timeout_s']:.0f} s; output in {tests['log']})"]
    if "junit_error" in tests:
        parts.append(tests["junit_error"] + ". Last lines of the output:\n\n```\n" + "\n".join(tests["log_tail"])
                     + "\n```")
        return "\n\n".join(parts)
    parts.append(markdown_table(["passed", "failed", "skipped", "errors"],
                                [[tests["passed"], tests["failed"], tests["skipped"], tests["errors"]]]))
    if tests["problems"]:
        left_out = f" ({tests['problems_left_out']} more in {JUNIT_XML})" if tests["problems_left_out"] else ""
        parts.append(f"Failures and errors{left_out}:\n\n" + "\n".join(
            f"- `{problem['test']}` ({problem['outcome']}): " + " / ".join(problem["message"])
            for problem in tests["problems"]))
    if tests["skip_reasons"]:
        parts.append("Skip reasons:\n\n" + markdown_table(
            ["tests", "reason"], [[count, reason] for reason, count in tests["skip_reasons"].items()]))
    return "\n\n".join(parts)


def render_training(training: dict) -> str:
    rows = []
    for preset, run in training.items():
        if "command" not in run:
            rows.append([preset, f"error: {run['error']}" if "error" in run else run["status"]] + ["-"] * 6)
            continue
        window, overall = run.get("tokens_per_s_last_window"), run.get("tokens_per_s_overall")
        rows.append([preset, f"{run['status']} (exit {run['exit_status']})", loss_text(run.get("first")),
                     loss_text(run.get("last")), {True: "yes", False: "NO", None: "-"}[run.get("loss_fell")],
                     f"{window:,.0f}" if window else "-", f"{overall:,.0f}" if overall else "-", f"{run['wall_s']} s"])
    table = markdown_table(["preset", "status", "first eval (train / val loss)", "last eval (train / val loss)",
                            "loss fell", "tokens/s, last window", "tokens/s, overall", "wall time"], rows)
    first = next((run for run in training.values() if "command" in run), None)
    if first is None:
        return table
    return (f"{first['iters']} iterations, batch {first['batch_size']} x block {first['block_size']}; "
            f"\"last window\" is tinytf.train's own rate over the steps since the previous evaluation, \"overall\" "
            f"counts every step's tokens over the whole training time, evaluations included. Logs: "
            f"train-<preset>/train.log.\n\n" + table
            + "".join(f"\n\n{preset}, last lines of the log:\n\n```\n" + "\n".join(run["log_tail"]) + "\n```"
                      for preset, run in training.items() if run.get("log_tail")))


def attention_cell(record: dict | None) -> str:
    if record is None:
        return "-"
    if record["status"] == "ok":
        tflops = f", {record['tflops']:.1f} TFLOP/s" if record["tflops"] else ""
        return f"{record['median_s'] * 1e3:.2f} ms{tflops}, {size_text(record['peak_extra_bytes'])}"
    if record["status"] == "error":
        return f"error: {record['error'][:120]}"
    return record["status"]


def render_attention(attention: dict) -> str:
    implementations = attention["implementations"]
    by_case = {(r["dtype"], r["pass"], r["causal"], r["D"], r["T"], r["implementation"]): r
               for r in attention["results"]}
    rows = []
    for dtype, pass_name, causal, head_dim, seq_len in dict.fromkeys(key[:5] for key in by_case):
        records = {name: by_case.get((dtype, pass_name, causal, head_dim, seq_len, name)) for name in implementations}
        kernel, torch = records.get(TINYTF_KERNEL), records.get(TORCH_SDPA)
        ratio = (f"{kernel['median_s'] / torch['median_s']:.2f}" if kernel and torch and kernel["status"] == "ok"
                 and torch["status"] == "ok" else "-")
        rows.append([dtype, pass_name, "yes" if causal else "no", head_dim, seq_len,
                     *(attention_cell(records[name]) for name in implementations), ratio])
    rows.sort(key=lambda row: (row[0], row[1] != "forward", row[2], row[3], row[4]))
    header = ["dtype", "pass", "causal", "D", "T = S", *implementations, f"{TINYTF_KERNEL} / {TORCH_SDPA} time"]
    torch_note = "" if TORCH_SDPA in implementations else f" torch is left out: {attention['torch']}."
    return (f"B = {attention['B']}, H = {attention['H']}, {', '.join(attention['dtypes'])} (torch's SDPA limited to "
            f"its FlashAttention backend in half precision); each cell: median time, TFLOP/s "
            f"(4 B H T S D forward, x2.5 with backward, halved when causal), peak extra memory.{torch_note}\n\n"
            f"Timing: {attention['timing_method']}. Memory: {attention['memory_method']}. Naive path: "
            f"{attention['naive_skip_rule']}.\n\n" + markdown_table(header, rows))


def error_text(outcome: dict) -> str:
    return f"error: {outcome['error']}\n\n```\n" + "\n".join(outcome["traceback"]) + "\n```"


def render_markdown(report: dict) -> str:
    finished = report.get("finished")
    parts = ["# tinytf GPU check",
             f"Started {report['started']}, " + (f"finished {finished}." if finished else "not finished (yet).")
             + f" Command: `{report['command']}`."]
    if finished:
        parts.append("Problems: " + ("; ".join(report["problems"]) if report["problems"] else "none") + ".")
    renderers = {"environment": render_environment, "tests": render_tests, "training": render_training,
                 "attention": render_attention}
    for key, render in renderers.items():
        if key not in report:
            continue
        section = report[key]
        body = section if isinstance(section, str) else error_text(section) if "traceback" in section else \
            render(section)
        parts.append(f"## {key.capitalize()}\n\n{body}")
    return "\n\n".join(parts) + "\n"


def problems_of(report: dict) -> list[str]:
    """What the report shows going wrong; the exit status is 1 when there is any."""
    problems = []
    sections = {key: report.get(key) for key in ("environment", "tests", "attention")}
    sections.update({f"training {preset}": run for preset, run in report.get("training", {}).items()})
    for name, section in sections.items():
        if isinstance(section, dict) and "traceback" in section:
            problems.append(f"{name} raised {section['error']}")
    tests = sections["tests"]
    if isinstance(tests, dict) and "command" in tests and tests["status"] != "passed":
        counts = "" if "junit_error" in tests else f": {tests['failed']} failed, {tests['errors']} errors"
        problems.append(f"tests {tests['status']}{counts}")
    for preset, run in report.get("training", {}).items():
        if "command" in run and run["status"] != "done":
            problems.append(f"training {preset}: {run['status']} (exit status {run['exit_status']})")
    attention = sections["attention"]
    if isinstance(attention, dict) and "results" in attention:
        errors = sum(record["status"] == "error" for record in attention["results"])
        if errors:
            problems.append(f"{errors} attention case(s) raised an error")
    return problems


# --- the command line -------------------------------------------------------------------------------------------------
def say(message: str) -> None:
    print(f"{PROG}: {message}", flush=True)


def guarded(compute: Callable, *args, **kwargs):
    """compute(*args, **kwargs), or a record of the exception it raised: a bug in one section must not cost the
    others their results (the report keeps the traceback; the command line prints none)."""
    try:
        return compute(*args, **kwargs)
    except Exception as error:
        return {"status": "error", "error": f"{type(error).__name__}: {error}",
                "traceback": traceback.format_exc().splitlines()[-15:]}


def skipped_by_budget(section: str) -> str:
    return f"skipped: --time-limit left no time for {section}"


def gpu_check(args: argparse.Namespace, command_text: str) -> int:
    check_arguments(args)
    check_output_folder(args.out, args.overwrite)
    cupy = find_gpu()
    source_tree = find_source_tree()
    if not args.skip_tests and source_tree is not None:
        check_test_tools(args.test_workers)
    args.out = args.out.resolve()  # the subprocesses run in other folders
    prepare_output_folder(args.out)  # the first write: every check that can refuse has passed
    budget = TimeBudget(args.time_limit)
    report = {"format_version": 1, "started": now_utc(), "command": command_text, "finished": None}

    torch, torch_missing = import_torch()
    report["environment"] = guarded(describe_environment, cupy, torch, torch_missing, source_tree)
    save_report(args.out, report)
    say(f"{cupy.cuda.runtime.getDeviceCount()} GPU(s); the report goes to {args.out}")

    promised_training = 0 if args.skip_training else MIN_TRAIN_S * len(PRESETS)
    promised_attention = 0 if args.skip_attention else MIN_BENCH_S
    if args.skip_tests:
        report["tests"] = "skipped: --skip-tests"
    elif source_tree is None:
        report["tests"] = f"skipped: no source tree at {PACKAGE_ROOT} (tinytf is installed without its tests)"
    else:
        timeout_s = budget.share(args.test_timeout, promised_training + promised_attention)
        if timeout_s > 0:
            say(f"tests: pytest on {source_tree / 'tests'}, up to {timeout_s:.0f} s")
            report["tests"] = guarded(run_tests, source_tree, args.out, args.tests, timeout_s,
                                      args.test_workers)
        else:
            report["tests"] = skipped_by_budget("the tests")
    save_report(args.out, report)

    if not args.skip_training:
        report["training"] = {}
        for index, preset in enumerate(PRESETS):
            promised_later = MIN_TRAIN_S * (len(PRESETS) - index - 1) + promised_attention
            timeout_s = budget.share(args.train_timeout, promised_later)
            if timeout_s > 0:
                say(f"training: {preset}, {args.train_iters} iterations, up to {timeout_s:.0f} s")
                report["training"][preset] = guarded(run_training, preset, args.out, args.train_iters,
                                                     args.data, timeout_s)
            else:
                report["training"][preset] = {"status": skipped_by_budget(f"training {preset}")}
            save_report(args.out, report)

    if not args.skip_attention:
        budget_s = budget.share(args.bench_budget, 0)
        if budget_s > 0:
            say(f"attention: benchmark, up to {budget_s:.0f} s")

            def save_partial(section: dict) -> None:
                report["attention"] = section
                save_report(args.out, report)

            report["attention"] = guarded(run_attention, cupy, torch, torch_missing, args.quick, args.reps,
                                          budget_s, on_progress=save_partial)
        else:
            report["attention"] = skipped_by_budget("the attention benchmark")

    report["problems"] = problems_of(report)
    report["finished"] = now_utc()
    save_report(args.out, report)
    say("problems: " + ("; ".join(report["problems"]) if report["problems"] else "none")
        + f"; report: {args.out / REPORT_MARKDOWN}")
    return 1 if report["problems"] else 0


@command_line(PROG)
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return gpu_check(build_parser().parse_args(argv), f"python -m {PROG} {shlex.join(argv)}".strip())


if __name__ == "__main__":
    sys.exit(main())
