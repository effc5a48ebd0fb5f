"""Training curves of subnetwork and circuit probing.

``probing_training_plot`` draws the per-epoch records (``ProbingEpoch``) that
``subnetwork_probing_prune_scores`` and ``circuit_probing_prune_scores`` pass to their
``epoch_callback``: the loss and its faithfulness part, the expected circuit size and,
when a validation loader was given, the validation faithfulness. One line per target
circuit size (circuit probing runs one optimisation per size).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from auto_circuit.figures.export import require_plotly
from auto_circuit.vocabulary.errors import CircuitError

if TYPE_CHECKING:
    import plotly.graph_objects as go

_PANELS = (
    ("loss", "Loss"),
    ("faithfulness", "Faithfulness loss (train)"),
    ("expected_circuit_size", "Expected circuit size (edges)"),
    ("validation_faithfulness", "Faithfulness loss (validation)"),
)


def probing_training_plot(epochs: Sequence[Any], title: str = "Subnetwork probing") -> go.Figure:
    """One panel per quantity against the epoch, one line per target circuit size.

    Args:
        epochs: ``ProbingEpoch`` records (anything with their fields), in order.
        title: The figure's title.

    Returns:
        A plotly figure; the validation panel is drawn only when some record has a
        validation value.
    """
    if not epochs:
        raise CircuitError("probing_training_plot needs at least one epoch record.")
    go_module = require_plotly()
    from plotly.subplots import make_subplots

    panels = [
        (field, label)
        for field, label in _PANELS
        if field != "validation_faithfulness" or any(getattr(e, field) is not None for e in epochs)
    ]
    fig = make_subplots(rows=len(panels), cols=1, shared_xaxes=True, subplot_titles=[
        label for _, label in panels
    ])  # fmt: skip
    runs: dict[int | None, list[Any]] = {}
    for record in epochs:
        runs.setdefault(record.circuit_size, []).append(record)
    for row, (field, _) in enumerate(panels, start=1):
        for size, records in runs.items():
            name = "no target size" if size is None else f"target {size} edges"
            fig.add_trace(
                go_module.Scatter(
                    x=[r.epoch for r in records],
                    y=[getattr(r, field) for r in records],
                    mode="lines",
                    name=name,
                    legendgroup=name,
                    showlegend=row == 1,
                ),
                row=row,
                col=1,
            )
    fig.update_xaxes(title_text="Epoch", row=len(panels), col=1)
    fig.update_layout(title=title, template="plotly_white", height=250 * len(panels))
    return fig
