"""Train a character-level GPT: `python -m tinytf.train --help`.

With no --data it trains on the text of Python's own documentation (the stdlib module pydoc_data), so it runs
offline on any machine. The output folder receives the prepared data, checkpoints (safetensors weights, JSON
state, written atomically), metrics.jsonl (one line per evaluation) and loss.png (when matplotlib is installed).

Mixed precision: --dtype bf16 or fp16 casts the model's weights and activations to bfloat16 or float16; AdamW steps
float32 master copies of the weights (kept in its state, so checkpoints hold them), and fp16 scales the loss
dynamically (tinytf.optim.GradScaler) so that small gradients do not flush to zero. Losses are computed and logged
in float32.

Data-parallel training over several processes (see tinytf.distributed): `mpiexec -n 2 python -m mpi4py -m tinytf.train
...`. --batch-size stays per rank. All ranks draw the same global batch of world_size * batch_size windows from one
sampler and each keeps its own rows, so the sampler state is one for the whole job: a checkpoint resumes under any
number of ranks, and W ranks with --batch-size b follow exactly the batches of one process with --batch-size W*b.
Dropout draws from a generator per rank (rank 0 keeps the single-process stream, the others are seeded apart).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import math
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import backend, distributed
from .checkpoint import (Checkpoint, CheckpointError, FolderInUse, FolderLock, has_checkpoint, load_checkpoint,
                         remove_checkpoint, remove_staging_folders, replace_folder_contents, save_checkpoint,
                         staging_folder, write_atomic)
from .cli import UserError, command_line, load_trained_model
from .data import BatchSampler, CharTokenizer, TokenDataset, default_corpus, prepare_dataset, read_text
from .models import GPT, GPTConfig
from .optim import AdamW, GradScaler, clip_grad_norm_, lr_at, weight_decay_groups
from .tensor import no_grad

MODEL_FLAGS = ("n_layer", "n_head", "n_kv_head", "n_embd", "block_size", "dropout", "bias", "mlp_hidden")
# Options a resumed run takes from its checkpoint unless given again on the command line.
TRAINING_OPTIONS = ("batch_size", "iters", "lr", "min_lr", "warmup_iters", "weight_decay", "beta1", "beta2",
                    "grad_clip", "eval_interval", "eval_iters", "seed")
TRAIN_FRACTION = 0.9  # of the text's characters go to the train split, the rest to val
# --dtype's accepted spellings -> the dtype's name, which the checkpoint records
DTYPE_NAMES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
               "fp16": "float16", "float16": "float16"}
SAVED_DTYPE_DEFAULT = "float32"  # of checkpoints older than --dtype
_NOT_GIVEN = object()


class _DefaultsOnceFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: ...)" only where the help text does not already say what the default is."""

    def _get_help_string(self, action):
        return action.help if "default" in (action.help or "") else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tinytf.train",
        description="Train a character-level GPT on a text file (default: Python's documentation, offline).",
        formatter_class=_DefaultsOnceFormatter,
    )
    data = parser.add_argument_group("data and output")
    data.add_argument("--data", type=Path, help="UTF-8 text file to train on (default: pydoc_data's text)")
    data.add_argument("--out", type=Path, default=Path("out"), help="folder for data, checkpoints and metrics")
    data.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    data.add_argument("--overwrite", action="store_true",
                      help="start a new run in an --out that holds one, deleting its checkpoint and metrics")
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
    evaluation.add_argument("--dtype", default="fp32",
                            help="weights and activations: fp32, bf16 or fp16 (bf16/fp16 keep float32 master weights "
                                 "in AdamW; fp16 also scales the loss)")
    evaluation.add_argument("--seed", type=int, default=1337, help="seed for weights, batches and dropout")
    return parser


def parse_arguments(argv: list[str] | None) -> tuple[argparse.Namespace, frozenset[str]]:
    """The arguments, and the names of the options given on the command line (argparse fills in defaults only for
    names the namespace lacks, so a namespace of placeholders tells the two apart)."""
    parser = build_parser()
    defaults = vars(parser.parse_args([]))
    args = parser.parse_args(argv, namespace=argparse.Namespace(**dict.fromkeys(defaults, _NOT_GIVEN)))
    given = frozenset(name for name, value in vars(args).items() if value is not _NOT_GIVEN)
    for name in defaults.keys() - given:
        setattr(args, name, defaults[name])
    return args, given


def warmup_iters(args: argparse.Namespace) -> int:
    """--warmup-iters, or by default 100 steps (iters // 20 for runs shorter than 2,000 steps)."""
    return min(100, args.iters // 20) if args.warmup_iters is None else args.warmup_iters


def dtype_name(name: str) -> str:
    """The dtype name ("float32", "bfloat16", "float16") that a --dtype value spells, or a UserError."""
    if name not in DTYPE_NAMES:
        raise UserError(f"--dtype must be fp32, bf16 or fp16 (or float32, bfloat16, float16), got {name!r}")
    return DTYPE_NAMES[name]


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
    if args.mlp_hidden is not None and args.mlp_hidden < 1:
        raise UserError(f"--mlp-hidden must be at least 1, got {args.mlp_hidden}")
    if args.n_kv_head is not None and args.n_head % args.n_kv_head:
        raise UserError(f"--n-head ({args.n_head}) must be a multiple of --n-kv-head ({args.n_kv_head})")
    if args.n_embd % args.n_head:
        raise UserError(f"--n-embd ({args.n_embd}) must be divisible by --n-head ({args.n_head})")
    if args.resume and args.overwrite:
        raise UserError("--resume continues the run in --out and --overwrite deletes it: pass one of them")


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
def read_corpus(args: argparse.Namespace) -> tuple[str, str]:
    """(text, its SHA-256) of --data, or of the default corpus."""
    text = read_text(args.data) if args.data is not None else default_corpus()
    return text, hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def check_splits(text: str, block_size: int) -> None:
    """Both splits must hold a window of block_size + 1 tokens: checked before anything is written."""
    train_tokens = int(len(text) * TRAIN_FRACTION)
    shortest = min(train_tokens, len(text) - train_tokens)
    if shortest < block_size + 1:
        raise UserError(f"the text has {len(text):,} characters: its {'train' if train_tokens == shortest else 'val'} "
                        f"split would hold {shortest}, fewer than --block-size + 1 = {block_size + 1}; use more text "
                        "or a smaller --block-size")


def start_fresh(args: argparse.Namespace, text: str) -> None:
    """Prepare `text` into `out/data` for a new run, then clear what an earlier run left in --out: its checkpoint
    (only with --overwrite: it is refused otherwise), and metrics.jsonl and loss.png, which describe a run that
    cannot be continued. The data is staged beside the old folder and moved in at once, and the old run is removed
    only once the new data is complete: a run killed while preparing leaves the old run as it was."""
    folder = args.out / "data"
    remove_staging_folders(folder)  # left by runs killed while preparing; this process owns --out now
    staging = staging_folder(folder)
    try:
        prepare_dataset(text, staging, train_fraction=TRAIN_FRACTION)
        if args.overwrite:
            remove_checkpoint(args.out)
        for name in ("metrics.jsonl", "loss.png"):
            (args.out / name).unlink(missing_ok=True)
        replace_folder_contents(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def load_dataset(args: argparse.Namespace, text: str | None) -> TokenDataset:
    """Prepare `text` into `out/data` on a new run (see `start_fresh`), or reopen the prepared data on --resume
    (text None).

    In a data-parallel run the main rank prepares the files and the other ranks open them, so --out must be a folder
    that every rank sees (a shared filesystem when the ranks run on several machines).
    """
    folder = args.out / "data"
    if text is not None and distributed.is_main():
        start_fresh(args, text)
    distributed.barrier()  # the other ranks open the files once the main rank has written them
    dataset = TokenDataset.open(folder)
    if text is not None:
        source = args.data or "pydoc_data.topics (Python's documentation)"
        announce(f"data: {source}: {len(text):,} characters, vocabulary of {dataset.tokenizer.vocab_size}, "
                 f"{len(dataset.splits['train']):,} train / {len(dataset.splits['val']):,} val tokens")
    return dataset


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
    scaler: GradScaler  # enabled for float16 only
    averager: distributed.GradientAverager
    samplers: dict[str, BatchSampler]  # "train" for the steps, "eval" for estimate_loss
    tokenizer: CharTokenizer
    data_sha256: str | None  # of the text the run trains on (None for checkpoints older than this field)
    start: int = 0  # the first iteration to run
    best_val: float = math.inf
    saved_iteration: int | None = None  # of the checkpoint in --out, None before the first one

    def kept_checkpoint(self) -> str:
        """What the folder holds after a stop: said to the user, so it must be true."""
        if self.saved_iteration is None:
            return f"no checkpoint was written to {self.args.out}"
        return f"the last good checkpoint (iteration {self.saved_iteration + 1}) in {self.args.out} is kept"

    @property
    def tokens_per_step(self) -> int:
        return self.args.batch_size * distributed.world_size() * self.model.config.block_size

    @property
    def metrics_path(self) -> Path:
        return self.args.out / "metrics.jsonl"


def check_out_folder(args: argparse.Namespace) -> None:
    """Refuse what would lose or mix up a run: a fresh run over a saved one, a resume with nothing to resume."""
    if args.resume and not has_checkpoint(args.out):
        raise UserError(f"--resume: {args.out} holds no checkpoint to continue; start a new run without --resume")
    if not args.resume and not args.overwrite and has_checkpoint(args.out):
        raise UserError(f"{args.out} holds a run already: continue it with --resume, start it again with "
                        "--overwrite (its checkpoint and metrics are deleted), or choose another --out")


def take_saved_options(args: argparse.Namespace, given: frozenset[str], checkpoint: Checkpoint) -> None:
    """On --resume: the checkpoint's model, and its training options unless given again; a model flag that
    disagrees with the checkpoint, or --data naming another text, is refused rather than ignored."""
    saved = checkpoint.meta.get("train_args")
    config = checkpoint.meta.get("config")
    if not isinstance(saved, dict) or not isinstance(config, dict):
        raise UserError(f"cannot resume from {args.out}: its checkpoint has no training arguments or config")
    saved_model = {**config, "preset": saved.get("preset"), "dtype": saved.get("dtype", SAVED_DTYPE_DEFAULT)}
    model_options = ("preset", "dtype", *MODEL_FLAGS)
    conflicts = [f"--{name.replace('_', '-')} {getattr(args, name)} (the checkpoint has {saved_model.get(name)})"
                 for name in model_options if name in given and getattr(args, name) != saved_model.get(name)]
    if conflicts:
        raise UserError(f"--resume continues the model saved in {args.out}, which these flags contradict: "
                        f"{', '.join(conflicts)}; drop them, or start a new run in another --out")
    for name in model_options:
        setattr(args, name, saved_model.get(name, getattr(args, name)))
    for name in TRAINING_OPTIONS:
        if name not in given and name in saved:
            setattr(args, name, saved[name])
        elif name in given and name in saved and getattr(args, name) != saved[name]:
            announce(f"resume: --{name.replace('_', '-')} {getattr(args, name)} replaces the saved {saved[name]}")
    if "data" in given:
        _, data_sha256 = read_corpus(args)
        if data_sha256 != checkpoint.meta.get("data_sha256", data_sha256):
            raise UserError(f"--data {args.data} is not the text the run in {args.out} was trained on "
                            f"({saved.get('data')}); drop --data to continue on the prepared data")


def set_up_run(args: argparse.Namespace, checkpoint: Checkpoint | None) -> Run:
    """Data, model, optimizer and samplers of a new run, or of the run in `checkpoint` on --resume. Every check
    (the data, the device, the model's settings) runs before anything is written to --out."""
    text = data_sha256 = None
    try:
        device = backend.check_device(rank_device(args.device))
        if checkpoint is None:
            text, data_sha256 = read_corpus(args)
            check_splits(text, args.block_size)
            overrides = {name: getattr(args, name) for name in MODEL_FLAGS}
            config = GPTConfig.from_preset(args.preset, vocab_size=CharTokenizer.from_text(text).vocab_size,
                                           **overrides)
        else:
            data_sha256 = checkpoint.meta.get("data_sha256")
    except (OSError, ValueError, RuntimeError) as error:  # a bad data file, an unusable device or MPI
        raise UserError(str(error)) from None
    try:
        dataset = load_dataset(args, text)
    except (OSError, ValueError) as error:
        raise UserError(f"cannot {'prepare' if text is not None else 'open'} the data in {args.out / 'data'}: "
                        f"{error}") from None
    backend.manual_seed(args.seed)
    dtype = backend.as_dtype(args.dtype)
    if checkpoint is not None:
        model, tokenizer, _ = load_trained_model(args.out, device, checkpoint, dtype)
        if tokenizer.to_dict() != dataset.tokenizer.to_dict():
            raise UserError(f"the prepared data in {args.out / 'data'} (a vocabulary of {dataset.tokenizer.vocab_size}) "
                            f"is not the data the checkpoint was trained on (a vocabulary of {tokenizer.vocab_size}); "
                            "start a new run with --overwrite or another --out")
        model.train()
    else:
        model = GPT(config).to(device, dtype)  # initialised in float32, then rounded to nearest even
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
        # bfloat16 has float32's exponent range, so only float16's gradients need scaling into range
        scaler=GradScaler(enabled=dtype == backend.FLOAT16),
        averager=distributed.GradientAverager(model.parameters()),
        samplers={"train": BatchSampler(dataset.splits, global_batch_size, block_size, seed=args.seed),
                  "eval": BatchSampler(dataset.splits, global_batch_size, block_size, seed=args.seed + 1)},
        tokenizer=dataset.tokenizer,
        data_sha256=data_sha256,
    )
    if checkpoint is not None:
        restore_run(run, checkpoint)
    config = model.config
    announce(f"model: {args.preset if checkpoint is None else 'resumed'} {config.n_layer} layers, {config.n_head} heads "
             f"({config.n_kv_head} kv), width {config.n_embd}, block {config.block_size}: "
             f"{model.num_parameters() / 1e6:.2f}M parameters on {device} in {dtype}")
    if world > 1:
        announce(f"data parallel: {world} ranks x {args.batch_size} sequences = {global_batch_size} sequences "
                 f"({run.tokens_per_step:,} tokens) per step")
    return run


def restore_run(run: Run, checkpoint: Checkpoint) -> None:
    """Continue where the checkpoint stands: its iteration, best loss, optimizer state, dropout and batch streams."""
    if checkpoint.optimizer_state is None:
        raise UserError(f"the checkpoint in {run.args.out} has no optimizer state to resume from")
    try:
        iteration, best_val = checkpoint.meta["iteration"], float(checkpoint.meta["best_val_loss"])
        if not isinstance(iteration, int) or iteration < 0:
            raise ValueError(f"iteration {iteration!r} is not a count")
        run.optimizer.load_state_dict(checkpoint.optimizer_state)
        run.scaler.load_state_dict(checkpoint.meta.get("grad_scaler", {}))
        restore_dropout_rng(checkpoint.meta["rng"], run.args.seed)
        for name, sampler in run.samplers.items():
            sampler.load_state_dict(checkpoint.meta["rng"][f"sampler_{name}"])
    except (KeyError, TypeError, ValueError) as error:  # a manifest edited by hand, or damaged
        raise UserError(f"cannot resume from the checkpoint in {run.args.out}: its state is damaged "
                        f"({type(error).__name__}: {error})") from None
    run.start, run.best_val, run.saved_iteration = iteration + 1, best_val, iteration
    if run.args.iters <= run.start:
        raise UserError(f"the run in {run.args.out} has done {run.start} iterations; pass --iters above that to "
                        "continue it")
    keep_metrics_up_to(run.metrics_path, run.start)
    announce(f"resumed from {run.args.out} at iteration {run.start}")


def keep_metrics_up_to(path: Path, iterations: int) -> None:
    """Drop the metrics of iterations past the checkpoint (a run killed after evaluating, before saving, or mid
    line), so that metrics.jsonl describes the one run that continues."""
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
        if isinstance(record, dict) and isinstance(record.get("iter"), int) and record["iter"] <= iterations:
            kept.append(line)
    if kept != lines:
        write_atomic(path, "".join(line + "\n" for line in kept).encode("utf-8"))


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
        "data_sha256": run.data_sha256,
        "grad_scaler": run.scaler.state_dict(),  # {} unless float16
        "train_args": {key: str(value) if isinstance(value, Path) else value for key, value in train_args.items()},
        "rng": {"tinytf": dropout_states[0], "tinytf_other_ranks": dropout_states[1:],
                **{f"sampler_{name}": sampler.state_dict() for name, sampler in run.samplers.items()}},
    }
    try:
        save_checkpoint(run.args.out, {name: backend.to_numpy(a) for name, a in run.model.state_dict().items()},
                        meta, run.optimizer.state_dict())
    except OSError as error:  # a full disk, a quota, a folder made read-only: the previous checkpoint is whole
        raise UserError(f"cannot save the checkpoint at iteration {iteration + 1}: {describe_os_error(error)}; "
                        f"{run.kept_checkpoint()}") from None
    run.saved_iteration = iteration


def describe_os_error(error: OSError) -> str:
    """'No space left on device (out/.weights-1a2b3c4d.safetensors.5e6f7a8b.tmp)': what failed, and where."""
    where = f" ({error.filename})" if error.filename else ""
    return f"{error.strerror or error}{where}"


def weights_are_finite(run: Run) -> bool:
    with backend.device_scope(run.device):
        return all(bool(backend.get_array_module(p.data).isfinite(p.data).all()) for p in run.model.parameters())


def load_run_checkpoint(folder: Path) -> Checkpoint:
    try:
        return load_checkpoint(folder)
    except CheckpointError as error:
        raise UserError(f"cannot load the checkpoint in {folder}: {error}") from None


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
    run.scaler.scale(loss).backward()  # float16: the loss times the scale; otherwise the loss itself
    run.averager.average()  # data parallel: every rank now holds the gradient of the whole global batch
    if run.args.grad_clip > 0:
        run.scaler.unscale_(run.optimizer)  # the clip must see the true gradients
        clip_grad_norm_(run.model.parameters(), run.args.grad_clip)
    run.scaler.step(run.optimizer)  # float16: skipped (and the scale halved) when a gradient overflowed
    run.scaler.update()
    return loss.item()


def evaluate_and_save(run: Run, iteration: int, lr: float, tokens_per_s: float, elapsed_s: float) -> bool:
    """After `iteration`: estimate both losses, append them to metrics.jsonl, print them and write a checkpoint.

    Returns False, writing nothing, when a loss or a weight is not finite: a diverged model never replaces the
    last good checkpoint."""
    losses = estimate_loss(run.model, run.samplers["eval"], run.args.eval_iters, run.device)
    if not (math.isfinite(losses["train"]) and math.isfinite(losses["val"]) and weights_are_finite(run)):
        return False
    run.best_val = min(run.best_val, losses["val"])
    record = {"iter": iteration + 1, "train_loss": losses["train"], "val_loss": losses["val"], "lr": lr,
              "tokens_per_s": tokens_per_s, "elapsed_s": elapsed_s}
    if distributed.is_main():
        try:
            append_metrics(run.metrics_path, record)
        except OSError as error:
            raise UserError(f"cannot write {run.metrics_path}: {describe_os_error(error)}; "
                            f"{run.kept_checkpoint()}") from None
    announce(f"iter {iteration + 1}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
    save_run(run, iteration)
    return True


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
    image = io.BytesIO()
    figure.savefig(image, format="png", dpi=100)
    plt.close(figure)
    try:
        write_atomic(image_path, image.getvalue())
    except OSError as error:  # the run itself is saved; only the picture is missing
        print(f"loss curve: cannot write {image_path}: {describe_os_error(error)}", file=sys.stderr)
        return
    print(f"loss curve: {image_path}")


def train(args: argparse.Namespace, given: frozenset[str] | None = None) -> int:
    """Train, holding --out for the whole run; returns the exit status: 0 done, 1 the loss diverged, 130
    interrupted (checkpoint saved).

    `given`: the options given on the command line (by default, those that differ from the parser's defaults);
    on --resume the others come from the checkpoint. `args` itself is left unchanged."""
    args = argparse.Namespace(**vars(args))
    if given is None:
        defaults = vars(build_parser().parse_args([]))
        given = frozenset(name for name, value in vars(args).items() if defaults.get(name) != value)
    args.dtype = dtype_name(args.dtype)
    with own_out_folder(args.out):
        check_out_folder(args)
        checkpoint = None
        if args.resume:
            checkpoint = load_run_checkpoint(args.out)
            take_saved_options(args, given, checkpoint)
        check_arguments(args)
        return train_loop(set_up_run(args, checkpoint))


@contextlib.contextmanager
def own_out_folder(out: Path):
    """Hold the lock on --out while the run reads and writes it, so that a second run into the same folder is
    refused instead of crashing one of them mid-save. A lock left by a killed run is taken over. Only the main
    rank locks: in a data-parallel run the other ranks write nothing to --out."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a folder (it is created if missing)")
    try:
        main_rank = distributed.is_main()
    except RuntimeError as error:  # an MPI launch without mpi4py
        raise UserError(str(error)) from None
    if not main_rank:
        yield
        return
    with contextlib.ExitStack() as stack:
        try:
            lock = stack.enter_context(FolderLock(out))
        except FolderInUse as error:
            raise UserError(f"{error}: another run is using this --out; wait for it to end or choose another "
                            "--out") from None
        except OSError as error:
            raise UserError(f"cannot use --out {out}: {error.strerror or error}") from None
        if not lock.locked:
            announce(f"warning: this filesystem cannot lock {out}; make sure no other run uses it at the same time",
                     file=sys.stderr)
        elif lock.stale_holder is not None:
            announce(f"note: the run before this one in {out} (pid {lock.stale_holder.get('pid', '?')}) did not end "
                     "cleanly; its lock is taken over")
        yield


def train_loop(run: Run) -> int:
    """The steps from run.start to --iters, with evaluation, checkpoints, divergence and Ctrl-C handling."""
    args = run.args
    started = time.perf_counter()
    window_start, window_steps = started, 0
    # A diverging run overflows: its non-finite loss or weights are caught and reported in one line below, so
    # NumPy's warnings about them would only bury that line.
    with StopRequest() as stop, np.errstate(over="ignore", invalid="ignore", divide="ignore"), \
            tqdm(range(run.start, args.iters), initial=run.start, total=args.iters, unit="step", mininterval=1.0,
                 dynamic_ncols=True, disable=not distributed.is_main()) as progress:
        for iteration in progress:
            lr = lr_at(iteration, lr=args.lr, min_lr=args.min_lr, warmup_iters=run.warmup_iters,
                       decay_iters=args.iters)
            loss, stop_requested = agree_on_step(train_step(run, lr), stop.requested)
            if not math.isfinite(loss):
                progress.close()
                announce(f"stopping: the loss became {loss} at iteration {iteration + 1}; {run.kept_checkpoint()}",
                         file=sys.stderr)
                return 1
            window_steps += 1
            now = time.perf_counter()
            tokens_per_s = window_steps * run.tokens_per_step / max(now - window_start, 1e-9)
            progress.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)

            last_step = iteration == args.iters - 1
            if (iteration + 1) % args.eval_interval == 0 or last_step:
                if not evaluate_and_save(run, iteration, lr, tokens_per_s, elapsed_s=now - started):
                    progress.close()
                    announce(f"stopping: the loss estimate or the weights stopped being finite at iteration "
                             f"{iteration + 1} (the model diverged; try a lower --lr or --grad-clip); "
                             f"{run.kept_checkpoint()}", file=sys.stderr)
                    return 1
                window_start, window_steps = time.perf_counter(), 0
            if stop_requested and not last_step:
                if not weights_are_finite(run):
                    progress.close()
                    announce(f"interrupted at iteration {iteration + 1} with weights that are not finite; "
                             f"{run.kept_checkpoint()}", file=sys.stderr)
                    return 1
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
    exit_status = train(*parse_arguments(argv))
    # Under `python -m mpi4py` a rank that exits non-zero (1: NaN, 130: interrupted) ends the whole job at once, so
    # no rank leaves before the main rank has written its checkpoint.
    distributed.barrier()
    return exit_status


if __name__ == "__main__":
    sys.exit(main())
