"""The example scripts still run and learn, in a shortened form."""

import importlib.util
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_cnn_learns_the_digits_in_two_epochs():
    # scikit-learn (the digits) comes with the dev extra. The full run (10 epochs) reaches about 98%; two epochs already get well past chance (10%)
    assert load_example("train_cnn").train(epochs=2, log=False) > 0.9
