import hashlib
import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from tinytf.data import (
    MAX_VOCAB_SIZE,
    BatchSampler,
    CharTokenizer,
    Corpus,
    TokenDataset,
    default_corpus,
    document_positions,
    prepare_dataset,
    prepare_shards,
    read_text,
    token_dtype,
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
    (train,), (val,) = dataset.splits["train"], dataset.splits["val"]  # one file per split
    assert isinstance(train, np.memmap) and train.dtype == np.uint16
    assert len(train) == int(len(TEXT) * 0.9) and len(train) + len(val) == len(TEXT)
    assert (tmp_path / "data" / "train.bin").stat().st_size == 2 * len(train)
    assert dataset.tokenizer.decode(np.concatenate([train, val])) == TEXT

    reopened = TokenDataset.open(tmp_path / "data")
    assert reopened.tokenizer.chars == dataset.tokenizer.chars
    np.testing.assert_array_equal(reopened.splits["val"][0], val)


def test_prepare_honours_train_fraction_and_a_given_tokenizer(tmp_path):
    tokenizer = CharTokenizer.from_text(TEXT + "XYZ")
    dataset = prepare_dataset(TEXT, tmp_path, train_fraction=0.5, tokenizer=tokenizer)
    assert dataset.token_counts["train"] == len(TEXT) // 2
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


# --- corpora streamed from disk ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bpe():
    pytest.importorskip("tokenizers", reason="byte-level BPE is the tokenizers package's (the interop extra)")
    from tinytf.tokenization import train_bpe

    return train_bpe(iter([TEXT, "the quick brown fox jumps over the lazy dog\n" * 5]), 300)


def _write_corpus_folder(folder):
    """Three documents in two text files and a JSON-lines file, a hidden file that is skipped, in sorted order."""
    folder.mkdir()
    (folder / "a.txt").write_text(TEXT, encoding="utf-8")
    (folder / "b").mkdir()
    (folder / "b" / "c.jsonl").write_text(json.dumps({"text": "the quick brown fox", "id": 1}) + "\n\n"
                                          + json.dumps({"text": "jumps over 𝄞"}) + "\n", encoding="utf-8")
    (folder / ".hidden.txt").write_text("never read")
    return [TEXT, "the quick brown fox", "jumps over 𝄞"]


def test_a_text_file_streams_in_pieces_that_join_to_its_text_and_encode_as_the_whole(tmp_path, bpe):
    from tinytf.data import _text_file_pieces

    path = tmp_path / "corpus.txt"
    path.write_bytes(b"\xef\xbb\xbf" + (TEXT * 5).encode("utf-8"))  # a byte-order mark, and multi-byte characters
    pieces = list(_text_file_pieces(path, piece_bytes=100))  # most reads cut a character in two
    assert len(pieces) > 10 and "".join(pieces) == read_text(path)
    encoded_in_pieces = np.concatenate([bpe.encode_ordinary(piece) for piece in pieces])
    np.testing.assert_array_equal(encoded_in_pieces, bpe.encode_ordinary(read_text(path)))


def test_streamed_errors_name_the_byte_and_line_as_read_text_does(tmp_path):
    from tinytf.data import _text_file_pieces

    path = tmp_path / "latin1.txt"
    path.write_bytes(("é\n" * 300).encode("utf-8") + "naïve".encode("latin-1"))
    with pytest.raises(ValueError) as whole:
        read_text(path)
    with pytest.raises(ValueError) as streamed:
        list(_text_file_pieces(path, piece_bytes=64))
    assert str(streamed.value) == str(whole.value) and "line 301" in str(whole.value)


def test_a_folder_yields_its_files_and_json_lines_as_documents(tmp_path):
    documents = _write_corpus_folder(tmp_path / "corpus")
    corpus = Corpus(tmp_path / "corpus")
    pieces = list(corpus.pieces())
    assert [text for text, _ in pieces] == documents and all(ends for _, ends in pieces)
    expected = hashlib.sha256("\0".join(documents).encode("utf-8")).hexdigest()
    assert corpus.sha256() == expected


def test_a_single_file_hashes_as_its_text(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    assert Corpus(path).sha256() == hashlib.sha256(TEXT.encode("utf-8")).hexdigest()


def test_json_lines_errors_name_the_line_and_the_fields(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "no text"}) + "\n")
    with pytest.raises(ValueError, match=r"corpus.jsonl, line 2: no string field 'text' \(found \['body'\]\)"):
        list(Corpus(path).pieces())
    path.write_text(json.dumps({"body": "chosen", "text": 1}) + "\n")
    assert [text for text, _ in Corpus(path, text_field="body").pieces()] == ["chosen"]
    path.write_text("{broken\n")
    with pytest.raises(ValueError, match="line 1: not JSON"):
        list(Corpus(path).pieces())
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no files"):
        list(Corpus(tmp_path / "empty").pieces())


# --- shards -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("workers", [1, 2])
def test_shards_and_manifest_equal_a_one_shot_encoding(tmp_path, bpe, workers):
    documents = _write_corpus_folder(tmp_path / "corpus")
    dataset = prepare_shards(Corpus(tmp_path / "corpus"), tmp_path / "data", bpe, workers=workers, shard_tokens=300,
                             progress=False)
    one_shot = np.concatenate([np.append(bpe.encode_ordinary(document), bpe.eot_id) for document in documents])
    manifest = json.loads((tmp_path / "data" / "meta.json").read_text())
    shard_files = sorted((tmp_path / "data").glob("shard-*.bin"))
    assert [shard["file"] for shard in manifest["shards"]] == [path.name for path in shard_files]
    assert len(shard_files) == -(-len(one_shot) // 300) and all(s["tokens"] == 300 for s in manifest["shards"][:-1])
    written = np.concatenate([np.fromfile(path, dtype=np.uint16) for path in shard_files])
    np.testing.assert_array_equal(written, one_shot)
    assert (manifest["dtype"], manifest["documents"]) == ("uint16", 3)
    assert manifest["characters"] == sum(map(len, documents))
    train_tokens = int(len(one_shot) * 0.9)
    assert manifest["tokens"] == {"train": train_tokens, "val": len(one_shot) - train_tokens}
    np.testing.assert_array_equal(np.concatenate(dataset.splits["train"]), one_shot[:train_tokens])
    np.testing.assert_array_equal(np.concatenate(dataset.splits["val"]), one_shot[train_tokens:])
    assert TokenDataset.open(tmp_path / "data").tokenizer.to_dict() == bpe.to_dict()


def test_vocabularies_beyond_uint16_are_stored_as_uint32(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tinytf.tokenization import HuggingFaceTokenizer

    assert token_dtype(65_536) == np.uint16 and token_dtype(65_537) == np.uint32
    vocabulary = {f"w{i}": i for i in range(70_000)}
    library = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocabulary, unk_token="w0"))
    library.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tokenizer = HuggingFaceTokenizer(library, end_of_text="w69999")
    (tmp_path / "corpus.txt").write_text("w65535 w65536 w7 " * 20 + "w69998")
    dataset = prepare_shards(Corpus(tmp_path / "corpus.txt"), tmp_path / "data", tokenizer, workers=1,
                             progress=False)
    ids = np.fromfile(tmp_path / "data" / "shard-00000.bin", dtype=np.uint32)
    assert ids[:3].tolist() == [65_535, 65_536, 7] and ids[-2:].tolist() == [69_998, 69_999]
    assert dataset.splits["train"][0].dtype == np.uint32 and dataset.manifest["dtype"] == "uint32"


def test_a_damaged_shard_or_manifest_is_reported(tmp_path, bpe):
    prepare_shards(Corpus(), tmp_path / "data", bpe, workers=1,
                   shard_tokens=50_000, progress=False)
    with open(tmp_path / "data" / "shard-00001.bin", "r+b") as file:
        file.truncate(10)
    with pytest.raises(ValueError, match=r"shard-00001.bin is missing or incomplete"):
        TokenDataset.open(tmp_path / "data")
    manifest = json.loads((tmp_path / "data" / "meta.json").read_text())
    manifest["shards"][0]["file"] = "../elsewhere.bin"
    (tmp_path / "data" / "meta.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="meta.json is malformed"):
        TokenDataset.open(tmp_path / "data")


def test_batches_come_from_every_shard_and_never_straddle_two():
    shards = [np.arange(1000 * k, 1000 * k + length, dtype=np.uint16) for k, length in enumerate([40, 9, 200, 5])]
    sampler = BatchSampler({"train": shards}, batch_size=64, block_size=8, seed=0)
    seen = set()
    for _ in range(20):
        x, y = sampler.get_batch("train")
        np.testing.assert_array_equal(x, x[:, :1] + np.arange(8))  # consecutive ids: one shard
        np.testing.assert_array_equal(y, x + 1)
        seen.update((x[:, 0] // 1000).tolist())
    assert seen == {0, 1, 2}  # the 5-token shard holds no window of 9


def test_a_split_of_single_array_draws_the_batches_of_a_one_shard_list():
    tokens = np.arange(500, dtype=np.uint16)
    for _ in range(2):
        as_array, as_list = BatchSampler({"t": tokens}, 4, 8, seed=5), BatchSampler({"t": [tokens]}, 4, 8, seed=5)
        np.testing.assert_array_equal(as_array.get_batch("t")[0], as_list.get_batch("t")[0])
    with pytest.raises(ValueError, match=r"has 12 tokens in 2 files, fewer than block_size \+ 1 = 9 in any one"):
        BatchSampler({"t": [tokens[:6], tokens[:6]]}, 4, 8)


def test_document_positions_restart_after_each_end_of_text_and_at_each_row():
    eot = 9
    ids = np.array([[1, 2, eot, 3, 4, eot, eot, 5],
                    [eot, 6, 7, 8, 1, 2, 3, eot]])
    expected = np.array([[0, 1, 2, 0, 1, 2, 0, 0],
                         [0, 0, 1, 2, 3, 4, 5, 6]])
    np.testing.assert_array_equal(document_positions(ids, eot), expected)


@given(arrays(np.int64, array_shapes(min_dims=2, max_dims=2, max_side=12), elements=st.integers(0, 3)))
def test_document_positions_count_tokens_since_the_last_end_of_text(ids):
    positions = document_positions(ids, eot_id=0)
    for row, row_positions in zip(ids, positions):
        since = 0
        for t, token in enumerate(row):
            assert row_positions[t] == since
            since = 0 if token == 0 else since + 1


def test_document_positions_need_a_batch_of_rows():
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        document_positions(np.arange(5), eot_id=0)
