"""Sample text from a trained checkpoint: `python -m tinytf.sample --ckpt out --prompt "ROMEO:"`.

Text streams out as it is generated; the KV cache keeps each step to one new token.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from . import backend
from .train import UserError, load_trained_model


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tinytf.sample", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--ckpt", type=Path, default=Path("out"), help="checkpoint folder written by tinytf.train")
    parser.add_argument("--prompt", default="\n", help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=500, help="characters to generate")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 picks the most likely character")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k most likely characters")
    parser.add_argument("--top-p", type=float, default=None, help="sample from the smallest set with this probability")
    parser.add_argument("--num-samples", type=int, default=1, help="independent samples, printed one after another")
    parser.add_argument("--seed", type=int, default=1337, help="seed of the sampling generator")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--no-cache", action="store_true", help="recompute the whole context at every step")
    return parser


def check_arguments(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 0:
        raise UserError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise UserError(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.num_samples < 1:
        raise UserError(f"--num-samples must be at least 1, got {args.num_samples}")
    if not args.prompt:
        raise UserError("--prompt must not be empty")


def sample(args: argparse.Namespace, out=sys.stdout) -> None:
    check_arguments(args)
    try:
        device = backend.check_device(args.device)
    except (ValueError, RuntimeError) as error:
        raise UserError(str(error)) from None
    model, tokenizer, _ = load_trained_model(args.ckpt, device)
    try:
        prompt_ids = tokenizer.encode(args.prompt)
    except ValueError as error:
        raise UserError(f"the prompt cannot be encoded: {error}") from None
    block_size = model.config.block_size
    if len(prompt_ids) > block_size:
        print(f"note: the prompt has {len(prompt_ids)} characters; the model sees only the last {block_size}",
              file=sys.stderr)
    rng = np.random.default_rng(args.seed)
    for index in range(args.num_samples):
        out.write(args.prompt)
        for next_ids in model.stream(prompt_ids[None, :], args.max_new_tokens, args.temperature, args.top_k,
                                     args.top_p, use_cache=not args.no_cache, rng=rng):
            out.write(tokenizer.decode(next_ids))
            out.flush()
        out.write("\n" if index == args.num_samples - 1 else "\n---------------\n")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        sample(args)
    except UserError as error:
        print(f"tinytf.sample: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
