"""Train a GPT on text, character- or BPE-level: `python -m tinytf.train --help`.

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

Gradient accumulation: --grad-accum N draws a step's N micro-batches as one global batch of N * world_size *
batch_size windows, so any split of the same number of sequences into micro-batches, ranks and batch size trains on
the same windows; the micro-batch losses are divided by N, and the averaging over ranks, the clip and the optimizer
step run once per step.

Fine-tuning: --init-from starts from a Hugging Face folder (tinytf.interop) or a tinytf run, with its architecture,
a lower default learning rate and --freeze; --save-hf writes the result back as a Hugging Face folder.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fnmatch
import json
import math
import shlex
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
from .data import (
    BatchSampler,
    CharTokenizer,
    Corpus,
    TokenDataset,
    document_positions,
    prepare_dataset,
    prepare_shards,
)
from .interop import from_pretrained, save_pretrained
from .models import GPT, PRESETS, GPTConfig
from .nn import skip_init
from .optim import AdamW, GradScaler, clip_grad_norm_, lr_at, weight_decay_groups
from .tensor import no_grad
from .tokenization import Tokenizer, tokenizer_from_spec
from .viz import plot_loss_curves

MODEL_FLAGS = ("n_layer", "n_head", "n_kv_head", "n_embd", "block_size", "dropout", "bias", "mlp_hidden")
# Options a resumed run takes from its checkpoint unless given again on the command line.
TRAINING_OPTIONS = ("batch_size", "grad_accum", "iters", "lr", "min_lr", "warmup_iters", "weight_decay", "beta1",
                    "beta2", "grad_clip", "eval_interval", "eval_iters", "seed", "peak_tflops", "init_from", "save_hf",
                    "document_masking")
PRETRAINING_LR = 1e-3
NO_DOCUMENT_END = ("--document-masking needs a tokenizer with an end-of-text token to find where documents end; "
                   "--tokenizer {tokenizer} has none (use a BPE tokenizer: bpe:N, a tokenizer.json or tiktoken)")
# nanoGPT's finetune_shakespeare rate: a pretrained model moves far less than a random one should
FINETUNING_LR = 3e-5
# Dense peak TFLOP/s by (a part of) CuPy's device name, first match wins: bf16/fp16 on tensor cores, fp32 without
# them (NVIDIA's data sheets). MFU divides the model's FLOPs per second by the peak of the run's dtype.
GPU_PEAK_TFLOPS = (
    ("H100 PCIe", {"bfloat16": 756.0, "float16": 756.0, "float32": 51.0}),
    ("H100", {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0}),
    ("H200", {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0}),
    ("A100", {"bfloat16": 312.0, "float16": 312.0, "float32": 19.5}),
    ("V100", {"float16": 125.0, "float32": 15.7}),
)
TRAIN_FRACTION = 0.9  # of the tokens go to the train split, the rest to val
# --dtype's accepted spellings -> the dtype's name, which the checkpoint records
DTYPE_NAMES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
               "fp16": "float16", "float16": "float16"}
SAVED_DTYPE_DEFAULT = "float32"  # of checkpoints older than --dtype
_NOT_GIVEN = object()


class _DefaultsOnceFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: ...)" only where the help text does not already say what the default is."""

    def _get_help_string(self, action):
        return action.help if "default" in (action.help or "") else super()._get_help_string(action)


class _RecipeParser(argparse.ArgumentParser):
    """Reads @FILE arguments as the recipes in examples/recipes/ write them: flags as on a command line, any number
    per line, # to the end of a line a comment."""

    def convert_arg_line_to_args(self, arg_line: str) -> list[str]:
        return shlex.split(arg_line, comments=True)


def build_parser() -> argparse.ArgumentParser:
    parser = _RecipeParser(
        prog="python -m tinytf.train",
        description="Train a GPT on text, character- or BPE-level (default: Python's documentation, offline).",
        epilog="@FILE reads flags from FILE (# starts a comment), as in: python -m tinytf.train "
               "@examples/recipes/finetune_gpt2_shakespeare.args; flags after it override the file's.",
        formatter_class=_DefaultsOnceFormatter,
        fromfile_prefix_chars="@",
    )
    data = parser.add_argument_group("data and output")
    data.add_argument("--data", type=Path,
                      help="UTF-8 text to train on: a file (one document), a folder of files, or a .jsonl file (one "
                           "document per line) (default: pydoc_data's text)")
    data.add_argument("--text-field", default="text", help="the field of .jsonl records that holds the text")
    data.add_argument("--tokenizer", default="char",
                      help="char; a tokenizer.json file or a model folder holding one (GPT-2's, Llama's); bpe:N, a "
                           "byte-level BPE of N tokens trained on --data; or tiktoken:NAME (tiktoken installed)")
    data.add_argument("--document-masking", action="store_true",
                      help="a training window that spans several documents attends within each, with positions "
                           "restarting at each (varlen attention); needs a tokenizer with an end-of-text token")
    data.add_argument("--data-workers", type=int, default=None,
                      help="processes that encode the data, for tokenizers other than char (default: the CPUs)")
    data.add_argument("--out", type=Path, default=Path("out"), help="folder for data, checkpoints and metrics")
    data.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    data.add_argument("--overwrite", action="store_true",
                      help="start a new run in an --out that holds one, deleting its checkpoint and metrics")
    data.add_argument("--init-from", type=Path, metavar="PATH",
                      help="fine-tune: start from a Hugging Face GPT-2/Llama/Mistral/Qwen2/Gemma 2 folder or a tinytf "
                           "run folder, with its architecture (default: random weights)")
    data.add_argument("--save-hf", metavar="DIR",
                      help="also write the trained model as a Hugging Face folder when the run ends (default: "
                           "OUT/hf when --init-from is a Hugging Face folder, else none)")
    model = parser.add_argument_group("model (nanoGPT's CPU shakespeare_char configuration by default)")
    model.add_argument("--preset", choices=tuple(PRESETS), default="gpt2",
                       help="gpt2: learned positions, LayerNorm, GELU; llama: RoPE, RMSNorm, SwiGLU, GQA; gemma2: "
                            "llama's with GeGLU, norms around attention and MLP, soft-capped attention and logits")
    model.add_argument("--n-layer", type=int, default=4, help="number of decoder blocks")
    model.add_argument("--n-head", type=int, default=4, help="query heads per attention layer")
    model.add_argument("--n-kv-head", type=int, default=None,
                       help="key/value heads (GQA); default: n_head for gpt2, n_head // 2 for llama and gemma2")
    model.add_argument("--n-embd", type=int, default=128, help="width of the residual stream")
    model.add_argument("--block-size", type=int, default=64, help="context length in characters")
    model.add_argument("--dropout", type=float, default=0.0, help="dropout probability")
    model.add_argument("--mlp-hidden", type=int, default=None, help="MLP hidden width (default: preset's rule)")
    model.add_argument("--bias", action=argparse.BooleanOptionalAction, default=None,
                       help="biases in Linear and LayerNorm layers (default: the preset's; nanoGPT trains without)")
    model.add_argument("--freeze", action=_PatternList, default=[], metavar="PATTERN",
                       help="parameters whose names match (fnmatch; repeatable or comma-separated, e.g. 'wte.*,"
                            "blocks.0.*') get no gradient and no optimizer state (default: train all)")
    optimization = parser.add_argument_group("optimization (AdamW, warmup then cosine decay)")
    optimization.add_argument("--batch-size", type=int, default=12,
                              help="sequences per micro-batch (per rank in data-parallel runs)")
    optimization.add_argument("--grad-accum", type=int, default=1, metavar="N",
                              help="micro-batches whose gradients add up to one step: a step sees grad_accum x "
                                   "ranks x batch_size sequences")
    optimization.add_argument("--iters", type=int, default=2000, help="training steps")
    optimization.add_argument("--lr", type=float, default=None,
                              help=f"peak learning rate (default: {PRETRAINING_LR:g}, or {FINETUNING_LR:g} with "
                                   "--init-from)")
    optimization.add_argument("--min-lr", type=float, default=None,
                              help="learning rate at the end of the decay (default: --lr / 10)")
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
    evaluation.add_argument("--peak-tflops", type=float, default=None,
                            help="the device's peak TFLOP/s for the model FLOPs utilisation (MFU) in the log "
                                 "(default: known GPUs' peak for --dtype, none on the CPU)")
    evaluation.add_argument("--dry-run", action="store_true",
                            help="build the model, take one step at a tiny batch, print the parameter count and the "
                                 "memory per device the real batch needs, and exit without writing anything")
    return parser


class _PatternList(argparse.Action):
    """--freeze: patterns from every use of the flag, each split at commas."""

    def __call__(self, parser, namespace, values, option_string=None):
        earlier = getattr(namespace, self.dest)
        patterns = [pattern.strip() for pattern in values.split(",")]
        setattr(namespace, self.dest, (earlier if isinstance(earlier, list) else []) + patterns)


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
    positive = ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "grad_accum", "iters", "eval_interval",
                "eval_iters")
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
    if args.document_masking and args.tokenizer == "char" and not args.resume:
        raise UserError(NO_DOCUMENT_END.format(tokenizer="char"))
    if args.peak_tflops is not None and not 0 < args.peak_tflops < math.inf:
        raise UserError(f"--peak-tflops must be a positive number of TFLOP/s, got {args.peak_tflops}")
    if "" in args.freeze:
        raise UserError(f"--freeze takes parameter name patterns such as 'wte.*', got an empty one in {args.freeze}")
    if args.save_hf is not None and Path(args.save_hf).is_file():
        raise UserError(f"--save-hf {args.save_hf} is a file; pass a folder (it is created if missing)")


def resolve_defaults(args: argparse.Namespace) -> None:
    """Fill in the defaults that depend on other options: --lr (lower when fine-tuning), --min-lr and --save-hf."""
    if args.lr is None:
        args.lr = FINETUNING_LR if args.init_from is not None else PRETRAINING_LR
    if args.min_lr is None:
        args.min_lr = args.lr / 10
    if args.save_hf is None and args.init_from is not None and is_hf_folder(args.init_from):
        args.save_hf = str(args.out / "hf")


# --- fine-tuning: the model a run starts from -------------------------------------------------------------------------
HF_TOKENIZER_SETTINGS = ("tokenizer_config.json", "special_tokens_map.json")  # copied from --init-from to --save-hf


@dataclass
class StartingModel:
    """--init-from's model (float32, on the CPU, dropout set by --dropout) and, from a tinytf run, its tokenizer."""

    model: GPT
    tokenizer: Tokenizer | None  # None for a Hugging Face folder: its vocabulary is the data's to fit


def is_hf_folder(path) -> bool:
    return (Path(path) / "config.json").is_file()


def preset_of(config: GPTConfig) -> str:
    """The --preset whose architecture (norm, MLP, positions) `config` has."""
    for name, settings in PRESETS.items():
        if all(getattr(config, key) == settings[key] for key in ("norm", "mlp", "pos")):
            return name
    raise UserError(f"the model has norm={config.norm}, mlp={config.mlp}, pos={config.pos}, which no --preset "
                    f"({', '.join(PRESETS)}) trains")


def load_starting_model(args: argparse.Namespace, given: frozenset[str]) -> StartingModel:
    """The model of --init-from, whose settings become the run's model flags (a flag given with another value is
    refused); --dropout, a training setting rather than a weight, applies to it."""
    path = args.init_from
    try:
        if is_hf_folder(path):
            source, tokenizer, preset = from_pretrained(path), None, None
        elif has_checkpoint(path):
            source, tokenizer, checkpoint = load_trained_model(path)
            preset = checkpoint.meta.get("train_args", {}).get("preset")
        else:
            raise UserError(f"--init-from {path} is neither a Hugging Face model folder (config.json and "
                            "model.safetensors) nor a tinytf run folder (checkpoint.json)")
    except CheckpointError as error:
        raise UserError(f"--init-from: {error}") from None
    config = source.config
    saved = {**config.to_dict(), "preset": preset or preset_of(config)}
    flags = ("preset", *(name for name in MODEL_FLAGS if name != "dropout"))
    conflicts = [f"--{name.replace('_', '-')} {getattr(args, name)} (the model has {saved[name]})"
                 for name in flags if name in given and getattr(args, name) != saved[name]]
    if conflicts:
        raise UserError(f"--init-from {path} brings its architecture, which these flags contradict: "
                        f"{', '.join(conflicts)}; drop them")
    for name in flags:
        setattr(args, name, saved[name])
    with skip_init():  # every weight comes from the source
        model = GPT(dataclasses.replace(config, dropout=args.dropout))
    model.load_state_dict(source.state_dict())
    freeze_parameters(model, args.freeze)  # a bad pattern is refused before anything is written
    return StartingModel(model.train(), tokenizer)


def check_start_fits_data(start: StartingModel, data_tokenizer: Tokenizer, path) -> None:
    """The data's token ids (from `data_tokenizer`, any of tinytf's tokenizers) must mean to the model what they
    meant in its training."""
    if start.tokenizer is not None and start.tokenizer.to_dict() != data_tokenizer.to_dict():
        raise UserError(f"--init-from {path} was trained with another tokenizer (a vocabulary of "
                        f"{start.tokenizer.vocab_size}) than this data's (a vocabulary of {data_tokenizer.vocab_size})")
    if data_tokenizer.vocab_size > start.model.config.vocab_size:
        raise UserError(f"the data's tokenizer has a vocabulary of {data_tokenizer.vocab_size}, more than the "
                        f"{start.model.config.vocab_size} tokens of --init-from {path}; tokenize with the model's own "
                        "tokenizer")


def freeze_parameters(model: GPT, patterns: list[str]) -> None:
    """Switch off the gradients of the parameters whose names match one of `patterns` (fnmatch): they get no
    gradient and no optimizer state. A pattern that matches nothing is refused: a typo would silently train all."""
    names = dict(model.named_parameters())
    unmatched = [pattern for pattern in patterns if not fnmatch.filter(names, pattern)]
    if unmatched:
        raise UserError(f"--freeze {', '.join(unmatched)} matches no parameter; the model's parameters are named "
                        f"like {', '.join(list(names)[:3])}, ..., {list(names)[-1]}")
    frozen = {name for pattern in patterns for name in fnmatch.filter(names, pattern)}
    if patterns and len(frozen) == len(names):
        raise UserError(f"--freeze {','.join(patterns)} freezes every parameter: nothing would train")
    for name in frozen:
        names[name].requires_grad_(False)


def export_hf(run: Run) -> None:
    """Write the trained model as a Hugging Face folder (--save-hf) that transformers loads with its tokenizer: the
    run's tokenizer as tokenizer.json (when it is a Hugging Face one), and the tokenizer settings of --init-from's
    folder (its end-of-text and padding tokens)."""
    folder = Path(run.args.save_hf)
    description = run.tokenizer.to_dict()
    source = Path(run.args.init_from) if run.args.init_from is not None else None
    try:
        save_pretrained(run.model, folder)
        if description.get("type") == "huggingface":
            write_atomic(folder / "tokenizer.json", description["tokenizer_json"].encode("utf-8"))
        for name in HF_TOKENIZER_SETTINGS if source is not None and is_hf_folder(source) else ():
            if (source / name).is_file():
                write_atomic(folder / name, (source / name).read_bytes())
    except OSError as error:
        raise UserError(f"cannot write the Hugging Face folder {folder}: {describe_os_error(error)}; "
                        f"{run.kept_checkpoint()}") from None
    announce(f"Hugging Face folder: {folder} (transformers.AutoModelForCausalLM.from_pretrained loads it)")


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
def read_corpus(args: argparse.Namespace) -> tuple[Corpus, str]:
    """--data as a corpus streamed from disk (by default Python's documentation), and its SHA-256 (one pass)."""
    if args.data_workers is not None and args.data_workers < 1:
        raise UserError(f"--data-workers must be at least 1, got {args.data_workers}")
    corpus = Corpus(args.data, args.text_field)
    return corpus, corpus.sha256()


def build_tokenizer(args: argparse.Namespace, corpus: Corpus):
    """The tokenizer --tokenizer names, fitted on `corpus` for char and bpe:N (one more pass over it)."""
    try:
        return tokenizer_from_spec(args.tokenizer, corpus.texts)
    except ImportError as error:  # tokenizers or tiktoken missing: said in one line, with the command to install it
        raise UserError(str(error)) from None


def check_splits(dataset: TokenDataset, block_size: int) -> None:
    """Both splits must hold a window of block_size + 1 tokens: checked on the staged data, before the old run is
    touched."""
    counts = dataset.token_counts
    shortest = min(counts, key=counts.get)
    if counts[shortest] < block_size + 1:
        raise UserError(f"the text has {sum(counts.values()):,} tokens: its {shortest} split would hold "
                        f"{counts[shortest]}, fewer than --block-size + 1 = {block_size + 1}; use more text or a "
                        "smaller --block-size")


def start_fresh(args: argparse.Namespace, corpus: Corpus, tokenizer) -> None:
    """Prepare `corpus` into `out/data` for a new run, then clear what an earlier run left in --out: its checkpoint
    (only with --overwrite: it is refused otherwise), and metrics.jsonl and loss.png, which describe a run that
    cannot be continued. The data is staged beside the old folder and moved in at once, and the old run is removed
    only once the new data is complete: a run killed while preparing leaves the old run as it was.

    Character-level runs encode the text in memory into train.bin and val.bin; the other tokenizers stream the
    corpus through --data-workers processes into shards."""
    folder = args.out / "data"
    remove_staging_folders(folder)  # left by runs killed while preparing; this process owns --out now
    staging = staging_folder(folder)
    try:
        if isinstance(tokenizer, CharTokenizer):
            dataset = prepare_dataset(corpus.text(), staging, train_fraction=TRAIN_FRACTION, tokenizer=tokenizer)
        else:
            dataset = prepare_shards(corpus, staging, tokenizer, train_fraction=TRAIN_FRACTION,
                                     workers=args.data_workers)
        check_splits(dataset, args.block_size)
        if args.overwrite:
            remove_checkpoint(args.out)
        for name in ("metrics.jsonl", "loss.png"):
            (args.out / name).unlink(missing_ok=True)
        replace_folder_contents(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def load_dataset(args: argparse.Namespace, corpus: Corpus | None = None, tokenizer=None) -> TokenDataset:
    """Prepare `corpus` with `tokenizer` into `out/data` on a new run (see `start_fresh`), or reopen the prepared
    data on --resume (corpus None).

    In a data-parallel run the main rank prepares the files and the other ranks open them, so --out must be a folder
    that every rank sees (a shared filesystem when the ranks run on several machines).
    """
    folder = args.out / "data"
    if corpus is not None and distributed.is_main():
        start_fresh(args, corpus, tokenizer)
    distributed.barrier()  # the other ranks open the files once the main rank has written them
    dataset = TokenDataset.open(folder)
    if corpus is not None:
        documents, counts = dataset.manifest["documents"], dataset.token_counts
        in_documents = f" in {documents:,} documents" if documents > 1 else ""
        announce(f"data: {corpus.describe()}: {dataset.manifest['characters']:,} characters{in_documents}, "
                 f"vocabulary of {dataset.tokenizer.vocab_size}, {counts['train']:,} train / {counts['val']:,} val "
                 "tokens")
    return dataset


def rank_batch(sampler: BatchSampler, split: str, device: str, eot_id: int | None = None):
    """This rank's rows of the sampler's next global batch of `split`, on `device`: model_inputs of them."""
    return model_inputs(*(distributed.shard(rows) for rows in sampler.get_batch(split)), device, eot_id)


def model_inputs(inputs: np.ndarray, targets: np.ndarray, device: str, eot_id: int | None) -> tuple:
    """(inputs, targets, position_ids) on `device`, for GPT.forward: position_ids number the tokens inside their
    documents when documents end with `eot_id` (--document-masking), else None."""
    positions = None if eot_id is None else backend.to_device(document_positions(inputs, eot_id), device)
    return backend.to_device(inputs, device), backend.to_device(targets, device), positions


def document_end(run: Run) -> int | None:
    """The token that ends documents, where --document-masking keeps attention inside them; else None."""
    return run.tokenizer.eot_id if run.args.document_masking else None


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
    tokenizer: Tokenizer
    data_sha256: str | None  # of the text the run trains on (None for checkpoints older than this field)
    start: int = 0  # the first iteration to run
    best_val: float = math.inf
    saved_iteration: int | None = None  # of the checkpoint in --out, None before the first one
    peak_tflops: float | None = None  # of this rank's device in the run's dtype, for MFU (None: unknown)

    def kept_checkpoint(self) -> str:
        """What the folder holds after a stop: said to the user, so it must be true."""
        if self.saved_iteration is None:
            return f"no checkpoint was written to {self.args.out}"
        return f"the last good checkpoint (iteration {self.saved_iteration + 1}) in {self.args.out} is kept"

    @property
    def tokens_per_step(self) -> int:
        return self.args.grad_accum * self.args.batch_size * distributed.world_size() * self.model.config.block_size

    def model_flops_utilisation(self, tokens_per_s: float) -> float | None:
        """The fraction of the devices' peak that the model's FLOPs at `tokens_per_s` (whole job) take; None when
        the peak is unknown."""
        if self.peak_tflops is None:
            return None
        per_device = tokens_per_s / distributed.world_size() * model_flops_per_token(self.model)
        return per_device / (self.peak_tflops * 1e12)

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
    saved_model = {**config, "preset": saved.get("preset"), "dtype": saved.get("dtype", SAVED_DTYPE_DEFAULT),
                   "freeze": saved.get("freeze", [])}
    model_options = ("preset", "dtype", "freeze", *MODEL_FLAGS)  # --freeze: the optimizer state has its groups
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
    saved_tokenizer = saved.get("tokenizer", "char")  # runs older than --tokenizer are character-level
    if "tokenizer" in given and args.tokenizer != saved_tokenizer:
        raise UserError(f"--tokenizer {args.tokenizer} is not the tokenizer of the run in {args.out} "
                        f"({saved_tokenizer}); drop --tokenizer to continue with it, or start a new run in another "
                        "--out")
    args.tokenizer = saved_tokenizer
    if "text_field" not in given:
        args.text_field = saved.get("text_field", args.text_field)
    if "data" in given:
        _, data_sha256 = read_corpus(args)
        if data_sha256 != checkpoint.meta.get("data_sha256", data_sha256):
            raise UserError(f"--data {args.data} is not the text the run in {args.out} was trained on "
                            f"({saved.get('data')}); drop --data to continue on the prepared data")


def set_up_run(args: argparse.Namespace, checkpoint: Checkpoint | None, start: StartingModel | None = None) -> Run:
    """Data, model, optimizer and samplers of a new run (from random weights, or from `start`: --init-from), or of
    the run in `checkpoint` on --resume. Every check (the data, the device, the model's settings) runs before
    anything is written to --out."""
    corpus = tokenizer = data_sha256 = None
    try:
        device = backend.check_device(rank_device(args.device))
        if checkpoint is None:
            corpus, data_sha256 = read_corpus(args)
            tokenizer = build_tokenizer(args, corpus)
            if start is None:
                overrides = {name: getattr(args, name) for name in MODEL_FLAGS}
                config = GPTConfig.from_preset(args.preset, vocab_size=tokenizer.vocab_size,
                                               **overrides)
                with skip_init():
                    freeze_parameters(GPT(config), args.freeze)  # a bad pattern is refused before anything is written
            else:
                check_start_fits_data(start, tokenizer, args.init_from)
        else:
            data_sha256 = checkpoint.meta.get("data_sha256")
    except (OSError, ValueError, RuntimeError) as error:  # a bad data file, an unusable device or MPI
        raise UserError(str(error)) from None
    try:
        dataset = load_dataset(args, corpus, tokenizer)
    except (OSError, ValueError) as error:
        raise UserError(f"cannot {'prepare' if corpus is not None else 'open'} the data in {args.out / 'data'}: "
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
        # initialised (or loaded) in float32, then rounded to nearest even
        model = (GPT(config) if start is None else start.model).to(device, dtype)
        seed_rank_dropout(args.seed)
    freeze_parameters(model, args.freeze)
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
        # A step draws its micro-batches as one global batch (see step_batches)
        samplers={"train": BatchSampler(dataset.splits, global_batch_size * args.grad_accum, block_size,
                                        seed=args.seed),
                  "eval": BatchSampler(dataset.splits, global_batch_size, block_size, seed=args.seed + 1)},
        tokenizer=dataset.tokenizer,
        data_sha256=data_sha256,
        peak_tflops=device_peak_tflops(args, device),
    )
    if args.document_masking and run.tokenizer.eot_id is None:
        raise UserError(NO_DOCUMENT_END.format(tokenizer=args.tokenizer))
    if checkpoint is not None:
        restore_run(run, checkpoint)
    config = model.config
    origin = "resumed" if checkpoint is not None else args.preset if start is None else f"{args.init_from}:"
    announce(f"model: {origin} {config.n_layer} layers, {config.n_head} heads ({config.n_kv_head} kv), width "
             f"{config.n_embd}, block {config.block_size}: {model.num_parameters() / 1e6:.2f}M parameters on {device} "
             f"in {dtype}{frozen_note(model)}")
    if world > 1 or args.grad_accum > 1:
        micro_batches = f"{args.grad_accum} micro-batches x " if args.grad_accum > 1 else ""
        ranks = f"{world} ranks x " if world > 1 else ""
        announce(f"batch: {micro_batches}{ranks}{args.batch_size} sequences = {args.grad_accum * global_batch_size} "
                 f"sequences ({run.tokens_per_step:,} tokens) per step")
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


# --- throughput and memory --------------------------------------------------------------------------------------------
# What a decoder block keeps for backward per token, in bytes per unit of width, measured with tracemalloc: float32
# 96 (24 values); bf16/fp16 130, more than float32, since the ops keep float32 intermediates (by is_half).
ACTIVATION_BYTES_PER_WIDTH = {False: 96, True: 130}
def model_flops_per_token(model: GPT) -> float:
    """Training FLOPs per token, PaLM's estimate as nanoGPT's MFU uses it: 6 N for the products with the N weights
    (2 forward, 4 backward) plus 12 L T d for attention's scores and weighted sums (L layers, context T, d the
    width of the query heads). N leaves out the position table, which is looked up, not multiplied."""
    config = model.config
    positions = model.wpe.weight.numel() if config.pos == "learned" else 0
    head_dim = config.head_dim or config.n_embd // config.n_head
    return 6 * (model.num_parameters() - positions) + 12 * config.n_layer * config.block_size * config.n_head * head_dim


def device_peak_tflops(args: argparse.Namespace, device: str) -> float | None:
    """--peak-tflops, or the data-sheet peak of a known GPU in the run's dtype; None on the CPU or an unknown GPU."""
    if args.peak_tflops is not None:
        return args.peak_tflops
    if not device.startswith("cuda"):
        return None
    name = backend.device_name(device)
    return next((peaks.get(args.dtype) for part, peaks in GPU_PEAK_TFLOPS if part in name), None)


def memory_estimate(model: GPT, dtype, batch_size: int, grad_accum: int) -> dict[str, float]:
    """Bytes per device that training `model` in `dtype` takes, by kind, for micro-batches of `batch_size`
    sequences of block_size tokens.

    Weights in `dtype`; gradients of the trained ones in `dtype` (float32 when micro-batches add up in a 16-bit
    model); AdamW's two float32 moments; the float32 master weights of a bf16/fp16 model. Activations, what the
    forward pass keeps for backward, per token: per layer ACTIVATION_BYTES_PER_WIDTH bytes per unit of width d, and
    2.5 h T float32 values for the attention scores and probabilities of the naive path (h heads, context T; the
    flash paths keep none, so this is an upper bound for them); and the logits (V values in `dtype`, their float32
    copy in a 16-bit model, their float32 probabilities). tests/test_recipes.py checks the total against what
    tinytf keeps on the CPU (tracemalloc); Korthikanti et al. 2022 count 17 d + 2.5 h T values for Megatron's layers.
    """
    config = model.config
    size, half = dtype.itemsize, backend.is_half(dtype)
    trained = sum(param.numel() for param in model.parameters() if param.requires_grad)
    tokens = batch_size * config.block_size
    per_layer_token = (ACTIVATION_BYTES_PER_WIDTH[half] * config.n_embd
                       + 2.5 * config.n_head * config.block_size * 4)
    logits_per_token = config.vocab_size * (size + (4 if half else 0) + 4)
    return {
        "weights": model.num_parameters() * size,
        "gradients": trained * (4 if half and grad_accum > 1 else size),
        "AdamW moments": trained * 2 * 4,
        "master weights": trained * 4 if half else 0,
        "activations": tokens * (config.n_layer * per_layer_token + logits_per_token),
    }


def frozen_note(model: GPT) -> str:
    """", 12.3M of them trained" when --freeze left some parameters out; "" otherwise."""
    trained = sum(param.numel() for param in model.parameters() if param.requires_grad)
    return "" if trained == model.num_parameters() else f", {trained / 1e6:.2f}M of them trained"


# --- training ---------------------------------------------------------------------------------------------------------
@no_grad()
def estimate_loss(model: GPT, sampler: BatchSampler, eval_iters: int, device: str,
                  eot_id: int | None = None) -> dict[str, float]:
    """Mean loss of `eval_iters` batches per split; in a data-parallel run each rank scores its rows of the global
    batch and the means are averaged over ranks (equal shares, so that is the mean over the global batch)."""
    model.eval()
    splits = ("train", "val")
    totals = np.zeros(len(splits))
    for index, split in enumerate(splits):
        for _ in range(eval_iters):
            inputs, targets, positions = rank_batch(sampler, split, device, eot_id)
            totals[index] += model(inputs, targets, position_ids=positions)[1].item()
    model.train()
    distributed.all_reduce(totals, op="mean")
    return {split: float(total / eval_iters) for split, total in zip(splits, totals)}


def step_batches(run: Run):
    """This rank's --grad-accum micro-batches of the next step, each model_inputs of (b, T) rows on its device.

    The step draws all of them as one global batch of grad_accum * world_size * batch_size windows, micro-batch
    after micro-batch, and each rank keeps its rows of each: every way of splitting the same number of sequences per
    step into micro-batches, ranks and batch size trains on the same windows."""
    inputs, targets = run.samplers["train"].get_batch("train")
    count = run.args.grad_accum
    for micro_inputs, micro_targets in zip(np.split(inputs, count), np.split(targets, count)):
        yield model_inputs(distributed.shard(micro_inputs), distributed.shard(micro_targets), run.device,
                           document_end(run))


def widen_half_gradients(params) -> None:
    """Make bfloat16/float16 gradients float32, so that the next micro-batches add into float32: summed in 16 bits,
    every addition would round to 8 (bf16) or 11 (fp16) significant bits."""
    for param in params:
        if param.grad is not None and backend.is_half(param.grad.dtype):
            param.grad = param.grad.astype(backend.compute_dtype(param.grad.dtype))


def train_step(run: Run, lr: float) -> float:
    """One optimizer step at learning rate `lr` on the next --grad-accum micro-batches; returns this rank's mean loss
    over them, before the step."""
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    run.optimizer.zero_grad()
    losses = []
    for micro_batch, (inputs, targets, positions) in enumerate(step_batches(run)):
        _, loss = run.model(inputs, targets, position_ids=positions)
        # Each micro-batch's loss is the mean over its rows: divided by the number of micro-batches, the summed
        # gradients are those of the mean over all the step's rows, as one batch of them would give (dividing by 1
        # changes nothing).
        run.scaler.scale(loss / run.args.grad_accum).backward()  # float16: times the scale, against underflow
        losses.append(loss.item())
        if micro_batch == 0 and run.args.grad_accum > 1:
            widen_half_gradients(run.model.parameters())
    run.averager.average()  # data parallel: every rank now holds the gradient of the whole global batch
    if run.args.grad_clip > 0:
        run.scaler.unscale_(run.optimizer)  # the clip must see the true gradients
        clip_grad_norm_(run.model.parameters(), run.args.grad_clip)
    run.scaler.step(run.optimizer)  # float16: skipped (and the scale halved) when a gradient overflowed
    run.scaler.update()
    return sum(losses) / len(losses)


def evaluate_and_save(run: Run, iteration: int, lr: float, tokens_per_s: float, elapsed_s: float) -> bool:
    """After `iteration`: estimate both losses, append them to metrics.jsonl, print them and write a checkpoint.

    Returns False, writing nothing, when a loss or a weight is not finite: a diverged model never replaces the
    last good checkpoint."""
    losses = estimate_loss(run.model, run.samplers["eval"], run.args.eval_iters, run.device, document_end(run))
    if not (math.isfinite(losses["train"]) and math.isfinite(losses["val"]) and weights_are_finite(run)):
        return False
    run.best_val = min(run.best_val, losses["val"])
    record = {"iter": iteration + 1, "train_loss": losses["train"], "val_loss": losses["val"], "lr": lr,
              "tokens_per_s": tokens_per_s, "elapsed_s": elapsed_s}
    mfu = run.model_flops_utilisation(tokens_per_s)
    if mfu is not None:
        record["mfu"] = mfu
    if distributed.is_main():
        try:
            append_metrics(run.metrics_path, record)
        except OSError as error:
            raise UserError(f"cannot write {run.metrics_path}: {describe_os_error(error)}; "
                            f"{run.kept_checkpoint()}") from None
    announce(f"iter {iteration + 1}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}, "
             f"{tokens_per_s:,.0f} tokens/s" + (f", MFU {mfu:.1%}" if mfu is not None else ""))
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
    """loss.png of the run (tinytf.viz.plot_loss_curves); a missing matplotlib or an unwritable file costs only the
    picture, never the run."""
    try:
        plot_loss_curves(metrics_path, image_path)
    except ImportError:
        print("loss curve: matplotlib is not installed, skipping loss.png (pip install 'tinytf[plot]')")
        return
    except OSError as error:
        print(f"loss curve: cannot write {image_path}: {describe_os_error(error)}", file=sys.stderr)
        return
    except ValueError as error:  # a metrics.jsonl that another program wrote into
        print(f"loss curve: skipping {image_path}: {error}", file=sys.stderr)
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
    if args.resume and args.init_from is not None:
        raise UserError(f"--init-from starts a new run from {args.init_from} and --resume continues the one in "
                        f"{args.out}: pass one of them")
    if args.dry_run:
        return dry_run(args, given)
    with own_out_folder(args.out):
        check_out_folder(args)
        checkpoint = None
        if args.resume:
            checkpoint = load_run_checkpoint(args.out)
            take_saved_options(args, given, checkpoint)
        resolve_defaults(args)
        check_arguments(args)
        start = load_starting_model(args, given) if args.init_from is not None and checkpoint is None else None
        return train_loop(set_up_run(args, checkpoint, start))


def dry_run(args: argparse.Namespace, given: frozenset[str]) -> int:
    """--dry-run: the model of this command line (or of the checkpoint on --resume, or of --init-from), one step on a
    tiny batch of random tokens on the device, the parameter count and the memory estimate for the real batch.
    Reads the data only for its vocabulary; writes nothing."""
    checkpoint = load_run_checkpoint(args.out) if args.resume else None
    if checkpoint is not None:
        take_saved_options(args, given, checkpoint)
    resolve_defaults(args)
    check_arguments(args)
    try:
        device = backend.check_device(rank_device(args.device))
        if args.init_from is not None:
            model = load_starting_model(args, given).model
        elif checkpoint is not None:
            model = load_trained_model(args.out, checkpoint=checkpoint)[0]
        else:
            vocab_size = build_tokenizer(args, Corpus(args.data, args.text_field)).vocab_size  # no hashing pass
            config = GPTConfig.from_preset(args.preset, vocab_size=vocab_size,
                                           **{name: getattr(args, name) for name in MODEL_FLAGS})
            model = GPT(config)
    except (OSError, ValueError, RuntimeError) as error:
        raise UserError(str(error)) from None
    dtype = backend.as_dtype(args.dtype)
    model = model.to(device, dtype).train()
    freeze_parameters(model, args.freeze)
    config = model.config
    announce(f"dry run: {preset_of(config)} {config.n_layer} layers, {config.n_head} heads ({config.n_kv_head} kv), "
             f"width {config.n_embd}, block {config.block_size}, vocabulary {config.vocab_size}: "
             f"{model.num_parameters():,} parameters{frozen_note(model)}")
    tokens = min(config.block_size, 32)
    ids = backend.to_device(np.random.default_rng(args.seed).integers(0, config.vocab_size, (1, tokens + 1)), device)
    started = time.perf_counter()
    _, loss = model(ids[:, :-1], ids[:, 1:])
    scaler = GradScaler(enabled=dtype == backend.FLOAT16)
    scaler.scale(loss).backward()
    scaler.step(AdamW(weight_decay_groups(model.parameters(), args.weight_decay), lr=args.lr))
    announce(f"one step on 1 x {tokens} random tokens on {device} in {dtype}: loss {loss.item():.3f} "
             f"(ln {config.vocab_size} = {math.log(config.vocab_size):.3f}), {time.perf_counter() - started:.2f} s")
    estimate = memory_estimate(model, dtype, args.batch_size, args.grad_accum)
    parts = ", ".join(f"{kind} {size / 2**30:.2f} GiB" for kind, size in estimate.items() if size)
    announce(f"memory per device for micro-batches of {args.batch_size} x {config.block_size} tokens: {parts}; "
             f"total {sum(estimate.values()) / 2**30:.2f} GiB (an estimate: see tinytf.train.memory_estimate)")
    world = distributed.world_size()
    tokens_per_step = args.grad_accum * world * args.batch_size * config.block_size
    announce(f"tokens per step: {tokens_per_step:,} ({args.grad_accum} micro-batches x {world} rank(s) x "
             f"{args.batch_size} x {config.block_size}); {model_flops_per_token(model) * tokens_per_step / 1e12:,.1f} "
             "TFLOP per step")
    return 0


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
    if distributed.is_main() and args.save_hf is not None:
        export_hf(run)
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
