"""Tokenizers: characters, a Hugging Face `tokenizer.json`, a byte-level BPE trained on the corpus, tiktoken.

Each one has `vocab_size`; `eot_id`, the end-of-text token that separates documents (None for characters);
`encode(text)`, what a prompt becomes (with the tokens a tokenizer adds itself, such as Llama's BOS);
`encode_ordinary(text)`, plain text alone, for corpora; `decode(ids)`; and `to_dict()`, a JSON-able description that
`tokenizer_from_dict` turns back into the tokenizer, so that a run's data and checkpoints carry their tokenizer whole.
`tokenizer_from_spec` reads the training command's --tokenizer: char, PATH/tokenizer.json, bpe:N or tiktoken:NAME.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np

MAX_VOCAB_SIZE = int(np.iinfo(np.uint16).max)  # 65,535 characters: character ids are stored as uint16
END_OF_TEXT = "<|endoftext|>"  # GPT-2's; the token a trained BPE reserves to separate documents
# End-of-text names looked up in a tokenizer.json without a tokenizer_config.json beside it, in this order.
KNOWN_END_OF_TEXT_TOKENS = (END_OF_TEXT, "<|end_of_text|>", "</s>", "<eos>")
BYTE_ALPHABET_SIZE = 256  # a byte-level BPE starts from one token per byte

_UNKNOWN_CHARS_SHOWN = 20


def tokenizer_from_spec(spec: str, corpus_texts: Callable[[], Iterable[str]]):
    """The tokenizer that --tokenizer `spec` names: "char" and "bpe:N" are fitted on `corpus_texts()` (the corpus'
    pieces, streamed), a path to a tokenizer.json is read, "tiktoken:NAME" is tiktoken's encoding NAME."""
    if spec == "char":
        return CharTokenizer.from_texts(corpus_texts())
    if spec.startswith("bpe:"):
        size = spec.removeprefix("bpe:")
        if not size.isdigit() or int(size) <= BYTE_ALPHABET_SIZE:
            raise ValueError(f"--tokenizer bpe:N needs a vocabulary size N above {BYTE_ALPHABET_SIZE} (one token per "
                             f"byte, plus {END_OF_TEXT} and the merges), got {spec!r}")
        return train_bpe(corpus_texts(), int(size))
    if spec.startswith("tiktoken:"):
        return TiktokenTokenizer(spec.removeprefix("tiktoken:"))
    path = Path(spec)
    if path.is_dir():
        path = path / "tokenizer.json"  # a model folder
    if not path.is_file():
        raise ValueError(f"--tokenizer {spec!r} is not char, bpe:N, tiktoken:NAME or an existing tokenizer.json file "
                         "(or a folder holding one)")
    return HuggingFaceTokenizer.from_file(path)


def tokenizer_from_dict(description: Mapping):
    """The tokenizer that `to_dict()` described (as saved in a prepared dataset or a checkpoint)."""
    kinds = {"char": CharTokenizer, "huggingface": HuggingFaceTokenizer, "tiktoken": TiktokenTokenizer}
    kind = description.get("type") if isinstance(description, Mapping) else None
    if kind not in kinds:
        raise ValueError(f"not a tokenizer description (expected a 'type' of {', '.join(kinds)}): {description!r:.200}")
    return kinds[kind].from_dict(description)


def _import_tokenizers():
    try:
        import tokenizers  # optional (the interop extra): only for tokenizer.json files and bpe:N
    except ImportError:
        raise ImportError("Hugging Face tokenizers (a tokenizer.json, bpe:N) need the tokenizers package: "
                          "pip install tokenizers") from None
    return tokenizers


def train_bpe(texts: Iterable[str], vocab_size: int) -> HuggingFaceTokenizer:
    """A byte-level BPE (GPT-2's scheme) of at most `vocab_size` tokens, END_OF_TEXT among them, learned from `texts`
    as they stream past; a small corpus may hold fewer merges than asked for, and the vocabulary is then smaller."""
    tokenizers = _import_tokenizers()
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT], show_progress=False,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    return HuggingFaceTokenizer(tokenizer, END_OF_TEXT)


class HuggingFaceTokenizer:
    """A `tokenizers.Tokenizer` (GPT-2's, Llama's, or one trained by `train_bpe`) and its end-of-text token."""

    def __init__(self, tokenizer, end_of_text: str | None):
        self._tokenizer = tokenizer
        self.end_of_text = end_of_text
        self._eot_id = None if end_of_text is None else tokenizer.token_to_id(end_of_text)
        if end_of_text is not None and self._eot_id is None:
            raise ValueError(f"the tokenizer has no token {end_of_text!r} to end documents with")

    @classmethod
    def from_file(cls, path) -> HuggingFaceTokenizer:
        """Read a tokenizer.json; its end-of-text token is the eos_token of a tokenizer_config.json beside it, or
        else the first of KNOWN_END_OF_TEXT_TOKENS in its vocabulary (None when there is none)."""
        tokenizers = _import_tokenizers()
        path = Path(path)
        try:
            tokenizer = tokenizers.Tokenizer.from_file(str(path))
        except Exception as error:  # the library raises plain Exceptions
            raise ValueError(f"cannot read {path}: {error}") from None
        return cls(tokenizer, _end_of_text_token(tokenizer, path.with_name("tokenizer_config.json")))

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size()

    @property
    def eot_id(self) -> int | None:
        return self._eot_id

    def encode(self, text: str) -> np.ndarray:
        """Token ids of `text` with the special tokens the tokenizer adds itself (Llama's BOS), int64 of shape (n,)."""
        return np.array(self._tokenizer.encode(text).ids, dtype=np.int64)

    def encode_ordinary(self, text: str) -> np.ndarray:
        """Token ids of `text` alone, int64 of shape (n,)."""
        # encode_batch_fast skips the character offsets that encode computes (1.5x faster); one text keeps it to
        # one thread, so that parallel preparation is the worker processes' alone
        return np.array(self._tokenizer.encode_batch_fast([text], add_special_tokens=False)[0].ids, dtype=np.int64)

    def decode(self, ids) -> str:
        """The text of a sequence of ids, special tokens (the end of text) included, so that decode inverts encode."""
        return self._tokenizer.decode([int(token) for token in ids], skip_special_tokens=False)

    def to_dict(self) -> dict:
        return {"type": "huggingface", "tokenizer_json": self._tokenizer.to_str(), "end_of_text": self.end_of_text}

    @classmethod
    def from_dict(cls, description: Mapping) -> HuggingFaceTokenizer:
        tokenizers = _import_tokenizers()
        try:
            tokenizer = tokenizers.Tokenizer.from_str(description["tokenizer_json"])
        except Exception as error:  # a KeyError, or the library's plain Exception for malformed JSON
            raise ValueError(f"a damaged Hugging Face tokenizer description ({type(error).__name__}: {error})") from None
        return cls(tokenizer, description.get("end_of_text"))

    def __repr__(self) -> str:
        return f"HuggingFaceTokenizer(vocab_size={self.vocab_size}, end_of_text={self.end_of_text!r})"


def _end_of_text_token(tokenizer, config_path: Path) -> str | None:
    if config_path.is_file():
        try:
            eos = json.loads(config_path.read_text(encoding="utf-8")).get("eos_token")
        except (ValueError, AttributeError) as error:
            raise ValueError(f"cannot read {config_path}: {error}") from None
        eos = eos.get("content") if isinstance(eos, dict) else eos  # older files spell it {"content": ...}
        if isinstance(eos, str) and tokenizer.token_to_id(eos) is not None:
            return eos
    return next((name for name in KNOWN_END_OF_TEXT_TOKENS if tokenizer.token_to_id(name) is not None), None)


class TiktokenTokenizer:
    """One of tiktoken's encodings by name ("gpt2", "cl100k_base", ...), where the tiktoken package is installed."""

    def __init__(self, name: str):
        try:
            import tiktoken  # optional: not a dependency of tinytf
        except ImportError:
            raise ImportError(f"--tokenizer tiktoken:{name} needs the tiktoken package (pip install tiktoken); "
                              "or pass a tokenizer.json, or bpe:N") from None
        try:
            self._encoding = tiktoken.get_encoding(name)
        except ValueError as error:
            raise ValueError(f"tiktoken has no encoding {name!r}: {error}") from None
        self.name = name

    @property
    def vocab_size(self) -> int:
        return self._encoding.n_vocab

    @property
    def eot_id(self) -> int:
        return self._encoding.eot_token

    def encode(self, text: str) -> np.ndarray:
        return self.encode_ordinary(text)

    def encode_ordinary(self, text: str) -> np.ndarray:
        return np.array(self._encoding.encode_ordinary(text), dtype=np.int64)

    def decode(self, ids) -> str:
        return self._encoding.decode([int(token) for token in ids])

    def to_dict(self) -> dict:
        return {"type": "tiktoken", "name": self.name}

    @classmethod
    def from_dict(cls, description: Mapping) -> TiktokenTokenizer:
        return cls(str(description.get("name")))

    def __repr__(self) -> str:
        return f"TiktokenTokenizer({self.name!r})"


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

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> CharTokenizer:
        """The vocabulary of all the pieces of a corpus streamed in turn (never joined in memory)."""
        chars: set[str] = set()
        for text in texts:
            chars.update(text)
        return cls().fit("".join(chars))

    def fit(self, text: str) -> CharTokenizer:
        """Take the vocabulary from `text` (replacing the current one); returns self."""
        if not text:
            raise ValueError("cannot fit a tokenizer on empty text")
        self._set_vocabulary(text)
        return self

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    @property
    def eot_id(self) -> None:
        """Characters have no end-of-text token: documents are joined as they are."""
        return None

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

    encode_ordinary = encode  # characters have no special tokens to leave out

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


Tokenizer = CharTokenizer | HuggingFaceTokenizer | TiktokenTokenizer  # what tokenizer_from_spec and _from_dict return


def _code_points(text: str) -> np.ndarray:
    # surrogatepass: a str may hold lone surrogates, which are still distinct characters to the tokenizer.
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4").astype(np.uint32)


