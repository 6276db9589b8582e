import json

import numpy as np
import pytest

from tinytf.data import (
    MAX_VOCAB_SIZE,
    BatchSampler,
    CharTokenizer,
    TokenDataset,
    default_corpus,
    prepare_dataset,
    read_text,
)

TEXT = "ROMEO:\nBut, soft! what light through yonder window breaks?\nJULIET:\nAy me! — ☃ 𝄞\n" * 20


# --- tokenizer --------------------------------------------------------------------------------------------------------
def test_tokenizer_round_trips_text_with_newlines_and_astral_characters():
    tokenizer = CharTokenizer.from_text(TEXT)
    ids = tokenizer.encode(TEXT)
    assert ids.dtype == np.int64 and ids.shape == (len(TEXT),)
    assert tokenizer.decode(ids) == TEXT
    assert tokenizer.decode(ids.tolist()) == TEXT


def test_tokenizer_vocabulary_is_the_distinct_characters_in_code_point_order():
    tokenizer = CharTokenizer.from_text("banana\n")
    assert tokenizer.chars == "\nabn"
    assert tokenizer.vocab_size == 4
    assert tokenizer.encode("nab").tolist() == [3, 1, 2]


def test_fit_replaces_the_vocabulary():
    tokenizer = CharTokenizer.from_text("abc")
    assert tokenizer.fit("xy") is tokenizer
    assert tokenizer.chars == "xy"
    with pytest.raises(ValueError, match="empty text"):
        tokenizer.fit("")


def test_encoding_empty_text_gives_no_ids():
    assert CharTokenizer.from_text("ab").encode("").shape == (0,)


def test_tokenizer_survives_json_through_to_dict():
    tokenizer = CharTokenizer.from_text(TEXT)
    restored = CharTokenizer.from_dict(json.loads(json.dumps(tokenizer.to_dict())))
    assert restored.chars == tokenizer.chars
    assert restored.decode(restored.encode(TEXT)) == TEXT


@pytest.mark.parametrize("description", [{"type": "bpe"}, {"type": "char", "chars": "ba"}, {"type": "char"}, "abc"])
def test_from_dict_rejects_a_malformed_description(description):
    with pytest.raises(ValueError):
        CharTokenizer.from_dict(description)


def test_unknown_characters_are_listed_once_each_in_text_order():
    tokenizer = CharTokenizer.from_text("abc")
    with pytest.raises(ValueError) as error:
        tokenizer.encode("abzé\nzz😀a")
    assert str(error.value) == (
        "the text contains 4 character(s) that are not in the tokenizer's vocabulary of 3: 'z', 'é', '\\n', '😀'"
    )


def test_many_unknown_characters_are_truncated():
    tokenizer = CharTokenizer.from_text("a")
    with pytest.raises(ValueError, match=r"and 80 more$"):
        tokenizer.encode("".join(chr(0x4E00 + i) for i in range(100)))


def test_more_than_65535_distinct_characters_are_refused():
    chars = "".join(chr(0x10000 + i) for i in range(MAX_VOCAB_SIZE + 1))
    with pytest.raises(ValueError, match="65,536 distinct characters; at most 65,535"):
        CharTokenizer.from_text(chars)
    assert CharTokenizer.from_text(chars[:-1]).vocab_size == MAX_VOCAB_SIZE


@pytest.mark.parametrize(
    "ids, match",
    [([0, 5], "token id 5 is out of range for the vocabulary of 3"), ([-1], "token id -1"),
     ([[0, 1]], "one sequence"), ([0.5], "integers")],
)
def test_decode_rejects_bad_ids(ids, match):
    with pytest.raises(ValueError, match=match):
        CharTokenizer.from_text("abc").decode(ids)


# --- text files -------------------------------------------------------------------------------------------------------
def test_read_text_reads_utf8_and_drops_a_byte_order_mark(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes("\ufeffhé\nllo".encode())
    assert read_text(path) == "hé\nllo"


def test_read_text_errors_name_the_path_and_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="data file not found: .*missing.txt"):
        read_text(tmp_path / "missing.txt")
    with pytest.raises(IsADirectoryError, match="is a folder"):
        read_text(tmp_path)
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(ValueError, match="data file is empty: .*empty.txt"):
        read_text(tmp_path / "empty.txt")
    (tmp_path / "latin1.txt").write_bytes("ok\ncafé".encode("latin-1"))
    with pytest.raises(ValueError, match=r"not UTF-8 text: .*latin1.txt: byte 0xe9 at offset 6 \(line 2\)"):
        read_text(tmp_path / "latin1.txt")


def test_default_corpus_is_python_documentation_available_offline():
    text = default_corpus()
    assert len(text) > 400_000
    assert "lambda" in text and CharTokenizer.from_text(text).vocab_size < 256


# --- prepared datasets ------------------------------------------------------------------------------------------------
def test_prepare_writes_uint16_splits_read_back_through_memmap(tmp_path):
    dataset = prepare_dataset(TEXT, tmp_path / "data")
    train, val = dataset.splits["train"], dataset.splits["val"]
    assert isinstance(train, np.memmap) and train.dtype == np.uint16
    assert len(train) == int(len(TEXT) * 0.9) and len(train) + len(val) == len(TEXT)
    assert (tmp_path / "data" / "train.bin").stat().st_size == 2 * len(train)
    assert dataset.tokenizer.decode(np.concatenate([train, val])) == TEXT

    reopened = TokenDataset.open(tmp_path / "data")
    assert reopened.tokenizer.chars == dataset.tokenizer.chars
    np.testing.assert_array_equal(reopened.splits["val"], val)


def test_prepare_honours_train_fraction_and_a_given_tokenizer(tmp_path):
    tokenizer = CharTokenizer.from_text(TEXT + "XYZ")
    dataset = prepare_dataset(TEXT, tmp_path, train_fraction=0.5, tokenizer=tokenizer)
    assert len(dataset.splits["train"]) == len(TEXT) // 2
    assert dataset.tokenizer.vocab_size == tokenizer.vocab_size


@pytest.mark.parametrize("fraction", [0.0, 1.0, 1.5, -0.1])
def test_prepare_rejects_a_train_fraction_outside_0_1(tmp_path, fraction):
    with pytest.raises(ValueError, match="train_fraction must be between 0 and 1"):
        prepare_dataset(TEXT, tmp_path, train_fraction=fraction)


def test_prepare_rejects_text_too_short_to_split(tmp_path):
    with pytest.raises(ValueError, match="too short to split"):
        prepare_dataset("a", tmp_path)
    with pytest.raises(ValueError, match="empty text"):
        prepare_dataset("", tmp_path)


def test_open_rejects_a_missing_or_incomplete_dataset(tmp_path):
    with pytest.raises(FileNotFoundError, match="meta.json is missing"):
        TokenDataset.open(tmp_path)
    prepare_dataset(TEXT, tmp_path)
    with open(tmp_path / "val.bin", "r+b") as file:
        file.truncate(10)
    with pytest.raises(ValueError, match="val.bin is missing or incomplete"):
        TokenDataset.open(tmp_path)
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="meta.json is malformed"):
        TokenDataset.open(tmp_path)


# --- batches ----------------------------------------------------------------------------------------------------------
def _splits():
    tokens = CharTokenizer.from_text(TEXT).encode(TEXT).astype(np.uint16)
    return {"train": tokens[:1000], "val": tokens[1000:]}


def test_batches_are_windows_of_the_split_with_targets_shifted_by_one():
    tokens = np.arange(1000, dtype=np.uint16)  # token value == position, so a window shows where it came from
    x, y = BatchSampler({"train": tokens}, batch_size=5, block_size=16, seed=0).get_batch("train")
    assert x.shape == y.shape == (5, 16) and x.dtype == y.dtype == np.int64
    np.testing.assert_array_equal(x, x[:, :1] + np.arange(16))
    np.testing.assert_array_equal(y, x + 1)


def test_the_last_window_of_a_minimal_split_is_reachable():
    tokens = np.arange(9, dtype=np.uint16)
    x, y = BatchSampler({"train": tokens}, batch_size=3, block_size=8).get_batch("train")
    np.testing.assert_array_equal(x, np.tile(np.arange(8), (3, 1)))
    np.testing.assert_array_equal(y, np.tile(np.arange(1, 9), (3, 1)))


def test_same_seed_same_batches_and_other_seed_other_batches():
    first = BatchSampler(_splits(), 4, 8, seed=7)
    second = BatchSampler(_splits(), 4, 8, seed=7)
    other = BatchSampler(_splits(), 4, 8, seed=8)
    for _ in range(3):
        x1, _ = first.get_batch("train")
        np.testing.assert_array_equal(x1, second.get_batch("train")[0])
    assert not np.array_equal(first.get_batch("train")[0], other.get_batch("train")[0])


def test_evaluation_batches_do_not_shift_the_training_sequence():
    with_eval, without_eval = BatchSampler(_splits(), 4, 8, seed=1), BatchSampler(_splits(), 4, 8, seed=1)
    with_eval.get_batch("val")
    np.testing.assert_array_equal(with_eval.get_batch("train")[0], without_eval.get_batch("train")[0])


def test_restored_state_continues_the_same_batch_sequence():
    sampler = BatchSampler(_splits(), 4, 8, seed=3)
    sampler.get_batch("train")
    sampler.get_batch("val")
    state = json.loads(json.dumps(sampler.state_dict()))  # as it travels in a checkpoint
    expected = [sampler.get_batch(split)[0] for split in ("train", "val", "train")]

    resumed = BatchSampler(_splits(), 4, 8, seed=999)
    resumed.load_state_dict(state)
    for split, batch in zip(("train", "val", "train"), expected):
        np.testing.assert_array_equal(resumed.get_batch(split)[0], batch)


def test_sampler_errors_are_clear():
    with pytest.raises(ValueError, match=r"the val split has 8 tokens, fewer than block_size \+ 1 = 9"):
        BatchSampler({"train": np.zeros(100, np.uint16), "val": np.zeros(8, np.uint16)}, 2, 8)
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        BatchSampler(_splits(), 0, 8)
    sampler = BatchSampler(_splits(), 2, 8)
    with pytest.raises(ValueError, match="unknown split 'test'"):
        sampler.get_batch("test")
    with pytest.raises(ValueError, match="sampler state has splits"):
        sampler.load_state_dict({"train": {}})
