"""Train a character-level GPT: `python -m tinytf.train --help`.

With no --data it trains on the text of Python's own documentation (the stdlib module pydoc_data), so it runs
offline on any machine. The output folder receives the prepared data, checkpoints (safetensors weights, JSON
state, written atomically), metrics.jsonl (one line per evaluation) and loss.png (when matplotlib is installed).

Data-parallel training over several processes (see tinytf.distributed): `mpiexec -n 2 python -m mpi4py -m tinytf.train
...`. --batch-size stays per rank. All ranks draw the same global batch of world_size * batch_size windows from one
sampler and each keeps its own rows, so the sampler state is one for the whole job: a checkpoint resumes under any
number of ranks, and W ranks with --batch-size b follow exactly the batches of one process with --batch-size W*b.
Dropout draws from a generator per rank (rank 0 keeps the single-process stream, the others are seeded apart).
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import backend, distributed
from .checkpoint import Checkpoint, save_checkpoint
from .cli import UserError, command_line, load_trained_model
from .data import BatchSampler, CharTokenizer, TokenDataset, default_corpus, prepare_dataset, read_text
from .models import GPT, GPTConfig
from .optim import AdamW, clip_grad_norm_, lr_at, weight_decay_groups
from .tensor import no_grad

MODEL_FLAGS = ("n_layer", "n_head", "n_kv_head", "n_embd", "block_size", "dropout", "bias", "mlp_hidden")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tinytf.train",
        description="Train a character-level GPT on a text file (default: Python's documentation, offline).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    data = parser.add_argument_group("data and output")
    data.add_argument("--data", type=Path, help="UTF-8 text file to train on (default: pydoc_data's text)")
    data.add_argument("--out", type=Path, default=Path("out"), help="folder for data, checkpoints and metrics")
    data.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    model = parser.add_argument_group("model (nanoGPT's CPU shakespeare_char configuration by default)")
    model.add_argument("--preset", choices=("gpt2", "llama"), default="gpt2",
                       help="gpt2: learned positions, LayerNorm, GELU; llama: RoPE, RMSNorm, SwiGLU, GQA")
    model.add_argument("--n-layer", type=int, default=4, help="number of decoder blocks")
    model.add_argument("--n-head", type=int, default=4, help="query heads per attention layer")
    model.add_argument("--n-kv-head", type=int, default=None,
                       help="key/value heads (GQA); default: n_head for gpt2, n_head // 2 for llama")
    model.add_argument("--n-embd", type=int, default=128, help="width of the residual stream")
    model.add_argument("--block-size", type=int, default=64, help="context length in characters")
    model.add_argument("--dropout", type=float, default=0.0, help="dropout probability")
    model.add_argument("--mlp-hidden", type=int, default=None, help="MLP hidden width (default: preset's rule)")
    model.add_argument("--bias", action=argparse.BooleanOptionalAction, default=None,
                       help="biases in Linear and LayerNorm layers (default: the preset's; nanoGPT trains without)")
    optimization = parser.add_argument_group("optimization (AdamW, warmup then cosine decay)")
    optimization.add_argument("--batch-size", type=int, default=12,
                              help="sequences per step (per rank in data-parallel runs)")
    optimization.add_argument("--iters", type=int, default=2000, help="training steps")
    optimization.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    optimization.add_argument("--min-lr", type=float, default=1e-4, help="learning rate at the end of the decay")
    optimization.add_argument("--warmup-iters", type=int, default=None,
                              help="steps of linear warmup (default: 100, or iters // 20 for short runs)")
    optimization.add_argument("--weight-decay", type=float, default=0.1, help="AdamW decay on 2-D weights")
    optimization.add_argument("--beta1", type=float, default=0.9, help="AdamW beta1")
    optimization.add_argument("--beta2", type=float, default=0.99, help="AdamW beta2")
    optimization.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm (0: off)")
    evaluation = parser.add_argument_group("evaluation and running")
    evaluation.add_argument("--eval-interval", type=int, default=250, help="evaluate and checkpoint every N steps")
    evaluation.add_argument("--eval-iters", type=int, default=20, help="batches per loss estimate")
    evaluation.add_argument("--device", default="cpu",
                            help="cpu, cuda or cuda:N (data-parallel: cuda gives each rank its own GPU)")
    evaluation.add_argument("--seed", type=int, default=1337, help="seed for weights, batches and dropout")
    return parser


def warmup_iters(args: argparse.Namespace) -> int:
    """--warmup-iters, or by default 100 steps (iters // 20 for runs shorter than 2,000 steps)."""
    return min(100, args.iters // 20) if args.warmup_iters is None else args.warmup_iters


def check_arguments(args: argparse.Namespace) -> None:
    positive = ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "iters", "eval_interval", "eval_iters")
    for name in positive:
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.n_kv_head is not None and args.n_kv_head < 1:
        raise UserError(f"--n-kv-head must be at least 1, got {args.n_kv_head}")
    if not 0 <= args.dropout < 1:
        raise UserError(f"--dropout must be in [0, 1), got {args.dropout}")
    if not 0 <= warmup_iters(args) <= args.iters:
        raise UserError(f"--warmup-iters must be between 0 and --iters ({args.iters}), got {args.warmup_iters}")
    for name in ("lr", "min_lr", "weight_decay", "grad_clip"):
        if not getattr(args, name) >= 0:
            raise UserError(f"--{name.replace('_', '-')} must be non-negative, got {getattr(args, name)}")


# --- data parallelism -------------------------------------------------------------------------------------------------
def announce(message: str, file=None) -> None:
    """Print on the main rank only (every rank runs this script; one speaks for the job), above the progress bar."""
    if distributed.is_main():
        tqdm.write(message, file=file)


def rank_device(device: str) -> str:
    """The device of this rank: in a data-parallel run, 'cuda' means this rank's own GPU, cuda:<local rank>."""
    if distributed.world_size() == 1 or not device.startswith("cuda"):
        return device
    if device != "cuda":
        raise UserError(f"--device {device} would put every rank on the same GPU; in a data-parallel run pass "
                        "--device cuda and each rank takes the GPU of its local rank")
    return f"cuda:{distributed.local_rank()}"


def seed_rank_dropout(seed: int) -> None:
    """Give ranks other than 0 a dropout generator of their own: with the same masks on every rank, the ranks would
    drop the same units of different sequences. Rank 0 keeps the stream a single process would have."""
    if distributed.rank() > 0:
        backend.manual_seed(int(np.random.SeedSequence([seed, distributed.rank()]).generate_state(1)[0]))


def restore_dropout_rng(saved_rng: dict, seed: int) -> None:
    """Each rank continues its own dropout stream; a rank that the saved run did not have starts a fresh one."""
    states = [saved_rng["tinytf"], *saved_rng.get("tinytf_other_ranks", [])]
    if distributed.rank() < len(states):
        backend.set_rng_state(states[distributed.rank()])
    else:
        seed_rank_dropout(seed)


def agree_on_step(loss: float, stop_requested: bool) -> tuple[float, bool]:
    """The loss averaged over ranks, and whether any rank was asked to stop, in one small Allreduce: every rank must
    take the same decision to go on, since a rank that stopped alone would leave the others waiting for it."""
    values = np.array([loss, float(stop_requested)])
    distributed.all_reduce(values)
    return float(values[0]) / distributed.world_size(), bool(values[1] > 0)


# --- data -------------------------------------------------------------------------------------------------------------
def load_dataset(args: argparse.Namespace) -> TokenDataset:
    """Prepare the text into `out/data` (uint16 token files read through memmap), or reopen it on --resume.

    In a data-parallel run the main rank prepares the files and the other ranks open them, so --out must be a folder
    that every rank sees (a shared filesystem when the ranks run on several machines).
    """
    folder = args.out / "data"
    dataset = None
    if not args.resume and distributed.is_main():
        text = read_text(args.data) if args.data is not None else default_corpus()
        source = args.data or "pydoc_data.topics (Python's documentation)"
        dataset = prepare_dataset(text, folder)
        announce(f"data: {source}: {len(text):,} characters, vocabulary of {dataset.tokenizer.vocab_size}, "
                 f"{len(dataset.splits['train']):,} train / {len(dataset.splits['val']):,} val tokens")
    distributed.barrier()  # the other ranks open the files once the main rank has written them
    return dataset if dataset is not None else TokenDataset.open(folder)


def rank_batch(sampler: BatchSampler, split: str, device: str):
    """This rank's rows of the sampler's next global batch of `split`, on `device`: inputs and targets, (b, T)."""
    x, y = (distributed.shard(rows) for rows in sampler.get_batch(split))
    return backend.to_device(x, device), backend.to_device(y, device)


# --- the run: set up fresh, or restored from a checkpoint -------------------------------------------------------------
@dataclass
class Run:
    """What the training loop works on; `start` and `best_val` come from the checkpoint on --resume."""

    args: argparse.Namespace
    warmup_iters: int
    device: str
    model: GPT
    optimizer: AdamW
    averager: distributed.GradientAverager
    samplers: dict[str, BatchSampler]  # "train" for the steps, "eval" for estimate_loss
    tokenizer: CharTokenizer
    start: int = 0  # the first iteration to run
    best_val: float = math.inf

    @property
    def tokens_per_step(self) -> int:
        return self.args.batch_size * distributed.world_size() * self.model.config.block_size

    @property
    def metrics_path(self) -> Path:
        return self.args.out / "metrics.jsonl"


def set_up_run(args: argparse.Namespace) -> Run:
    """Data, model, optimizer and samplers of a new run, or of the run saved in --out on --resume."""
    try:
        device = backend.check_device(rank_device(args.device))
        args.out.mkdir(parents=True, exist_ok=True)
        dataset = load_dataset(args)
    except (OSError, ValueError, RuntimeError) as error:  # a bad data file, an unusable device or MPI
        raise UserError(str(error)) from None
    backend.manual_seed(args.seed)
    if args.resume:
        model, _, checkpoint = load_trained_model(args.out, device)
        model.train()
    else:
        overrides = {name: getattr(args, name) for name in MODEL_FLAGS}
        config = GPTConfig.from_preset(args.preset, vocab_size=dataset.tokenizer.vocab_size, **overrides)
        model = GPT(config).to(device)
        seed_rank_dropout(args.seed)
    distributed.broadcast_parameters(model.parameters())  # equal by the shared seed already; now certainly
    world = distributed.world_size()
    global_batch_size = args.batch_size * world  # every rank draws the global batch and keeps its own rows
    block_size = model.config.block_size
    run = Run(
        args=args,
        warmup_iters=warmup_iters(args),
        device=device,
        model=model,
        optimizer=AdamW(weight_decay_groups(model.parameters(), args.weight_decay), lr=args.lr,
                        betas=(args.beta1, args.beta2)),
        averager=distributed.GradientAverager(model.parameters()),
        samplers={"train": BatchSampler(dataset.splits, global_batch_size, block_size, seed=args.seed),
                  "eval": BatchSampler(dataset.splits, global_batch_size, block_size, seed=args.seed + 1)},
        tokenizer=dataset.tokenizer,
    )
    if args.resume:
        restore_run(run, checkpoint)
    config = model.config
    announce(f"model: {args.preset if not args.resume else 'resumed'} {config.n_layer} layers, {config.n_head} heads "
             f"({config.n_kv_head} kv), width {config.n_embd}, block {config.block_size}: "
             f"{model.num_parameters() / 1e6:.2f}M parameters on {device}")
    if world > 1:
        announce(f"data parallel: {world} ranks x {args.batch_size} sequences = {global_batch_size} sequences "
                 f"({run.tokens_per_step:,} tokens) per step")
    return run


def restore_run(run: Run, checkpoint: Checkpoint) -> None:
    """Continue where the checkpoint stands: its iteration, best loss, optimizer state, dropout and batch streams."""
    run.start = checkpoint.meta["iteration"] + 1
    run.best_val = checkpoint.meta["best_val_loss"]
    if checkpoint.optimizer_state is None:
        raise UserError(f"the checkpoint in {run.args.out} has no optimizer state to resume from")
    run.optimizer.load_state_dict(checkpoint.optimizer_state)
    restore_dropout_rng(checkpoint.meta["rng"], run.args.seed)
    for name, sampler in run.samplers.items():
        sampler.load_state_dict(checkpoint.meta["rng"][f"sampler_{name}"])
    announce(f"resumed from {run.args.out} at iteration {run.start}")


def save_run(run: Run, iteration: int) -> None:
    """Everything needed to continue exactly where the run stands after `iteration` steps.

    Called on every rank, since each one adds its dropout generator's state; only the main rank writes.
    """
    dropout_states = distributed.gather_object(backend.get_rng_state())
    if not distributed.is_main():
        return
    train_args = {**vars(run.args), "warmup_iters": run.warmup_iters}
    meta = {
        "config": run.model.config.to_dict(),
        "tokenizer": run.tokenizer.to_dict(),
        "iteration": iteration,
        "best_val_loss": run.best_val,
        "train_args": {key: str(value) if isinstance(value, Path) else value for key, value in train_args.items()},
        "rng": {"tinytf": dropout_states[0], "tinytf_other_ranks": dropout_states[1:],
                **{f"sampler_{name}": sampler.state_dict() for name, sampler in run.samplers.items()}},
    }
    save_checkpoint(run.args.out, {name: backend.to_numpy(a) for name, a in run.model.state_dict().items()}, meta,
                    run.optimizer.state_dict())


# --- training ---------------------------------------------------------------------------------------------------------
@no_grad()
def estimate_loss(model: GPT, sampler: BatchSampler, eval_iters: int, device: str) -> dict[str, float]:
    """Mean loss of `eval_iters` batches per split; in a data-parallel run each rank scores its rows of the global
    batch and the means are averaged over ranks (equal shares, so that is the mean over the global batch)."""
    model.eval()
    splits = ("train", "val")
    totals = np.zeros(len(splits))
    for index, split in enumerate(splits):
        for _ in range(eval_iters):
            totals[index] += model(*rank_batch(sampler, split, device))[1].item()
    model.train()
    distributed.all_reduce(totals, op="mean")
    return {split: float(total / eval_iters) for split, total in zip(splits, totals)}


def train_step(run: Run, lr: float) -> float:
    """One optimizer step at learning rate `lr` on the next training batch; returns this rank's loss before it."""
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    _, loss = run.model(*rank_batch(run.samplers["train"], "train", run.device))
    run.optimizer.zero_grad()
    loss.backward()
    run.averager.average()  # data parallel: every rank now holds the gradient of the whole global batch
    if run.args.grad_clip > 0:
        clip_grad_norm_(run.model.parameters(), run.args.grad_clip)
    run.optimizer.step()
    return loss.item()


def evaluate_and_save(run: Run, iteration: int, lr: float, tokens_per_s: float, elapsed_s: float) -> None:
    """After `iteration`: estimate both losses, append them to metrics.jsonl, print them and write a checkpoint."""
    losses = estimate_loss(run.model, run.samplers["eval"], run.args.eval_iters, run.device)
    run.best_val = min(run.best_val, losses["val"])
    record = {"iter": iteration + 1, "train_loss": losses["train"], "val_loss": losses["val"], "lr": lr,
              "tokens_per_s": tokens_per_s, "elapsed_s": elapsed_s}
    if distributed.is_main():
        append_metrics(run.metrics_path, record)
    announce(f"iter {iteration + 1}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
    save_run(run, iteration)


class StopRequest:
    """Ctrl-C asks the loop to stop after the current step (so the checkpoint is consistent); a second one aborts."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc_info):
        signal.signal(signal.SIGINT, self._previous)


def append_metrics(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as file:
        file.write(json.dumps(record) + "\n")


def plot_losses(metrics_path: Path, image_path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("loss curve: matplotlib is not installed, skipping loss.png (pip install 'tinytf[plot]')")
        return
    records = [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines() if line]
    iters = [r["iter"] for r in records]
    figure, axes = plt.subplots(figsize=(7, 4))
    axes.plot(iters, [r["train_loss"] for r in records], label="train")
    axes.plot(iters, [r["val_loss"] for r in records], label="val")
    axes.set_xlabel("iteration")
    axes.set_ylabel("cross-entropy (nats/char)")
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(image_path, dpi=100)
    plt.close(figure)
    print(f"loss curve: {image_path}")


def train(args: argparse.Namespace) -> int:
    """The training loop; returns the exit status: 0 done, 1 the loss diverged, 130 interrupted (checkpoint saved)."""
    check_arguments(args)
    run = set_up_run(args)
    started = time.perf_counter()
    window_start, window_steps = started, 0
    with StopRequest() as stop, tqdm(range(run.start, args.iters), initial=run.start, total=args.iters, unit="step",
                                      mininterval=1.0, dynamic_ncols=True,
                                      disable=not distributed.is_main()) as progress:
        for iteration in progress:
            lr = lr_at(iteration, lr=args.lr, min_lr=args.min_lr, warmup_iters=run.warmup_iters,
                       decay_iters=args.iters)
            loss, stop_requested = agree_on_step(train_step(run, lr), stop.requested)
            if not math.isfinite(loss):
                progress.close()
                announce(f"stopping: the loss became {loss} at iteration {iteration}; "
                         f"the last good checkpoint in {args.out} is kept", file=sys.stderr)
                return 1
            window_steps += 1
            now = time.perf_counter()
            tokens_per_s = window_steps * run.tokens_per_step / max(now - window_start, 1e-9)
            progress.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)

            last_step = iteration == args.iters - 1
            if (iteration + 1) % args.eval_interval == 0 or last_step:
                evaluate_and_save(run, iteration, lr, tokens_per_s, elapsed_s=now - started)
                window_start, window_steps = time.perf_counter(), 0
            if stop_requested and not last_step:
                save_run(run, iteration)
                progress.close()
                announce(f"interrupted: saved a checkpoint at iteration {iteration + 1} in {args.out}; "
                         "continue with --resume")
                return 130
    if distributed.is_main() and run.metrics_path.exists():
        plot_losses(run.metrics_path, args.out / "loss.png")
    announce(f"done: {args.iters} iterations in {time.perf_counter() - started:.1f} s, "
             f"best val loss {run.best_val:.4f}; sample with: python -m tinytf.sample --ckpt {args.out}")
    return 0


@command_line("tinytf.train")
def main(argv: list[str] | None = None) -> int:
    exit_status = train(build_parser().parse_args(argv))
    # Under `python -m mpi4py` a rank that exits non-zero (1: NaN, 130: interrupted) ends the whole job at once, so
    # no rank leaves before the main rank has written its checkpoint.
    distributed.barrier()
    return exit_status


if __name__ == "__main__":
    sys.exit(main())
