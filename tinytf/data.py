"""Data: corpora streamed from disk, token files, and a seeded batch sampler.

The layout follows nanoGPT and llm.c: a corpus is encoded once into token ids, written as flat binary files
(uint16, or uint32 for vocabularies beyond 65,536 ids) and read back through `numpy.memmap`, so a corpus larger than
memory costs nothing until a batch touches it. `meta.json` beside them is the manifest: the tokenizer, the files
with their token counts and dtype, the number of documents, and each split as ranges of those files.

Two writers share that layout. `prepare_dataset` encodes a text held in memory into `train.bin` and `val.bin` (the
character-level runs, small by nature). `prepare_shards` streams a `Corpus` (a text file, a folder of them, or JSON
lines) through worker processes into `shard-00000.bin`, `shard-00001.bin`, ..., with the tokenizer's end-of-text
token after each document. Both split by position: the first `train_fraction` of the tokens train, the rest
validate, so a long document may straddle the boundary.
"""

from __future__ import annotations

import codecs
import collections
import hashlib
import json
import multiprocessing
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .tokenization import MAX_VOCAB_SIZE, CharTokenizer, tokenizer_from_dict

__all__ = ["MAX_VOCAB_SIZE", "CharTokenizer", "Corpus", "TokenDataset", "BatchSampler", "prepare_dataset",
           "prepare_shards", "token_dtype", "read_text", "default_corpus", "document_positions"]

SPLITS = ("train", "val")
META_NAME = "meta.json"
SHARD_TOKENS = 100_000_000  # per shard file, as llm.c's FineWeb shards: 200 MB of uint16
PIECE_BYTES = 1 << 20  # a text file is read, and sent to a worker, in pieces of about this size
_SHARD_FILE = re.compile(r"^[\w-]+\.bin$")  # names the manifest may refer to: files of this folder only
def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id of the vocabulary fits (vocab_size <= 65,536), else uint32."""
    return np.dtype(np.uint16 if vocab_size - 1 <= np.iinfo(np.uint16).max else np.uint32)


# --- corpora ----------------------------------------------------------------------------------------------------------
class Corpus:
    """The documents of a path, streamed in pieces: a text file is one document; a `.jsonl` file holds one document
    per line, in the string field `text_field`; a folder holds the files below it, in sorted order (hidden ones
    skipped). No path: Python's documentation (see `default_corpus`). Files are UTF-8."""

    def __init__(self, path=None, text_field: str = "text"):
        self.path = None if path is None else Path(path)
        self.text_field = text_field

    def describe(self) -> str:
        return "pydoc_data.topics (Python's documentation)" if self.path is None else str(self.path)

    def files(self) -> list[Path]:
        """The files the corpus reads, in order; FileNotFoundError or ValueError when there are none."""
        if self.path is None:
            return []
        if self.path.is_dir():
            files = sorted(path for path in self.path.rglob("*") if path.is_file()
                           and not any(part.startswith(".") for part in path.relative_to(self.path).parts))
            if not files:
                raise ValueError(f"the data folder {self.path} holds no files")
            return files
        if not self.path.exists():
            raise FileNotFoundError(f"data file not found: {self.path}")
        if self.path.stat().st_size == 0:
            raise ValueError(f"data file is empty: {self.path}")
        return [self.path]

    def pieces(self) -> Iterator[tuple[str, bool]]:
        """(text, ends_document) in order. A text file is cut after newlines between two non-space characters,
        where byte-level BPE pre-tokenizers (GPT-2's, Llama 3's) split anyway: the pieces encode as the whole."""
        if self.path is None:
            yield default_corpus(), True
            return
        for path in self.files():
            if path.suffix == ".jsonl":
                yield from ((document, True) for document in _jsonl_documents(path, self.text_field))
                continue
            previous = None
            for piece in _text_file_pieces(path):
                if previous is not None:
                    yield previous, False
                previous = piece
            if previous:  # an empty file in a folder is no document
                yield previous, True

    def texts(self) -> Iterator[str]:
        return (text for text, _ in self.pieces())

    def text(self) -> str:
        """The whole corpus in memory, its documents joined as they are (for character-level runs)."""
        return "".join(self.texts())

    def sha256(self) -> str:
        """SHA-256 of the documents' UTF-8 joined by NUL bytes (of a single text file: of its text)."""
        digest, at_document_start, first = hashlib.sha256(), True, True
        for text, ends_document in self.pieces():
            if at_document_start and not first:
                digest.update(b"\0")
            digest.update(text.encode("utf-8", "surrogatepass"))
            at_document_start, first = ends_document, False
        return digest.hexdigest()


def _text_file_pieces(path: Path, piece_bytes: int = PIECE_BYTES) -> Iterator[str]:
    """The UTF-8 text of a file in pieces of about `piece_bytes` or more, cut where `_safe_cut` allows; the errors of
    `read_text` (byte and line of the first invalid byte). A file with no such newline is held whole."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    bytes_before, lines_before, pending = 0, 0, ""
    with open(path, "rb") as file:
        while True:
            raw = file.read(piece_bytes)
            undecoded = decoder.getstate()[0]  # the start of a character cut by the previous read
            try:
                text = decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as error:
                offset = bytes_before - len(undecoded) + error.start
                line = lines_before + error.object.count(b"\n", 0, error.start) + 1
                raise ValueError(f"data file is not UTF-8 text: {path}: byte {error.object[error.start]:#04x} at "
                                 f"offset {offset} (line {line}) is invalid; convert the file to UTF-8") from None
            if bytes_before == 0:
                text = text.removeprefix("\ufeff")  # a byte-order mark is not part of the text
            bytes_before, lines_before = bytes_before + len(raw), lines_before + raw.count(b"\n")
            pending += text
            if not raw:
                break
            # only the new text is searched: a file without cut points costs one pass, not one per read
            cut = _safe_cut(pending, len(pending) - len(text) - 1) if len(pending) >= piece_bytes else 0
            if cut:
                yield pending[:cut]
                pending = pending[cut:]
    if pending:
        yield pending


def _safe_cut(text: str, start: int = 0) -> int:
    """The index just after the last newline of `text[start:]` with a non-space character on both sides, or 0."""
    index = text.rfind("\n", max(start, 1), len(text) - 1)
    while index > 0:
        if not text[index - 1].isspace() and not text[index + 1].isspace():
            return index + 1
        index = text.rfind("\n", max(start, 1), index)
    return 0


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    """The non-empty `text_field` strings of a JSON-lines file, line by line (blank lines skipped)."""
    with open(path, encoding="utf-8-sig") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}, line {number}: not JSON ({error.msg})") from None
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                fields = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise ValueError(f"{path}, line {number}: no string field {text_field!r} (found {fields}); "
                                 "choose the field with --text-field")
            if text:
                yield text


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


# --- prepared datasets ------------------------------------------------------------------------------------------------
class TokenDataset:
    """A prepared folder: its tokenizer, and per split ("train", "val") a list of memory-mapped token arrays (one per
    file the split spans)."""

    def __init__(self, directory: Path, tokenizer, splits: dict[str, list[np.ndarray]], manifest: dict):
        self.directory = directory
        self.tokenizer = tokenizer
        self.splits = splits
        self.manifest = manifest

    @property
    def token_counts(self) -> dict[str, int]:
        return {split: sum(len(piece) for piece in pieces) for split, pieces in self.splits.items()}

    @classmethod
    def open(cls, directory) -> TokenDataset:
        """Map a folder written by `prepare_dataset` or `prepare_shards`: FileNotFoundError without meta.json,
        ValueError when it is malformed or a file's size disagrees with it."""
        directory = Path(directory)
        meta_path = directory / META_NAME
        if not meta_path.is_file():
            raise FileNotFoundError(f"{directory} is not a prepared dataset: {META_NAME} is missing")
        try:
            manifest = _complete_manifest(json.loads(meta_path.read_text(encoding="utf-8")))
            tokenizer = tokenizer_from_dict(manifest["tokenizer"])
            dtype = np.dtype(manifest["dtype"])
            shard_tokens = {shard["file"]: int(shard["tokens"]) for shard in manifest["shards"]}
            ranges = {split: [(name, int(start), int(stop)) for name, start, stop in manifest["splits"][split]]
                      for split in SPLITS}
            if dtype not in (np.uint16, np.uint32) or not all(map(_SHARD_FILE.match, shard_tokens)) or any(
                    name not in shard_tokens or not 0 <= start < stop <= shard_tokens[name]
                    for split_ranges in ranges.values() for name, start, stop in split_ranges):
                raise ValueError("its dtype, file names or split ranges are invalid")
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{meta_path} is malformed ({error!r}); prepare the dataset again") from None
        shards = {}
        for name, count in shard_tokens.items():
            path = directory / name
            expected_bytes = count * dtype.itemsize
            actual_bytes = path.stat().st_size if path.is_file() else None
            if count == 0 or actual_bytes != expected_bytes:
                raise ValueError(
                    f"{path} is missing or incomplete: {META_NAME} records {count} tokens ({expected_bytes} bytes), "
                    f"the file has {actual_bytes} bytes; prepare the dataset again"
                )
            shards[name] = np.memmap(path, dtype=dtype, mode="r")
        splits = {split: [shards[name][start:stop] for name, start, stop in ranges[split]] for split in SPLITS}
        return cls(directory, tokenizer, splits, manifest)

    def __repr__(self) -> str:
        counts = ", ".join(f"{split}={count:,}" for split, count in self.token_counts.items())
        return f"TokenDataset({str(self.directory)!r}, vocab_size={self.tokenizer.vocab_size}, {counts})"


def _complete_manifest(manifest: dict) -> dict:
    """A manifest of this version from one written before shards (train.bin and val.bin, uint16, no counts of
    documents and characters)."""
    if "shards" in manifest:
        return manifest
    counts = {split: int(manifest["tokens"][split]) for split in SPLITS}
    return {**manifest, "dtype": "uint16", "documents": None, "characters": None,
            "shards": [{"file": f"{split}.bin", "tokens": counts[split]} for split in SPLITS],
            "splits": {split: [[f"{split}.bin", 0, counts[split]]] for split in SPLITS}}


def _write_manifest(directory: Path, tokenizer, dtype: np.dtype, shards: list[dict], train_tokens: int,
                    documents: int, characters: int) -> None:
    """meta.json, written last (to disk before it returns): a folder without it is no dataset."""
    splits, position = {"train": [], "val": []}, 0
    for shard in shards:  # the first train_tokens tokens of the files, in order, train; the others validate
        start, stop = position, position + shard["tokens"]
        if start < train_tokens:
            splits["train"].append([shard["file"], 0, min(stop, train_tokens) - start])
        if stop > train_tokens:
            splits["val"].append([shard["file"], max(train_tokens - start, 0), shard["tokens"]])
        position = stop
    manifest = {"tokenizer": tokenizer.to_dict(), "dtype": dtype.name, "documents": documents,
                "characters": characters, "shards": shards, "splits": splits,
                "tokens": {"train": train_tokens, "val": position - train_tokens}}
    _write_durably(directory / META_NAME, json.dumps(manifest).encode("utf-8"))


def _write_durably(path: Path, payload: bytes) -> None:
    with open(path, "wb") as file:
        file.write(payload)
        file.flush()
        os.fsync(file.fileno())


def _check_fraction(train_fraction: float) -> None:
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be between 0 and 1 (exclusive), got {train_fraction!r}")


def prepare_dataset(text: str, directory, *, train_fraction: float = 0.9, tokenizer: CharTokenizer | None = None
                    ) -> TokenDataset:
    """Encode `text` (in memory) and write `train.bin` (the first `train_fraction` of it), `val.bin` (the rest) and
    `meta.json`. The character tokenizer is fitted on the whole text unless one is given. Returns the dataset."""
    if not text:
        raise ValueError("cannot prepare a dataset from empty text")
    _check_fraction(train_fraction)
    if tokenizer is None:
        tokenizer = CharTokenizer.from_text(text)
    dtype = token_dtype(tokenizer.vocab_size)
    ids = tokenizer.encode(text).astype(dtype)
    train_tokens = int(len(ids) * train_fraction)
    if train_tokens == 0 or train_tokens == len(ids):
        raise ValueError(
            f"a text of {len(ids)} tokens is too short to split into train and val with train_fraction={train_fraction}"
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # meta.json goes first and comes back last: a preparation interrupted in between leaves no dataset to open.
    (directory / META_NAME).unlink(missing_ok=True)
    ids[:train_tokens].tofile(directory / "train.bin")
    ids[train_tokens:].tofile(directory / "val.bin")
    shards = [{"file": "train.bin", "tokens": train_tokens}, {"file": "val.bin", "tokens": len(ids) - train_tokens}]
    _write_manifest(directory, tokenizer, dtype, shards, train_tokens, documents=1, characters=len(text))
    return TokenDataset.open(directory)


def prepare_shards(corpus: Corpus, directory, tokenizer, *, train_fraction: float = 0.9, workers: int | None = None,
                   shard_tokens: int = SHARD_TOKENS, progress: bool = True) -> TokenDataset:
    """Stream `corpus` through `workers` encoding processes (default: the CPUs this process may use; 1: none, all
    in this process) into `shard-NNNNN.bin` files of `shard_tokens` tokens (the last one shorter), each document
    followed by the tokenizer's end-of-text token, then write `meta.json`. Memory stays bounded: at most two
    batches of about PIECE_BYTES per worker are in flight. Returns the dataset."""
    _check_fraction(train_fraction)
    workers = available_cpus() if workers is None else workers
    if workers < 1 or shard_tokens < 1:
        raise ValueError(f"workers and shard_tokens must be at least 1, got {workers} and {shard_tokens}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / META_NAME).unlink(missing_ok=True)  # as in prepare_dataset: no dataset until the end
    dtype = token_dtype(tokenizer.vocab_size)
    writer = _ShardWriter(directory, dtype, shard_tokens)
    documents = characters = 0
    total_bytes = sum(path.stat().st_size for path in corpus.files()) or None
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="encoding", disable=not progress,
              mininterval=1.0, dynamic_ncols=True) as bar, _EncoderPool(tokenizer, dtype, workers) as encode_all:

        def counted(pieces: Iterable[tuple[str, bool]]) -> Iterator[tuple[str, bool]]:
            nonlocal documents, characters
            for text, ends_document in pieces:
                documents, characters = documents + ends_document, characters + len(text)
                bar.update(len(text.encode("utf-8", "surrogatepass")))
                yield text, ends_document

        for ids in encode_all(counted(corpus.pieces())):
            writer.write(ids)
    shards = writer.close()
    total = sum(shard["tokens"] for shard in shards)
    train_tokens = int(total * train_fraction)
    if train_tokens == 0 or train_tokens == total:
        raise ValueError(f"a corpus of {total} tokens is too short to split into train and val with "
                         f"train_fraction={train_fraction}")
    _write_manifest(directory, tokenizer, dtype, shards, train_tokens, documents, characters)
    return TokenDataset.open(directory)


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the platform has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class _ShardWriter:
    """Appends token ids to shard files of `shard_tokens` tokens each; `close()` returns their names and counts."""

    def __init__(self, directory: Path, dtype: np.dtype, shard_tokens: int):
        self.directory, self.dtype, self.shard_tokens = directory, dtype, shard_tokens
        self.shards: list[dict] = []
        self._file = None

    def write(self, ids: np.ndarray) -> None:
        while len(ids):
            if self._file is None or self.shards[-1]["tokens"] == self.shard_tokens:
                self._next_file()
            room = self.shard_tokens - self.shards[-1]["tokens"]
            self._file.write(ids[:room].astype(self.dtype, copy=False).tobytes())
            self.shards[-1]["tokens"] += min(room, len(ids))
            ids = ids[room:]

    def _next_file(self) -> None:
        self._close_file()
        name = f"shard-{len(self.shards):05d}.bin"
        self._file = open(self.directory / name, "wb")
        self.shards.append({"file": name, "tokens": 0})

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())  # on disk before the manifest that names it
            self._file.close()

    def close(self) -> list[dict]:
        self._close_file()
        self._file = None
        return self.shards


def encode_pieces(tokenizer, pieces: Sequence[tuple[str, bool]], dtype) -> np.ndarray:
    """The ids of consecutive pieces of a corpus, the end-of-text id after each that ends a document, as `dtype`."""
    ids = []
    for text, ends_document in pieces:
        ids.append(tokenizer.encode_ordinary(text))
        if ends_document and tokenizer.eot_id is not None:
            ids.append(np.array([tokenizer.eot_id]))
    return np.concatenate(ids).astype(dtype) if ids else np.zeros(0, dtype)


class _EncoderPool:
    """`with _EncoderPool(tokenizer, dtype, workers) as encode_all:` maps pieces to their ids in order, in worker
    processes that each rebuild the tokenizer once from its description (in this process when workers == 1)."""

    def __init__(self, tokenizer, dtype: np.dtype, workers: int):
        self.tokenizer, self.dtype, self.workers = tokenizer, dtype, workers
        self._pool = None

    def __enter__(self):
        if self.workers == 1:
            return lambda pieces: (encode_pieces(self.tokenizer, batch, self.dtype) for batch in _batches(pieces))
        # fork where the platform has it: a worker starts at once, without importing tinytf again
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else None)
        self._pool = context.Pool(self.workers, _start_worker, (self.tokenizer.to_dict(), self.dtype.str))
        return self._encode_in_order

    def _encode_in_order(self, pieces: Iterable[tuple[str, bool]]) -> Iterator[np.ndarray]:
        # apply_async with a bounded queue, not Pool.imap: imap's feeder thread would read the whole corpus ahead
        in_flight = collections.deque()
        for batch in _batches(pieces):
            in_flight.append(self._pool.apply_async(_encode_in_worker, (batch,)))
            if len(in_flight) >= 2 * self.workers:
                yield in_flight.popleft().get()
        while in_flight:
            yield in_flight.popleft().get()

    def __exit__(self, *exc_info):
        if self._pool is not None:
            self._pool.terminate()  # done, or interrupted: the workers hold nothing worth waiting for
            self._pool.join()


def _batches(pieces: Iterable[tuple[str, bool]], batch_bytes: int = PIECE_BYTES) -> Iterator[list[tuple[str, bool]]]:
    """Consecutive pieces grouped to about `batch_bytes` characters: one task per worker round trip."""
    batch, size = [], 0
    for piece in pieces:
        batch.append(piece)
        size += len(piece[0])
        if size >= batch_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


_worker_tokenizer = None
_worker_dtype = None


def _start_worker(description: dict, dtype: str) -> None:
    global _worker_tokenizer, _worker_dtype
    _worker_tokenizer, _worker_dtype = tokenizer_from_dict(description), np.dtype(dtype)


def _encode_in_worker(pieces: list[tuple[str, bool]]) -> np.ndarray:
    return encode_pieces(_worker_tokenizer, pieces, _worker_dtype)


# --- batches ----------------------------------------------------------------------------------------------------------
class BatchSampler:
    """Random training windows: x is `block_size` consecutive tokens, y the same window shifted by one.

    A split is one token array or a list of them (the shards it spans); a window lies inside one array, each of its
    starting positions equally likely. Each split draws from its own seeded `numpy.random.Generator`, so evaluating
    does not change the sequence of training batches, and `state_dict()` / `load_state_dict()` let a resumed run
    draw exactly the same batches.
    """

    def __init__(self, splits: Mapping[str, np.ndarray | Sequence[np.ndarray]], batch_size: int, block_size: int,
                 seed: int = 0):
        for name, value in (("batch_size", batch_size), ("block_size", block_size)):
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.batch_size = int(batch_size)
        self.block_size = int(block_size)
        self.splits = {split: [np.asarray(tokens)] if hasattr(tokens, "dtype") else [np.asarray(a) for a in tokens]
                       for split, tokens in splits.items()}
        # window_starts[split][k]: how many windows the arrays before array k hold (a running total)
        self._window_starts = {}
        for split, arrays in self.splits.items():
            windows = np.array([max(len(tokens) - self.block_size, 0) for tokens in arrays], dtype=np.int64)
            if windows.sum() == 0:
                total = sum(len(tokens) for tokens in arrays)
                spread = f" in {len(arrays)} files" if total > self.block_size else ""
                raise ValueError(
                    f"the {split} split has {total} tokens{spread}, fewer than block_size + 1 = {block_size + 1}"
                    f"{' in any one' if spread else ''}; use a smaller block size or more text"
                )
            self._window_starts[split] = np.concatenate([[0], np.cumsum(windows)])
        names = sorted(self.splits)
        seeds = np.random.SeedSequence(seed).spawn(len(names))
        self._generators = {name: np.random.default_rng(child) for name, child in zip(names, seeds)}

    def get_batch(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(x, y), both int64 of shape (batch_size, block_size), with y[:, t] == x[:, t + 1] inside the window."""
        if split not in self.splits:
            raise ValueError(f"unknown split {split!r}: expected one of {sorted(self.splits)}")
        window_starts = self._window_starts[split]
        starts = self._generators[split].integers(0, window_starts[-1], size=self.batch_size)
        arrays = np.searchsorted(window_starts, starts, side="right") - 1
        offsets = starts - window_starts[arrays]
        windows = np.stack([self.splits[split][array][offset:offset + self.block_size + 1]
                            for array, offset in zip(arrays, offsets)]).astype(np.int64)  # (B, T + 1)
        return np.ascontiguousarray(windows[:, :-1]), np.ascontiguousarray(windows[:, 1:])

    def state_dict(self) -> dict:
        """The generators' states, JSON-able."""
        return {split: generator.bit_generator.state for split, generator in self._generators.items()}

    def load_state_dict(self, state: Mapping) -> None:
        if set(state) != set(self._generators):
            raise ValueError(f"sampler state has splits {sorted(state)}, expected {sorted(self._generators)}")
        for split, generator in self._generators.items():
            generator.bit_generator.state = state[split]


def document_positions(ids: np.ndarray, eot_id: int) -> np.ndarray:
    """int64 (B, T): each token's position inside its document, for windows that pack several documents.

    A document ends with the end-of-text token `eot_id`; the token after it starts the next one at position 0, as
    does each row's first token. Given to the model as `position_ids`, these keep attention inside each document
    (the runs that start at 0, attended as variable-length sequences) and restart the positional encoding.
    """
    ids = np.asarray(ids)
    if ids.ndim != 2:
        raise ValueError(f"document_positions: ids must be (B, T), got shape {ids.shape}")
    starts = np.zeros(ids.shape, dtype=bool)
    starts[:, 0] = True
    starts[:, 1:] = ids[:, :-1] == eot_id
    flat_starts = starts.ravel()
    start_indices = np.flatnonzero(flat_starts)
    document_of_token = np.cumsum(flat_starts) - 1
    return (np.arange(ids.size) - start_indices[document_of_token]).reshape(ids.shape)
