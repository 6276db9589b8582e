"""The training command with subword tokenizers: bpe:N and tokenizer.json runs end to end, sampling with the run's
tokenizer, resume checks, JSON-lines corpora, and a preparation interrupted or killed midway."""

import io
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import tinytf.sample as sample_module
import tinytf.train as train_module
from tinytf.checkpoint import load_checkpoint
from tinytf.data import Corpus, TokenDataset, document_positions
from training_runs import TINY, run_tiny, write_corpus

pytest.importorskip("tokenizers", reason="subword tokenizers are the tokenizers package's (the interop extra)")
REPOSITORY = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory):
    """`python -m tinytf.train --tokenizer bpe:300 --iters 5`, as a user types it."""
    folder = tmp_path_factory.mktemp("bpe")
    corpus = write_corpus(folder / "corpus.txt")
    result = subprocess.run([sys.executable, "-m", "tinytf.train", *TINY, "--data", str(corpus), "--out",
                             str(folder / "run"), "--tokenizer", "bpe:300", "--iters", "5", "--eval-interval", "5",
                             "--data-workers", "2"], capture_output=True, text=True, timeout=300, cwd=REPOSITORY)
    assert result.returncode == 0, result.stderr
    return folder / "run", corpus, result.stdout


def test_a_bpe_run_trains_on_shards_of_its_own_tokenizer(bpe_run):
    run, corpus, log = bpe_run
    dataset = TokenDataset.open(run / "data")
    vocab_size = dataset.tokenizer.vocab_size
    assert 256 < vocab_size <= 300 and dataset.manifest["dtype"] == "uint16"
    assert sorted(path.name for path in (run / "data").iterdir()) == ["meta.json", "shard-00000.bin"]
    text = corpus.read_text()
    stream = np.concatenate(dataset.splits["train"] + dataset.splits["val"])
    assert dataset.tokenizer.decode(stream) == text + "<|endoftext|>"  # one document, then its end
    assert len(stream) < len(text) / 2  # the merges learned from the corpus
    checkpoint = load_checkpoint(run)
    assert checkpoint.meta["config"]["vocab_size"] == vocab_size
    assert checkpoint.meta["tokenizer"] == dataset.tokenizer.to_dict()
    assert checkpoint.meta["train_args"]["tokenizer"] == "bpe:300"
    assert f"characters, vocabulary of {vocab_size}, " in log


def test_sampling_decodes_with_the_run_tokenizer(bpe_run):
    run, _, _ = bpe_run
    out = io.StringIO()
    sample_module.sample(sample_module.build_parser().parse_args(
        ["--ckpt", str(run), "--prompt", "line 7: the quick", "--max-new-tokens", "12", "--seed", "1"]), out)
    text = out.getvalue()
    tokenizer = TokenDataset.open(run / "data").tokenizer
    assert text.startswith("line 7: the quick") and len(tokenizer.encode(text.rstrip("\n"))) > 12


def test_resume_refuses_another_tokenizer_and_continues_with_its_own(bpe_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(bpe_run[0], run)
    assert run_tiny("--out", run, "--resume", "--tokenizer", "char", "--iters", 7) == 2
    assert ("--tokenizer char is not the tokenizer of the run in" in capsys.readouterr().err)
    assert run_tiny("--out", run, "--resume", "--tokenizer", "bpe:300", "--iters", 7) == 0
    assert load_checkpoint(run).meta["iteration"] == 6


def test_a_tokenizer_json_run_separates_json_lines_documents_with_its_end_of_text(tmp_path):
    from test_tokenization import gpt2_style_file

    library = gpt2_style_file(tmp_path)
    lines = [json.dumps({"body": f"document {i}: the quick brown fox jumps over the lazy dog."}) for i in range(80)]
    (tmp_path / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    assert run_tiny("--data", tmp_path / "corpus.jsonl", "--text-field", "body", "--tokenizer",
                    tmp_path / "tokenizer.json", "--out", tmp_path / "run", "--iters", 2, "--data-workers", 1) == 0
    dataset = TokenDataset.open(tmp_path / "run" / "data")
    stream = np.concatenate(dataset.splits["train"] + dataset.splits["val"])
    end_of_text = library.token_to_id("<|endoftext|>")
    assert dataset.manifest["documents"] == 80 and (stream == end_of_text).sum() == 80
    first_document = stream[:np.argmax(stream == end_of_text)]
    assert first_document.tolist() == library.encode(json.loads(lines[0])["body"], add_special_tokens=False).ids
    assert load_checkpoint(tmp_path / "run").meta["config"]["vocab_size"] == library.get_vocab_size()


def test_document_masking_gives_the_model_positions_that_restart_after_each_end_of_text(tmp_path, monkeypatch):
    from test_tokenization import gpt2_style_file

    from tinytf.models import GPT

    library = gpt2_style_file(tmp_path)
    end_of_text = library.token_to_id("<|endoftext|>")
    lines = [json.dumps({"text": f"doc {i}: a fox."}) for i in range(200)]  # documents shorter than a window
    (tmp_path / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    calls = []
    forward = GPT.forward

    def recording_forward(model, idx, targets=None, position_ids=None):
        calls.append((np.asarray(idx), position_ids))
        return forward(model, idx, targets, position_ids=position_ids)

    monkeypatch.setattr(GPT, "forward", recording_forward)
    assert run_tiny("--data", tmp_path / "corpus.jsonl", "--tokenizer", tmp_path / "tokenizer.json", "--out",
                    tmp_path / "run", "--iters", 2, "--eval-iters", 1, "--data-workers", 1,
                    "--document-masking") == 0
    assert calls and load_checkpoint(tmp_path / "run").meta["train_args"]["document_masking"] is True
    for ids, positions in calls:
        np.testing.assert_array_equal(positions, document_positions(ids, end_of_text))
        assert (ids[:, :-1] == end_of_text).any() and (positions[:, 1:] == 0).any()  # windows span documents


def test_document_masking_needs_an_end_of_text_token(tmp_path, capsys):
    assert run_tiny("--data", write_corpus(tmp_path / "corpus.txt"), "--out", tmp_path / "run",
                    "--document-masking") == 2
    assert "--document-masking needs a tokenizer with an end-of-text token" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_bad_tokenizer_arguments_are_one_line_errors_that_write_nothing(tmp_path, capsys, monkeypatch):
    corpus = write_corpus(tmp_path / "corpus.txt")
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # as where tiktoken is not installed
    for flags, message in [(["--tokenizer", "bpe:12"], "bpe:N needs a vocabulary size N above 256"),
                           (["--tokenizer", "nowhere.json"], "is not char, bpe:N, tiktoken:NAME or an existing"),
                           (["--tokenizer", "tiktoken:gpt2"], r"needs the tiktoken package \(pip install tiktoken\)"),
                           (["--tokenizer", "bpe:300", "--data-workers", "0"], "--data-workers must be at least 1"),
                           (["--tokenizer", "bpe:300", "--block-size", "3000"],
                            r"val split would hold \d+, fewer than --block-size \+ 1 = 3001")]:
        assert run_tiny("--data", corpus, "--out", tmp_path / "run", *flags) == 2
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if "error" in line]  # the rest: the progress bar, if any
        assert len(errors) == 1 and re.search(message, errors[0]), err
        assert not (tmp_path / "run").exists()


def test_an_interrupted_preparation_leaves_the_old_run_as_it_was(bpe_run, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(bpe_run[0], run)
    before = {path.name: path.read_bytes() for path in (run / "data").iterdir()}
    pieces = Corpus.pieces

    def pieces_then_interrupt(self):
        yield next(pieces(self))
        raise KeyboardInterrupt
    monkeypatch.setattr(Corpus, "pieces", pieces_then_interrupt)
    monkeypatch.setattr(Corpus, "sha256", lambda self: "0" * 64)
    monkeypatch.setattr(train_module, "build_tokenizer", lambda args, corpus: TokenDataset.open(
        bpe_run[0] / "data").tokenizer)
    assert run_tiny("--data", bpe_run[1], "--out", run, "--tokenizer", "bpe:300", "--overwrite") == 130
    assert {path.name: path.read_bytes() for path in (run / "data").iterdir()} == before
    assert not [path for path in run.iterdir() if path.name.endswith(".partial")]
    assert load_checkpoint(run).meta["iteration"] == 4


def test_a_preparation_killed_midway_leaves_no_data_and_the_next_run_starts_clean(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog {i * i}.\n"
                              for i in range(90_000)))  # 6 MB: one worker encodes it in seconds, a shard per MB
    command = [sys.executable, "-m", "tinytf.train", *TINY, "--data", str(corpus), "--out", str(tmp_path / "run"),
               "--tokenizer", "bpe:300", "--iters", "1"]
    process = subprocess.Popen([*command, "--data-workers", "1"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, cwd=REPOSITORY)
    deadline = time.monotonic() + 120
    shard = None
    while shard is None and time.monotonic() < deadline and process.poll() is None:
        shard = next((path for path in (tmp_path / "run").glob(".data-*.partial/shard-00000.bin")
                      if path.stat().st_size > 0), None)
        time.sleep(0.01)
    still_preparing = process.poll() is None
    process.kill()
    process.wait()
    assert shard is not None and still_preparing, "the preparation ended before it could be killed midway"
    assert not (tmp_path / "run" / "data").exists()  # staged only: no dataset half-written in its place
    result = subprocess.run([*command, "--data-workers", "2"], capture_output=True, timeout=300, cwd=REPOSITORY)
    assert result.returncode == 0, result.stderr
    assert [path.name for path in (tmp_path / "run").iterdir() if path.name.startswith(".")] == []
    assert TokenDataset.open(tmp_path / "run" / "data").manifest["documents"] == 1
