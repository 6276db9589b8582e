"""Pictures for studying tinytf: the autograd graph (DOT, SVG, PNG), attention maps and loss curves.

A top layer, beside interop: it imports the layers below it; only the command lines (tinytf.train's loss.png,
tinytf.sample --attention-map) import it. The PNG pictures need matplotlib (`pip install 'tinytf[plot]'`); DOT and
SVG need nothing.
"""

from .graph import Graph, Node, graph, record_modules
from .plots import attention_maps, plot_attention, plot_loss_curves

__all__ = ["Graph", "Node", "attention_maps", "graph", "plot_attention", "plot_loss_curves", "record_modules"]
