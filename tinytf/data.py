"""Character-level data: a tokenizer, token files on disk, and a seeded batch sampler.

The layout follows nanoGPT: a text is encoded once into uint16 token ids, split into `train.bin` and `val.bin`, and
read back through `numpy.memmap`, so a corpus larger than memory costs nothing until a batch touches it.
`meta.json` beside them holds the tokenizer and the token counts.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np

TOKEN_DTYPE = np.dtype(np.uint16)
MAX_VOCAB_SIZE = int(np.iinfo(TOKEN_DTYPE).max)  # 65,535 characters: ids are stored as uint16
SPLITS = ("train", "val")
META_NAME = "meta.json"

_UNKNOWN_CHARS_SHOWN = 20


class CharTokenizer:
    """One id per distinct character, in code-point order (as nanoGPT's shakespeare_char)."""

    def __init__(self, chars: str = ""):
        self._set_vocabulary(chars)

    def _set_vocabulary(self, chars: str) -> None:
        distinct = sorted(set(chars))
        if len(distinct) > MAX_VOCAB_SIZE:
            raise ValueError(
                f"the text has {len(distinct):,} distinct characters; at most {MAX_VOCAB_SIZE:,} are supported "
                "because token ids are stored as uint16"
            )
        self.chars = "".join(distinct)
        # Sorted code points let encode() look a whole text up with one searchsorted instead of a Python loop.
        self._code_points = _code_points(self.chars)

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls().fit(text)

    def fit(self, text: str) -> CharTokenizer:
        """Take the vocabulary from `text` (replacing the current one); returns self."""
        if not text:
            raise ValueError("cannot fit a tokenizer on empty text")
        self._set_vocabulary(text)
        return self

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        """Token ids of `text`, shape (len(text),), int64; a ValueError lists characters outside the vocabulary."""
        code_points = _code_points(text)
        ids = np.searchsorted(self._code_points, code_points)
        known = np.zeros(code_points.shape, dtype=bool)
        if self.vocab_size:
            known = self._code_points[np.minimum(ids, self.vocab_size - 1)] == code_points
        if not known.all():
            raise ValueError(self._unknown_characters_message(code_points[~known]))
        return ids.astype(np.int64, copy=False)

    def _unknown_characters_message(self, unknown_code_points: np.ndarray) -> str:
        distinct, first_seen = np.unique(unknown_code_points, return_index=True)
        in_text_order = distinct[np.argsort(first_seen)]
        shown = ", ".join(repr(chr(code_point)) for code_point in in_text_order[:_UNKNOWN_CHARS_SHOWN])
        hidden = len(in_text_order) - _UNKNOWN_CHARS_SHOWN
        more = f" and {hidden} more" if hidden > 0 else ""
        return (
            f"the text contains {len(in_text_order)} character(s) that are not in the tokenizer's vocabulary "
            f"of {self.vocab_size}: {shown}{more}"
        )

    def decode(self, ids) -> str:
        """The text of a sequence of token ids (list or 1-D integer array)."""
        ids = np.asarray(ids)
        if ids.ndim > 1:
            raise ValueError(f"decode takes one sequence of ids (1-D), got an array of shape {ids.shape}")
        if ids.size and ids.dtype.kind not in "iu":
            raise ValueError(f"token ids must be integers, got dtype {ids.dtype}")
        ids = ids.reshape(-1).astype(np.int64, copy=False)
        out_of_range = (ids < 0) | (ids >= self.vocab_size)
        if out_of_range.any():
            raise ValueError(
                f"token id {ids[out_of_range][0]} is out of range for the vocabulary of {self.vocab_size} "
                f"(valid ids are 0..{self.vocab_size - 1})"
            )
        return self._code_points[ids].astype("<u4").tobytes().decode("utf-32-le", "surrogatepass")

    def to_dict(self) -> dict:
        """A JSON-able description, for checkpoints; `from_dict` inverts it."""
        return {"type": "char", "chars": self.chars}

    @classmethod
    def from_dict(cls, description: Mapping) -> CharTokenizer:
        if not isinstance(description, Mapping) or description.get("type") != "char":
            raise ValueError(f"not a character tokenizer description: {description!r:.200}")
        chars = description.get("chars")
        if not isinstance(chars, str) or "".join(sorted(set(chars))) != chars:
            raise ValueError("a character tokenizer's 'chars' must be a string of distinct characters in sorted order")
        return cls(chars)

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


def _code_points(text: str) -> np.ndarray:
    # surrogatepass: a str may hold lone surrogates, which are still distinct characters to the tokenizer.
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4").astype(np.uint32)


def read_text(path) -> str:
    """The UTF-8 text of a file; clear errors for a missing path, a folder, an empty file or other encodings."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"data file not found: {path}") from None
    except IsADirectoryError:
        raise IsADirectoryError(f"data path is a folder, expected a text file: {path}") from None
    if not raw:
        raise ValueError(f"data file is empty: {path}")
    try:
        return raw.decode("utf-8-sig")  # -sig: a byte-order mark is not part of the text
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise ValueError(
            f"data file is not UTF-8 text: {path}: byte {raw[error.start]:#04x} at offset {error.start} "
            f"(line {line}) is invalid; convert the file to UTF-8"
        ) from None


def default_corpus() -> str:
    """Python's own documentation (the stdlib's `pydoc_data.topics`, about 465 KB), present on every install."""
    try:
        from pydoc_data import topics  # imported on demand: the module is a 465 KB literal
    except ImportError as error:
        raise RuntimeError(
            f"this Python install lacks the pydoc_data module ({error}); pass a text file with --data instead"
        ) from None
    return "".join(topics.topics.values())


class TokenDataset:
    """A prepared folder: the tokenizer and one uint16 memmap of token ids per split ("train", "val")."""

    def __init__(self, directory: Path, tokenizer: CharTokenizer, splits: dict[str, np.ndarray]):
        self.directory = directory
        self.tokenizer = tokenizer
        self.splits = splits

    @classmethod
    def open(cls, directory) -> TokenDataset:
        """Map a folder written by `prepare_dataset`: FileNotFoundError without meta.json, ValueError if incomplete."""
        directory = Path(directory)
        meta_path = directory / META_NAME
        if not meta_path.is_file():
            raise FileNotFoundError(f"{directory} is not a prepared dataset: {META_NAME} is missing")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            tokenizer = CharTokenizer.from_dict(meta["tokenizer"])
            token_counts = {split: int(meta["tokens"][split]) for split in SPLITS}
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{meta_path} is malformed ({error!r}); prepare the dataset again") from None
        splits = {}
        for split, count in token_counts.items():
            path = directory / f"{split}.bin"
            expected_bytes = count * TOKEN_DTYPE.itemsize
            actual_bytes = path.stat().st_size if path.is_file() else None
            if count == 0 or actual_bytes != expected_bytes:
                raise ValueError(
                    f"{path} is missing or incomplete: {META_NAME} records {count} tokens ({expected_bytes} bytes), "
                    f"the file has {actual_bytes} bytes; prepare the dataset again"
                )
            splits[split] = np.memmap(path, dtype=TOKEN_DTYPE, mode="r")
        return cls(directory, tokenizer, splits)

    def __repr__(self) -> str:
        counts = ", ".join(f"{split}={len(tokens):,}" for split, tokens in self.splits.items())
        return f"TokenDataset({str(self.directory)!r}, vocab_size={self.tokenizer.vocab_size}, {counts})"


def prepare_dataset(
    text: str, directory, *, train_fraction: float = 0.9, tokenizer: CharTokenizer | None = None
) -> TokenDataset:
    """Encode `text` and write `train.bin` (the first `train_fraction` of it), `val.bin` (the rest) and `meta.json`.

    The tokenizer is fitted on the whole text unless one is given. Returns the prepared `TokenDataset`.
    """
    if not text:
        raise ValueError("cannot prepare a dataset from empty text")
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be between 0 and 1 (exclusive), got {train_fraction!r}")
    if tokenizer is None:
        tokenizer = CharTokenizer.from_text(text)
    ids = tokenizer.encode(text).astype(TOKEN_DTYPE)
    train_tokens = int(len(ids) * train_fraction)
    if train_tokens == 0 or train_tokens == len(ids):
        raise ValueError(
            f"a text of {len(ids)} characters is too short to split into train and val "
            f"with train_fraction={train_fraction}"
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta_path = directory / META_NAME
    # meta.json goes first and comes back last: a preparation interrupted in between leaves no dataset to open.
    meta_path.unlink(missing_ok=True)
    ids[:train_tokens].tofile(directory / "train.bin")
    ids[train_tokens:].tofile(directory / "val.bin")
    meta = {"tokenizer": tokenizer.to_dict(), "tokens": {"train": train_tokens, "val": len(ids) - train_tokens}}
    meta_path.write_text(json.dumps(meta), encoding="utf-8")
    return TokenDataset.open(directory)


class BatchSampler:
    """Random training windows: x is `block_size` consecutive tokens, y the same window shifted by one.

    Each split draws from its own seeded `numpy.random.Generator`, so evaluating does not change the sequence of
    training batches, and `state_dict()` / `load_state_dict()` let a resumed run draw exactly the same batches.
    """

    def __init__(self, splits: Mapping[str, np.ndarray], batch_size: int, block_size: int, seed: int = 0):
        for name, value in (("batch_size", batch_size), ("block_size", block_size)):
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for split, tokens in splits.items():
            if len(tokens) < block_size + 1:
                raise ValueError(
                    f"the {split} split has {len(tokens)} tokens, fewer than block_size + 1 = {block_size + 1}; "
                    "use a smaller block size or more text"
                )
        self.batch_size = int(batch_size)
        self.block_size = int(block_size)
        self.splits = {split: np.asarray(tokens) for split, tokens in splits.items()}
        names = sorted(self.splits)
        seeds = np.random.SeedSequence(seed).spawn(len(names))
        self._generators = {name: np.random.default_rng(child) for name, child in zip(names, seeds)}
        self._window = np.arange(self.block_size + 1)

    def get_batch(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(x, y), both int64 of shape (batch_size, block_size), with y[:, t] == x[:, t + 1] inside the window."""
        if split not in self.splits:
            raise ValueError(f"unknown split {split!r}: expected one of {sorted(self.splits)}")
        tokens = self.splits[split]
        starts = self._generators[split].integers(0, len(tokens) - self.block_size, size=self.batch_size)
        windows = tokens[starts[:, None] + self._window].astype(np.int64)  # (B, T + 1)
        return np.ascontiguousarray(windows[:, :-1]), np.ascontiguousarray(windows[:, 1:])

    def state_dict(self) -> dict:
        """The generators' states, JSON-able."""
        return {split: generator.bit_generator.state for split, generator in self._generators.items()}

    def load_state_dict(self, state: Mapping) -> None:
        if set(state) != set(self._generators):
            raise ValueError(f"sampler state has splits {sorted(state)}, expected {sorted(self._generators)}")
        for split, generator in self._generators.items():
            generator.bit_generator.state = state[split]
