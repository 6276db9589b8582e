"""tinytf.viz's plots: attention maps recorded from a forward pass, equal to softmax(q k^T) recomputed from the
layers' weights, and the PNG files of attention maps and loss curves."""

import json
import struct
import sys

import numpy as np
import pytest
from devices import DEVICES
from training_runs import run_tiny, write_corpus

import tinytf
import tinytf.nn.attention as attention_module
from tinytf import backend, nn
from tinytf.models import GPT, GPTConfig
from tinytf.viz.plots import attention_maps, plot_attention, plot_loss_curves

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path) -> tuple[int, int]:
    """(width, height) from a PNG file's IHDR chunk, after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def softmax_rows(scores, keep):
    """softmax over the last axis of the scores where keep is True; zeros elsewhere (and in rows that keep nothing)."""
    scores = np.where(keep, scores, -np.inf)
    top = scores.max(axis=-1, keepdims=True)
    weights = np.exp(scores - np.where(np.isfinite(top), top, 0))
    total = weights.sum(axis=-1, keepdims=True)
    return np.divide(weights, total, out=np.zeros_like(weights), where=total > 0)


def numpy_params(module) -> dict:
    return {name: backend.to_numpy(p.data).astype(np.float64) for name, p in module.named_parameters()}


@pytest.mark.parametrize("device", DEVICES)
def test_gpt2_attention_maps_are_softmax_of_its_own_queries_and_keys(device):
    """One layer of gpt2: the maps equal softmax(q k^T / sqrt(D) + causal mask), q and k recomputed with NumPy from
    the embeddings, the LayerNorm and c_attn; rows sum to 1 and nothing above the diagonal."""
    tinytf.manual_seed(0)
    config = GPTConfig.from_preset("gpt2", n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=11)
    model = GPT(config).to(device)
    idx = np.array([[1, 5, 2, 9, 3, 3, 0], [4, 4, 10, 7, 1, 2, 6]])
    maps = attention_maps(model, idx)
    assert maps.shape == (1, 2, 2, 7, 7) and maps.dtype == np.float32

    p = numpy_params(model)
    x = p["wte.weight"][idx] + p["wpe.weight"][:7]  # (B, T, C)
    normed = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + config.norm_eps)
    h = normed * p["blocks.0.norm1.weight"] + p["blocks.0.norm1.bias"]
    qkv = h @ p["blocks.0.attn.c_attn.weight"].T + p["blocks.0.attn.c_attn.bias"]  # (B, T, 3C)
    q = qkv[..., :16].reshape(2, 7, 2, 8).transpose(0, 2, 1, 3)  # (B, H, T, D)
    k = qkv[..., 16:32].reshape(2, 7, 2, 8).transpose(0, 2, 1, 3)
    expected = softmax_rows(q @ k.transpose(0, 1, 3, 2) / np.sqrt(8), np.tril(np.ones((7, 7), bool)))
    np.testing.assert_allclose(maps[0], expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(maps.sum(-1), 1.0, rtol=1e-5)
    assert not np.triu(maps, 1).any()


@pytest.mark.parametrize("device", DEVICES)
def test_recorded_weights_follow_gqa_window_softcap_and_key_padding(device):
    """A MultiHeadAttention with 4 query heads on 2 K/V heads, a window of 2, a softcap and a padded key: each query
    head's weights are recomputed from c_attn with NumPy (head h reads K/V head h // 2)."""
    tinytf.manual_seed(1)
    layer = nn.MultiHeadAttention(12, n_head=4, n_kv_head=2, head_dim=3, window=2, softcap=0.5).to(device)
    x = np.random.default_rng(0).standard_normal((2, 5, 12)).astype(np.float32)
    padding = np.array([[True] * 5, [False, True, True, True, True]])  # row 1: key 0 is padding
    with tinytf.no_grad(), attention_module.record_attention_weights() as recorded:
        layer(tinytf.tensor(x, device=device), key_padding_mask=padding)
    (weights,) = recorded
    weights = backend.to_numpy(weights)
    assert weights.shape == (2, 4, 5, 5)

    p = numpy_params(layer)
    qkv = (x @ p["c_attn.weight"].T + p["c_attn.bias"]).reshape(2, 5, 8, 3).transpose(0, 2, 1, 3)
    q, k = qkv[:, :4], qkv[:, [4, 4, 5, 5]]  # each query head beside its K/V head
    scores = 0.5 * np.tanh(q @ k.transpose(0, 1, 3, 2) / np.sqrt(3) / 0.5)
    i, j = np.arange(5)[:, None], np.arange(5)[None, :]
    keep = (j <= i) & (j >= i - 2) & padding[:, None, None, :]
    expected = softmax_rows(scores, keep)
    np.testing.assert_allclose(weights, expected, rtol=1e-4, atol=1e-6)
    assert not weights[1, :, 0].any()  # query 0 of row 1 sees only its padded key: a row of zeros


def test_llama_maps_have_one_map_per_query_head():
    tinytf.manual_seed(0)
    config = GPTConfig.from_preset("llama", n_layer=2, n_head=4, n_kv_head=2, n_embd=16, block_size=8, vocab_size=9)
    maps = attention_maps(GPT(config), np.array([[1, 2, 3, 4, 5, 6]]))
    assert maps.shape == (2, 1, 4, 6, 6)
    np.testing.assert_allclose(maps.sum(-1), 1.0, rtol=1e-5)
    assert not np.triu(maps, 1).any()
    assert not np.allclose(maps[:, :, 0], maps[:, :, 1])  # two query heads on one K/V head attend differently


def test_the_recorder_is_off_after_use_and_changes_no_output():
    tinytf.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=9, dropout=0.1)).train()
    idx = np.array([[1, 2, 3, 4]])
    with tinytf.no_grad():
        before = model.eval()(idx)[0].numpy()
        maps = attention_maps(model.train(), idx)
        with pytest.raises(RuntimeError), attention_module.record_attention_weights():
            raise RuntimeError("a failure inside the block")
        after = model.eval()(idx)[0].numpy()
    assert maps.shape == (2, 1, 2, 4, 4)
    assert attention_module._recorded_weights is None
    np.testing.assert_array_equal(before, after)
    model.train()
    attention_maps(model, idx)
    assert model.training  # attention_maps runs in eval mode and restores the model's mode


def test_attention_maps_of_a_model_without_attention():
    with pytest.raises(ValueError, match="no MultiHeadAttention"):
        attention_maps(nn.Linear(3, 3), tinytf.tensor(np.ones((1, 3), np.float32)))


def test_plot_attention_writes_a_grid_or_one_map(tmp_path):
    maps = np.random.default_rng(0).dirichlet(np.ones(6), size=(2, 1, 3, 6)).astype(np.float32)  # (L, B, H, T, S)
    tokens = ["a", "$", "\n", " ", "b", "c"]  # $ and a newline: labels matplotlib must not parse as a formula
    plot_attention(maps, tokens, tmp_path / "grid.png")
    plot_attention(maps[:, 0], tokens, tmp_path / "one.png", layer=1, head=2)
    grid_width, grid_height = png_size(tmp_path / "grid.png")
    one_width, one_height = png_size(tmp_path / "one.png")
    assert grid_width > 2 * one_width and grid_height > 1.5 * one_height > 0
    long = np.full((1, 1, 50, 50), 1 / 50, np.float32)  # 50 tokens: drawn without labels
    plot_attention(long, [str(i) for i in range(50)], tmp_path / "long.png")
    assert min(png_size(tmp_path / "long.png")) > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png", "long.png", "one.png"]  # no temporary left


def test_plot_attention_errors(tmp_path):
    maps = np.full((2, 3, 4, 4), 0.25, np.float32)
    tokens = list("abcd")
    folder = tmp_path / "folder.png"
    folder.mkdir()
    for kwargs, message in [(dict(tokens=list("abc")), "3 tokens for maps over 4 keys"),
                            (dict(maps=np.zeros((2, 2, 3, 4, 4))), "batch of 2 sequences"),
                            (dict(maps=np.zeros((3, 4, 4))), "must be"),
                            (dict(layer=2), "layer 2 is out of range"), (dict(head=-1), "head -1 is out of range"),
                            (dict(path=tmp_path / "map.jpg"), "ending in .png"),
                            (dict(path=folder), "is a folder"),
                            (dict(path=tmp_path / "nowhere" / "map.png"), "does not exist")]:
        arguments = dict(maps=maps, tokens=tokens, path=tmp_path / "map.png") | kwargs
        with pytest.raises(ValueError, match=message):
            plot_attention(**arguments)
    assert [p.name for p in tmp_path.iterdir()] == ["folder.png"]


def test_loss_curves_of_a_real_run_and_of_metrics_files(tmp_path):
    assert run_tiny("--data", write_corpus(tmp_path / "corpus.txt"), "--out", tmp_path / "run", "--iters", 4,
                    "--eval-interval", 2) == 0
    metrics = tmp_path / "other.jsonl"
    metrics.write_text("".join(json.dumps({"iter": i, "train_loss": 4 / i, "val_loss": 4.5 / i}) + "\n"
                               for i in (1, 2, 3)), encoding="utf-8")
    plot_loss_curves(tmp_path / "run", tmp_path / "one.png")
    plot_loss_curves([tmp_path / "run", metrics], tmp_path / "two.png", labels=["tiny", "by hand"])
    assert min(png_size(tmp_path / "one.png")) > 0 and min(png_size(tmp_path / "two.png")) > 0


def test_loss_curves_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no metrics.jsonl"):
        plot_loss_curves(tmp_path, tmp_path / "loss.png")
    bad = tmp_path / "metrics.jsonl"
    bad.write_text('{"iter": 1, "train_loss": 2.0, "val_loss": 2.1}\n{"iter": 2}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 2 is not an evaluation"):
        plot_loss_curves(tmp_path, tmp_path / "loss.png")
    bad.write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="no evaluation yet"):
        plot_loss_curves(bad, tmp_path / "loss.png")
    with pytest.raises(ValueError, match="2 labels for 1 runs"):
        plot_loss_curves([bad], tmp_path / "loss.png", labels=["a", "b"])
    assert not (tmp_path / "loss.png").exists()


def test_missing_matplotlib_names_the_plot_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import matplotlib.figure now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'tinytf\[plot\]'"):
        plot_attention(np.full((1, 1, 2, 2), 0.5), ["a", "b"], tmp_path / "map.png")
