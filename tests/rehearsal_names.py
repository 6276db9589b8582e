"""After a rehearsal run: every CuPy name tinytf touched on the stand-in must exist in the real cupy module.

The stand-in answers only to names CuPy has, but that list is written by hand; this check asks the installed
cupy-cuda12x wheel (the dev extra; it imports without a GPU) and names the call site of each name it lacks.
"""

from __future__ import annotations

import importlib

from tinytf import backend


def missing_in(module, names: dict[str, str]) -> dict[str, str]:
    """The names ("cupy.a.b") that `module` (the real cupy) does not have, with their call sites."""
    missing = {}
    for name, site in names.items():
        value, path = module, module.__name__
        for part in name.split(".")[1:]:
            path = f"{path}.{part}"
            try:
                value = getattr(value, part)
            except AttributeError:
                try:  # a submodule `import cupy` does not load, such as cupy.cuda.nccl
                    value = importlib.import_module(path)
                except ImportError:
                    missing[name] = site
                    break
    return missing


def check_cupy_names() -> tuple[list[str], bool]:
    """(report lines, whether some name tinytf used on the stand-in is unknown to real CuPy)."""
    if not backend.uses_cuda_standin() or not backend.is_available("cuda"):
        return [], False
    # Read through __dict__: the stand-in's own bookkeeping is not a CuPy name tinytf used.
    touched = backend.cupy_module().__dict__["touched"]
    try:
        real_cupy = importlib.import_module("cupy")
    except Exception as error:  # not installed, or broken CUDA libraries
        return [f"GPU rehearsal: real CuPy is not importable ({error!r}); the {len(touched)} CuPy names tinytf used "
                "were not checked (pip install -e '.[dev]' installs cupy-cuda12x)"], False
    missing = missing_in(real_cupy, touched)
    lines = [f"GPU rehearsal: tinytf used {len(touched)} CuPy names on the stand-in; {len(missing)} of them are "
             f"missing from cupy {real_cupy.__version__}"]
    lines += [f"  {name} (first used at {site})" for name, site in sorted(missing.items())]
    return lines, bool(missing)
