"""What the command lines tinytf.train and tinytf.sample share: their one-line errors and loading a trained model."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path

from . import backend, distributed
from .checkpoint import Checkpoint, CheckpointError, load_checkpoint
from .models import GPT, GPTConfig
from .tokenization import Tokenizer, tokenizer_from_dict


class UserError(Exception):
    """A problem with the command line, the data or a checkpoint: reported as one line, exit status 2."""


def command_line(prog: str) -> Callable:
    """Decorate a command line's `main(argv) -> exit status`: a UserError it raises is printed as the one line
    `prog: error: ...` on stderr, never a traceback, and main returns 2; Ctrl-C prints `prog: interrupted` and
    main returns 130."""

    def decorate(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def main_reporting_user_errors(*args, **kwargs) -> int:
            try:
                return main(*args, **kwargs)
            except UserError as error:
                print(f"{prog}: error: {error}", file=sys.stderr)
                distributed.abort_job(2)  # in a data-parallel run the other ranks may be waiting for this one
                return 2
            except KeyboardInterrupt:  # Ctrl-C where the command has no checkpoint to save: one line, not a traceback
                print(f"{prog}: interrupted", file=sys.stderr)
                distributed.abort_job(130)
                return 130

        return main_reporting_user_errors

    return decorate


def load_trained_model(folder: Path, device: str = "cpu", checkpoint: Checkpoint | None = None,
                       dtype=None) -> tuple[GPT, Tokenizer, Checkpoint]:
    """(model in eval mode, tokenizer, checkpoint) from a folder written by tinytf.train (or from its checkpoint,
    already loaded), in `dtype` (default: the dtype its weights were saved in, such as bfloat16 for a --dtype bf16
    run); UserError when the folder is missing or corrupt."""
    try:
        checkpoint = checkpoint if checkpoint is not None else load_checkpoint(folder)
        meta = checkpoint.meta
        config = GPTConfig(**meta["config"])
        tokenizer = tokenizer_from_dict(meta["tokenizer"])
        saved_dtype = next((w.dtype for w in checkpoint.weights.values() if backend.is_floating(w.dtype)), None)
        # load_state_dict keeps the model's dtype: cast first, so that the saved weights load unrounded
        model = GPT(config).to(dtype=dtype if dtype is not None else saved_dtype)
        model.load_state_dict(checkpoint.weights)
    except (CheckpointError, KeyError, TypeError, ValueError) as error:
        raise UserError(f"cannot load the checkpoint in {folder}: {error}") from None
    return model.to(device).eval(), tokenizer, checkpoint
