"""--grad-accum: N micro-batches make one step equal to one batch of all their rows; the steps' tokens/s and MFU."""

import argparse

import numpy as np
import pytest

import tinytf.train as train_module
from tinytf import backend, distributed
from tinytf.checkpoint import load_checkpoint
from tinytf.data import BatchSampler
from tinytf.models import GPT, GPTConfig
from tinytf.optim import SGD, AdamW, GradScaler, weight_decay_groups
from test_distributed import WEIGHT_TOLERANCE, needs_mpi, run_ranks
from training_runs import TINY, StopAfter, metrics, run_tiny, write_corpus

VOCAB, BLOCK, STEPS = 50, 16, 4
TOKENS = np.random.default_rng(0).integers(0, VOCAB, 4000)
ROWS = 8  # sequences per step, split as 8 x 1, 4 x 2 and 2 x 4


def parameters_after_steps(dtype, batch_size: int, grad_accum: int, optimizer: str) -> dict[str, np.ndarray]:
    """A 2-layer model's parameters (as float64) after STEPS calls of tinytf.train.train_step, from the same
    initial weights and the same windows for every split of ROWS into micro-batches."""
    backend.manual_seed(3)
    model = GPT(GPTConfig(vocab_size=VOCAB, block_size=BLOCK, n_layer=2, n_head=2, n_embd=32)).to(dtype=dtype)
    if optimizer == "adamw":  # the training command's optimizer; the gradient norms are 0.57 to 1.02: all clipped
        lr, clip = 1e-2, 0.25
        optimizer = AdamW(weight_decay_groups(model.parameters(), 0.1), lr=lr, betas=(0.9, 0.99))
    else:  # AdamW and clipping hide a gradient's scale; SGD without clipping shows a missing division by N
        lr, clip = 0.5, 0.0
        optimizer = SGD(model.parameters(), lr=lr)
    run = train_module.Run(
        args=argparse.Namespace(grad_accum=grad_accum, grad_clip=clip, document_masking=False), warmup_iters=0,
        device="cpu", model=model,
        optimizer=optimizer, scaler=GradScaler(enabled=False),
        averager=distributed.GradientAverager(model.parameters()),
        samplers={"train": BatchSampler({"train": TOKENS}, batch_size * grad_accum, BLOCK, seed=1)},
        tokenizer=None, data_sha256=None)
    for _ in range(STEPS):
        train_module.train_step(run, lr)
    return {name: param.data.astype(np.float64) for name, param in model.named_parameters()}


def largest_difference(a: dict, b: dict) -> float:
    return max(float(np.abs(a[name] - b[name]).max()) for name in a)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_accumulated_micro_batches_equal_one_batch_in_float64(optimizer):
    """float64 leaves only the summation order to differ. Tolerance: the float32 runs of the next test move their
    parameters up to 4.4e-5 from the float64 ones, 370 units of float32's rounding (1.2e-7): AdamW's first steps
    amplify a gradient's relative error that much. The same amplification of float64's rounding (2.2e-16) is 8e-14
    (measured: 1.6e-14); 1e-12 leaves a factor of 12. A missing division by N moves them by 1e-8 (AdamW and the clip
    undo most of a gradient's scale) to 0.07 (SGD), clipping each micro-batch by 0.08."""
    one_batch = parameters_after_steps(np.float64, ROWS, 1, optimizer)
    for grad_accum in (2, 4):
        accumulated = parameters_after_steps(np.float64, ROWS // grad_accum, grad_accum, optimizer)
        assert largest_difference(accumulated, one_batch) < 1e-12, grad_accum


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_accumulated_micro_batches_round_no_worse_than_one_batch(dtype):
    """Against the float64 one-batch run as the reference, the accumulated float32 (or bf16, whose micro-batch
    gradients add up in float32) run's error is at most twice the one-batch run's in the same dtype: both round at
    the same points except the order of the sum over rows (FlashAttention's criterion)."""
    reference = parameters_after_steps(np.float64, ROWS, 1, "adamw")
    dtype = backend.as_dtype(dtype)
    one_batch_error = largest_difference(parameters_after_steps(dtype, ROWS, 1, "adamw"), reference)
    for grad_accum in (2, 4):
        error = largest_difference(parameters_after_steps(dtype, ROWS // grad_accum, grad_accum, "adamw"), reference)
        assert error <= 2 * one_batch_error, (grad_accum, error, one_batch_error)


# --- the command line -------------------------------------------------------------------------------------------------
@pytest.fixture
def text_file(tmp_path):
    return write_corpus(tmp_path / "corpus.txt")


def test_grad_accum_is_saved_and_an_interrupted_run_resumes_with_it(tmp_path, text_file, monkeypatch, capsys):
    common = ["--data", text_file, "--iters", 8, "--eval-interval", 4, "--batch-size", 2, "--grad-accum", 3]
    assert run_tiny(*common, "--out", tmp_path / "straight") == 0
    assert "batch: 3 micro-batches x 2 sequences = 6 sequences (96 tokens) per step" in capsys.readouterr().out
    monkeypatch.setattr(train_module, "StopRequest", StopAfter(3))
    assert run_tiny(*common, "--out", tmp_path / "resumed") == 130
    monkeypatch.undo()
    # resumed without --grad-accum or --batch-size: the saved ones continue
    assert train_module.main(["--out", str(tmp_path / "resumed"), "--resume"]) == 0
    straight, resumed = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "resumed")
    assert resumed.meta["train_args"]["grad_accum"] == 3 and resumed.meta["train_args"]["batch_size"] == 2
    for name, array in straight.weights.items():
        np.testing.assert_array_equal(resumed.weights[name], array, err_msg=name)
    assert [(r["iter"], r["val_loss"]) for r in metrics(tmp_path / "straight")] == \
        [(r["iter"], r["val_loss"]) for r in metrics(tmp_path / "resumed")]


def test_metrics_give_tokens_per_second_and_mfu_against_the_given_peak(tmp_path, text_file, capsys):
    out = tmp_path / "run"
    assert run_tiny("--data", text_file, "--out", out, "--iters", 4, "--eval-interval", 2, "--grad-accum", 2,
                    "--peak-tflops", "0.5") == 0
    config = GPTConfig(**load_checkpoint(out).meta["config"])
    # By hand for the tiny model: 6 N + 12 L T d, N without the position table (16 x 16).
    parameters = GPT(config).num_parameters() - config.block_size * config.n_embd
    flops_per_token = 6 * parameters + 12 * config.n_layer * config.block_size * config.n_embd
    for record in metrics(out):
        assert record["tokens_per_s"] > 0
        assert record["mfu"] == pytest.approx(record["tokens_per_s"] * flops_per_token / 0.5e12, rel=1e-12)
    assert ", MFU " in capsys.readouterr().out
    assert run_tiny("--data", text_file, "--out", tmp_path / "cpu", "--iters", 2) == 0
    assert all("mfu" not in record for record in metrics(tmp_path / "cpu"))  # no peak known for the CPU


def test_known_gpus_have_a_peak_and_others_none(monkeypatch):
    args = argparse.Namespace(peak_tflops=None, dtype="bfloat16")
    assert train_module.device_peak_tflops(args, "cpu") is None
    for name, peak in (("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA A100-SXM4-40GB", 312.0),
                       ("NVIDIA GeForce GTX 1080", None)):
        monkeypatch.setattr(train_module.backend, "device_name", lambda device, name=name: name)
        assert train_module.device_peak_tflops(args, "cuda:0") == peak, name


@pytest.mark.parametrize("flags, message", [
    (["--grad-accum", "0"], "--grad-accum must be at least 1, got 0"),
    (["--peak-tflops", "0"], "--peak-tflops must be a positive number of TFLOP/s, got 0.0"),
    (["--peak-tflops", "nan"], "--peak-tflops must be a positive number of TFLOP/s, got nan"),
])
def test_bad_accumulation_and_peak_values_are_one_line_and_write_nothing(tmp_path, text_file, capsys, flags, message):
    out = tmp_path / "run"
    assert run_tiny("--data", text_file, "--out", out, "--iters", 2, *flags) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error == [f"tinytf.train: error: {message}"], error
    assert not out.exists()


@needs_mpi
def test_two_ranks_accumulating_train_like_one_process_with_the_whole_step(tmp_path, text_file):
    """2 ranks x 2 micro-batches x 2 sequences against 1 process x 8 sequences: the same windows per step (see
    tinytf.train.step_batches). float32, so that tests/test_distributed.py's tolerance for a reordered float32 sum
    applies (measured: 4.7e-7); bf16 weights would differ by a unit in their last place (2^-8 relative), which
    test_accumulated_micro_batches_round_no_worse_than_one_batch bounds instead."""
    common = ["--data", text_file, "--iters", 4, "--eval-interval", 2]
    assert run_tiny(*common, "--out", tmp_path / "one", "--batch-size", 8) == 0
    job = run_ranks("-m", "tinytf.train", *TINY, *map(str, common), "--out", tmp_path / "two", "--batch-size", 2,
                    "--grad-accum", 2)
    assert job.returncode == 0, job.stderr
    assert "batch: 2 micro-batches x 2 ranks x 2 sequences = 8 sequences (128 tokens) per step" in job.stdout
    one, two = load_checkpoint(tmp_path / "one").weights, load_checkpoint(tmp_path / "two").weights
    assert max(float(np.abs(one[name] - two[name]).max()) for name in one) < WEIGHT_TOLERANCE
