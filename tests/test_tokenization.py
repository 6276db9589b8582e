"""Tokenizers: byte-level BPE trained here, tokenizer.json files built offline, descriptions, --tokenizer specs."""

import json
import sys

import numpy as np
import pytest

from tinytf.tokenization import (
    END_OF_TEXT,
    CharTokenizer,
    HuggingFaceTokenizer,
    tokenizer_from_dict,
    tokenizer_from_spec,
    train_bpe,
)

tokenizers = pytest.importorskip("tokenizers", reason="Hugging Face tokenizers are the interop extra's")

CORPUS = ["ROMEO: But, soft! what light through yonder window breaks?\n",
          "JULIET: O Romeo, Romeo! wherefore art thou Romeo? 10 € ☃\n"] * 30


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(iter(CORPUS), 300)


def gpt2_style_file(folder, special_tokens=(END_OF_TEXT,)):
    """A GPT-2-shaped tokenizer.json (byte-level BPE, GPT-2's pre-tokenizer) trained on CORPUS, written to folder."""
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=320, special_tokens=list(special_tokens), show_progress=False,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer)
    tokenizer.save(str(folder / "tokenizer.json"))
    return tokenizer


def test_trained_bpe_round_trips_unseen_text_and_compresses_seen_text(bpe):
    assert 256 < bpe.vocab_size <= 300 and bpe.eot_id is not None
    unseen = "Zebras 𝄞 — naïve café\n\ttabs  and  spaces\x00"
    assert bpe.decode(bpe.encode_ordinary(unseen)) == unseen  # bytes fall back to the byte alphabet
    seen = CORPUS[0]
    ids = bpe.encode_ordinary(seen)
    assert ids.dtype == np.int64 and len(ids) < len(seen.encode("utf-8")) / 2  # merges learned from the corpus


def test_end_of_text_is_one_token_that_decodes_back(bpe):
    text = f"first{END_OF_TEXT}second"
    ids = bpe.encode_ordinary(text)
    assert (ids == bpe.eot_id).sum() == 1 and bpe.decode(ids) == text


def test_descriptions_survive_json_and_rebuild_the_same_tokenizer(bpe):
    for tokenizer in (bpe, CharTokenizer.from_text("abc\n")):
        restored = tokenizer_from_dict(json.loads(json.dumps(tokenizer.to_dict())))
        assert type(restored) is type(tokenizer) and restored.to_dict() == tokenizer.to_dict()
        np.testing.assert_array_equal(restored.encode_ordinary("abc\n"), tokenizer.encode_ordinary("abc\n"))
    with pytest.raises(ValueError, match="not a tokenizer description"):
        tokenizer_from_dict({"type": "sentencepiece"})
    with pytest.raises(ValueError, match="damaged Hugging Face tokenizer"):
        tokenizer_from_dict({"type": "huggingface", "tokenizer_json": "{not json"})


def test_a_tokenizer_json_encodes_as_the_library_does_and_finds_its_end_of_text(tmp_path):
    library = gpt2_style_file(tmp_path)
    loaded = HuggingFaceTokenizer.from_file(tmp_path / "tokenizer.json")
    text = "JULIET: O Romeo! 10 € and something else"
    assert loaded.encode_ordinary(text).tolist() == library.encode(text, add_special_tokens=False).ids
    assert loaded.eot_id == library.token_to_id(END_OF_TEXT) and loaded.vocab_size == library.get_vocab_size()


def test_tokenizer_config_names_the_end_of_text_token(tmp_path):
    library = gpt2_style_file(tmp_path, special_tokens=("<s>", "</s>", "<pad>"))
    assert HuggingFaceTokenizer.from_file(tmp_path / "tokenizer.json").end_of_text == "</s>"  # a known name
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<pad>"}}))
    loaded = HuggingFaceTokenizer.from_file(tmp_path / "tokenizer.json")
    assert loaded.end_of_text == "<pad>" and loaded.eot_id == library.token_to_id("<pad>")


def test_specs_name_each_kind_of_tokenizer(tmp_path):
    texts = lambda: iter(CORPUS)  # noqa: E731 (streamed again by each spec that fits)
    assert tokenizer_from_spec("char", texts).to_dict() == CharTokenizer.from_text("".join(CORPUS)).to_dict()
    assert isinstance(tokenizer_from_spec("bpe:290", texts), HuggingFaceTokenizer)
    gpt2_style_file(tmp_path)
    by_file, by_folder = tokenizer_from_spec(str(tmp_path / "tokenizer.json"), texts), tokenizer_from_spec(
        str(tmp_path), texts)
    assert by_file.to_dict() == by_folder.to_dict()
    with pytest.raises(ValueError, match=r"bpe:N needs a vocabulary size N above 256"):
        tokenizer_from_spec("bpe:100", texts)
    with pytest.raises(ValueError, match=r"bpe:N needs a vocabulary size"):
        tokenizer_from_spec("bpe:lots", texts)
    with pytest.raises(ValueError, match=r"is not char, bpe:N, tiktoken:NAME or an existing tokenizer.json"):
        tokenizer_from_spec(str(tmp_path / "missing.json"), texts)


def test_tiktoken_without_the_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # import fails as if it were not installed
    with pytest.raises(ImportError, match=r"tiktoken:gpt2 needs the tiktoken package \(pip install tiktoken\)"):
        tokenizer_from_spec("tiktoken:gpt2", lambda: iter(()))


def test_char_vocabulary_of_streamed_pieces_equals_that_of_the_whole_text():
    pieces = ["ab", "c\n", "𝄞a"]
    assert CharTokenizer.from_texts(iter(pieces)).chars == CharTokenizer.from_text("".join(pieces)).chars
