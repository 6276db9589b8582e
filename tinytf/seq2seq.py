"""python -m tinytf.seq2seq: train an encoder-decoder to read dates written in words, and translate the ones you type.

    python -m tinytf.seq2seq train --out runs/dates            # under 4 minutes on 2 CPU cores
    python -m tinytf.seq2seq translate --ckpt runs/dates "the fifth of march, nineteen eighty-seven"
    1987-03-05

The data is made here, offline, from Python's calendar: a date of 1700-2199 written one of several ways ("March 5,
1987", "5 mar 1987", "Thursday, March 5, 1987", "the fifth of March, nineteen eighty-seven", ...) is the source, its
ISO form the target; characters are the tokens. One date in every HELD_OUT_EVERY never trains: it is the held-out
set the exact-match accuracy is measured on, so the model is scored on dates it has never seen in any writing.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import numpy as np

from . import backend
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .cli import UserError, command_line
from .models import EncoderDecoder, EncoderDecoderConfig
from .optim import AdamW, clip_grad_norm_, lr_at
from .tensor import no_grad

FIRST_DAY, LAST_DAY = datetime.date(1700, 1, 1).toordinal(), datetime.date(2199, 12, 31).toordinal()
HELD_OUT_EVERY = 20  # the dates whose day number is a multiple of this are held out from training
PAD, START, END = 0, 1, 2
SPECIALS = 3
ALPHABET = " ,.-'0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
MAX_SOURCE, MAX_TARGET = 64, 12  # characters: the longest writing is about 55, an ISO date is 10 (+ END)

ONES = ["", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
        "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
ORDINALS = {"one": "first", "two": "second", "three": "third", "five": "fifth", "eight": "eighth", "nine": "ninth",
            "twelve": "twelfth"}


def number_words(n: int) -> str:
    """0 < n < 100 in words: 21 -> "twenty-one"."""
    if n < 20:
        return ONES[n]
    return TENS[n // 10] + ("-" + ONES[n % 10] if n % 10 else "")


def ordinal_words(n: int) -> str:
    """1 <= n <= 31 as an ordinal in words: 21 -> "twenty-first"."""
    words = number_words(n)
    head, _, last = words.rpartition("-")
    last = ORDINALS.get(last, last[:-1] + "ieth" if last.endswith("y") else last + "th")
    return f"{head}-{last}" if head else last


def ordinal_digits(n: int) -> str:
    """21 -> "21st"."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def year_words(year: int) -> str:
    """1987 -> "nineteen eighty-seven", 2005 -> "two thousand five", 1900 -> "nineteen hundred"."""
    century, rest = divmod(year, 100)
    if century % 10 == 0 and rest < 10:  # 2000-2009
        return f"{number_words(century // 10)} thousand" + (f" {number_words(rest)}" if rest else "")
    if rest == 0:
        return f"{number_words(century)} hundred"
    return f"{number_words(century)} {'oh-' if rest < 10 else ''}{number_words(rest)}"


def written(date: datetime.date, style: int) -> str:
    """`date` written in one of the styles (0 .. STYLES - 1)."""
    month, short = date.strftime("%B"), date.strftime("%b")
    day, year, weekday = date.day, date.year, date.strftime("%A")
    forms = [
        f"{month} {day}, {year}",
        f"{day} {month} {year}",
        f"{short} {day} {year}",
        f"{weekday}, {month} {day}, {year}",
        f"the {ordinal_digits(day)} of {month}, {year}",
        f"{month} {ordinal_digits(day)}, {year}",
        f"the {ordinal_words(day)} of {month}, {year_words(year)}",
        f"{month} {ordinal_words(day)}, {year_words(year)}",
        f"{day} {short}. {year}",
    ]
    text = forms[style]
    return text.lower() if style % 2 else text


STYLES = 9


def sample_dates(rng: np.random.Generator, count: int, held_out: bool) -> list[datetime.date]:
    """`count` random dates, all from the held-out days or all from the training days."""
    days = rng.integers(FIRST_DAY // HELD_OUT_EVERY, LAST_DAY // HELD_OUT_EVERY, size=count) * HELD_OUT_EVERY
    if not held_out:
        days = days + rng.integers(1, HELD_OUT_EVERY, size=count)
    return [datetime.date.fromordinal(int(day)) for day in days]


def encode(text: str) -> np.ndarray:
    """Characters -> ids; a UserError names a character the model cannot read."""
    unknown = sorted(set(text) - set(ALPHABET))
    if unknown:
        raise UserError(f"the model reads the characters {ALPHABET.strip()!r} only; {unknown} are not among them")
    return np.array([SPECIALS + ALPHABET.index(character) for character in text], dtype=np.int64)


def decode(ids) -> str:
    return "".join(ALPHABET[int(i) - SPECIALS] for i in ids if int(i) >= SPECIALS)


def batch(rng: np.random.Generator, size: int, held_out: bool = False):
    """(sources, targets): lists of id arrays; a target is the ISO date followed by END."""
    dates = sample_dates(rng, size, held_out)
    styles = rng.integers(0, STYLES, size=size)
    sources = [encode(written(date, int(style))) for date, style in zip(dates, styles)]
    targets = [np.append(encode(date.isoformat()), END) for date in dates]
    return sources, targets


def padded(rows: list[np.ndarray], width: int | None = None) -> np.ndarray:
    width = width or max(len(row) for row in rows)
    out = np.full((len(rows), width), PAD, dtype=np.int64)
    for index, row in enumerate(rows):
        out[index, : len(row)] = row
    return out


def build_model(args) -> EncoderDecoder:
    config = EncoderDecoderConfig(
        vocab_size=SPECIALS + len(ALPHABET), max_positions=MAX_SOURCE, d_model=args.d_model, n_head=args.n_head,
        encoder_layers=args.layers, decoder_layers=args.layers, ffn_dim=4 * args.d_model, activation="gelu_tanh",
        norm_first=True, final_norm=True, layernorm_embedding=False, positions="learned",
        tie_word_embeddings=False, pad_token_id=PAD, bos_token_id=START, eos_token_id=END,
        decoder_start_token_id=START)
    return EncoderDecoder(config)


def training_loss(model: EncoderDecoder, sources, targets):
    src = padded(sources)
    tgt = padded([np.append(START, target) for target in targets])
    return model(src, tgt[:, :-1], src != PAD, tgt[:, :-1] != PAD, targets=tgt[:, 1:])[1]


@no_grad()
def exact_match(model: EncoderDecoder, sources, targets, batch_size: int = 500) -> float:
    """The fraction of sources whose greedy translation is exactly the target's date."""
    model.eval()
    correct = 0
    for start in range(0, len(sources), batch_size):
        outputs = model.generate(sources[start : start + batch_size], max_new_tokens=MAX_TARGET, temperature=0)
        expected = targets[start : start + batch_size]
        correct += sum(decode(out) == decode(target) for out, target in zip(outputs, expected))
    model.train()
    return correct / len(sources)


def train(args) -> int:
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise UserError(f"--out {out} is not empty; pass --overwrite to write the checkpoint there anyway")
    backend.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    held_out = batch(np.random.default_rng(args.seed + 1), args.eval_size, held_out=True)
    model = build_model(args)
    optimizer = AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    started = time.perf_counter()
    for step in range(args.iters):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, lr=args.lr, min_lr=args.lr / 10, warmup_iters=args.iters // 20,
                                decay_iters=args.iters)
        loss = training_loss(model, *batch(rng, args.batch_size))
        optimizer.zero_grad()
        loss.backward()
        clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if (step + 1) % args.log_interval == 0 or step + 1 == args.iters:
            print(f"step {step + 1}: loss {loss.item():.4f} ({time.perf_counter() - started:.0f} s)", flush=True)
    accuracy = exact_match(model, *held_out)
    elapsed = time.perf_counter() - started
    print(f"held-out exact match: {accuracy:.2%} of {len(held_out[0])} dates never trained on ({elapsed:.0f} s)")
    meta = {"args": {name: getattr(args, name) for name in ("d_model", "n_head", "layers")},
            "accuracy": accuracy, "seconds": elapsed}
    save_checkpoint(out, model.state_dict(), meta)
    return 0


def translate(args) -> int:
    try:
        checkpoint = load_checkpoint(args.ckpt)
    except (CheckpointError, OSError) as error:
        raise UserError(f"--ckpt {args.ckpt}: {error}") from None
    model = build_model(argparse.Namespace(**checkpoint.meta["args"]))
    model.load_state_dict(checkpoint.weights)
    model.eval()
    texts = args.text or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    sources = [encode(text) for text in texts]
    with no_grad():
        for out in model.generate(sources, max_new_tokens=MAX_TARGET, temperature=0, num_beams=args.num_beams):
            print(decode(out))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tinytf.seq2seq", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    training = commands.add_parser("train", help="train on generated dates and report the held-out exact match")
    training.add_argument("--out", default="runs/dates", help="folder for the checkpoint")
    training.add_argument("--overwrite", action="store_true", help="write the checkpoint into a non-empty --out")
    training.add_argument("--iters", type=int, default=1000, help="training steps")
    training.add_argument("--batch-size", type=int, default=64, help="dates per step")
    training.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    training.add_argument("--d-model", type=int, default=128, help="width")
    training.add_argument("--n-head", type=int, default=4, help="attention heads")
    training.add_argument("--layers", type=int, default=2, help="encoder layers, and as many decoder layers")
    training.add_argument("--eval-size", type=int, default=2000, help="held-out dates scored at the end")
    training.add_argument("--log-interval", type=int, default=100, help="print the loss every N steps")
    training.add_argument("--seed", type=int, default=0, help="seed for weights and data")
    translating = commands.add_parser("translate", help="translate dates written in words into ISO dates")
    translating.add_argument("--ckpt", default="runs/dates", help="the folder train wrote")
    translating.add_argument("--num-beams", type=int, default=None, help="beam search instead of greedy")
    translating.add_argument("text", nargs="*", help="dates in words (default: one per line from stdin)")
    return parser


@command_line("tinytf.seq2seq")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return train(args) if args.command == "train" else translate(args)


if __name__ == "__main__":
    sys.exit(main())
