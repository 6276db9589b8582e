"""The sampling CLI: streaming, reproducibility and bad input."""

import io

import numpy as np
import pytest

import tinytf.sample as sample_module
import tinytf.train as train_module


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sample")
    corpus = folder / "corpus.txt"
    corpus.write_text("ROMEO: good night, good night!\nJULIET: parting is such sweet sorrow.\n" * 40, encoding="utf-8")
    assert train_module.main(["--data", str(corpus), "--out", str(folder / "run"), "--iters", "30", "--n-layer", "1",
                              "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "4",
                              "--eval-interval", "30", "--eval-iters", "1"]) == 0
    return folder / "run"


def _sample(checkpoint, *extra):
    args = sample_module.build_parser().parse_args(["--ckpt", str(checkpoint), *map(str, extra)])
    out = io.StringIO()
    sample_module.sample(args, out)
    return out.getvalue()


def test_sampling_is_reproducible_and_cache_agnostic(checkpoint):
    first = _sample(checkpoint, "--prompt", "ROMEO:", "--max-new-tokens", 40, "--seed", 3)
    assert first.startswith("ROMEO:") and len(first) == len("ROMEO:") + 40 + 1
    assert first == _sample(checkpoint, "--prompt", "ROMEO:", "--max-new-tokens", 40, "--seed", 3)
    greedy = _sample(checkpoint, "--prompt", "JULIET:", "--max-new-tokens", 40, "--temperature", 0)
    assert greedy == _sample(checkpoint, "--prompt", "JULIET:", "--max-new-tokens", 40, "--temperature", 0,
                             "--no-cache")


def test_long_prompt_is_cropped_with_a_notice(checkpoint, capsys):
    text = _sample(checkpoint, "--prompt", "good night " * 5, "--max-new-tokens", 5)
    assert text.startswith("good night ")
    assert "model sees only the last 16" in capsys.readouterr().err


def test_unknown_characters_in_the_prompt(checkpoint, capsys):
    assert sample_module.main(["--ckpt", str(checkpoint), "--prompt", "ROMEO€ZQ"]) == 2
    err = capsys.readouterr().err
    assert "tinytf.sample: error: the prompt cannot be encoded" in err and "'€'" in err


def test_missing_or_corrupt_checkpoint(tmp_path, checkpoint, capsys):
    assert sample_module.main(["--ckpt", str(tmp_path / "nowhere")]) == 2
    assert "cannot load the checkpoint" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "checkpoint.json").write_text("{not json")
    assert sample_module.main(["--ckpt", str(broken)]) == 2
    assert "cannot load the checkpoint" in capsys.readouterr().err


def test_bad_sampling_arguments(checkpoint, capsys):
    for flags, message in [(["--top-k", "0"], "--top-k"), (["--top-p", "2"], "--top-p"),
                           (["--temperature", "-1"], "--temperature"), (["--prompt", ""], "--prompt")]:
        assert sample_module.main(["--ckpt", str(checkpoint), *flags]) == 2
        assert message in capsys.readouterr().err


def test_several_prompts_generate_as_one_batch_each_as_alone(checkpoint):
    """Prompts of different lengths, generated together (a ragged batch), continue each as it does alone."""
    prompts = ["ROMEO: good", "J", "JULIET:"]
    batch = _sample(checkpoint, *sum((["--prompt", prompt] for prompt in prompts), []), "--max-new-tokens", 8,
                    "--temperature", 0)
    alone = [_sample(checkpoint, "--prompt", prompt, "--max-new-tokens", 8, "--temperature", 0) for prompt in prompts]
    assert batch == sample_module.SEPARATOR.join(alone)
    assert all(len(text) == len(prompt) + 8 + 1 for text, prompt in zip(alone, prompts))


def test_attention_map_of_the_first_sample(checkpoint, tmp_path, monkeypatch):
    """--attention-map draws the maps of the first sample's prompt and continuation, cut to the block size (16)."""
    drawn = []
    monkeypatch.setattr(sample_module, "plot_attention", lambda maps, tokens, path: drawn.append((maps, tokens, path)))
    text = _sample(checkpoint, "--prompt", "ROMEO:", "--max-new-tokens", 5, "--num-samples", 2, "--attention-map",
                   tmp_path / "map.png")
    first = text.split(sample_module.SEPARATOR)[0][:-1]  # the first sample, without the newline after it
    ((maps, tokens, path),) = drawn
    assert tokens == list(first) and maps.shape == (1, 1, 2, 11, 11) and path == tmp_path / "map.png"
    np.testing.assert_allclose(maps.sum(-1), 1.0, rtol=1e-5)
    text = _sample(checkpoint, "--prompt", "good night, good night!", "--prompt", "J", "--max-new-tokens", 3,
                   "--temperature", 0, "--attention-map", tmp_path / "batch.png")
    first = text.split(sample_module.SEPARATOR)[0][:-1]  # the first prompt's row of the batch: 23 + 3 characters
    maps, tokens, _ = drawn[1]
    assert len(first) == 26 and tokens == list(first[-16:]) and maps.shape == (1, 1, 2, 16, 16)


def test_attention_map_is_a_png_file(checkpoint, tmp_path, capsys):
    assert sample_module.main(["--ckpt", str(checkpoint), "--prompt", "JULIET:", "--max-new-tokens", "4",
                               "--attention-map", str(tmp_path / "map.png")]) == 0
    assert (tmp_path / "map.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"attention map: {tmp_path / 'map.png'}" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["map.png"]  # written through a temporary file, none left


def test_attention_map_errors_come_before_sampling(checkpoint, tmp_path, capsys):
    (tmp_path / "folder.png").mkdir()
    for path, message in [(tmp_path / "map.svg", "ending in .png"), (tmp_path / "folder.png", "is a folder"),
                          (tmp_path / "nowhere" / "map.png", "does not exist")]:
        assert sample_module.main(["--ckpt", str(checkpoint), "--prompt", "ROMEO:", "--attention-map",
                                   str(path)]) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.startswith("tinytf.sample: error: --attention-map ") and message in err
        assert err.count("\n") == 1
