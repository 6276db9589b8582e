"""Fused elementwise ops from one definition: a few lines of arithmetic, run by NumPy, numexpr or CuPy.

    GELU_TANH = ElementwiseExpression("gelu_tanh", '''
        t = tanh(x * (c + c * k * x * x))
        y = 0.5 * x * (1 + t)
    ''', inputs=("x",), outputs=("y", "t"), constants=dict(c=0.7978845608028654, k=0.044715))
    y, t = GELU_TANH(x)

The source is Python syntax: assignments, one per line, of + - * / and unary -, comparisons (1 where true, else 0),
numbers, the names of inputs, outputs, locals, constants and scalars, and the functions in FUNCTIONS. It is parsed
once (Python's `ast`) into one tree, from which three evaluators are generated:
- NumPy (the CPU default): the tree as a program of ufunc calls with out=, into a few block-sized scratch buffers
  (a small register allocation: an intermediate reuses the buffer of its operand); the program runs over one
  cache-sized block of elements at a time (common.row_blocks), so every pass reads the L2 cache, not memory.
- numexpr, when installed and selected with use_numexpr(True): each assignment printed as a numexpr string.
  Off by default: numexpr's transcendentals are scalar libm calls, slower than NumPy's SIMD ufuncs (bench/NOTES.md).
- CuPy: the whole source printed as CUDA C, one cupy.ElementwiseKernel per expression and dtype, made once.
An output that the source reads before it assigns it is updated in place (an optimizer's moments): the caller
passes it. The others are allocated, or written into arrays passed as out=.
"""

from __future__ import annotations

import ast
import math
import re
import textwrap

import numpy as np

from .. import backend
from .common import map_row_blocks

try:
    import numexpr
except ImportError:  # an optional extra: tinytf[cpu]
    numexpr = None

# name -> (the NumPy ufunc, the CUDA C function, the numexpr function, the Python function for constants)
FUNCTIONS = {
    "exp": (np.exp, "exp", "exp", math.exp),
    "log": (np.log, "log", "log", math.log),
    "tanh": (np.tanh, "tanh", "tanh", math.tanh),
    "sqrt": (np.sqrt, "sqrt", "sqrt", math.sqrt),
    "abs": (np.absolute, "fabs", "abs", abs),
}
_BINARY = {ast.Add: ("add", "+"), ast.Sub: ("subtract", "-"), ast.Mult: ("multiply", "*"), ast.Div: ("divide", "/")}
# a comparison is 1 where it holds and 0 elsewhere, in the expression's dtype: (r >= p) * scale is a dropout mask
_COMPARISONS = {ast.Gt: ("greater", ">"), ast.GtE: ("greater_equal", ">="), ast.Lt: ("less", "<"),
                ast.LtE: ("less_equal", "<=")}
_SYMBOLS = dict((*_BINARY.values(), *_COMPARISONS.values()))
# the names the printed NumPy, numexpr and CUDA code gives its own variables
_RESERVED = re.compile(r"np|block|i|register_\d+|scalar_\d+|number_\d+|FUNCTIONS")
_CUDA_TYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}

_numexpr_selected = False


def use_numexpr(enabled: bool = True) -> None:
    """Evaluate expressions on NumPy arrays with numexpr (which must be installed) instead of NumPy's ufuncs.
    An explicit opt-in: on the machines measured in bench/NOTES.md NumPy is faster for every fused op."""
    global _numexpr_selected
    if enabled and numexpr is None:
        raise RuntimeError("use_numexpr: numexpr is not installed (pip install 'tinytf[cpu]')")
    _numexpr_selected = bool(enabled)


# --- the tree --------------------------------------------------------------------------------------------------
# A node is a tuple: ("array", name), ("number", value), ("scalar", name), (ufunc name, operand, ...), where the
# ufunc names are those of _BINARY and _COMPARISONS, "negative" and the keys of FUNCTIONS.


def _parse(source: str, names: dict[str, str], constants: dict[str, float]) -> list[tuple[str, tuple]]:
    """[(target, tree)] for each assignment; `names` maps every array name to its role and gains the locals."""
    statements = []
    for statement in ast.parse(textwrap.dedent(source)).body:
        if not (isinstance(statement, ast.Assign) and len(statement.targets) == 1
                and isinstance(statement.targets[0], ast.Name)):
            raise SyntaxError(f"expected one `name = expression` per line, got {ast.unparse(statement)!r}")
        target = statement.targets[0].id
        if target not in names and (_RESERVED.fullmatch(target) or target in FUNCTIONS):
            raise NameError(f"the local {target!r} has a name the generated code uses")
        if names.get(target, "local") not in ("output", "local") or target in constants:
            raise SyntaxError(f"{target!r} is not an output or a local: it cannot be assigned")
        tree = _node(statement.value, names, constants)
        names.setdefault(target, "local")
        statements.append((target, tree))
    return statements


def _node(node: ast.expr, names: dict[str, str], constants: dict[str, float]) -> tuple:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return ("number", node.value)
    if isinstance(node, ast.Name):
        if node.id in constants:
            return ("number", constants[node.id])
        if names.get(node.id) == "scalar":
            return ("scalar", node.id)
        if node.id in names:
            return ("array", node.id)
        raise NameError(f"{node.id!r} is not an input, output, scalar, constant or earlier local")
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        return (_BINARY[type(node.op)][0], _node(node.left, names, constants), _node(node.right, names, constants))
    if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in _COMPARISONS:
        return (_COMPARISONS[type(node.ops[0])][0], _node(node.left, names, constants),
                _node(node.comparators[0], names, constants))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return ("negative", _node(node.operand, names, constants))
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in FUNCTIONS
            and len(node.args) == 1 and not node.keywords):
        return (node.func.id, _node(node.args[0], names, constants))
    raise SyntaxError(f"unsupported in an elementwise expression: {ast.unparse(node)!r}")


def _is_scalar(tree: tuple) -> bool:
    return tree[0] in ("number", "scalar") or (tree[0] != "array" and all(_is_scalar(t) for t in tree[1:]))


def _reads(tree: tuple) -> set[str]:
    if tree[0] == "array":
        return {tree[1]}
    if tree[0] in ("number", "scalar"):
        return set()
    return set().union(*(_reads(t) for t in tree[1:]))


def _printed(tree: tuple, leaf, function_name, comparison: str = "({} {} {})") -> str:
    """The tree as infix text, fully parenthesized; leaf(node) prints names and numbers, function_name(name) the
    functions, `comparison` is the format of a comparison's left side, symbol and right side."""
    kind = tree[0]
    if kind in ("array", "number", "scalar"):
        return leaf(tree)
    operands = [_printed(child, leaf, function_name, comparison) for child in tree[1:]]
    if kind == "negative":
        return f"(-{operands[0]})"
    if kind in FUNCTIONS:
        return f"{function_name(kind)}({operands[0]})"
    if kind in dict(_COMPARISONS.values()):
        return comparison.format(operands[0], _SYMBOLS[kind], operands[1])
    return f"({operands[0]} {_SYMBOLS[kind]} {operands[1]})"


def _python_leaf(tree: tuple) -> str:
    return repr(float(tree[1])) if tree[0] == "number" else tree[1]


# --- the NumPy program -------------------------------------------------------------------------------------------


class _Program:
    """The statements as ufunc calls over slots: an input or output by its name, ("register", k) for a block-sized
    scratch buffer reused by every block, ("scalar", k) for a value of scalars and constants computed once per call."""

    def __init__(self, statements, names: dict[str, str]):
        self.names = [name for name, role in names.items() if role in ("input", "output")]
        self.scalars: list[object] = []  # compiled Python expressions, ("scalar", k) is the k-th
        self.calls: list[tuple] = []  # (ufunc, operand slots, out slot)
        self.n_registers = 0
        self._block = None  # `source`, compiled on first use
        self._constant_values: dict[np.dtype, list] = {}  # dtype -> scalar slots that depend on no call's scalars
        homes = {name: name for name in self.names}  # where each array name lives: itself, or a local's register
        free: list[tuple] = []
        for target, tree in statements:
            if target not in homes:
                homes[target] = free.pop(0) if free else self._new_register()
            home = homes[target]
            # the target's buffer holds intermediates too, unless the expression still reads it
            pool = free if target in _reads(tree) else [home, *free]
            self._emit(tree, pool, homes, home)
            free[:] = [slot for slot in pool if slot != home]

    def _new_register(self) -> tuple:
        self.n_registers += 1
        return ("register", self.n_registers - 1)

    def _emit(self, tree: tuple, free: list, homes: dict, out=None):
        """Append the calls that compute `tree` (into `out` when given); returns the slot of the result and whether
        it is a register the caller may release."""
        if tree[0] == "array" or _is_scalar(tree):
            if tree[0] == "array":
                slot = homes[tree[1]]
            else:
                python = _printed(tree, _python_leaf, lambda name: f"FUNCTIONS[{name!r}][3]")
                self.scalars.append(compile(python, "<scalars>", "eval"))
                slot = ("scalar", len(self.scalars) - 1)
            if out is not None:
                self.calls.append((np.positive, (slot,), out))
            return slot, False
        operands = [self._emit(child, free, homes) for child in tree[1:]]
        owned = [slot for slot, releasable in operands if releasable]
        if out is None:
            out = owned.pop(0) if owned else (free.pop(0) if free else self._new_register())
        free.extend(owned)
        ufunc = FUNCTIONS[tree[0]][0] if tree[0] in FUNCTIONS else getattr(np, tree[0])
        self.calls.append((ufunc, tuple(slot for slot, _ in operands), out))
        return out, True

    def _scalar_values(self, scalars: dict, dtype) -> list:
        """The values of the scalar slots as 0-d arrays of `dtype` (NumPy's ufuncs take those about twice as fast
        as Python numbers, with the same rounding); made once per dtype when they do not depend on the call."""
        if dtype in self._constant_values:
            return self._constant_values[dtype]
        values = [np.array(eval(code, {"FUNCTIONS": FUNCTIONS}, scalars), dtype) for code in self.scalars]
        if not any(name in scalars for code in self.scalars for name in code.co_names):
            self._constant_values[dtype] = values
        return values

    @property
    def source(self) -> str:
        """The calls as the Python function that runs them on one block (printed for the reader, and compiled)."""
        def name(slot) -> str:
            return slot if isinstance(slot, str) else f"{slot[0]}_{slot[1]}"

        registers = [f"register_{k}" for k in range(self.n_registers)]
        scalars = [f"scalar_{k}" for k in range(len(self.scalars))]
        lines = [f"def block({', '.join(self.names + registers + scalars)}):"]
        lines += [f"    np.{ufunc.__name__}({', '.join(map(name, operands))}, out={name(out)})"
                  for ufunc, operands, out in self.calls]
        return "\n".join(lines) + "\n"

    def run(self, arrays: dict, scalars: dict) -> None:
        """Run over the flat arrays (all of one size), one cache-sized block of elements at a time; the blocks are
        shared out in contiguous runs to the worker threads (common.map_row_blocks), each with its own registers."""
        if self._block is None:
            namespace = {"np": np}
            exec(compile(self.source, "<elementwise expression>", "exec"), namespace)
            self._block = namespace["block"]
        flat = [arrays[name] for name in self.names]
        values = self._scalar_values(scalars, flat[0].dtype)

        def run_blocks(run: list[slice]) -> None:
            width = run[0].stop - run[0].start
            registers = [np.empty(width, dtype=flat[0].dtype) for _ in range(self.n_registers)]
            for rows in run:
                size = rows.stop - rows.start
                self._block(*[array[rows] for array in flat], *[register[:size] for register in registers], *values)

        map_row_blocks(run_blocks, flat[0])


# --- the expression ----------------------------------------------------------------------------------------------


class ElementwiseExpression:
    """One fused elementwise op, stated once. inputs: the names of the arrays it reads; outputs: those it writes
    (an output read before it is assigned is updated in place); scalars: per-call numbers, passed by keyword;
    constants: numbers fixed at definition. Called as expression(*inputs, out=None, **scalars) -> the outputs
    (one array, or a tuple of them); all arrays have one shape and one floating dtype."""

    def __init__(self, name: str, source: str, inputs: tuple[str, ...], outputs: tuple[str, ...],
                 scalars: tuple[str, ...] = (), constants: dict[str, float] | None = None):
        self.name, self.source = name, textwrap.dedent(source).strip()
        self.inputs, self.outputs, self.scalars = tuple(inputs), tuple(outputs), tuple(scalars)
        self.constants = dict(constants or {})
        roles = {**dict.fromkeys(self.inputs, "input"), **dict.fromkeys(self.outputs, "output"),
                 **dict.fromkeys(self.scalars, "scalar")}
        reserved = [given for given in (*roles, *self.constants) if _RESERVED.fullmatch(given) or given in FUNCTIONS]
        if reserved:
            raise NameError(f"{name}: {reserved} are names the generated code uses")
        self.statements = _parse(self.source, roles, self.constants)
        self.locals = tuple(name for name, role in roles.items() if role == "local")
        assigned, self.updated = set(), []
        for target, tree in self.statements:
            self.updated += [name for name in _reads(tree) if name in self.outputs and name not in assigned]
            assigned.add(target)
        self.updated = tuple(dict.fromkeys(self.updated))  # outputs read before written: the caller passes them
        if set(self.outputs) - assigned:
            raise SyntaxError(f"{name}: outputs {sorted(set(self.outputs) - assigned)} are never assigned")
        self.program = _Program(self.statements, roles)
        self._kernels: dict[np.dtype, object] = {}

    def __call__(self, *inputs, out=None, **scalars):
        if len(inputs) != len(self.inputs) or set(scalars) != set(self.scalars):
            raise TypeError(f"{self.name} takes the arrays {self.inputs} and the scalars {self.scalars}")
        xp = backend.get_array_module(*inputs)
        shape, dtype = inputs[0].shape, inputs[0].dtype
        if out is None:
            if self.updated:
                raise TypeError(f"{self.name} updates {self.updated} in place: pass them in out=")
            out = tuple(xp.empty(shape, dtype=dtype) for _ in self.outputs)
        out = out if isinstance(out, tuple) else (out,)
        for array in (*inputs, *out):
            if array.shape != shape or array.dtype != dtype:
                raise ValueError(f"{self.name}: every array must have shape {shape} and dtype {dtype}, "
                                 f"got {array.shape} and {array.dtype}")
        if backend.is_cupy_array(inputs[0]):
            self._cuda_kernel(dtype)(*inputs, *[dtype.type(scalars[name]) for name in self.scalars], *out)
            return out if len(out) > 1 else out[0]
        # the host evaluators write flat views: a strided output (a transposed parameter) goes through a copy
        work = tuple(xp.ascontiguousarray(array) for array in out)
        if _numexpr_selected:
            self._run_numexpr(inputs, work, scalars)
        else:
            arrays = dict(zip(self.inputs + self.outputs, [a.reshape(-1) for a in (*inputs, *work)]))
            self.program.run(arrays, scalars)
        for array, written in zip(out, work):
            if written is not array:
                array[...] = written
        return out if len(out) > 1 else out[0]

    def cuda_source(self, dtype) -> tuple[str, str, str]:
        """(in_params, out_params, operation) of the cupy.ElementwiseKernel for `dtype` (float32 or float64)."""
        ctype = _CUDA_TYPES[np.dtype(dtype)]
        suffix = "f" if ctype == "float" else ""

        def leaf(tree):
            return f"{float(tree[1])!r}{suffix}" if tree[0] == "number" else tree[1]

        lines = []
        declared = set()
        for target, tree in self.statements:
            declaration = f"{ctype} " if target in self.locals and target not in declared else ""
            declared.add(target)
            lines.append(f"{declaration}{target} = {_printed(tree, leaf, lambda name: FUNCTIONS[name][1])};")
        # CuPy reads parameter types as NumPy dtype names ("float" would be float64 there); the body is C
        type_name = np.dtype(dtype).name
        in_params = ", ".join(f"{type_name} {name}" for name in self.inputs + self.scalars)
        out_params = ", ".join(f"{type_name} {name}" for name in self.outputs)
        return in_params, out_params, "\n".join(lines)

    def numexpr_source(self) -> tuple[list[tuple[str, str]], list[float]]:
        """([(target, numexpr expression)] for each assignment, the numbers they name number_0, number_1, ...):
        numexpr types a literal 0.5 as a double, which would widen a float32 expression to float64."""
        numbers: list[float] = []

        def leaf(tree):
            if tree[0] != "number":
                return tree[1]
            numbers.append(float(tree[1]))
            return f"number_{len(numbers) - 1}"

        # numexpr's comparisons are booleans, which it does not multiply: where() makes them numbers
        return [(target, _printed(tree, leaf, lambda name: FUNCTIONS[name][2], "where({} {} {}, 1, 0)"))
                for target, tree in self.statements], numbers

    def _cuda_kernel(self, dtype):
        if dtype not in self._kernels:
            self._kernels[dtype] = backend.elementwise_kernel(*self.cuda_source(dtype), self.name)
        return self._kernels[dtype]

    def _run_numexpr(self, inputs, out, scalars) -> None:
        dtype = inputs[0].dtype
        statements, numbers = self.numexpr_source()
        values = {name: dtype.type(value) for name, value in scalars.items()}
        values.update((f"number_{i}", dtype.type(value)) for i, value in enumerate(numbers))
        values.update(zip(self.inputs + self.outputs, (*inputs, *out)))
        for target, text in statements:
            if target in self.locals and target not in values:
                values[target] = np.empty_like(inputs[0])
            numexpr.evaluate(text, local_dict=values, out=values[target], casting="same_kind")
