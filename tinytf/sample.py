"""Sample text from a trained checkpoint: `python -m tinytf.sample --ckpt out --prompt "ROMEO:"`.

The prompt is encoded, and the text decoded, with the tokenizer the run was trained with (saved in its checkpoint).

Or from a local Hugging Face model folder (GPT-2 or Llama, with its tokenizer.json): `--model DIR`.
Text streams out as it is generated; the KV cache keeps each step to one new token. Several --prompt options are
generated together as one batch (prompts of different lengths included) and each continuation is printed when the
batch is done. --attention-map FILE.png draws the attention weights of every layer and head over the first sample's
text (tinytf.viz.plot_attention).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from . import backend
from .checkpoint import CheckpointError
from .cli import UserError, command_line, load_trained_model
from .interop import from_pretrained
from .tokenization import HuggingFaceTokenizer
from .viz.plots import attention_maps, checked_png_path, plot_attention

SEPARATOR = "---------------\n"  # between samples, and between the prompts of a batch


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tinytf.sample", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--ckpt", type=Path, default=Path("out"), help="checkpoint folder written by tinytf.train")
    source.add_argument("--model", type=Path, default=None,
                        help="Hugging Face model folder: config.json, model.safetensors and tokenizer.json")
    parser.add_argument("--prompt", action="append", default=None,
                        help="text to continue, a newline when none is given; several --prompt options are generated "
                             "together as one batch")
    parser.add_argument("--max-new-tokens", type=int, default=500, help="tokens to generate")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 picks the most likely token")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    parser.add_argument("--top-p", type=float, default=None, help="sample from the smallest set with this probability")
    parser.add_argument("--num-samples", type=int, default=1, help="independent samples, printed one after another")
    parser.add_argument("--seed", type=int, default=1337, help="seed of the sampling generator")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--no-cache", action="store_true", help="recompute the whole context at every step")
    parser.add_argument("--attention-map", type=Path, default=None, metavar="FILE.png",
                        help="draw the attention weights of every layer and head over the first sample (prompt and "
                             "continuation, its last block_size tokens) to this PNG file (needs matplotlib)")
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
    if args.prompt is not None and not all(args.prompt):
        raise UserError("--prompt must not be empty")
    if args.attention_map is not None:
        try:
            checked_png_path(args.attention_map)
        except ValueError as error:
            raise UserError(f"--attention-map {error}") from None


def sample(args: argparse.Namespace, out=None) -> None:
    """Print each prompt and what the model writes after it to `out` (default: the current sys.stdout)."""
    out = out or sys.stdout
    check_arguments(args)
    try:
        device = backend.check_device(args.device)
    except (ValueError, RuntimeError) as error:
        raise UserError(str(error)) from None
    model, tokenizer = load_model(args, device)
    texts = args.prompt or ["\n"]
    prompts = [encoded_prompt(text, tokenizer, model.config.block_size) for text in texts]
    rng = np.random.default_rng(args.seed)
    for index in range(args.num_samples):
        if index:
            out.write(SEPARATOR)
        if len(prompts) == 1:
            ids = stream_continuation(args, model, tokenizer, texts[0], prompts[0], rng, out)
        else:
            batch = model.generate(prompts, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                                   use_cache=not args.no_cache, rng=rng)
            for number, (prompt, prompt_ids, row) in enumerate(zip(texts, prompts, batch)):
                continuation = tokenizer.decode(row.tolist())[len(tokenizer.decode(prompt_ids)):]
                out.write((SEPARATOR if number else "") + prompt + continuation + "\n")
            ids = batch[0].tolist()
        if index == 0:
            first_sample = ids
    if args.attention_map is not None:
        write_attention_map(model, tokenizer, first_sample, args.attention_map)


def write_attention_map(model, tokenizer, ids: list[int], path: Path) -> None:
    """Draw the attention maps of the last block_size tokens of `ids` (one forward pass) to the PNG file `path`."""
    ids = ids[-model.config.block_size :]
    maps = attention_maps(model, np.asarray(ids)[None, :])  # (n_layer, 1, H, T, T)
    try:
        plot_attention(maps, [tokenizer.decode([token]) for token in ids], path)
    except ImportError as error:
        raise UserError(f"--attention-map: {error}") from None
    except OSError as error:
        raise UserError(f"cannot write --attention-map {path}: {error.strerror or error}") from None
    print(f"attention map: {path}", file=sys.stderr)


def encoded_prompt(text: str, tokenizer, block_size: int) -> np.ndarray:
    """The prompt's token ids (at least one), with a note on stderr when the model will see only its end."""
    try:
        prompt_ids = tokenizer.encode(text)
    except ValueError as error:
        raise UserError(f"the prompt cannot be encoded: {error}") from None
    if len(prompt_ids) == 0:
        raise UserError(f"the prompt {text!r} encodes to no tokens")
    if len(prompt_ids) > block_size:
        print(f"note: the prompt has {len(prompt_ids)} tokens; the model sees only the last {block_size}",
              file=sys.stderr)
    return prompt_ids


def stream_continuation(args: argparse.Namespace, model, tokenizer, prompt: str, prompt_ids, rng,
                        out) -> list[int]:
    """Write the prompt and its continuation as the tokens come; returns their token ids."""
    out.write(prompt)
    ids, shown = list(prompt_ids), tokenizer.decode(prompt_ids)
    for next_ids in model.stream(prompt_ids[None, :], args.max_new_tokens, args.temperature, args.top_k,
                                 args.top_p, use_cache=not args.no_cache, rng=rng):
        # Decode the whole text and write what is new: a subword token's text can depend on its neighbours
        # (a leading space), and a byte-level token can end inside a character, which decodes as U+FFFD.
        ids.append(int(next_ids[0]))
        text = tokenizer.decode(ids)
        if not text.endswith("\ufffd"):
            out.write(text[len(shown):])
            out.flush()
            shown = text
    out.write(tokenizer.decode(ids)[len(shown):] + "\n")
    return ids


def load_model(args: argparse.Namespace, device: str):
    """(model in eval mode, tokenizer) from --model (a Hugging Face folder) or else --ckpt (a tinytf checkpoint)."""
    if args.model is None:
        model, tokenizer, _ = load_trained_model(args.ckpt, device)
        return model, tokenizer
    try:
        model = from_pretrained(args.model)
    except CheckpointError as error:
        raise UserError(f"cannot load the model: {error}") from None
    return model.to(device), read_model_tokenizer(args.model)


def read_model_tokenizer(folder: Path) -> HuggingFaceTokenizer:
    """The tokenizer.json of a Hugging Face model folder (with its tokenizer_config.json's end-of-text token)."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"{folder} has no tokenizer.json to turn the prompt into token ids")
    try:
        return HuggingFaceTokenizer.from_file(path)
    except ImportError:
        raise UserError("--model needs the tokenizers package: pip install tokenizers") from None
    except ValueError as error:
        raise UserError(str(error)) from None


@command_line("tinytf.sample")
def main(argv: list[str] | None = None) -> int:
    sample(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
