"""The recipes of examples/recipes/ as smoke runs on the CPU (the same @file, with flags after it for a tiny model or
offline data), and --dry-run's figures: GPT-2 124M's parameter count and a memory estimate checked against what
tinytf keeps."""

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import tinytf.train as train_module
from test_train_finetune import build_gpt2_folder
from tinytf import backend
from tinytf.checkpoint import load_checkpoint
from tinytf.models import GPT, GPTConfig
from training_runs import metrics, write_corpus

RECIPES = Path(__file__).resolve().parent.parent / "examples" / "recipes"
FINETUNE = f"@{RECIPES / 'finetune_gpt2_shakespeare.args'}"
PRETRAIN = f"@{RECIPES / 'pretrain_gpt2_124m.args'}"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt")


@pytest.fixture(scope="module")
def gpt2_folder(hf, tmp_path_factory, corpus):
    return build_gpt2_folder(hf, tmp_path_factory.mktemp("gpt2"), corpus)


def gpt2_sized_tokenizer(path: Path, vocab_size: int = 50257) -> Path:
    """A tokenizer.json with GPT-2's vocabulary size and <|endoftext|> id (50256), built offline: the 256 byte
    symbols, then placeholders (no merges: only the size matters to --dry-run)."""
    import tokenizers

    alphabet = sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: index for index, symbol in enumerate(alphabet)}
    vocab.update({f"placeholder{index}": index for index in range(len(vocab), vocab_size - 1)})
    vocab["<|endoftext|>"] = vocab_size - 1
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.add_special_tokens(["<|endoftext|>"])
    tokenizer.save(str(path))
    return path


def test_the_finetune_recipe_runs_on_a_random_gpt2_shaped_folder(gpt2_folder, corpus, tmp_path):
    """The recipe as written (bf16, gradient accumulation, 3e-5), on the CPU with 2 layers and a BPE of 300."""
    out = tmp_path / "run"
    assert train_module.main([FINETUNE, "--init-from", str(gpt2_folder), "--tokenizer", str(gpt2_folder),
                              "--data", str(corpus), "--out", str(out), "--device", "cpu", "--grad-accum", "2",
                              "--iters", "2", "--eval-interval", "2", "--eval-iters", "2"]) == 0
    saved = load_checkpoint(out).meta["train_args"]
    assert (saved["lr"], saved["dtype"], saved["batch_size"], saved["grad_accum"]) == (3e-5, "bfloat16", 1, 2)
    assert [record["iter"] for record in metrics(out)] == [2]
    assert json.loads((out / "hf" / "config.json").read_text())["dtype"] == "bfloat16"


def test_the_pretrain_recipe_runs_with_a_tiny_model(gpt2_folder, corpus, tmp_path):
    out = tmp_path / "run"
    assert train_module.main([PRETRAIN, "--data", str(corpus), "--tokenizer", str(gpt2_folder), "--out", str(out),
                              "--device", "cpu", "--n-layer", "2", "--n-head", "2", "--n-embd", "32",
                              "--block-size", "32", "--batch-size", "2", "--grad-accum", "2", "--iters", "3",
                              "--warmup-iters", "1", "--eval-interval", "3", "--eval-iters", "2"]) == 0
    saved = load_checkpoint(out).meta["train_args"]
    assert (saved["beta2"], saved["lr"], saved["min_lr"], saved["dtype"]) == (0.95, 6e-4, 6e-5, "bfloat16")
    assert np.isfinite(metrics(out)[-1]["val_loss"])


def test_the_pretrain_recipe_dry_run_is_gpt2_124m_and_writes_nothing(corpus, tmp_path, capsys):
    """124,439,808: the parameter count of Hugging Face's GPT-2 (tied embeddings, 50,257 tokens). float32 here for
    speed (a CPU steps bf16 at half the speed); the recipe's bf16 figures are in examples/recipes/README.md."""
    out = tmp_path / "run"
    tokenizer = gpt2_sized_tokenizer(tmp_path / "tokenizer.json")
    assert train_module.main([PRETRAIN, "--data", str(corpus), "--tokenizer", str(tokenizer), "--out", str(out),
                              "--device", "cpu", "--dtype", "fp32", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "12 layers, 12 heads (12 kv), width 768, block 1024, vocabulary 50257: 124,439,808 parameters" in printed
    assert "tokens per step: 491,520 (40 micro-batches x 1 rank(s) x 12 x 1024)" in printed
    assert f"weights {124_439_808 * 4 / 2**30:.2f} GiB" in printed
    assert not out.exists()


@pytest.mark.parametrize("preset, dtype", [("gpt2", "float32"), ("llama", "float32"), ("gpt2", "bfloat16")])
def test_the_memory_estimate_matches_what_the_forward_pass_keeps(preset, dtype):
    """tracemalloc counts NumPy's allocations: what a forward pass leaves allocated is what backward needs. Within
    10%: the estimate leaves out the embeddings' outputs, the norms' statistics and the mask, a few values per token
    against the hundreds it counts."""
    dtype = backend.as_dtype(dtype)
    config = GPTConfig.from_preset(preset, vocab_size=700, block_size=96, n_layer=3, n_head=3, n_embd=96)
    model = GPT(config).to(dtype=dtype)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (5, config.block_size + 1))
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        _, loss = model(ids[:, :-1], ids[:, 1:])
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    estimate = train_module.memory_estimate(model, dtype, batch_size=5, grad_accum=1)
    assert abs(estimate["activations"] - kept) < 0.1 * kept, (estimate["activations"], kept)
    parameters = model.num_parameters()
    assert estimate["weights"] == parameters * dtype.itemsize and estimate["AdamW moments"] == parameters * 8
    assert estimate["master weights"] == (parameters * 4 if dtype.itemsize == 2 else 0)
    del loss
