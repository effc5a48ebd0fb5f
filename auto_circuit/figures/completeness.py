"""The figure of completeness by knockouts (Wang et al. 2022, section 4).

Each measurement ``(circuit size, knockouts, KL(model || circuit), KL(model - K ||
circuit - K))`` is a point at (x, y) = (the two KLs), joined to its projection on the
diagonal ``y = x``: a complete circuit lies on the diagonal, and the longer the segment
the less complete the circuit. One facet per task, one colour per algorithm.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from auto_circuit.figures.export import require_plotly
from auto_circuit.figures.plots import PALETTE
from auto_circuit.vocabulary.errors import CircuitError

if TYPE_CHECKING:
    import plotly.graph_objects as go

CompletenessScores = Iterable[tuple[int, int, float, float]]


def completeness_fig(
    task_completeness_scores: Mapping[str, Mapping[str, CompletenessScores]],
    task_names: Mapping[str, str] | None = None,
    algo_names: Mapping[str, str] | None = None,
) -> go.Figure:
    """Completeness of each algorithm's circuit on each task (module docstring).

    Args:
        task_completeness_scores: ``{task: {algo: [(size, n_knockouts, kl, ko_kl)]}}``.
        task_names, algo_names: Display names for the keys (default: the keys).
    """
    if not task_completeness_scores:
        raise CircuitError("task_completeness_scores is empty: pass at least one task.")
    go_module = require_plotly()
    from plotly.subplots import make_subplots

    task_names = task_names or {}
    algo_names = algo_names or {}
    tasks = list(task_completeness_scores)
    fig = make_subplots(
        rows=1, cols=len(tasks), subplot_titles=[task_names.get(k, k) for k in tasks]
    )
    colors: dict[str, str] = {}
    for col, task in enumerate(tasks, start=1):
        xs: list[float] = []
        for algo, scores in task_completeness_scores[task].items():
            color = colors.setdefault(algo, PALETTE[len(colors) % len(PALETTE)])
            for i, (size, n_knockouts, kl, ko_kl) in enumerate(scores):
                mid = (kl + ko_kl) / 2
                xs.extend([kl, mid])
                fig.add_trace(
                    go_module.Scatter(
                        x=[kl, mid],
                        y=[ko_kl, mid],
                        name=algo_names.get(algo, algo),
                        legendgroup=algo,
                        showlegend=col == 1 and i == 0,
                        mode="lines+markers",
                        line={"color": color},
                        hovertext=[f"circuit size: {size}<br>knockouts: {n_knockouts}"] * 2,
                    ),
                    row=1,
                    col=col,
                )
        if xs:
            lo, hi = min(xs), max(xs)
            fig.add_trace(
                go_module.Scatter(
                    x=[lo, hi],
                    y=[lo, hi],
                    name="y = x",
                    legendgroup="y = x",
                    mode="lines",
                    line={"dash": "dash", "color": "#999999"},
                    showlegend=col == 1,
                ),
                row=1,
                col=col,
            )
    fig.update_xaxes(title_text="KL(model || circuit)")
    fig.update_yaxes(title_text="KL(model - K || circuit - K)", row=1, col=1)
    fig.update_layout(
        title="Same under knockouts", template="plotly_white", width=max(500, 430 * len(tasks))
    )
    return fig
