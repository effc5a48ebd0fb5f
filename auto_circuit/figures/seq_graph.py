"""``draw_seq_graph``: a circuit as Sankey diagrams, one per token position.

Each drawn edge is a Sankey link whose width is ``|score|``: blue for a positive score,
red for a negative one. Nodes are components (a head with its query, key and value
inputs is one node) placed by layer along the flow: x by layer with ``orientation="h"``,
y by layer with ``orientation="v"``. In graphs with token positions every position
gets its own Sankey, stacked top to bottom in position order, each as tall as its
share of the summed ``|score|`` of the drawn edges.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

from auto_circuit.engine.patchable_model import PatchableModel
from auto_circuit.figures._edges import (
    Components,
    DrawnEdge,
    finite_magnitudes,
    format_score,
    select_edges,
)
from auto_circuit.figures.export import require_plotly, show_in_ipython, write_figure
from auto_circuit.vocabulary.errors import CircuitError
from auto_circuit.vocabulary.types import PruneScores

if TYPE_CHECKING:
    import plotly.graph_objects as go

POSITIVE_COLOR = "rgba(0, 0, 255, 0.5)"
"""Link colour of an edge with a positive score."""
NEGATIVE_COLOR = "rgba(255, 0, 0, 0.5)"
"""Link colour of an edge with a negative score."""
NODE_COLOR = "rgba(80, 80, 80, 0.85)"

NODE_MARGIN = 0.02
"""Node positions lie in ``[NODE_MARGIN, 1 - NODE_MARGIN]`` of a Sankey's extent
(plotly ignores a position of exactly 0)."""
_NODE_GAP = 0.04  # gap between nodes of a layer, as a fraction of the cross extent
_GAP = 0.03  # vertical gap between stacked Sankeys, as a fraction of the plot height
_EMPTY_SHARE = 0.05  # height share of a shown position without drawn edges
_MARGIN = {"l": 30, "r": 30, "t": 70, "b": 30}
_WIDTH = 1200
_SANKEY_HEIGHT = 320  # pixels per Sankey (before the proportional split)


def draw_seq_graph(
    model: PatchableModel,
    prune_scores: PruneScores | None = None,
    score_threshold: float = 1e-2,
    show_all_seq_pos: bool = False,
    seq_labels: Sequence[str] | None = None,
    layer_spacing: bool = False,
    orientation: Literal["h", "v"] = "h",
    display_ipython: bool = True,
    file_path: str | os.PathLike[str] | None = None,
) -> go.Figure:
    """Draw the edges with ``|score| >= score_threshold`` as Sankey diagrams.

    Args:
        model: The patchable model.
        prune_scores: Edge scores (None: the current masks,
            ``model.current_patch_masks_as_prune_scores()``). Zero scores are never drawn.
        score_threshold: The smallest ``|score|`` drawn (``>= 0``).
        show_all_seq_pos: Also draw (empty) Sankeys for positions without drawn edges.
        seq_labels: One label per token position (e.g. ``train_loader.seq_labels``);
            only for graphs with positions.
        layer_spacing: Space every layer of the model evenly, so empty layers keep their
            room; otherwise only the layers of drawn components get columns (evenly
            spaced, the same columns for every position).
        orientation: ``"h"`` (layers left to right) or ``"v"`` (top to bottom).
        display_ipython: Show the figure when running inside IPython (never elsewhere).
        file_path: Also write the figure: ``.html``, or ``.png``/``.svg``/``.pdf``
            (static export needs Chromium, see ``auto_circuit.figures.export``).
            A relative path is relative to the current directory.

    Returns:
        The plotly figure (fixed pixel size: plotly.js needs it to place the nodes of a
        vertical Sankey): one ``go.Sankey`` trace per drawn position, in position order,
        each named by its position label (``"Position 3"`` or ``"3: Mary"``). Link
        ``customdata`` holds ``(edge name, score)``, link ``value`` is ``|score|``
        (infinite scores take the largest finite magnitude) and node labels are
        component names (``A1.0`` for the edge ``A0.1->A1.0.Q``).
    """
    go_module = require_plotly()
    if orientation not in ("h", "v"):
        raise CircuitError(f'orientation must be "h" or "v", got {orientation!r}.')
    if seq_labels is not None:
        if model.seq_len is None:
            raise CircuitError(
                "seq_labels were given but the graph has no token positions; build it with "
                "patchable_model(..., seq_len=...) or drop seq_labels."
            )
        if len(seq_labels) != model.seq_len:
            raise CircuitError(
                f"seq_labels has {len(seq_labels)} labels but the graph has "
                f"{model.seq_len} token positions."
            )
    scores = model.current_patch_masks_as_prune_scores() if prune_scores is None else prune_scores
    edges = select_edges(model, scores, threshold=score_threshold)
    components = Components(model)

    positions: list[int | None] = (
        list(range(model.seq_len)) if model.seq_len is not None else [None]
    )
    by_pos: dict[int | None, list[DrawnEdge]] = {p: [] for p in positions}
    for edge in edges:
        by_pos[edge.seq_idx].append(edge)
    shown = [p for p in positions if by_pos[p] or show_all_seq_pos]

    drawn_layers = {components.layer[components.of(n)] for e in edges for n in e.edge_nodes()}
    columns = _layer_fractions(
        components.layers() if layer_spacing else sorted(drawn_layers), spaced=layer_spacing
    )

    totals = {p: sum(finite_magnitudes([e.score for e in by_pos[p]])) for p in shown}
    domains = _domains(shown, totals)
    height = _MARGIN["t"] + _MARGIN["b"] + _SANKEY_HEIGHT * max(len(shown), 1)
    plot_w = _WIDTH - _MARGIN["l"] - _MARGIN["r"]
    plot_h = height - _MARGIN["t"] - _MARGIN["b"]

    fig = go_module.Figure()
    annotations = []
    for pos in shown:
        label = _position_label(pos, seq_labels)
        y0, y1 = domains[pos]
        dom_w, dom_h = plot_w, plot_h * (y1 - y0)
        fig.add_trace(
            _sankey(
                go_module,
                by_pos[pos],
                components,
                columns,
                orientation,
                (y0, y1),
                (dom_w, dom_h),
                label,
            )
        )
        if label:
            annotations.append(
                {
                    "text": label,
                    "x": 0.0,
                    "y": y1,
                    "xref": "paper",
                    "yref": "paper",
                    "xanchor": "left",
                    "yanchor": "bottom",
                    "showarrow": False,
                    "font": {"size": 14},
                }
            )
    if not edges:
        annotations.append(
            {
                "text": f"No edge has |score| >= {score_threshold:g}: lower score_threshold.",
                "x": 0.5,
                "y": 0.5,
                "xref": "paper",
                "yref": "paper",
                "showarrow": False,
                "font": {"size": 16},
            }
        )
    fig.update_layout(
        title={"text": f"Circuit: {len(edges)} edges with |score| >= {score_threshold:g}"},
        width=_WIDTH,
        height=height,
        margin=_MARGIN,
        annotations=annotations,
        template="plotly_white",
    )
    if display_ipython:
        show_in_ipython(fig)
    if file_path is not None:
        write_figure(fig, file_path)
    return fig


def _layer_fractions(layers: Sequence[int], spaced: bool) -> dict[int, float]:
    """Position of each layer along the flow, in ``[NODE_MARGIN, 1 - NODE_MARGIN]``:
    proportional to the layer number with ``spaced``, else by rank."""
    if not layers:
        return {}
    span = 1 - 2 * NODE_MARGIN
    if spaced:
        lo, hi = min(layers), max(layers)
        return {
            layer: NODE_MARGIN + span * ((layer - lo) / (hi - lo) if hi > lo else 0.5)
            for layer in layers
        }
    n = len(layers)
    return {
        layer: NODE_MARGIN + span * (rank / (n - 1) if n > 1 else 0.5)
        for rank, layer in enumerate(sorted(layers))
    }


def _domains(
    shown: Sequence[int | None], totals: dict[int | None, float]
) -> dict[int | None, tuple[float, float]]:
    """Paper y-ranges of the stacked Sankeys, first position on top, heights
    proportional to ``totals`` (positions without edges get a small fixed share)."""
    if not shown:
        return {}
    full = sum(totals.values())
    weights = {p: totals[p] if totals[p] > 0 else _EMPTY_SHARE * max(full, 1.0) for p in shown}
    total_weight = sum(weights.values())
    usable = 1.0 - _GAP * (len(shown) - 1)
    domains: dict[int | None, tuple[float, float]] = {}
    top = 1.0
    for p in shown:
        h = usable * weights[p] / total_weight
        domains[p] = (max(top - h, 0.0), top)
        top -= h + _GAP
    return domains


def _position_label(pos: int | None, seq_labels: Sequence[str] | None) -> str:
    if pos is None:
        return ""
    if seq_labels is None:
        return f"Position {pos}"
    return f"{pos}: {seq_labels[pos]}"


def _sankey(
    go_module,
    edges: list[DrawnEdge],
    components: Components,
    columns: dict[int, float],
    orientation: str,
    domain_y: tuple[float, float],
    domain_px: tuple[float, float],
    name: str,
) -> go.Sankey:
    names = sorted(
        {components.of(n) for e in edges for n in e.edge_nodes()}, key=components.order.__getitem__
    )
    index = {n: i for i, n in enumerate(names)}
    values = finite_magnitudes([e.score for e in edges])
    sources = [index[components.of(e.edge.src)] for e in edges]
    targets = [index[components.of(e.edge.dest)] for e in edges]
    dom_w, dom_h = domain_px
    cross_px = dom_h if orientation == "h" else dom_w
    along = [columns[components.layer[n]] for n in names]
    across = _cross_positions(names, components, sources, targets, values)
    if orientation == "v":
        # plotly.js places the fixed nodes of a vertical Sankey as if it were horizontal
        # (x times the domain width, y times its height): undo that scaling.
        xs = [a * dom_h / dom_w for a in along]
        ys = [c * dom_w / dom_h for c in across]
    else:
        xs, ys = along, across
    return go_module.Sankey(
        name=name,
        orientation=orientation,
        arrangement="fixed",
        domain={"x": [0.0, 1.0], "y": list(domain_y)},
        node={
            "label": names,
            "x": xs,
            "y": ys,
            "color": NODE_COLOR,
            "pad": _NODE_GAP * cross_px,
            "thickness": 12,
            "customdata": [components.layer[n] for n in names],
            "hovertemplate": "%{label} (layer %{customdata})<extra></extra>",
        },
        link={
            "source": sources,
            "target": targets,
            "value": values,
            "color": [POSITIVE_COLOR if e.score >= 0 else NEGATIVE_COLOR for e in edges],
            "customdata": [[e.name, format_score(e.score)] for e in edges],
            "hovertemplate": "%{customdata[0]}<br>score %{customdata[1]}<extra></extra>",
        },
    )


def _cross_positions(
    names: list[str],
    components: Components,
    sources: list[int],
    targets: list[int],
    values: list[float],
) -> list[float]:
    """Node centres across the flow: each layer's nodes stacked in component order,
    ``_NODE_GAP`` apart and centred, with the sizes plotly gives them (a node is as wide
    as the larger of its in- and outflow; the fullest layer spans the whole extent)."""
    inflow = [0.0] * len(names)
    outflow = [0.0] * len(names)
    for s, t, v in zip(sources, targets, values, strict=True):
        outflow[s] += v
        inflow[t] += v
    size = [max(i, o) for i, o in zip(inflow, outflow, strict=True)]
    by_layer: dict[int, list[int]] = {}
    for i, n in enumerate(names):
        by_layer.setdefault(components.layer[n], []).append(i)
    if not by_layer:
        return []
    # Plotly's scale (d3-sankey's ky): the fullest layer, gaps included, fills the extent.
    scale = min(
        (1 - _NODE_GAP * (len(group) - 1)) / max(sum(size[i] for i in group), 1e-12)
        for group in by_layer.values()
    )
    centres = [0.0] * len(names)
    for group in by_layer.values():
        used = sum(size[i] * scale for i in group) + _NODE_GAP * (len(group) - 1)
        top = (1 - used) / 2
        for i in group:
            centres[i] = max(top + size[i] * scale / 2, NODE_MARGIN)
            top += size[i] * scale + _NODE_GAP
    return centres
