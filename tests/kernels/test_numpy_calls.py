"""Library code runs on CuPy as well as NumPy, so outside tinytf/backend.py it must not call NumPy functions on
tensor data: np.exp(x) on a CuPy array fails (or silently copies to the host). Ops get the array module of their
inputs instead, `xp = get_array_module(x)`, and call xp.exp(x).

This scan finds every np.<name>(...) / numpy.<name>(...) call in tinytf/. A call passes when the name never looks at
array data (dtypes, type queries, shape arithmetic), when its module works on host arrays by design, or when it is
listed below with the reason it is safe. A new call that fits none of these is an error: use xp, or add it here with
its reason.
"""

from __future__ import annotations

import ast
from pathlib import Path

import tinytf

PACKAGE = Path(tinytf.__file__).parent
BACKEND = PACKAGE / "backend.py"

DATA_FREE = {
    "dtype", "bool_", "float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16",
    "uint32", "uint64", "iinfo", "finfo", "result_type", "promote_types", "can_cast", "issubdtype",
    "broadcast_shapes", "errstate",
}

HOST_SIDE_MODULES = {
    "data.py": "token batches come from memory-mapped files on the host and are moved to the device afterwards",
    "tokenization.py": "tokenizers turn text into token ids on the host, before any batch reaches a device",
    "testing/__init__.py": "gradient checks compare host copies in float64",
    "testing/cupy_standin.py": "the CuPy stand-in computes with NumPy on host memory: that is what it is for",
    "sample.py": "command line: tokenizing text on the host",
    "train.py": "command line: loss bookkeeping and seeds on the host",
    "checkpoint.py": "safetensors files hold host arrays",
    "interop/hf.py": "reads and writes checkpoint files, host arrays",
    "interop/bert_bart.py": "reads and writes checkpoint files, host arrays",
    "seq2seq.py": "command line: the generated dates and their token ids, on the host",
    "nn/layers.py": "makes parameters on the host (Module.to moves them); forward passes use tinytf.functional",
    "nn/conv.py": "makes parameters and buffers on the host (Module.to moves them); forward passes use the ops",
    "models/sampling.py": "samples from a host copy of the last position's logits",
    "models/beam.py": "scores the beams on a host copy of each step's logits (B * num_beams, vocab)",
    "kernels/emulator/__init__.py": "the emulator runs kernels on NumPy arrays: the CPU is its device",
    "attention/varlen.py": "cu_seqlens and position ids are read on the host: they set the loop over the sequences",
    "viz/graph.py": "lays out and draws the graph on the host; gradient norms of host copies (backend.to_numpy)",
    "viz/plots.py": "stacks host copies of the recorded weights (backend.to_numpy) and draws them",
}

ALLOWED_CALLS = {
    ("functional/activation.py", "cos"): "erf's Chebyshev nodes, fitted once at import on the host",
    ("functional/activation.py", "arange"): "erf's Chebyshev nodes, fitted once at import on the host",
    ("functional/activation.py", "polynomial.chebyshev.chebfit"): "erf's coefficients, fitted once at import",
    ("creation.py", "array"): "builds tensors from Python data on the host, then moves them",
    ("creation.py", "asarray"): "the dtype of a Python fill value",
    ("tensor.py", "array2string"): "repr formats a host copy (self.numpy())",
    ("tensor.py", "asarray"): "wraps Python data and NumPy scalars; CuPy arrays never reach it",
    ("nn/module.py", "shape"): "np.shape reads .shape, which CuPy arrays have",
    ("models/gpt.py", "zeros_like"): "initialization, on the host where the model is built",
    ("models/gpt.py", "array"): "generation keeps the token ids on the host",
    ("models/gpt.py", "asarray"): "generation keeps the token ids on the host",
    **{("models/gpt.py", name): "generation keeps the token ids on the host, ragged prompts' layout too"
       for name in ("concatenate", "maximum", "arange", "cumsum", "stack", "zeros")},
    **{("nn/kv_cache.py", name): "KVCache.store_sequences: the rows, indices and start bias of packed prompts, "
       "from cu_seqlens on the host, moved to the cache's device once" for name in ("diff", "repeat", "arange", "where")},
    ("attention/naive.py", "sqrt"): "of the head dim, a Python int",
    ("models/encoder.py", "zeros_like"): "initialization, on the host where the model is built",
    ("models/encoder.py", "zeros"): "default token types, built on the host and moved by checked_ids",
    ("models/encoder.py", "asarray"): "ids given as Python lists, moved to the device right after",
    ("models/encoder_decoder.py", "zeros"): "the final_logits_bias buffer at construction, and generation's host ids",
    **{("models/encoder_decoder.py", name): "generation keeps the token ids and the finished flags on the host"
       for name in ("asarray", "full", "where", "stack", "argmax", "concatenate")},
    ("attention/__init__.py", "asarray"): "alibi_slopes given as Python data, moved to the device right after",
    **{("attention/cuda.py", name): "the packed layout's sequence bookkeeping, from cu_seqlens on the host; the "
       "index arrays go to the device once" for name in ("diff", "repeat", "arange")},
    ("attention/cuda.py", "full"): "the (B,) lengths of a dense launch, moved to the device by xp.asarray",
    ("attention/dropout.py", "ndindex"): "iterates over block indices of a shape, no array data",
    ("functional/indexing.py", "asarray"): "indices given as host data (lists, NumPy arrays), moved to the device",
    ("functional/shape.py", "asarray"): "repeat_interleave reads its counts on the host: they set the output's length",
    ("functional/arithmetic.py", "array"): "a Python number as a 0-d array for a NumPy tensor only; a CuPy tensor gets "
                                           "a NumPy scalar",
    ("functional/expression.py", "array"): "the NumPy program's scalar slots: CuPy arrays run the ElementwiseKernel",
    ("functional/expression.py", "empty"): "the NumPy program's block registers: CuPy arrays run the ElementwiseKernel",
    ("functional/expression.py", "empty_like"): "numexpr's locals: numexpr takes only host arrays",
    ("functional/expression.py", "broadcast_to"): "the NumPy program's broadcast inputs: CuPy arrays run the "
                                                  "ElementwiseKernel, which broadcasts them itself",
    **{("functional/pooling.py", name): "window counts and interpolation matrices are built on the host from the "
       "sizes alone, then moved to the device"
       for name in ("arange", "minimum", "maximum", "floor", "zeros", "outer", "add.at")},
}


def numpy_calls(path: Path):
    """(line, name) of each call np.<name>(...) or numpy.<name>(...), with dotted names such as random.default_rng."""
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if not isinstance(node, ast.Call):
            continue
        parts, target = [], node.func
        while isinstance(target, ast.Attribute):
            parts.append(target.attr)
            target = target.value
        if isinstance(target, ast.Name) and target.id in ("np", "numpy") and parts:
            yield node.lineno, ".".join(reversed(parts))


def test_library_code_calls_numpy_only_where_that_is_safe_on_cupy():
    unexplained = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = path.relative_to(PACKAGE).as_posix()
        if path == BACKEND or module in HOST_SIDE_MODULES:
            continue
        for line, name in numpy_calls(path):
            if name not in DATA_FREE and (module, name) not in ALLOWED_CALLS:
                unexplained.append(f"tinytf/{module}:{line}: np.{name}(...)")
    assert not unexplained, (
        "NumPy calls that would fail on CuPy arrays; use xp = get_array_module(...) or explain them in "
        f"{Path(__file__).name}:\n" + "\n".join(unexplained)
    )


def test_the_allowlists_name_files_that_exist():
    stale = [module for module in HOST_SIDE_MODULES if not (PACKAGE / module).exists()]
    stale += [f"{module}: np.{name}" for module, name in ALLOWED_CALLS
              if not any(found == name for _, found in numpy_calls(PACKAGE / module))]
    assert not stale, f"allowlist entries with nothing left to allow: {stale}"
