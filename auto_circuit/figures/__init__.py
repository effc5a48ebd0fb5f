"""Figures of circuits and of their evaluation: the last stage of the pipeline.

Nothing upstream imports this package, and importing it changes no global plotting
setting. Plotly (an optional dependency: ``pip install "auto_circuit[plot]"``) is
imported only when a figure is made; the HTML circuit browser needs no plotly at all.

- ``draw_seq_graph``: a circuit as Sankey diagrams, one per token position.
- ``roc_plot``, ``task_roc_plot``, ``edge_patching_plot``, ``average_auc_plot``,
  ``prune_score_similarities_plot``: data in, figure out.
- ``circuit_browser_html``, ``write_circuit_browser``: a self-contained, offline HTML
  page to explore and compare circuits.
- ``write_figure``: save any figure as HTML or a static image.
- ``net_viz``, ``node_name``, ``t_fmt``: AutoCircuit's low-level Sankey helpers.
"""

from auto_circuit.figures.circuit_browser import circuit_browser_html, write_circuit_browser
from auto_circuit.figures.export import chromium_path, write_figure
from auto_circuit.figures.net_viz import net_viz, node_name, t_fmt
from auto_circuit.figures.plots import (
    average_auc_plot,
    edge_patching_plot,
    prune_score_similarities_plot,
    roc_plot,
    task_roc_plot,
)
from auto_circuit.figures.seq_graph import NEGATIVE_COLOR, POSITIVE_COLOR, draw_seq_graph

__all__ = [
    "NEGATIVE_COLOR",
    "POSITIVE_COLOR",
    "average_auc_plot",
    "chromium_path",
    "circuit_browser_html",
    "draw_seq_graph",
    "edge_patching_plot",
    "net_viz",
    "node_name",
    "prune_score_similarities_plot",
    "roc_plot",
    "t_fmt",
    "task_roc_plot",
    "write_circuit_browser",
    "write_figure",
]
