"""tinytf.viz.graph: the autograd graph as nodes and edges (read back from the DOT text), gradient norms, grouping by
the modules recorded under record_modules(), and the SVG and PNG drawings of the built-in layout."""

import re
import struct
import sys
import xml.etree.ElementTree as ElementTree

import numpy as np
import pytest
from devices import DEVICES

import tinytf
from tinytf import nn
from tinytf.models import GPT, GPTConfig
from tinytf.tensor import recording_modules
from tinytf.viz.graph import Graph, Node, graph, record_modules

SVG = "{http://www.w3.org/2000/svg}"
DOT_NODE = re.compile(r'^\s*"((?:[^"\\]|\\.)*)" \[label="((?:[^"\\]|\\.)*)", shape=(\w+)')
DOT_EDGE = re.compile(r'^\s*"((?:[^"\\]|\\.)*)" -> "((?:[^"\\]|\\.)*)";$')


def dot_unescaped(text: str) -> str:
    return re.sub(r"\\(.)", lambda match: "\n" if match.group(1) == "n" else match.group(1), text)


def parse_dot(dot: str) -> tuple[dict[str, tuple[str, str]], list[tuple[str, str]]]:
    """id -> (label, shape), and the edges, from DOT text; every line must be a node, an edge or the frame."""
    lines = dot.strip().splitlines()
    assert lines[0] == "digraph tinytf {" and lines[-1] == "}"
    nodes, edges = {}, []
    for line in lines[1:-1]:
        node, edge = DOT_NODE.match(line), DOT_EDGE.match(line)
        if node:
            nodes[dot_unescaped(node.group(1))] = (dot_unescaped(node.group(2)), node.group(3))
        elif edge:
            edges.append((dot_unescaped(edge.group(1)), dot_unescaped(edge.group(2))))
        else:
            assert line.strip() in ("rankdir=TB;", 'node [fontname="Helvetica", fontsize=11];'), line
    return nodes, edges


def tiny_gpt():
    tinytf.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=16, block_size=8, n_layer=2, n_head=2, n_embd=8))
    idx = tinytf.tensor(np.random.default_rng(0).integers(0, 16, (1, 8)))
    return model, idx


def test_dot_of_a_small_expression_has_exactly_its_ops_tensors_and_edges():
    a = tinytf.tensor(np.ones((2, 3), np.float32), requires_grad=True)
    b = tinytf.tensor(np.ones(3, np.float32), requires_grad=True)
    nodes, edges = parse_dot(graph((a * b + a).sum()).to_dot())

    by_label = {label.split("\n")[0] + " " + label.split("\n")[1]: node_id for node_id, (label, _) in nodes.items()}
    assert sorted(by_label) == ["Add (2, 3) float32", "Mul (2, 3) float32", "Sum () float32",
                                "tensor (2, 3) float32", "tensor (3,) float32"]
    a_id, b_id = by_label["tensor (2, 3) float32"], by_label["tensor (3,) float32"]
    mul, add, total = by_label["Mul (2, 3) float32"], by_label["Add (2, 3) float32"], by_label["Sum () float32"]
    assert {node_id: shape for node_id, (_, shape) in nodes.items()} == {
        a_id: "ellipse", b_id: "ellipse", mul: "box", add: "box", total: "box"}
    assert sorted(edges) == sorted([(a_id, mul), (b_id, mul), (mul, add), (a_id, add), (add, total)])
    assert [target for source, target in edges if source == a_id] == [mul, add]  # a feeds two ops


@pytest.mark.parametrize("device", DEVICES)
def test_graph_nodes_carry_kind_shape_dtype_and_op_settings(device):
    x = tinytf.tensor(np.ones((4, 2), np.float64), requires_grad=True, device=device)
    g = graph((x * 0.5).sum(axis=1))
    assert [(node.kind, node.label, node.shape, node.dtype) for node in g.nodes] == [
        ("tensor", "tensor", (4, 2), "float64"), ("op", "MulScalar(scalar=0.5)", (4, 2), "float64"),
        ("op", "Sum", (4,), "float64")]
    assert [(g.nodes[i].id, g.nodes[j].id) for i, j in [(0, 1), (1, 2)]] == g.edges


def test_a_tensor_without_a_graph_is_one_node():
    g = graph(tinytf.tensor([1.0, 2.0]))
    assert [(node.kind, node.shape) for node in g.nodes] == [("tensor", (2,))] and g.edges == []


@pytest.mark.parametrize("device", DEVICES)
def test_grad_norms_are_the_norms_of_the_gradients(device):
    rng = np.random.default_rng(1)
    a_values, b_values = rng.standard_normal((2, 3)).astype(np.float32), rng.standard_normal(3).astype(np.float32)
    a = tinytf.tensor(a_values, requires_grad=True, device=device)
    b = tinytf.tensor(b_values, requires_grad=True, device=device)
    product = a * b
    product.retain_grad()
    loss = (product + a).sum()
    assert all(node.grad_norm is None for node in graph(loss).nodes)
    loss.backward(retain_graph=True)

    norms = {(node.kind, node.label, node.shape): node.grad_norm for node in graph(loss).nodes}
    # d/da = b + 1 (broadcast over rows), d/db = a summed over rows, d/d(product) = ones
    np.testing.assert_allclose(norms["tensor", "tensor", (2, 3)],
                               np.linalg.norm(np.broadcast_to(b_values + 1, (2, 3)).astype(np.float64)), rtol=1e-6)
    np.testing.assert_allclose(norms["tensor", "tensor", (3,)],
                               np.linalg.norm(a_values.astype(np.float64).sum(axis=0)), rtol=1e-6)
    assert norms["op", "Mul", (2, 3)] == np.sqrt(6)
    assert norms["op", "Add", (2, 3)] is None  # no retained grad
    assert all(node.grad_norm is None for node in graph(loss, show_grads=False).nodes)


def test_a_graph_freed_by_backward_cannot_be_drawn():
    x = tinytf.tensor([1.0, 2.0], requires_grad=True)
    loss = (x * x).sum()
    loss.backward()
    with pytest.raises(RuntimeError, match="retain_graph=True"):
        graph(loss)


def test_parameters_are_named_after_the_model():
    model, idx = tiny_gpt()
    nodes = graph(model(idx, idx)[1], model=model).nodes
    labels = {node.label for node in nodes}
    assert {"wte.weight", "wpe.weight", "blocks.1.attn.c_attn.weight"} <= labels
    assert "lm_head.weight" not in labels  # tied to wte.weight: one tensor, named once
    assert not any(node.kind == "module" for node in nodes)  # no module calls were recorded


def test_module_grouping_collapses_each_block_and_expand_opens_one():
    model, idx = tiny_gpt()
    with record_modules():
        loss = model(idx, idx)[1]

    collapsed = graph(loss, model=model)
    modules = {node.label for node in collapsed.nodes if node.kind == "module"}
    assert modules == {"wte: Embedding", "blocks.0: DecoderBlock", "blocks.1: DecoderBlock", "ln_f: LayerNorm",
                       "lm_head: Linear"}
    ids = {node.label: node.id for node in collapsed.nodes}
    assert (ids["blocks.0: DecoderBlock"], ids["blocks.1: DecoderBlock"]) in collapsed.edges
    # the tied embedding feeds two modules, so it stays a node; the blocks' own parameters are inside their boxes
    assert {target for source, target in collapsed.edges if source == ids["wte.weight"]} == {
        ids["wte: Embedding"], ids["lm_head: Linear"]}
    assert not any(node.label.startswith("blocks.") for node in collapsed.nodes if node.kind == "tensor")
    assert len(collapsed.edges) == len(set(collapsed.edges))
    block = next(node for node in collapsed.nodes if node.label == "blocks.1: DecoderBlock")
    assert (block.shape, block.dtype) == ((1, 8, 8), "float32")

    expanded = graph(loss, model=model, expand=("blocks.0",))
    modules = {node.label for node in expanded.nodes if node.kind == "module"}
    assert {"blocks.0.norm1: LayerNorm", "blocks.0.attn: MultiHeadAttention", "blocks.0.norm2: LayerNorm",
            "blocks.0.mlp: GELUMLP", "blocks.1: DecoderBlock"} <= modules
    assert "blocks.0: DecoderBlock" not in modules
    residuals = [node.label for node in expanded.nodes if node.kind == "op" and node.module == "blocks.0"]
    assert residuals == ["Add", "Add"]
    ids = {node.label: node.id for node in expanded.nodes}
    assert (ids["blocks.0.norm1: LayerNorm"], ids["blocks.0.attn: MultiHeadAttention"]) in expanded.edges

    deeper = graph(loss, model=model, expand=("blocks.0", "blocks.0.attn"))
    modules = {node.label for node in deeper.nodes if node.kind == "module"}
    assert {"blocks.0.attn.c_attn: Linear", "blocks.0.attn.c_proj: Linear"} <= modules
    attention_ops = {node.label.split("(")[0] for node in deeper.nodes if node.module == "blocks.0.attn"}
    assert {"MatMul", "Softmax"} <= attention_ops

    with pytest.raises(ValueError, match="blocks.7"):
        graph(loss, model=model, expand=("blocks.7",))


def test_record_modules_stores_the_calls_outermost_first_and_ends_with_its_context():
    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(3, 2)

        def forward(self, x):
            return self.inner(x) * 2.0

    class Failing(nn.Module):
        def forward(self, x):
            raise ZeroDivisionError

    outer, failing, x = Outer(), Failing(), tinytf.randn(4, 3)
    with pytest.raises(ZeroDivisionError), record_modules():
        doubled = outer(x)
        assert recording_modules()
        with pytest.raises(ZeroDivisionError):
            failing(x)
        after_failure = outer.inner(x)
        raise ZeroDivisionError
    assert doubled._creator.module_calls == (outer,)
    assert doubled._creator.inputs[0]._creator.module_calls == (outer, outer.inner)
    assert after_failure._creator.module_calls == (outer.inner,)  # the failed call was taken off the stack
    assert not recording_modules()
    assert outer(x)._creator.module_calls == ()


def test_svg_is_xml_with_one_box_per_node_and_no_overlaps():
    model, idx = tiny_gpt()
    with record_modules():
        loss = model(idx, idx)[1]
    g = graph(loss, model=model, expand=("blocks.0",))
    svg = g.to_svg()
    assert svg == graph(loss, model=model, expand=("blocks.0",)).to_svg()  # deterministic

    root = ElementTree.fromstring(svg)
    assert root.tag == SVG + "svg"
    boxes = [element for element in root.iter(SVG + "g") if element.get("class", "").startswith("node")]
    assert [box.get("id") for box in boxes] == [node.id for node in g.nodes]
    assert len(root.findall(f".//{SVG}polyline")) == len(g.edges)
    extents = {}  # node id -> (left, top, right, bottom) of its front shape
    for box in boxes:
        shape = box.findall("*")[-1 - len(box.findall(SVG + "text"))]
        if shape.tag == SVG + "ellipse":
            cx, cy, rx, ry = (float(shape.get(key)) for key in ("cx", "cy", "rx", "ry"))
            extents[box.get("id")] = (cx - rx, cy - ry, cx + rx, cy + ry)
        else:
            x, y, w, h = (float(shape.get(key)) for key in ("x", "y", "width", "height"))
            extents[box.get("id")] = (x, y, x + w, y + h)
        assert [text.text for text in box.findall(SVG + "text")][0] in {node.label for node in g.nodes} | {
            node.label[:31] + "…" for node in g.nodes}
    width, height = float(root.get("width")), float(root.get("height"))
    placed = list(extents.values())
    for i, (left, top, right, bottom) in enumerate(placed):
        assert 0 <= left and right <= width and 0 <= top and bottom <= height
        for other in placed[i + 1:]:
            assert right <= other[0] or other[2] <= left or bottom <= other[1] or other[3] <= top
    for source, target in g.edges:  # data flows down the page
        assert extents[source][3] < extents[target][1]


def test_a_module_called_twice_makes_a_cycle_that_still_draws():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(3, 3)

        def forward(self, x):
            return self.layer(self.layer(x).relu())

    model = Twice()
    with record_modules():
        out = model(tinytf.randn(2, 3))
    g = graph(out, model=model)
    assert [node.label for node in g.nodes] == ["layer: Linear", "ReLU"]
    layer, relu = (node.id for node in g.nodes)
    assert g.edges == [(layer, relu), (relu, layer)]
    root = ElementTree.fromstring(g.to_svg())
    assert len(root.findall(f".//{SVG}polyline")) == 2


def test_a_tensor_reused_by_a_long_loop_is_drawn_in_bounded_time():
    x = tinytf.tensor([1.0, 2.0], requires_grad=True)
    y = x
    for _ in range(60):  # x feeds every step: routing all its edges around the boxes would take ~3,600 bends
        y = y * 0.5 + x
    g = graph(y.sum())
    root = ElementTree.fromstring(g.to_svg())
    routes = [polyline.get("points").split() for polyline in root.findall(f".//{SVG}polyline")]
    assert len(routes) == len(g.edges)
    longest_bent = max(len(points) for points in routes)
    assert 2 < longest_bent < 2 * 121 and sum(len(points) - 2 for points in routes) <= 2 * 20 * len(g.nodes)
    assert any(len(points) == 2 and float(points[1].split(",")[1]) - float(points[0].split(",")[1]) > 200
               for points in routes)  # the longest edges are drawn straight


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_save_writes_dot_svg_and_png(tmp_path):
    a = tinytf.tensor([1.0, 2.0], requires_grad=True)
    g = graph((a * a + a).sum())
    g.save(tmp_path / "g.dot")
    g.save(tmp_path / "g.svg")
    g.save(tmp_path / "g.png")
    assert (tmp_path / "g.dot").read_text() == g.to_dot()
    assert (tmp_path / "g.svg").read_text() == g.to_svg()
    svg = ElementTree.fromstring(g.to_svg())
    width, height = png_size(tmp_path / "g.png")  # 80 dpi: 0.8 pixel per SVG pixel
    assert abs(width - float(svg.get("width")) * 0.8) <= 1 and abs(height - float(svg.get("height")) * 0.8) <= 1
    with pytest.raises(ValueError, match=".jpg"):
        g.save(tmp_path / "g.jpg")


def test_png_without_matplotlib_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install 'tinytf\[plot\]'"):
        graph(tinytf.tensor([1.0])).save(tmp_path / "g.png")


def test_dot_quotes_ids_and_escapes_labels():
    g = Graph([Node('say "a"', "op", 'back\\slash "quoted"\nsecond line', (2,), "float32"),
               Node("m.x", "module", "m.x: Block")], [('say "a"', "m.x")])
    nodes, edges = parse_dot(g.to_dot())
    assert nodes == {'say "a"': ('back\\slash "quoted"\nsecond line\n(2,) float32', "box"),
                     "m.x": ("m.x: Block", "box3d")}
    assert edges == [('say "a"', "m.x")]
