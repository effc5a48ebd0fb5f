"""AutoCircuit's low-level Sankey helpers: ``net_viz``, ``node_name``, ``t_fmt``.

``draw_seq_graph`` is the figure users want; ``net_viz`` draws one Sankey of a given
set of edges (one token position), as AutoCircuit's ``draw_seq_graph`` used to
internally. Plotly is imported only inside ``net_viz``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Literal

import torch as t

from auto_circuit.engine.patchable_model import PatchableModel
from auto_circuit.figures._edges import Components, DrawnEdge, check_prune_scores
from auto_circuit.figures.export import require_plotly
from auto_circuit.figures.seq_graph import _layer_fractions, _sankey
from auto_circuit.vocabulary.errors import CircuitError
from auto_circuit.vocabulary.types import Edge, PruneScores

if TYPE_CHECKING:
    import plotly.graph_objects as go

_PLOT_PX = (1140.0, 320.0)  # the pixel size _sankey lays nodes out for


def node_name(n: str, unembed: bool = False) -> str:
    """The label a figure gives graph node ``n``: ``"Embed"`` for ``Resid Start``,
    ``"Unembed"`` (with ``unembed``) or ``""`` for ``Resid End``, and a head's name for
    its query, key or value input (``A1.0.Q`` -> ``A1.0``).

    AutoCircuit cut the last two characters of any name ending in Q, K or V; only a
    ``.Q``/``.K``/``.V`` suffix is cut here.
    """
    if n == "Resid End":
        return "Unembed" if unembed else ""
    if n == "Resid Start":
        return "Embed"
    head, dot, suffix = n.rpartition(".")
    return head if dot and suffix in ("Q", "K", "V") else n


def t_fmt(x: Any, seq_dim: int, seq_idx: int | None, line_break: str = "\n") -> str:
    """A short hover label for an activation ``x`` (``[batch, ..., seq, ...]``).

    A non-tensor is ``str(x)``. Of a tensor, the first prompt at position ``seq_idx``
    along ``seq_dim`` is shown (``seq_idx=None``: the last position when that axis is
    shorter than 5, else all of them): a vector as its first two values
    (``"[0.12, -3.5 ...]"``), anything else as its printout with ``line_break`` between
    lines.
    """
    if not isinstance(x, t.Tensor):
        return str(x)
    if x.ndim <= seq_dim:
        raise CircuitError(f"t_fmt: a tensor of shape {list(x.shape)} has no axis {seq_dim}.")
    pos: int | slice = seq_idx if seq_idx is not None else (-1 if x.size(-1) < 5 else slice(None))
    picked = x[(0, *[slice(None)] * (seq_dim - 1), pos)]
    flat = picked.squeeze()
    if flat.ndim == 1:
        return "[" + ", ".join(f"{v:.2f}".rstrip("0") for v in flat.tolist()[:2]) + " ...]"
    text = str(picked)
    text = text.removeprefix("tensor(").removesuffix(")")
    return text.replace("\n", line_break)


def net_viz(
    model: PatchableModel,
    seq_edges: Iterable[Edge],
    prune_scores: PruneScores | None,
    vert_interval: tuple[float, float],
    seq_idx: int | None = None,
    score_threshold: float = 1e-2,
    layer_spacing: bool = False,
    orientation: Literal["h", "v"] = "h",
) -> tuple[go.Sankey, int]:
    """One Sankey of the edges of ``seq_edges`` with ``|score| >= score_threshold``.

    Args:
        model: The patchable model.
        seq_edges: The candidate edges (usually ``model.edge_dict[seq_idx]``).
        prune_scores: Edge scores; None: the current masks.
        vert_interval: The paper y-range ``(y0, y1)`` the Sankey occupies.
        seq_idx: The token position drawn (names the trace).
        score_threshold: The smallest ``|score|`` drawn.
        layer_spacing: Give every layer of the model a column (else only drawn layers).
        orientation: ``"h"`` or ``"v"``.

    Returns:
        ``(sankey, n_layers)``: the ``go.Sankey`` (link width ``|score|``, blue positive,
        red negative, as ``draw_seq_graph``) and the number of layer columns it uses.
        AutoCircuit aligned layers with invisible "ghost" links; here nodes are placed
        at fixed positions by layer, so no link is invented. Hover labels show edge
        names and scores, not activations.
    """
    go_module = require_plotly()
    if orientation not in ("h", "v"):
        raise CircuitError(f'orientation must be "h" or "v", got {orientation!r}.')
    y0, y1 = vert_interval
    if not 0.0 <= y0 < y1 <= 1.0:
        raise CircuitError(f"vert_interval must satisfy 0 <= y0 < y1 <= 1, got {vert_interval}.")
    scores = model.current_patch_masks_as_prune_scores() if prune_scores is None else prune_scores
    check_prune_scores(model, scores)
    drawn: list[DrawnEdge] = []
    for e in seq_edges:
        score = float(scores[e.dest.module_name][e.patch_idx])
        if score != 0 and abs(score) >= score_threshold:
            drawn.append(DrawnEdge(e, score))
    drawn.sort(key=lambda d: (-abs(d.score), d.name))
    components = Components(model)
    used = {components.layer[components.of(n)] for d in drawn for n in d.edge_nodes()}
    layers = components.layers() if layer_spacing else sorted(used)
    columns = _layer_fractions(layers, spaced=layer_spacing)
    name = "All tokens" if seq_idx is None else f"Position {seq_idx}"
    sankey = _sankey(
        go_module,
        drawn,
        components,
        columns,
        orientation,
        (y0, y1),
        (_PLOT_PX[0], _PLOT_PX[1] * (y1 - y0)),
        name,
    )
    return sankey, len(layers)
