"""What the command lines share: one-line errors, and loading the model a training run saved."""

import subprocess
import sys

import pytest

from tinytf.cli import UserError, command_line, load_trained_model


def test_a_user_error_is_reported_as_one_line_with_exit_status_2(capsys):
    @command_line("tinytf.example")
    def main(argv=None):
        raise UserError("the data file is empty")

    assert main() == 2
    assert capsys.readouterr().err == "tinytf.example: error: the data file is empty\n"


def test_a_command_line_without_errors_returns_its_own_exit_status(capsys):
    assert command_line("tinytf.example")(lambda argv=None: 130)() == 130
    assert capsys.readouterr().err == ""


def test_a_missing_checkpoint_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="cannot load the checkpoint"):
        load_trained_model(tmp_path / "nowhere")


@pytest.mark.parametrize("module, other", [("tinytf.sample", "tinytf.train"), ("tinytf.train", "tinytf.sample")])
def test_neither_command_line_imports_the_other(module, other):
    code = f"import sys, {module}; assert {other!r} not in sys.modules, 'imported'"
    job = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert job.returncode == 0, job.stderr
