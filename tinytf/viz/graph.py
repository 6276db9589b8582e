"""Pictures of the autograd graph: Graphviz DOT text, SVG from a built-in layered layout, PNG through matplotlib.

`graph(tensor)` walks the graph back from a tensor, as `Tensor.backward` would: each Function becomes an op node
(its class name, its scalar settings, and the shape and dtype of the tensor it made), each leaf tensor a tensor node
(named after the model's parameter when `model` is given), and the edges follow the data, from inputs to outputs.
Gradient norms are shown where `.grad` is set: on leaves after backward, on op outputs that retained their grad.

Ops run under `record_modules()` remember the Module calls they ran in; `graph(loss, model=model)` then draws each
of the model's top-level modules (one transformer block) as one node, and `expand` opens chosen ones a level.

The SVG layout is the layered (Sugiyama) scheme of Graphviz's `dot`, in its simplest form: a node's layer is its
longest path from the sources, edges that span layers pass through invisible dummy nodes, the order inside each
layer comes from a few barycenter sweeps, and each node is then pulled toward the mean position of its neighbours.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

import numpy as np

from .. import backend
from ..nn import Module, Parameter
from ..tensor import Function, Tensor, record_modules
from .plots import new_figure, save_png

__all__ = ["Graph", "Node", "graph", "record_modules"]


@dataclasses.dataclass
class Node:
    """One box of the picture. kind: "op" (a Function; shape, dtype and grad_norm are its output's), "tensor" (a leaf
    tensor) or "module" (a module's ops drawn as one; shape and dtype are those of its last op's output). module: the
    name of the innermost module the node belongs to (for a parameter, its owner), when known."""

    id: str
    kind: str
    label: str
    shape: tuple | None = None
    dtype: str | None = None
    grad_norm: float | None = None
    module: str | None = None

    def lines(self) -> list[str]:
        """The text drawn in the node: its label, "shape dtype", and the gradient norm when there is one."""
        lines = [self.label]
        if self.shape is not None:
            lines.append(f"{self.shape} {self.dtype}")
        if self.grad_norm is not None:
            lines.append(f"grad norm {self.grad_norm:.4g}")
        return lines


def graph(tensor: Tensor, model: Module | None = None, expand=(), show_grads: bool = True) -> Graph:
    """The autograd graph that produced `tensor`, as nodes and data-flow edges.

    model: names the parameters (from `named_parameters`) and, for ops recorded under `record_modules()`, groups them
    by module: the ops of each of the model's modules below it become one node, except in the modules named in
    `expand` ("blocks.0"), which show their own ops and child modules (collapsed unless expanded too).
    show_grads: put gradient norms on the nodes whose tensor has a `.grad`.
    """
    expand = (expand,) if isinstance(expand, str) else tuple(expand)
    module_names: dict[int, str] = {}
    parameter_names: dict[int, str] = {}
    if model is not None:
        for name, module in model.named_modules():
            module_names.setdefault(id(module), name)
        parameter_names = {id(parameter): name for name, parameter in model.named_parameters()}
        unknown = [name for name in expand if name not in set(module_names.values()) - {""}]
        if unknown:
            raise ValueError(f"graph: expand names no module of the model: {', '.join(unknown)}")
    elif expand:
        raise ValueError("graph: expand needs the model (model=...) to know the modules' names")

    functions, outputs = _functions_in_order(tensor)
    nodes: list[Node] = []
    edges: list[tuple[str, str]] = []
    node_of: dict[int, Node] = {}  # id(Function or leaf Tensor) -> its node
    groups: dict[str, str | None] = {}  # node id -> the module (name) drawn in its place, None: drawn itself
    consumer_groups: dict[str, set] = {}  # leaf node id -> the groups of the ops it feeds
    if not functions:
        nodes.append(_leaf_node("t0", tensor, parameter_names, show_grads))
    for function in functions:
        for parent in function.inputs:
            if parent._creator is None and id(parent) not in node_of:
                node_of[id(parent)] = _leaf_node(f"t{len(node_of)}", parent, parameter_names, show_grads)
                nodes.append(node_of[id(parent)])
        output = outputs[id(function)]
        calls = [module_names[id(module)] for module in function.module_calls if id(module) in module_names]
        node = Node(f"op{len(node_of)}", "op", _op_label(function), tuple(output.shape), str(output.dtype),
                    _grad_norm(output, show_grads), calls[-1] if calls and calls[-1] else None)
        node_of[id(function)] = node
        nodes.append(node)
        groups[node.id] = next((name for name in calls if name and name not in expand), None)
        for parent in function.inputs:
            source = node_of[id(parent._creator if parent._creator is not None else parent)]
            edges.append((source.id, node.id))
            if source.kind == "tensor":
                consumer_groups.setdefault(source.id, set()).add(groups[node.id])
    for leaf_id, consumers in consumer_groups.items():
        groups[leaf_id] = next(iter(consumers)) if len(consumers) == 1 else None
    return _collapsed(nodes, edges, groups, model)


def _functions_in_order(root: Tensor) -> tuple[list[Function], dict[int, Tensor]]:
    """The Functions behind `root`, each after the Functions of its inputs (iterative DFS, as in tensor.py), and
    id(Function) -> the tensor it made. A Function does not keep its output: the consumers' inputs hold it."""
    order: list[Function] = []
    outputs: dict[int, Tensor] = {}
    if root._creator is None:
        return order, outputs
    outputs[id(root._creator)] = root
    visited: set[int] = set()
    stack: list[tuple[Function, bool]] = [(root._creator, False)]
    while stack:
        function, inputs_done = stack.pop()
        if inputs_done:
            order.append(function)
            continue
        if id(function) in visited:
            continue
        if function._released:
            raise RuntimeError("graph: this graph was freed by backward(); call backward(retain_graph=True) to draw "
                               "it after backward, or draw it before")
        visited.add(id(function))
        stack.append((function, True))
        for parent in reversed(function.inputs):  # reversed: the first input is explored first
            creator = parent._creator
            if creator is not None and id(creator) not in visited:
                outputs[id(creator)] = parent
                stack.append((creator, False))
    return order, outputs


def _leaf_node(node_id: str, tensor: Tensor, parameter_names: dict, show_grads: bool) -> Node:
    name = parameter_names.get(id(tensor))
    label = name or ("parameter" if isinstance(tensor, Parameter) else "tensor")
    owner = (name.rpartition(".")[0] or None) if name else None
    return Node(node_id, "tensor", label, tuple(tensor.shape), str(tensor.dtype), _grad_norm(tensor, show_grads), owner)


def _op_label(function: Function) -> str:
    """The Function's class name, with the scalar settings its forward stored (`MulScalar(scalar=0.5)`)."""
    settings = []
    for key, value in vars(function).items():
        if (isinstance(value, np.ndarray) or backend.is_cupy_array(value)) and value.ndim == 0:
            value = value.item()  # a number kept in the input's dtype
        if not key.startswith("_") and isinstance(value, (bool, int, float, str, np.number, np.bool_)):
            settings.append(f"{key}={_short(value)}")
    name = type(function).__name__
    return f"{name}({', '.join(settings)})" if settings else name


def _short(value) -> str:
    if isinstance(value, str):
        return value if len(value) <= 16 else value[:15] + "…"
    return f"{value:.4g}" if isinstance(value, (float, np.floating)) else str(value)


def _grad_norm(tensor: Tensor, show_grads: bool) -> float | None:
    if not show_grads or tensor.grad is None:
        return None
    return float(np.linalg.norm(backend.to_numpy(tensor.grad).astype(np.float64)))


def _collapsed(nodes: list[Node], edges: list[tuple[str, str]], groups: dict, model: Module | None) -> Graph:
    """Each node whose group is a module replaced by that module's one node; edges inside a module dropped, the
    others kept once."""
    modules = dict(model.named_modules()) if model is not None else {}
    kept: list[Node] = []
    module_nodes: dict[str, Node] = {}
    for node in nodes:
        group = groups.get(node.id)
        if group is None:
            kept.append(node)
            continue
        module_node = module_nodes.get(group)
        if module_node is None:
            module_node = module_nodes[group] = Node(f"module:{group}", "module",
                                                     f"{group}: {type(modules[group]).__name__}", module=group)
            kept.append(module_node)
        if node.kind == "op":  # the module's output: its last op's (nodes come in topological order)
            module_node.shape, module_node.dtype, module_node.grad_norm = node.shape, node.dtype, node.grad_norm
    representative = {node.id: f"module:{groups[node.id]}" if groups.get(node.id) else node.id for node in nodes}
    kept_edges = dict.fromkeys((representative[source], representative[target]) for source, target in edges)
    return Graph(kept, [edge for edge in kept_edges if edge[0] != edge[1]])


@dataclasses.dataclass
class Graph:
    """Nodes and data-flow edges (from_id, to_id); `to_dot`, `to_svg` and `save` draw them."""

    nodes: list[Node]
    edges: list[tuple[str, str]]

    def to_dot(self) -> str:
        """Graphviz DOT: ops as boxes, leaf tensors as ellipses, modules as 3-D boxes; data flows downwards."""
        shapes = {"op": "box", "tensor": "ellipse", "module": "box3d"}
        lines = ["digraph tinytf {", "  rankdir=TB;", '  node [fontname="Helvetica", fontsize=11];']
        for node in self.nodes:
            lines.append(f"  {_dot_string(node.id)} [label={_dot_string(chr(10).join(node.lines()))}, "
                         f"shape={shapes[node.kind]}, style=filled, fillcolor={_dot_string(_FILL[node.kind])}];")
        lines += [f"  {_dot_string(source)} -> {_dot_string(target)};" for source, target in self.edges]
        return "\n".join(lines + ["}"]) + "\n"

    def to_svg(self) -> str:
        """An SVG picture from the built-in layered layout (no dependency); the same graph gives the same text."""
        layout = _Layout(self)
        width, height = layout.width, layout.height
        parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
                 f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="monospace" font-size="{_FONT_PX}">',
                 '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" '
                 'orient="auto"><path d="M 0 0 L 10 5 L 0 10 z" fill="#555"/></marker></defs>',
                 '<rect width="100%" height="100%" fill="white"/>']
        for route in layout.routes:
            points = " ".join(f"{x:.1f},{y:.1f}" for x, y in route)
            parts.append(f'<polyline class="edge" points="{points}" fill="none" stroke="#555" '
                         'marker-end="url(#arrow)"/>')
        w, h = layout.box_width, layout.box_height
        for node in self.nodes:
            x, y = layout.centers[node.id]
            parts.append(f'<g class="node {node.kind}" id={quoteattr(node.id)}>')
            style = f'fill="{_FILL[node.kind]}" stroke="#333"'
            if node.kind == "tensor":
                parts.append(f'<ellipse cx="{x:.1f}" cy="{y:.1f}" rx="{w / 2:.1f}" ry="{h / 2:.1f}" {style}/>')
            else:
                if node.kind == "module":  # the 3-D box's back face
                    parts.append(f'<rect x="{x - w / 2 + 4:.1f}" y="{y - h / 2 - 4:.1f}" width="{w:.1f}" '
                                 f'height="{h:.1f}" {style}/>')
                parts.append(f'<rect x="{x - w / 2:.1f}" y="{y - h / 2:.1f}" width="{w:.1f}" height="{h:.1f}" '
                             f'{style}/>')
            for line, line_y in layout.text_lines(node):
                parts.append(f'<text x="{x:.1f}" y="{line_y:.1f}" text-anchor="middle" dominant-baseline="central">'
                             f"{escape(line)}</text>")
            parts.append("</g>")
        return "\n".join(parts + ["</svg>"]) + "\n"

    def save(self, path) -> None:
        """Write the picture; the format follows the suffix: .dot, .svg, or .png (the SVG's layout at 80 dpi,
        0.8 pixel per SVG pixel; needs matplotlib, the `plot` extra)."""
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix == ".dot":
            path.write_text(self.to_dot(), encoding="utf-8")
        elif suffix == ".svg":
            path.write_text(self.to_svg(), encoding="utf-8")
        elif suffix == ".png":
            _draw_png(self, path)
        else:
            raise ValueError(f"Graph.save: unknown format {path.suffix!r}; use .dot, .svg or .png")


_FILL = {"op": "#dbe9f6", "tensor": "#fdf3c4", "module": "#d9f0d3"}
_FONT_PX = 11
_CHAR_PX = 6.7  # the width of one monospace character at _FONT_PX
_LINE_PX = 14
_MAX_CHARS = 32  # longer lines are cut, so that all boxes keep one size
_GAP_X, _GAP_Y, _DUMMY_GAP, _MARGIN = 24, 36, 12, 16
_DUMMIES_PER_NODE = 20


def _fitted(line: str) -> str:
    return line if len(line) <= _MAX_CHARS else line[: _MAX_CHARS - 1] + "…"


class _Layout:
    """Node centers and edge routes of the layered drawing, in pixels (y grows downwards).

    Every node gets the same box, sized for the longest (cut) line and the most lines. An edge that spans several
    layers gets a dummy node in each layer between, so that ordering keeps it clear of boxes and it is drawn as a
    polyline through them; an edge that closes a cycle (a module called twice) is drawn straight, upwards.
    """

    def __init__(self, graph: Graph):
        texts = [[_fitted(line) for line in node.lines()] for node in graph.nodes]
        self.box_width = max([len(line) for lines in texts for line in lines] + [8]) * _CHAR_PX + 16
        self.box_height = max([len(lines) for lines in texts] + [1]) * _LINE_PX + 12
        self._texts = {node.id: lines for node, lines in zip(graph.nodes, texts)}
        index = {node.id: i for i, node in enumerate(graph.nodes)}
        count = len(graph.nodes)
        edges = [(index[source], index[target]) for source, target in graph.edges]
        layer = _longest_path_layers(count, edges)
        # chains: every edge as the list of vertices it passes (dummies get indices from `count` on); the shortest
        # spans first, while the budget lasts (a tensor reused by each step of a long loop would need a number of
        # dummies quadratic in the steps); an edge without them is drawn straight
        chains = [[source, target] for source, target in edges]
        budget = _DUMMIES_PER_NODE * count
        for chain in sorted(chains, key=lambda chain: layer[chain[1]] - layer[chain[0]]):
            source, target = chain
            if layer[target] - layer[source] - 1 > budget:
                break
            budget -= max(layer[target] - layer[source] - 1, 0)
            for dummy_layer in range(layer[source] + 1, layer[target]):
                layer.append(dummy_layer)
                chain.insert(-1, len(layer) - 1)
        forward = [layer[chain[-1]] > layer[chain[0]] for chain in chains]
        layers = [[] for _ in range(max(layer, default=0) + 1)]
        for vertex, vertex_layer in enumerate(layer):
            layers[vertex_layer].append(vertex)
        above = [[] for _ in layer]  # neighbours in the layer above / below, along forward edges
        below = [[] for _ in layer]
        for chain, is_forward in zip(chains, forward):
            if is_forward and len(chain) == layer[chain[-1]] - layer[chain[0]] + 1:  # not drawn straight
                for upper, lower in zip(chain, chain[1:]):
                    above[lower].append(upper)
                    below[upper].append(lower)
        _order_by_barycenters(layers, above, below)
        widths = [self.box_width if vertex < count else 0 for vertex in range(len(layer))]
        x = _place_in_layers(layers, above, below, widths)
        left = min((x[v] - widths[v] / 2 for v in range(len(layer))), default=0)
        x = [value - left + _MARGIN for value in x]
        y = [_MARGIN + 4 + vertex_layer * (self.box_height + _GAP_Y) + self.box_height / 2 for vertex_layer in layer]
        self.width = max([x[v] + widths[v] / 2 for v in range(len(layer))] + [0]) + _MARGIN + 4
        self.height = len(layers) * (self.box_height + _GAP_Y) - _GAP_Y + 2 * _MARGIN + 4
        self.centers = {node.id: (x[i], y[i]) for i, node in enumerate(graph.nodes)}
        half = self.box_height / 2
        self.routes = []
        for chain, is_forward in zip(chains, forward):
            sign = 1 if is_forward else -1  # leave from the bottom and enter at the top, or the reverse
            first, last = chain[0], chain[-1]
            # through each layer it crosses, the edge runs vertically beside the boxes, from the band's top to bottom
            passing = [(x[v], y[v] + offset) for v in chain[1:-1] for offset in (-half, half)]
            self.routes.append([(x[first], y[first] + sign * half)] + passing + [(x[last], y[last] - sign * half)])

    def text_lines(self, node: Node) -> list[tuple[str, float]]:
        """(text, y of its center) for each line of the node, centered on the node."""
        lines = self._texts[node.id]
        top = self.centers[node.id][1] - (len(lines) - 1) * _LINE_PX / 2
        return [(line, top + i * _LINE_PX) for i, line in enumerate(lines)]


def _longest_path_layers(count: int, edges: list[tuple[int, int]]) -> list[int]:
    """Each vertex's layer: the length of the longest path reaching it from a source, but a source's is one less
    than its nearest consumer's. Edges that close a cycle (back edges of a depth-first search) are left out."""
    successors = [[] for _ in range(count)]
    for source, target in edges:
        successors[source].append(target)
    state = [0] * count  # 0 new, 1 on the DFS path, 2 done
    finished: list[int] = []
    for start in range(count):
        if state[start]:
            continue
        state[start] = 1
        stack = [(start, iter(successors[start]))]
        while stack:
            vertex, pending = stack[-1]
            target = next(pending, None)
            if target is None:
                stack.pop()
                state[vertex] = 2
                finished.append(vertex)
            elif state[target] == 0:
                state[target] = 1
                stack.append((target, iter(successors[target])))
    position = {vertex: i for i, vertex in enumerate(reversed(finished))}
    layer = [0] * count
    has_input = [False] * count
    for vertex in reversed(finished):
        for target in successors[vertex]:
            if position[target] > position[vertex]:
                layer[target] = max(layer[target], layer[vertex] + 1)
                has_input[target] = True
    # A source (a parameter, the targets) sits just above its first consumer, not at the top with long edges down.
    for vertex in range(count):
        consumers = [layer[target] for target in successors[vertex] if position[target] > position[vertex]]
        if not has_input[vertex] and consumers:
            layer[vertex] = min(consumers) - 1
    return layer


def _order_by_barycenters(layers: list[list[int]], above: list, below: list, sweeps: int = 4) -> None:
    """Reorder each layer in place, downwards then upwards, by the mean position of each vertex's neighbours in the
    layer just swept (a vertex without any keeps its place): fewer crossings, deterministically (stable sorts)."""
    for _ in range(sweeps):
        for layer_order, neighbours in ((range(1, len(layers)), above), (range(len(layers) - 2, -1, -1), below)):
            for i in layer_order:
                reference = layers[i - 1] if neighbours is above else layers[i + 1]
                position = {vertex: p for p, vertex in enumerate(reference)}
                keys = {}
                for p, vertex in enumerate(layers[i]):
                    placed = [position[n] for n in neighbours[vertex] if n in position]
                    keys[vertex] = sum(placed) / len(placed) if placed else p
                layers[i].sort(key=keys.__getitem__)


def _place_in_layers(layers: list[list[int]], above: list, below: list, widths: list[float]) -> list[float]:
    """x of each vertex: each layer packed left to right, then a few sweeps that move each layer toward the mean x
    of its vertices' neighbours, keeping the order and the gaps (boxes _GAP_X apart, dummies _DUMMY_GAP)."""
    x = [0.0] * len(widths)
    for layer in layers:
        _pack(layer, [0.0] * len(layer), widths, x)
    for _ in range(4):
        for layer_order, neighbours in ((range(1, len(layers)), above), (range(len(layers) - 2, -1, -1), below)):
            for i in layer_order:
                wanted = [sum(x[n] for n in neighbours[v]) / len(neighbours[v]) if neighbours[v] else x[v]
                          for v in layers[i]]
                _pack(layers[i], wanted, widths, x)
    return x


def _pack(layer: list[int], wanted: list[float], widths: list[float], x: list[float]) -> None:
    """Place the layer's vertices at least their gap apart, in order, as close to `wanted` as one shift allows."""
    placed: list[float] = []
    for vertex, target in zip(layer, wanted):
        if placed:
            previous = layer[len(placed) - 1]
            gap = _GAP_X if widths[vertex] and widths[previous] else _DUMMY_GAP
            target = max(target, placed[-1] + (widths[previous] + widths[vertex]) / 2 + gap)
        placed.append(target)
    shift = sum(w - p for w, p in zip(wanted, placed)) / len(placed) if placed else 0.0
    for vertex, position in zip(layer, placed):
        x[vertex] = position + shift


def _draw_png(graph: Graph, path: Path) -> None:
    """The SVG's layout drawn with matplotlib, through the figure and the writer that plots.py uses for its PNGs."""
    layout = _Layout(graph)
    figure = new_figure(figsize=(layout.width / 100, layout.height / 100))  # 100 layout pixels to the inch
    axes = figure.add_axes((0, 0, 1, 1))
    axes.set_xlim(0, layout.width)
    axes.set_ylim(layout.height, 0)
    axes.axis("off")
    for route in layout.routes:
        xs, ys = zip(*route)
        axes.plot(xs[:-1], ys[:-1], color="#555", linewidth=0.8)
        axes.annotate("", xy=route[-1], xytext=route[-2],
                      arrowprops={"arrowstyle": "-|>", "color": "#555", "linewidth": 0.8, "shrinkA": 0, "shrinkB": 0})
    w, h = layout.box_width, layout.box_height
    angles = np.linspace(0, 2 * np.pi, 49)
    for node in graph.nodes:
        x, y = layout.centers[node.id]
        style = {"facecolor": _FILL[node.kind], "edgecolor": "#333", "linewidth": 0.8}
        if node.kind == "tensor":
            axes.fill(x + w / 2 * np.cos(angles), y + h / 2 * np.sin(angles), **style)
        else:
            if node.kind == "module":  # the 3-D box's back face
                axes.fill(*_rectangle(x + 4, y - 4, w, h), **style)
            axes.fill(*_rectangle(x, y, w, h), **style)
        for line, line_y in layout.text_lines(node):
            # a layout pixel is 1/100 inch, 0.72 points
            axes.text(x, line_y, line, ha="center", va="center", family="monospace", fontsize=_FONT_PX * 0.72)
    save_png(figure, path)


def _rectangle(x: float, y: float, w: float, h: float) -> tuple[list[float], list[float]]:
    """The corners of the w x h rectangle centered on (x, y), as the xs and ys of a polygon."""
    return [x - w / 2, x + w / 2, x + w / 2, x - w / 2], [y - h / 2, y - h / 2, y + h / 2, y + h / 2]


def _dot_string(text: str) -> str:
    """`text` as a quoted DOT string (backslashes and quotes escaped, newlines as \\n, which DOT centers)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
