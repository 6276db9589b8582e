"""The package's layers: every import inside tinytf points down the layer list, none hides in a function, no cycles.

The graph is read from the source (ast), so it sees every import a module can run, at the top or in a function.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "tinytf"

# Bottom first: a module may import only modules of lower layers, or of its own layer without a cycle. A name
# stands for the module and everything under it; the longest name that fits places a module. (The backend loads
# the CuPy stand-in by name, in CuPy's place, as it loads CuPy: no arrow.)
LAYERS = [
    ["tinytf.backend", "tinytf.threads"],
    ["tinytf.tensor"],
    ["tinytf.creation", "tinytf.testing"],
    ["tinytf.functional"],
    ["tinytf.kernels", "tinytf.testing.cupy_standin"],
    ["tinytf.attention"],
    ["tinytf.nn"],
    ["tinytf.models"],
    ["tinytf.optim", "tinytf.tokenization", "tinytf.data", "tinytf.checkpoint"],
    ["tinytf.interop", "tinytf.distributed", "tinytf.viz"],
    ["tinytf.cli"],
    ["tinytf.train", "tinytf.sample", "tinytf.seq2seq", "tinytf.gpu_check"],
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path, modules: dict) -> list[tuple[str, bool]]:
    """(imported tinytf module, at module level?) for each import statement of one module."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            # `from package import name` imports the submodule `name` when there is one
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        found += [(target, id(node) in top_level) for target in targets if target.split(".")[0] == "tinytf"]
    return found


def layer_of(name: str) -> int | None:
    fits = [(len(prefix), rank) for rank, names in enumerate(LAYERS) for prefix in names
            if name == prefix or name.startswith(prefix + ".")]
    return max(fits)[1] if fits else None


def import_graph() -> dict[str, set[str]]:
    """Module -> the tinytf modules it imports (its own enclosing packages left out: Python has them loaded)."""
    modules = all_modules()
    graph = {}
    for name, path in modules.items():
        graph[name] = {target for target, _ in imports_of(name, path, modules)
                       if target != name and not name.startswith(target + ".")}
    return graph


def test_every_module_has_a_layer():
    unplaced = [name for name in all_modules() if name != "tinytf" and layer_of(name) is None]
    assert not unplaced, f"add these modules to LAYERS: {unplaced}"


def test_imports_point_down_the_layers():
    upward = [f"{name} -> {target}" for name, targets in import_graph().items() if name != "tinytf"
              for target in targets if layer_of(target) is None or layer_of(target) > layer_of(name)]
    assert not upward, "imports that point up the layers:\n" + "\n".join(sorted(upward))


def test_no_import_of_tinytf_hides_in_a_function():
    modules = all_modules()
    delayed = [f"{name} -> {target}" for name, path in modules.items()
               for target, at_top in imports_of(name, path, modules) if not at_top]
    assert not delayed, "delayed imports (they hide a cycle or an upward arrow):\n" + "\n".join(sorted(delayed))


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path [a, b, ..., a], or None (iterative depth-first search)."""
    state = {}  # name -> "open" while on the current path, "done" after
    for start in graph:
        if start in state:
            continue
        path, stack = [], [(start, iter(sorted(graph[start])))]
        state[start] = "open"
        path.append(start)
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = "done"
                path.pop()
                stack.pop()
            elif state.get(child) == "open":
                return path[path.index(child):] + [child]
            elif child not in state and child in graph:
                state[child] = "open"
                path.append(child)
                stack.append((child, iter(sorted(graph[child]))))
    return None


def test_the_import_graph_has_no_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_import_tinytf_gives_the_subpackages_as_attributes_lazily():
    probe = ("import sys, tinytf; lazy = [m for m in ('tinytf.nn', 'tinytf.optim', 'tinytf.models') if m in "
             "sys.modules]; print(lazy); print(tinytf.nn.Linear.__name__, tinytf.optim.AdamW.__name__, "
             "tinytf.models.GPT.__name__, tinytf.nn.functional.scaled_dot_product_attention.__name__, "
             "tinytf.functional.relu.__name__)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.split("\n")[:2] == ["[]", "Linear AdamW GPT scaled_dot_product_attention relu"]
    import tinytf

    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        tinytf.nonexistent  # noqa: B018
