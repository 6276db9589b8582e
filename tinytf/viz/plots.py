"""Pictures of what a model attends to and of how its training went, as PNG files through matplotlib (the `plot`
extra; `pip install 'tinytf[plot]'`).

    attention_maps(model, idx)                     (n_layer, B, H, T, S) float32 attention weights of one forward pass
    plot_attention(maps, tokens, path, ...)        a grid of heatmaps, layers x heads, tokens on the axes
    plot_loss_curves(runs, path, labels=None)      train and val loss vs iteration of tinytf.train runs

Figures are drawn with matplotlib's object-oriented Figure (no pyplot), so plotting never changes the backend of a
notebook or a window that uses matplotlib too; each PNG is written atomically (checkpoint.write_atomic).
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .. import backend
from ..checkpoint import write_atomic
from ..nn.attention import record_attention_weights
from ..tensor import no_grad

LABELLED_TOKENS = 40  # up to this many tokens, a map shows them on its axes; beyond, the labels would overlap


def attention_maps(model, idx) -> np.ndarray:
    """The attention weights of every MultiHeadAttention layer of `model` for the token ids idx (B, T): one forward
    pass `model(idx)` in eval mode without a graph, the weights recorded per layer in call order
    (nn.attention.record_attention_weights). Returns (n_layer, B, H, T, S) float32 (S = T for self-attention), each
    row a probability distribution over the keys (zeros where a query sees no key); for grouped-query attention, H is
    the number of query heads."""
    was_training = model.training
    model.eval()  # the weights without dropout
    try:
        with no_grad(), record_attention_weights() as weights:
            model(idx)
    finally:
        model.train(was_training)
    if not weights:
        raise ValueError(f"attention_maps: {type(model).__name__} ran no MultiHeadAttention forward pass")
    shapes = {w.shape for w in weights}
    if len(shapes) > 1:
        raise ValueError(f"attention_maps: the layers' weights have different shapes {sorted(shapes)} "
                         "(cross-attention over a source of another length?); they stack only when equal")
    return np.stack([backend.to_numpy(w).astype(np.float32, copy=False) for w in weights])


def plot_attention(maps, tokens: Sequence[str], path, layer: int | None = None, head: int | None = None) -> None:
    """Draw attention maps to the PNG file `path`: a grid of heatmaps, one row per layer and one column per head,
    each titled "layer L head H", queries down and keys across, on one colour scale from 0 to 1.

    maps: (n_layer, H, T, S), or attention_maps' (n_layer, 1, H, T, S) of one sequence; tokens: the S keys' texts
    (the T queries are the last T of them), shown on the axes when S <= LABELLED_TOKENS. layer, head: draw only that
    layer's row, that head's column, or with both that one map."""
    path = checked_png_path(path)
    maps = np.asarray(maps)
    if maps.ndim == 5:
        if maps.shape[1] != 1:
            raise ValueError(f"plot_attention: maps of a batch of {maps.shape[1]} sequences; pick one, e.g. "
                             "maps[:, 0] (n_layer, H, T, S)")
        maps = maps[:, 0]
    if maps.ndim != 4:
        raise ValueError(f"plot_attention: maps must be (n_layer, H, T, S) or (n_layer, 1, H, T, S), got shape "
                         f"{maps.shape}")
    n_layer, n_head, T, S = maps.shape
    if len(tokens) != S:
        raise ValueError(f"plot_attention: {len(tokens)} tokens for maps over {S} keys; give one token per key")
    if T > S:
        raise ValueError(f"plot_attention: maps of {T} queries over {S} keys; the queries must be among the keys")
    layers = _chosen("layer", layer, n_layer)
    heads = _chosen("head", head, n_head)
    labels = [_plain_text(token) for token in tokens] if S <= LABELLED_TOKENS else None
    # Inches, laid out by hand: a layout engine (constrained, tight) costs seconds on a grid of a dozen maps.
    panel = max(1.6, 0.12 * S) if labels else 2.0  # the square of one map: room for one label per token
    margin = 0.3 + 0.07 * max(map(len, labels)) if labels else 0.35  # beside a map, for its tick labels
    title, colour_bar = 0.3, 1.0
    width = len(heads) * (panel + margin) + colour_bar
    height = len(layers) * (panel + margin + title)
    figure = new_figure(figsize=(width, height))
    grid = figure.subplots(len(layers), len(heads), squeeze=False)
    figure.subplots_adjust(left=margin / width, right=1 - colour_bar / width, bottom=margin / height,
                           top=1 - title / height, wspace=margin / panel, hspace=(margin + title) / panel)
    for row, layer_index in enumerate(layers):
        for column, head_index in enumerate(heads):
            axes = grid[row, column]
            image = axes.imshow(maps[layer_index, head_index], cmap="viridis", vmin=0.0, vmax=1.0,
                                interpolation="nearest")
            axes.set_title(f"layer {layer_index} head {head_index}", fontsize=9)
            if labels:
                axes.set_xticks(range(S), labels, rotation=90, fontsize=7)
                axes.set_yticks(range(T), labels[S - T :], fontsize=7)
            else:
                axes.tick_params(labelsize=7)
    bar = figure.add_axes((1 - 0.75 * colour_bar / width, 0.15, 0.12 / width, 0.7))
    figure.colorbar(image, cax=bar, label="attention weight")
    save_png(figure, path)


def plot_loss_curves(runs, path, labels: Sequence[str] | None = None) -> None:
    """Draw the train and val loss against the iteration of one or more tinytf.train runs to the PNG file `path`:
    one colour per run, train solid, val dashed.

    runs: a run folder (its metrics.jsonl) or a metrics.jsonl file, or a list of them. labels: one per run, in the
    legend (default: each run's folder name)."""
    path = checked_png_path(path)
    sources = [Path(runs)] if isinstance(runs, (str, Path)) else [Path(run) for run in runs]
    if not sources:
        raise ValueError("plot_loss_curves: no runs given")
    if labels is not None and len(labels) != len(sources):
        raise ValueError(f"plot_loss_curves: {len(labels)} labels for {len(sources)} runs")
    files = [source / "metrics.jsonl" if source.is_dir() else source for source in sources]
    labels = labels if labels is not None else [file.resolve().parent.name for file in files]
    figure = new_figure(figsize=(7, 4))
    axes = figure.subplots()
    for number, (file, label) in enumerate(zip(files, labels)):
        records = _evaluations(file)
        iterations = [record["iter"] for record in records]
        colour = f"C{number % 10}"
        axes.plot(iterations, [record["train_loss"] for record in records], color=colour, label=f"{label} train")
        axes.plot(iterations, [record["val_loss"] for record in records], color=colour, linestyle="--",
                  label=f"{label} val")
    axes.set_xlabel("iteration")
    axes.set_ylabel("cross-entropy loss (nats/token)")
    axes.legend()
    axes.grid(alpha=0.3)
    figure.subplots_adjust(left=0.1, right=0.97, bottom=0.12, top=0.96)
    save_png(figure, path)


def _evaluations(file: Path) -> list[dict]:
    """The records of a metrics.jsonl that tinytf.train writes, one per evaluation: iter, train_loss, val_loss, ..."""
    if not file.is_file():
        where = f"{file.parent} has no metrics.jsonl" if file.name == "metrics.jsonl" else f"{file} does not exist"
        raise FileNotFoundError(f"plot_loss_curves: {where} (a run writes it at its first evaluation)")
    records = []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            records.append({key: record[key] for key in ("iter", "train_loss", "val_loss")})
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"plot_loss_curves: {file} line {number} is not an evaluation of tinytf.train "
                             "(a JSON object with iter, train_loss and val_loss)") from None
    if not records:
        raise ValueError(f"plot_loss_curves: {file} holds no evaluation yet")
    return records


def _chosen(name: str, index: int | None, count: int) -> list[int]:
    """[index], or every index when None; ValueError outside 0..count-1."""
    if index is None:
        return list(range(count))
    if not 0 <= index < count:
        raise ValueError(f"plot_attention: {name} {index} is out of range; the maps have {count} {name}s")
    return [index]


def _plain_text(token: str) -> str:
    """A token as an axis label: control characters escaped (a newline shows as \\n), and $ escaped, which matplotlib
    would otherwise read as the start of a formula."""
    return "".join(repr(char)[1:-1] if not char.isprintable() else char for char in token).replace("$", r"\$")


def new_figure(**options):
    """A matplotlib Figure, or ImportError naming the extra that installs matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("tinytf.viz draws PNG files with matplotlib: pip install 'tinytf[plot]'") from None
    return Figure(**options)


def checked_png_path(path) -> Path:
    """`path` as a Path, checked before anything is drawn: ValueError unless it ends in .png, is no folder and lies
    in a folder that exists."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"{path}: tinytf.viz writes PNG files; give a path ending in .png")
    if path.is_dir():
        raise ValueError(f"{path} is a folder; give a file path ending in .png")
    if not path.parent.is_dir():
        raise ValueError(f"{path}: the folder {path.parent} does not exist")
    return path


def save_png(figure, path: Path) -> None:
    """Write the figure to `path` as PNG, atomically (the old file or the whole new one, never a part)."""
    image = io.BytesIO()
    figure.savefig(image, format="png", dpi=80)
    write_atomic(path, image.getvalue())
