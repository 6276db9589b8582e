"""--init-from, --freeze and --save-hf: fine-tuning a Hugging Face GPT-2 folder (random weights, built offline with
transformers) or a tinytf run, and the round trip of the result through transformers."""

import json

import numpy as np
import pytest

import tinytf.train as train_module
from tinytf.checkpoint import load_checkpoint
from tinytf.interop import save_pretrained
from tinytf.models import GPT, GPTConfig
from training_runs import metrics, run_tiny, write_corpus

TOLERANCE = 5e-5  # max |logit difference| against transformers in float32, as tests/interop/test_hf.py
BPE_VOCAB = 300


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt")


def build_gpt2_folder(hf, folder, corpus, vocab_size: int = BPE_VOCAB):
    """A GPT-2-shaped folder as the Hub has them, offline: random weights (2 layers, width 48) saved by
    transformers, a byte-level BPE tokenizer.json of `vocab_size` trained on `corpus` ending texts with
    <|endoftext|>, and the tokenizer_config.json that names it."""
    torch, transformers = hf
    import tokenizers

    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train([str(corpus)], trainer)
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=vocab_size, n_positions=32, n_embd=48, n_layer=2, n_head=4,
                                     bos_token_id=0, eos_token_id=0)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GPT2Tokenizer", "eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>",
         "model_max_length": 32}))
    return folder


@pytest.fixture(scope="module")
def gpt2_folder(hf, tmp_path_factory, corpus):
    return build_gpt2_folder(hf, tmp_path_factory.mktemp("gpt2"), corpus)


def finetune(*args) -> int:
    return train_module.main(["--batch-size", "4", "--eval-iters", "2", "--seed", "7", *map(str, args)])


def test_a_gpt2_folder_fine_tuned_saves_back_a_folder_transformers_loads_with_the_same_logits(
        hf, gpt2_folder, corpus, tmp_path, capsys):
    torch, transformers = hf
    out = tmp_path / "run"
    assert finetune("--init-from", gpt2_folder, "--tokenizer", gpt2_folder / "tokenizer.json", "--data", corpus,
                    "--out", out, "--iters", 6, "--eval-interval", 3, "--lr", "1e-3") == 0
    assert f"Hugging Face folder: {out / 'hf'}" in capsys.readouterr().out  # the default --save-hf
    checkpoint = load_checkpoint(out)
    assert checkpoint.meta["config"]["n_layer"] == 2 and checkpoint.meta["config"]["block_size"] == 32
    model = GPT(GPTConfig(**checkpoint.meta["config"]))
    model.load_state_dict(checkpoint.weights)

    fine_tuned = transformers.AutoModelForCausalLM.from_pretrained(out / "hf").eval()
    original = transformers.AutoModelForCausalLM.from_pretrained(gpt2_folder).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out / "hf")
    ids = np.array([tokenizer("line 12: the quick brown fox jumps over the lazy dog.")["input_ids"][:32]])
    with torch.no_grad():
        theirs = fine_tuned(torch.as_tensor(ids)).logits.numpy()
        before = original(torch.as_tensor(ids)).logits.numpy()
    ours = model(ids)[0].data
    print(f"fine-tuned GPT-2 through transformers: max |logit difference| {np.abs(theirs - ours).max():.2e}")
    assert np.abs(theirs - ours).max() < TOLERANCE
    assert np.abs(theirs - before).max() > 100 * TOLERANCE  # the saved weights are the fine-tuned ones
    records = metrics(out)
    assert records[-1]["val_loss"] < records[0]["val_loss"]


def test_a_gemma2_folder_fine_tunes_as_the_gemma2_preset_and_keeps_its_settings(hf, gpt2_folder, corpus, tmp_path):
    """A Gemma 2 folder (saved by tinytf, so offline) trains through the CLI and comes back as Gemma 2."""
    config = GPTConfig.from_preset("gemma2", vocab_size=BPE_VOCAB, block_size=32, n_layer=2, n_head=4, n_embd=32,
                                   head_dim=16, sliding_window=8, full_attention_layers=(1,),
                                   query_pre_attn_scalar=20.0)
    save_pretrained(GPT(config), tmp_path / "gemma2")
    out = tmp_path / "run"
    assert finetune("--init-from", tmp_path / "gemma2", "--tokenizer", gpt2_folder / "tokenizer.json", "--data",
                    corpus, "--out", out, "--iters", 2) == 0
    meta = load_checkpoint(out).meta
    assert meta["train_args"]["preset"] == "gemma2"
    assert GPTConfig(**meta["config"]) == GPTConfig(**{**config.to_dict(), "dropout": 0.0})
    assert json.loads((out / "hf" / "config.json").read_text())["model_type"] == "gemma2"


def test_fine_tuning_defaults_to_a_low_learning_rate_and_takes_the_models_architecture(gpt2_folder, corpus, tmp_path):
    out = tmp_path / "run"
    assert finetune("--init-from", gpt2_folder, "--tokenizer", gpt2_folder, "--data", corpus, "--out", out,
                    "--iters", 1, "--save-hf", tmp_path / "exported") == 0
    saved = load_checkpoint(out).meta["train_args"]
    assert (saved["lr"], saved["min_lr"]) == (3e-5, 3e-6)
    assert (saved["n_layer"], saved["n_embd"], saved["block_size"], saved["preset"]) == (2, 48, 32, "gpt2")
    assert (tmp_path / "exported" / "model.safetensors").is_file() and not (out / "hf").exists()
    assert json.loads((tmp_path / "exported" / "tokenizer_config.json").read_text())["eos_token"] == "<|endoftext|>"


def test_frozen_parameters_keep_their_values_and_get_no_optimizer_state(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    assert run_tiny("--data", corpus, "--out", tmp_path / "base", "--iters", 2, "--eval-interval", 2) == 0
    out = tmp_path / "tuned"
    # from a tinytf run: TINY's model flags agree with the saved model's
    assert run_tiny("--init-from", tmp_path / "base", "--data", corpus, "--out", out, "--iters", 3, "--lr", "1e-2",
                    "--freeze", "wte.*", "--freeze", "blocks.0.attn.*,ln_f.*") == 0
    base, tuned = load_checkpoint(tmp_path / "base"), load_checkpoint(out)
    frozen = {"wte.weight", "lm_head.weight", "blocks.0.attn.c_attn.weight", "blocks.0.attn.c_attn.bias",
              "blocks.0.attn.c_proj.weight", "blocks.0.attn.c_proj.bias", "ln_f.weight", "ln_f.bias"}
    assert frozen < set(tuned.weights)
    for name, array in tuned.weights.items():
        assert np.array_equal(array, base.weights[name]) == (name in frozen), name
    trained = len(set(tuned.weights) - frozen - {"lm_head.weight"})  # lm_head is wte, tied
    assert len(tuned.optimizer_state["state"]) == trained
    assert tuned.meta["train_args"]["freeze"] == ["wte.*", "blocks.0.attn.*", "ln_f.*"]
    # --resume keeps the frozen set (the optimizer state is laid out for it) and refuses another
    assert train_module.main(["--out", str(out), "--resume", "--iters", "4"]) == 0
    assert np.array_equal(load_checkpoint(out).weights["wte.weight"], base.weights["wte.weight"])
    assert train_module.main(["--out", str(out), "--resume", "--iters", "5", "--freeze", "wte.*"]) == 2


@pytest.fixture
def base_run(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    assert run_tiny("--data", corpus, "--out", tmp_path / "base", "--iters", 1) == 0
    return corpus, tmp_path / "base"


@pytest.mark.parametrize("flags, message", [
    (["--n-layer", "2"], "--init-from {base} brings its architecture, which these flags contradict: --n-layer 2 "
                         "(the model has 1); drop them"),
    (["--freeze", "blocks.9.*"], "--freeze blocks.9.* matches no parameter"),
    (["--freeze", "*"], "--freeze * freezes every parameter: nothing would train"),
    (["--freeze", "wte.*,"], "--freeze takes parameter name patterns such as 'wte.*', got an empty one"),
    (["--resume"], "--init-from starts a new run from {base} and --resume continues the one in"),
    (["--save-hf", "{corpus}"], "--save-hf {corpus} is a file"),
])
def test_bad_fine_tuning_flags_are_one_line_and_write_nothing(base_run, tmp_path, capsys, flags, message):
    corpus, base = base_run
    out = tmp_path / "run"
    flags = [flag.format(corpus=corpus) for flag in flags]
    assert run_tiny("--init-from", base, "--data", corpus, "--out", out, "--iters", 2, *flags) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("tinytf.train: error: "), error
    assert message.format(base=base, corpus=corpus) in error[0], error
    assert not out.exists()


def test_a_start_that_cannot_read_the_data_is_refused(base_run, hf, tmp_path, capsys):
    corpus, base = base_run
    other = write_corpus(tmp_path / "other.txt", word="LINE")  # other characters: another char vocabulary
    assert run_tiny("--init-from", base, "--data", other, "--out", tmp_path / "a", "--iters", 2) == 2
    assert "was trained with another tokenizer" in capsys.readouterr().err
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    hf[1].GPT2LMHeadModel(hf[1].GPT2Config(vocab_size=20, n_positions=32, n_embd=16, n_layer=1, n_head=2)) \
        .save_pretrained(tiny)
    assert finetune("--init-from", tiny, "--data", corpus, "--out", tmp_path / "c", "--iters", 2) == 2
    error = capsys.readouterr().err
    assert "more than the 20 tokens of --init-from" in error, error
    assert not (tmp_path / "c").exists()
    assert finetune("--init-from", tmp_path / "nowhere", "--data", corpus, "--out", tmp_path / "d") == 2
    assert "is neither a Hugging Face model folder" in capsys.readouterr().err
