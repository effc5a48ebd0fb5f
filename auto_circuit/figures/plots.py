"""Figures of circuit evaluations: data in, plotly figure out.

- ``roc_plot`` / ``task_roc_plot``: ROC curves against an official circuit (Conmy et
  al. 2023, "Towards Automated Circuit Discovery for Mechanistic Interpretability").
- ``edge_patching_plot``: a metric against circuit size, one facet per task.
- ``average_auc_plot``: areas under those curves relative to the Random algorithm
  (Miller et al. 2024, "Transformer Circuit Faithfulness Metrics are not Robust").
- ``prune_score_similarities_plot``: top-k overlap between algorithms.

Every algorithm keeps one colour across all facets of a figure and appears once in
the legend. No function shows the figure or changes plotly's global settings.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from auto_circuit.engine.patchable_model import PatchableModel
from auto_circuit.evaluation.area_under_curve import Points, average_auc
from auto_circuit.evaluation.official_circuits.measure_roc import measure_roc, roc_auc
from auto_circuit.evaluation.prune_metrics.prune_metrics import PruneMetric
from auto_circuit.evaluation.prune_scores_similarity import prune_score_similarities
from auto_circuit.figures.export import require_plotly
from auto_circuit.vocabulary.errors import CircuitError
from auto_circuit.vocabulary.types import Edge, PruneScores

if TYPE_CHECKING:
    import plotly.graph_objects as go

PALETTE = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)
"""Algorithm colours, assigned in order of first appearance."""
CHANCE_COLOR = "#999999"
_TEMPLATE = "plotly_white"


def _algo_colors(nested: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    algos: list[str] = []
    for per_algo in nested.values():
        algos.extend(a for a in per_algo if a not in algos)
    return {a: PALETTE[i % len(PALETTE)] for i, a in enumerate(algos)}


def _make_subplots(**kwargs: Any) -> go.Figure:
    require_plotly()
    from plotly.subplots import make_subplots

    return make_subplots(**kwargs)


def _from_metric(value: bool | None, metric: PruneMetric | None, field: str) -> bool:
    """An explicit setting, else the metric's, else False."""
    if value is not None:
        return value
    return bool(getattr(metric, field)) if metric is not None else False


def _check_nonempty(name: str, data: Mapping[str, Any]) -> None:
    if not data:
        raise CircuitError(f"{name} is empty: pass at least one task.")


def roc_plot(
    taskname_measurements: Mapping[str, Mapping[str, Points]], variable_width: bool = False
) -> go.Figure:
    """ROC curves, one facet per task, one line per algorithm.

    Args:
        taskname_measurements: ``{task: {algo: [(FPR, TPR)]}}`` (e.g. from
            ``auto_circuit.evaluation.official_circuits.measure_roc.measure_roc``); rates
            in ``[0, 1]``.
        variable_width: Draw earlier algorithms with thicker lines, so curves that lie
            on top of each other stay visible.

    Returns:
        A figure whose traces are, per task, the chance diagonal then each algorithm's
        points sorted by (FPR, TPR); the hover text gives the AUC.
    """
    _check_nonempty("taskname_measurements", taskname_measurements)
    tasks = list(taskname_measurements)
    colors = _algo_colors(taskname_measurements)
    widths = {
        a: (2 + 2 * (len(colors) - 1 - i) if variable_width else 2) for i, a in enumerate(colors)
    }
    fig = _make_subplots(
        rows=1, cols=len(tasks), subplot_titles=tasks, shared_yaxes=True, horizontal_spacing=0.04
    )
    go_module = require_plotly()
    legend_done: set[str] = set()
    for col, task in enumerate(tasks, start=1):
        fig.add_trace(
            go_module.Scatter(
                x=[0, 1],
                y=[0, 1],
                mode="lines",
                name="Chance",
                legendgroup="Chance",
                showlegend=col == 1,
                line={"color": CHANCE_COLOR, "dash": "dash", "width": 1},
                hoverinfo="skip",
            ),
            row=1,
            col=col,
        )
        for algo, points in taskname_measurements[task].items():
            pts = sorted((float(x), float(y)) for x, y in points)
            if any(not (0 <= v <= 1) for p in pts for v in p):
                raise CircuitError(
                    f"ROC points of {algo!r} on {task!r} must lie in [0, 1], got {pts}."
                )
            auc = roc_auc(pts) if len(pts) >= 2 else math.nan
            fig.add_trace(
                go_module.Scatter(
                    x=[p[0] for p in pts],
                    y=[p[1] for p in pts],
                    mode="lines+markers",
                    name=algo,
                    legendgroup=algo,
                    showlegend=algo not in legend_done,
                    line={"color": colors[algo], "width": widths[algo]},
                    marker={"size": 4},
                    hovertemplate=(
                        f"{algo} (AUC {auc:.3f})<br>FPR %{{x:.3f}}<br>TPR %{{y:.3f}}<extra></extra>"
                    ),
                ),
                row=1,
                col=col,
            )
            legend_done.add(algo)
    fig.update_xaxes(range=[0, 1], title_text="False positive rate")
    fig.update_yaxes(range=[0, 1])
    fig.update_yaxes(title_text="True positive rate", row=1, col=1)
    fig.update_layout(template=_TEMPLATE, width=max(450, 380 * len(tasks)), height=450)
    return fig


def task_roc_plot(
    model: PatchableModel | Mapping[str, Mapping[str, Points]] | None = None,
    official_edges: Collection[Edge | str] | None = None,
    algo_prune_scores: Mapping[str, PruneScores] | None = None,
    task_name: str = "Task",
    all_edges: bool = True,
    variable_width: bool = False,
    *,
    task_measurements: Mapping[str, Mapping[str, Points]] | None = None,
) -> go.Figure:
    """ROC curves of each algorithm's scores against one task's official circuit.

    AutoCircuit's form ``task_roc_plot(task_measurements)`` (``{task: {algo: [(FPR,
    TPR)]}}``, positionally or by name) draws those points: ``roc_plot`` of them.

    Args:
        model: The patchable model the scores belong to.
        official_edges: The official circuit (``Edge`` objects or edge names).
        algo_prune_scores: ``{algo: prune scores}``.
        task_name: The facet title.
        all_edges: A point after every group of tied scores (the exact curve); else
            only at ``measure_roc``'s default circuit sizes.
        variable_width: See ``roc_plot``.
    """
    if isinstance(model, Mapping):
        if task_measurements is not None:
            raise TypeError("task_roc_plot: task_measurements given twice.")
        task_measurements, model = model, None
    if task_measurements is not None:
        if model is not None or official_edges is not None or algo_prune_scores is not None:
            raise TypeError(
                "task_roc_plot: pass either task_measurements or model, official_edges and "
                "algo_prune_scores, not both."
            )
        return roc_plot(task_measurements, variable_width=variable_width)
    if model is None or official_edges is None:
        raise TypeError("task_roc_plot needs model, official_edges and algo_prune_scores.")
    if not algo_prune_scores:
        raise CircuitError("algo_prune_scores is empty: pass at least one algorithm.")
    points = {
        algo: measure_roc(model, official_edges, scores, all_edges=all_edges)
        for algo, scores in algo_prune_scores.items()
    }
    return roc_plot({task_name: points}, variable_width=variable_width)


def edge_patching_plot(
    task_algo_measurements: Mapping[str, Mapping[str, Points]]
    | Sequence[Mapping[str, Any]]
    | None = None,
    metric: PruneMetric | Mapping[str, Mapping[str, Points]] | None = None,
    y_title: str | None = None,
    log_x: bool | None = None,
    log_y: bool | None = None,
    y_axes_match: bool | None = None,
    facet_cols: int = 3,
    *,
    data: Sequence[Mapping[str, Any]] | None = None,
    task_measurements: Mapping[str, Mapping[str, Points]] | None = None,
    ablation_type: Any = None,
    metric_name: str | None = None,
    y_max: float | None = None,
    y_min: float | None = None,
    token_circuit: bool | None = None,
) -> go.Figure:
    """A metric against circuit size: one facet per task, one line per algorithm.

    AutoCircuit's form: ``data`` rows ``{"Task", "Algorithm", "X", "Y"}`` (the curves)
    and ``task_measurements`` (``{task: {algo: points}}``, whose one-point algorithms,
    e.g. the official circuit, are drawn as markers); ``metric_name`` titles the y axis,
    ``ablation_type`` the figure, and ``y_min``/``y_max`` fix the y range. A list of rows
    passed first is read as ``data`` (and a mapping second as ``task_measurements``).
    ``token_circuit`` is accepted and unused.

    An algorithm with a single point (e.g. an official circuit's size) is drawn as an X
    marker. On a log axis, points at or below 0 cannot be drawn and are left out.

    Args:
        task_algo_measurements: ``{task: {algo: [(n_edges, value)]}}``.
        metric: Supplies the y title (its name) and defaults for ``log_x``, ``log_y``
            and ``y_axes_match``.
        y_title: Overrides the y axis title.
        log_x, log_y: Log axes (default: the metric's, else linear).
        y_axes_match: Share the y axis across facets (default: the metric's).
        facet_cols: Facets per row.
    """
    del token_circuit
    if task_algo_measurements is not None and not isinstance(task_algo_measurements, Mapping):
        if data is not None:
            raise TypeError("edge_patching_plot: data given twice.")
        data, task_algo_measurements = task_algo_measurements, None
    if isinstance(metric, Mapping):
        if task_measurements is not None:
            raise TypeError("edge_patching_plot: task_measurements given twice.")
        task_measurements, metric = metric, None
    if data is not None or task_measurements is not None:
        if task_algo_measurements is not None:
            raise TypeError(
                "edge_patching_plot: pass task_algo_measurements, or AutoCircuit's data and "
                "task_measurements, not both."
            )
        task_algo_measurements = _from_rows(data or [], task_measurements or {})
    if task_algo_measurements is None:
        raise TypeError("edge_patching_plot needs task_algo_measurements (or data).")
    plot_metric = metric if isinstance(metric, PruneMetric) else None
    fig = _edge_patching_plot(
        task_algo_measurements,
        plot_metric,
        y_title or metric_name,
        log_x,
        log_y,
        y_axes_match,
        facet_cols,
    )
    if y_min is not None or y_max is not None:
        fig.update_yaxes(range=_y_range(y_min, y_max, _from_metric(log_y, plot_metric, "log_y")))
    if ablation_type is not None:
        fig.update_layout(title=f"{getattr(ablation_type, 'name', ablation_type)} ablation")
    return fig


def _from_rows(
    data: Sequence[Mapping[str, Any]], task_measurements: Mapping[str, Mapping[str, Points]]
) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """AutoCircuit's rows and one-point measurements as ``{task: {algo: points}}``."""
    curves: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for row in data:
        missing = {"Task", "Algorithm", "X", "Y"} - set(row)
        if missing:
            raise CircuitError(f"edge_patching_plot: a data row lacks {sorted(missing)}: {row}.")
        points = curves.setdefault(str(row["Task"]), {}).setdefault(str(row["Algorithm"]), [])
        points.append((float(row["X"]), float(row["Y"])))
    for task, algo_points in task_measurements.items():
        for algo, points in algo_points.items():
            if len(points) == 1:
                ((x, y),) = points
                curves.setdefault(task, {})[algo] = [(float(x), float(y))]
    return curves


def _y_range(y_min: float | None, y_max: float | None, log: bool) -> list[float | None]:
    def axis(v: float | None) -> float | None:
        if v is None or not log:
            return v
        return math.log10(v) if v > 0 else None

    return [axis(y_min), axis(y_max)]


def _edge_patching_plot(
    task_algo_measurements: Mapping[str, Mapping[str, Points]],
    metric: PruneMetric | None,
    y_title: str | None,
    log_x: bool | None,
    log_y: bool | None,
    y_axes_match: bool | None,
    facet_cols: int,
) -> go.Figure:
    _check_nonempty("task_algo_measurements", task_algo_measurements)
    if facet_cols < 1:
        raise CircuitError(f"facet_cols must be >= 1, got {facet_cols}.")
    log_x = _from_metric(log_x, metric, "log_x")
    log_y = _from_metric(log_y, metric, "log_y")
    match = bool(
        metric.y_axes_match if y_axes_match is None and metric is not None else y_axes_match
    )
    title = y_title or (metric.name if metric is not None else "Metric")
    if metric is not None and metric.lower_better and y_title is None:
        title += " (lower is better)"
    tasks = list(task_algo_measurements)
    cols = min(facet_cols, len(tasks))
    rows = math.ceil(len(tasks) / cols)
    colors = _algo_colors(task_algo_measurements)
    fig = _make_subplots(
        rows=rows,
        cols=cols,
        subplot_titles=tasks,
        shared_yaxes="all" if match else False,
        horizontal_spacing=0.06,
        vertical_spacing=0.12 if rows > 1 else 0.0,
    )
    go_module = require_plotly()
    legend_done: set[str] = set()
    for i, task in enumerate(tasks):
        row, col = i // cols + 1, i % cols + 1
        for algo, points in task_algo_measurements[task].items():
            pts = sorted(
                (float(x), float(y))
                for x, y in points
                if (not log_x or x > 0) and (not log_y or y > 0)
            )
            single = len(points) == 1
            fig.add_trace(
                go_module.Scatter(
                    x=[p[0] for p in pts],
                    y=[p[1] for p in pts],
                    mode="markers" if single else "lines+markers",
                    name=algo,
                    legendgroup=algo,
                    showlegend=algo not in legend_done,
                    line={"color": colors[algo]},
                    marker={"symbol": "x", "size": 12} if single else {"size": 5},
                    hovertemplate=f"{algo}<br>%{{x}} edges<br>%{{y:.4g}}<extra></extra>",
                ),
                row=row,
                col=col,
            )
            legend_done.add(algo)
    fig.update_xaxes(type="log" if log_x else "linear")
    fig.update_yaxes(type="log" if log_y else "linear")
    for c in range(1, cols + 1):
        fig.update_xaxes(title_text="Edges in the circuit", row=rows, col=c)
    for r in range(1, rows + 1):
        fig.update_yaxes(title_text=title, row=r, col=1)
    fig.update_layout(template=_TEMPLATE, width=max(500, 420 * cols), height=380 * rows + 80)
    return fig


def average_auc_plot(
    task_algo_measurements: Mapping[str, Mapping[str, Points]],
    metric: PruneMetric | None = None,
    log_x: bool | None = None,
    log_y: bool | None = None,
    y_min: float | None = None,
    eps: float = 1e-3,
    baseline_algo: str = "Random",
    inverse: bool = False,
) -> go.Figure:
    """Horizontal bars: each algorithm's area under the curve divided by the baseline's
    (Random) on the same task, averaged over tasks (``average_auc``).

    Args:
        task_algo_measurements: ``{task: {algo: [(n_edges, value)]}}``; every task needs
            ``baseline_algo``.
        metric: Supplies ``log_x``, ``log_y``, ``y_min`` and the title; explicit
            arguments override it.
        eps: The log-y resolution (see ``measurements_auc``).
        baseline_algo: The algorithm every area is divided by (a bar at 1).
        inverse: Plot ``2 - ratio`` (AutoCircuit's option for metrics where lower is
            better: a smaller area then gives a longer bar).

    Returns:
        One ``go.Bar`` (orientation ``"h"``) with ``x`` the ratios and ``y`` the
        algorithms, sorted by ratio ascending (the largest on top).
    """
    _check_nonempty("task_algo_measurements", task_algo_measurements)
    log_x = _from_metric(log_x, metric, "log_x")
    log_y = _from_metric(log_y, metric, "log_y")
    if y_min is None and metric is not None:
        y_min = metric.y_min
    ratios = average_auc(task_algo_measurements, log_x, log_y, y_min, eps, baseline_algo)
    if inverse:
        ratios = {algo: 2.0 - ratio for algo, ratio in ratios.items()}
    algos = sorted(ratios, key=lambda a: (ratios[a], a))
    colors = _algo_colors(task_algo_measurements)
    go_module = require_plotly()
    fig = go_module.Figure(
        go_module.Bar(
            x=[ratios[a] for a in algos],
            y=algos,
            orientation="h",
            marker={"color": [colors[a] for a in algos]},
            text=[f"{ratios[a]:.3f}" for a in algos],
            textposition="auto",
            hovertemplate="%{y}: %{x:.4f}<extra></extra>",
        )
    )
    fig.add_vline(x=1.0, line_dash="dash", line_color=CHANCE_COLOR)
    name = metric.name if metric is not None else "metric"
    note = " (lower is better)" if metric is not None and metric.lower_better else ""
    fig.update_layout(
        template=_TEMPLATE,
        title={"text": f"Average AUC of {name}<br>relative to {baseline_algo}{note}"},
        xaxis_title=f"AUC / AUC({baseline_algo}), mean over {len(task_algo_measurements)} tasks",
        width=700,
        height=max(300, 60 + 40 * len(algos)),
    )
    return fig


def prune_score_similarities_plot(
    task_algo_prune_scores: Mapping[str, Mapping[str, PruneScores]],
    edge_counts: Sequence[int],
) -> go.Figure:
    """Heatmaps of top-k overlap between algorithms: rows are tasks, columns circuit
    sizes k (``prune_score_similarities``); NaN cells (ties make a top k ambiguous) are
    left blank.

    Returns:
        One ``go.Heatmap`` per (task, k), row-major, with ``z[i][j]`` the overlap of
        algorithm ``y[i]`` with algorithm ``x[j]``.
    """
    _check_nonempty("task_algo_prune_scores", task_algo_prune_scores)
    if not edge_counts:
        raise CircuitError("edge_counts is empty: pass at least one circuit size k.")
    tasks = list(task_algo_prune_scores)
    titles = [f"{task}, top {k}" for task in tasks for k in edge_counts]
    fig = _make_subplots(
        rows=len(tasks),
        cols=len(edge_counts),
        subplot_titles=titles,
        horizontal_spacing=0.08,
        vertical_spacing=0.12 if len(tasks) > 1 else 0.0,
    )
    go_module = require_plotly()
    for r, task in enumerate(tasks, start=1):
        similarities = prune_score_similarities(task_algo_prune_scores[task], list(edge_counts))
        algos = list(task_algo_prune_scores[task])
        for c, k in enumerate(edge_counts, start=1):
            z = [[similarities[k][a][b] for b in algos] for a in algos]
            fig.add_trace(
                go_module.Heatmap(
                    z=z,
                    x=algos,
                    y=algos,
                    text=[["" if math.isnan(v) else f"{v:.2f}" for v in row] for row in z],
                    texttemplate="%{text}",
                    coloraxis="coloraxis",
                    hovertemplate="%{y} vs %{x}: %{z:.3f}<extra></extra>",
                ),
                row=r,
                col=c,
            )
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(
        template=_TEMPLATE,
        coloraxis={"colorscale": "Blues", "cmin": 0.0, "cmax": 1.0},
        width=max(450, 330 * len(edge_counts) + 120),
        height=max(350, 300 * len(tasks) + 60),
    )
    return fig
