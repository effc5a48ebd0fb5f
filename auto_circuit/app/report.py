"""One HTML report for a task: run algorithms, evaluate their circuits, draw the results.

The report holds a table of algorithms (discovery time, ROC AUC against the official
circuit, faithfulness at the official circuit's size and its area over circuit sizes),
the faithfulness curves, the ROC curves and the circuit browser of every algorithm's
circuit, in one self-contained file.
"""

from __future__ import annotations

import html
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from auto_circuit.algorithms.prune import run_circuits
from auto_circuit.algorithms.registry import PruneAlgo
from auto_circuit.app.tasks import LoadedTask
from auto_circuit.engine.graph_utils import edge_counts_util
from auto_circuit.evaluation.area_under_curve import measurements_auc
from auto_circuit.evaluation.official_circuits.measure_roc import measure_roc, roc_auc
from auto_circuit.evaluation.prune_metrics.prune_metrics import PruneMetric, prune_metric
from auto_circuit.vocabulary.types import AblationType, Measurements, PatchType, PruneScores


@dataclass(frozen=True)
class AlgoResult:
    """What the report shows for one algorithm."""

    key: str
    seconds: float
    scores: PruneScores
    curve: Measurements
    roc: Measurements | None

    @property
    def roc_auc(self) -> float | None:
        return None if self.roc is None else roc_auc(self.roc)


def evaluate_algorithms(
    loaded: LoadedTask,
    algos: Sequence[PruneAlgo],
    metric: PruneMetric,
    ablation_type: AblationType = AblationType.RESAMPLE,
    patch_type: PatchType = PatchType.TREE_PATCH,
    progress: Callable[[str], None] = lambda message: None,
) -> list[AlgoResult]:
    """Run each algorithm on the train prompts and measure its circuits on the test ones."""
    model = loaded.model
    results = []
    for algo in algos:
        progress(f"discovering with {algo.name}")
        start = time.perf_counter()
        scores = algo(model, loaded.train_loader, loaded.true_edges)
        seconds = time.perf_counter() - start
        scores = {k: v.detach() for k, v in scores.items()}
        true_size = len(loaded.true_edges) if loaded.true_edges else None
        counts = edge_counts_util(model.n_edges, None, scores, true_edge_count=true_size)
        progress(f"evaluating {algo.name} at {len(counts)} circuit sizes")
        outs = run_circuits(
            model, loaded.test_loader, counts, scores, patch_type, ablation_type,
            show_progress=False,
        )  # fmt: skip
        curve = metric.metric_func(model, loaded.test_loader, outs)
        roc = None
        if loaded.true_edges:
            roc = measure_roc(model, loaded.true_edges, scores, all_edges=True)
        results.append(AlgoResult(algo.key, seconds, scores, curve, roc))
    return results


def _value_at(curve: Measurements, size: int) -> float | None:
    """The metric of the smallest measured circuit with at least ``size`` edges."""
    candidates = sorted((x, y) for x, y in curve if x >= size)
    return float(candidates[0][1]) if candidates else None


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def report_html(
    loaded: LoadedTask,
    results: Sequence[AlgoResult],
    metric: PruneMetric,
    ablation_type: AblationType,
) -> str:
    """The self-contained HTML page of a report."""
    from auto_circuit.figures import circuit_browser_html
    from auto_circuit.figures.plots import edge_patching_plot, roc_plot

    task, model = loaded.task, loaded.model
    true_size = len(loaded.true_edges) if loaded.true_edges else None
    k = true_size or min(10, model.n_edges)
    rows = []
    for r in results:
        # Area under the curve over the fraction of edges kept: the mean faithfulness.
        auc = measurements_auc([(x / model.n_edges, y) for x, y in r.curve], False, False)
        rows.append(
            "<tr>"
            f"<td>{html.escape(r.key)}</td><td>{r.seconds:.2f}</td>"
            f"<td>{_fmt(r.roc_auc)}</td><td>{_fmt(_value_at(r.curve, k))}</td>"
            f"<td>{_fmt(auc)}</td></tr>"
        )
    curves = {task.name: {r.key: r.curve for r in results}}
    figure_divs = [
        edge_patching_plot(curves, metric, log_y=False).to_html(
            full_html=False, include_plotlyjs="inline"
        )
    ]
    if all(r.roc is not None for r in results):
        rocs = {task.name: {r.key: r.roc for r in results if r.roc is not None}}
        figure_divs.append(roc_plot(rocs).to_html(full_html=False, include_plotlyjs=False))
    browser = circuit_browser_html(
        model,
        {r.key: r.scores for r in results},
        title=f"{task.name}: circuits",
        initial_edges=k,
    )
    official = f"{true_size} edges" if true_size else "none"
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>auto_circuit report: {html.escape(task.name)}</title>
<style>body{{font-family:sans-serif;margin:2em;}} table{{border-collapse:collapse;}}
td,th{{border:1px solid #999;padding:4px 10px;text-align:right;}} td:first-child{{text-align:left;}}
iframe{{width:100%;height:760px;border:1px solid #999;}}</style></head>
<body>
<h1>Circuit discovery report: {html.escape(task.name)}</h1>
<p>Model graph: {model.n_edges} edges. Official circuit: {official}.
Circuits evaluated with {html.escape(str(PatchType.TREE_PATCH))} and
{html.escape(str(ablation_type))} ablation; metric: {html.escape(metric.name)}.</p>
<table id="algorithms"><tr><th>algorithm</th><th>time (s)</th><th>ROC AUC</th>
<th>{html.escape(metric.name)} at {k} edges</th>
<th>mean over circuit sizes (area over the fraction of edges)</th></tr>
{"".join(rows)}</table>
<h2>Faithfulness and ROC</h2>
{"".join(figure_divs)}
<h2>Circuits</h2>
<iframe id="circuit-browser" srcdoc="{html.escape(browser, quote=True)}"></iframe>
</body></html>
"""


def write_report(
    loaded: LoadedTask,
    algos: Sequence[PruneAlgo],
    path: str | Path,
    metric_key: str = "Logit Diff Percent",
    ablation_type: AblationType = AblationType.RESAMPLE,
    progress: Callable[[str], None] = lambda message: None,
) -> list[AlgoResult]:
    """Run, evaluate and write the report of ``algos`` on a loaded task to ``path``."""
    metric = prune_metric(metric_key)
    results = evaluate_algorithms(loaded, algos, metric, ablation_type, progress=progress)
    page = report_html(loaded, results, metric, ablation_type)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return results
