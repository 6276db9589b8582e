"""A non-editable install (a wheel) must carry the .cu sources and the emulator header, and find them at run time."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from tinytf.kernels.compile_gate import TENSOR_CORE_SOURCES

REPOSITORY = Path(__file__).resolve().parents[2]


def build_wheel(tmp_path: Path) -> Path:
    """`pip wheel --no-deps` of a copy of the repository's packaged files (the working tree stays clean)."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPOSITORY / name, source / name)
    shutil.copytree(REPOSITORY / "tinytf", source / "tinytf", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    # Reuse the installed setuptools when it can build wheels itself: an isolated build environment costs ~15 s.
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools.command.bdist_wheel") else []
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", *isolation, "-w", str(tmp_path / "dist"),
         "-q", "--disable-pip-version-check"],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    [wheel] = (tmp_path / "dist").glob("tinytf-*.whl")
    return wheel


def test_the_wheel_carries_the_kernels_and_finds_them_when_installed(tmp_path):
    wheel = build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = sorted(path.parent.relative_to(REPOSITORY).as_posix()
                      for path in (REPOSITORY / "tinytf").rglob("__init__.py") if "__pycache__" not in path.parts)
    expected = {f"{package}/__init__.py" for package in packages} | {
        "tinytf/kernels/__init__.py", "tinytf/kernels/compile_gate.py", "tinytf/kernels/flash_attention.cu",
        "tinytf/kernels/tensor_core.cuh", "tinytf/kernels/flash_attention_tc.cuh",
        "tinytf/kernels/emulator/cuda_emulator.h",
    } | {f"tinytf/kernels/{source.name}" for source in TENSOR_CORE_SOURCES if source.is_file()}
    assert expected <= names, f"missing from the wheel: {sorted(expected - names)}"

    installed = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(installed)  # what pip install puts in site-packages for a pure-Python wheel
    probe = ("import tinytf.kernels as k, tinytf.kernels.emulator as e; "
             "print(k.FLASH_ATTENTION_SOURCE.resolve()); print(k.TENSOR_CORE_HEADER.resolve()); "
             "print(e.HEADER.resolve())")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(installed)})
    assert result.returncode == 0, result.stderr
    for found in result.stdout.split():
        assert Path(found).is_file() and Path(found).is_relative_to(installed.resolve()), result.stdout
