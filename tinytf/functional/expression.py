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
  cache-sized block of elements at a time (common.BLOCK_BYTES), so every pass reads the L2 cache, not memory.
- numexpr, when installed and selected with use_numexpr(True): each assignment printed as a numexpr string.
  Off by default: numexpr's transcendentals are scalar libm calls, slower than NumPy's SIMD ufuncs (bench/NOTES.md).
- CuPy: the whole source printed as CUDA C, one cupy.ElementwiseKernel per expression and dtype, made once.
An output that the source reads before it assigns it is updated in place (an optimizer's moments): the caller
passes it. The others are allocated, or written into arrays passed as out=. Inputs broadcast to the outputs' shape
(a RoPE table (T, D) against x (B, H, T, D), a row statistic (N, 1) against (N, C)), and any array may be strided.
`foreach` runs one expression over many sets of arrays in one call (AdamW over all of a model's parameters).
"""

from __future__ import annotations

import ast
import itertools
import math
import re
import textwrap

import numpy as np

from .. import backend
from ..threads import get_num_threads, run_on_workers
from . import common

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
        self.names = [name for name, role in names.items() if role in ("input", "output")]  # inputs, then outputs
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

    def run(self, calls: list[list], scalars: dict) -> None:
        """Run over `calls`, each the arrays of one call in the order of self.names, all of one shape (a broadcast
        input viewed through broadcast_to, with zero strides): the blocks of every call, one cache-sized block at a
        time, as one list shared out in contiguous runs to the worker threads (_map_block_runs), each thread with
        its own registers."""
        if self._block is None:
            namespace = {"np": np}
            exec(compile(self.source, "<elementwise expression>", "exec"), namespace)
            self._block = namespace["block"]
        dtype = calls[0][0].dtype
        values = self._scalar_values(scalars, dtype)

        def run_blocks(run: list[tuple]) -> None:
            largest = max(math.prod(shape) for _, _, shape in run)
            registers = [np.empty(largest, dtype=dtype) for _ in range(self.n_registers)]
            for arrays, index, shape in run:
                size = math.prod(shape)
                views = [register[:size] for register in registers]
                if len(shape) > 1:
                    views = [view.reshape(shape) for view in views]
                self._block(*[array[index] for array in arrays], *views, *values)

        _map_block_runs(run_blocks, [block for arrays in calls for block in _blocks(arrays)], dtype.itemsize)


def _merged(arrays: list) -> list:
    """Views of `arrays` (all of one shape, the last an output) with the fewest axes: the arrays flat when all are
    contiguous (the common case, checked first), else in the output's memory order with each two neighbouring axes
    merged where every array steps through them as one (nditer's coalescing), so that a block is a few long runs of
    elements, not many short ones."""
    if all(array.flags.c_contiguous for array in arrays):
        return [array.reshape(-1) for array in arrays]
    # the largest step first, so that a block is one part of the output's memory (a transposed parameter's update
    # would walk it column by column otherwise)
    last = arrays[-1].strides
    order = sorted(range(len(last)), key=lambda axis: -abs(last[axis]))
    if order != list(range(len(order))):
        arrays = [array.transpose(order) for array in arrays]
    shape, strides = [], [[] for _ in arrays]
    for axis, size in enumerate(arrays[0].shape):
        if size == 1:
            continue
        if shape and all(steps[-1] == array.strides[axis] * size for steps, array in zip(strides, arrays)):
            shape[-1] *= size
            for steps, array in zip(strides, arrays):
                steps[-1] = array.strides[axis]
            continue
        shape.append(size)
        for steps, array in zip(strides, arrays):
            steps.append(array.strides[axis])
    return [array.reshape(shape or (1,), copy=False) for array in arrays]


def _blocks(arrays: list) -> list[tuple]:
    """[(arrays, index, block shape)]: the arrays (all of one shape) cut into blocks of about common.BLOCK_BYTES,
    each array[index] a view. A block is a range of rows along the first axis whose rows fit in a block, one index
    of each axis before it: a row of a (B, H, T, D) array that is too large becomes blocks of (rows, T, D)."""
    arrays = _merged(arrays)
    shape, itemsize = arrays[0].shape, arrays[0].dtype.itemsize
    split, row_bytes = 0, itemsize * math.prod(shape[1:])
    while row_bytes > common.BLOCK_BYTES and split < len(shape) - 1:
        split += 1
        row_bytes //= shape[split]
    rows, inner = shape[split], shape[split + 1:]
    per_block = max(1, common.BLOCK_BYTES // row_bytes)
    if split == 0:  # the common case: slices of the first axis
        return [(arrays, slice(start, start + per_block), (min(per_block, rows - start), *inner))
                for start in range(0, rows, per_block)]
    return [(arrays, (*outer, slice(start, start + per_block)), (min(per_block, rows - start), *inner))
            for outer in itertools.product(*map(range, shape[:split])) for start in range(0, rows, per_block)]


def _map_block_runs(work, blocks: list[tuple], itemsize: int) -> None:
    """work(run) for runs of consecutive `blocks` of about equal size, one run per thread (threads.run_on_workers),
    so that each thread streams its own part of memory. A thread must get common.MIN_BLOCKS_PER_THREAD blocks'
    worth of elements, or handing work to the pool costs more than the second core saves."""
    if len(blocks) <= 1:  # the common case of small arrays, without the pool's bookkeeping
        if blocks:
            work(blocks)
        return
    sizes = [math.prod(shape) for _, _, shape in blocks]
    total = sum(sizes)
    worth = -(-total * itemsize // common.BLOCK_BYTES)
    n_threads = min(get_num_threads(), worth // common.MIN_BLOCKS_PER_THREAD) or 1
    if n_threads == 1:
        work(blocks)
        return
    runs, start, done = [], 0, 0
    for end, size in enumerate(sizes, 1):
        done += size
        if done * n_threads >= total * (len(runs) + 1):
            runs.append(blocks[start:end])
            start = end
    run_on_workers(work, runs, n_threads)


def _broadcasts_to(shape: tuple, target: tuple) -> bool:
    return len(shape) <= len(target) and all(size in (1, whole) for size, whole in zip(shape[::-1], target[::-1]))


# --- the expression ----------------------------------------------------------------------------------------------


class ElementwiseExpression:
    """One fused elementwise op, stated once. inputs: the names of the arrays it reads; outputs: those it writes
    (an output read before it is assigned is updated in place); scalars: per-call numbers, passed by keyword;
    constants: numbers fixed at definition. Called as expression(*inputs, out=None, **scalars) -> the outputs
    (one array, or a tuple of them); all arrays have one floating dtype, the outputs one shape, to which the inputs
    broadcast."""

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
        if set(scalars) != set(self.scalars):
            raise TypeError(f"{self.name} takes the arrays {self.inputs} and the scalars {self.scalars}")
        out = self._checked(inputs, out)
        if backend.is_cupy_array(out[0]):
            self._cuda_kernel(out[0].dtype)(*inputs, *[out[0].dtype.type(scalars[name]) for name in self.scalars],
                                            *out)
        elif _numexpr_selected:
            self._run_numexpr(inputs, out, scalars)
        else:
            self.program.run([self._host_arrays(inputs, out)], scalars)
        return out if len(out) > 1 else out[0]

    def foreach(self, inputs: list[tuple], out: list[tuple], **scalars) -> None:
        """The expression on many sets of arrays with the same scalars, as one call: inputs[k] and out[k] are the
        arrays of the k-th (each set of one shape, the sets of one dtype). On the host the blocks of all the sets are
        one list, shared out to the worker threads, where a call per set would leave the second core idle on every
        small array (an optimizer's step over a model's parameters); on a GPU, one kernel per set."""
        if set(scalars) != set(self.scalars) or len(inputs) != len(out):
            raise TypeError(f"{self.name}.foreach takes a list of input tuples, a list as long of output tuples and "
                            f"the scalars {self.scalars}")
        checked = [self._checked(arrays, outputs) for arrays, outputs in zip(inputs, out)]
        if not checked:
            return
        dtypes = {outputs[0].dtype for outputs in checked}
        if len(dtypes) > 1:
            raise ValueError(f"{self.name}.foreach: every array must have one dtype, got {sorted(map(str, dtypes))}")
        if backend.is_cupy_array(checked[0][0]) or _numexpr_selected:
            for arrays, outputs in zip(inputs, checked):
                self(*arrays, out=outputs, **scalars)
        else:
            self.program.run([self._host_arrays(arrays, outputs) for arrays, outputs in zip(inputs, checked)],
                             scalars)

    def _checked(self, inputs: tuple, out) -> tuple:
        """The outputs of a call as a tuple, allocated when not given; raises unless the inputs broadcast to the
        outputs' shape and every array has their dtype."""
        if len(inputs) != len(self.inputs):
            raise TypeError(f"{self.name} takes the arrays {self.inputs} and the scalars {self.scalars}")
        if out is None:
            if self.updated:
                raise TypeError(f"{self.name} updates {self.updated} in place: pass them in out=")
            xp = backend.get_array_module(*inputs)
            shape = np.broadcast_shapes(*[array.shape for array in inputs])
            out = tuple(xp.empty(shape, dtype=inputs[0].dtype) for _ in self.outputs)
        out = out if isinstance(out, tuple) else (out,)
        shape, dtype = out[0].shape, out[0].dtype
        for array in out:
            if array.shape != shape or array.dtype != dtype:
                raise ValueError(f"{self.name}: every output must have shape {shape} and dtype {dtype}, "
                                 f"got {array.shape} and {array.dtype}")
        for array in inputs:
            if array.dtype != dtype or (array.shape != shape and not _broadcasts_to(array.shape, shape)):
                raise ValueError(f"{self.name}: every input must broadcast to shape {shape} and have dtype {dtype}, "
                                 f"got {array.shape} and {array.dtype}")
        return out

    def _host_arrays(self, inputs: tuple, out: tuple) -> list:
        """The arrays of a call in the program's order, the inputs of another shape viewed as the outputs' shape."""
        shape = out[0].shape
        return [*(array if array.shape == shape else np.broadcast_to(array, shape) for array in inputs), *out]

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
        """numexpr broadcasts the inputs and writes strided outputs itself."""
        dtype = out[0].dtype
        statements, numbers = self.numexpr_source()
        values = {name: dtype.type(value) for name, value in scalars.items()}
        values.update((f"number_{i}", dtype.type(value)) for i, value in enumerate(numbers))
        values.update(zip(self.inputs + self.outputs, (*inputs, *out)))
        for target, text in statements:
            if target in self.locals and target not in values:
                values[target] = np.empty_like(out[0])
            numexpr.evaluate(text, local_dict=values, out=values[target], casting="same_kind")
