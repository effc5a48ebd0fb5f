"""The ``auto-circuit`` command line: list, discover, evaluate, report, export.

Bad arguments end with a one-line message and exit status 2, never a traceback.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any

import typer

from auto_circuit.vocabulary.errors import CircuitError

app = typer.Typer(
    help="Find and test circuits in transformer language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

DEFAULT_ALGOS = "Logit Diff Gradients,EAP-IG,ACDC,Random"


def _friendly(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn user errors into a message and exit status 2."""

    @wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (CircuitError, OSError, KeyError) as err:
            message = err.args[0] if isinstance(err, KeyError) and err.args else err
            if isinstance(err, OSError) and err.filename is not None:
                message = f"{err.filename}: {err.strerror or err}"
            typer.echo(f"error: {message}", err=True)
            raise typer.Exit(code=2) from None

    return run


def _say(message: str) -> None:
    typer.echo(message, err=True)


def _load(task_key: str, device: str):
    from auto_circuit.app.tasks import load_task, task_by_key

    _say(f"loading task {task_key!r}")
    return load_task(task_by_key(task_key), device)


def _algos(keys: str):
    from auto_circuit.algorithms.registry import prune_algo

    return [prune_algo(key.strip()) for key in keys.split(",") if key.strip()]


def _ablation(name: str):
    from auto_circuit.vocabulary.types import AblationType

    try:
        return AblationType[name.upper()]
    except KeyError:
        known = ", ".join(a.name for a in AblationType)
        raise CircuitError(f"Unknown ablation {name!r}. Known: {known}.") from None


def _read_scores(path: Path, task: str):
    """The scores in ``path`` (read first, so a bad file fails before any model loads),
    refused unless saved for ``task``. ``_fit_scores`` then checks the model's graph."""
    from auto_circuit.engine.score_files import load_prune_scores

    saved = load_prune_scores(path)
    if saved.task is not None and saved.task != task:
        raise CircuitError(
            f"{path} holds scores of task {saved.task!r}, not {task!r}. Use that task, or "
            f"run `auto-circuit discover {task!r}` to score this one."
        )
    return saved


def _fit_scores(path: Path, saved: Any, model: Any) -> dict[str, Any]:
    """The saved scores on the model's device, refused unless made for its graph."""
    from auto_circuit.engine.score_files import check_file_fits

    check_file_fits(path, saved, model)
    return {name: value.to(model.device) for name, value in saved.scores.items()}


@app.command("models")
@_friendly
def list_models() -> None:
    """List the models: those the package ships, then published ones tasks use."""
    from auto_circuit.app.tasks import TASK_DICT

    for key, task in TASK_DICT.items():
        if not isinstance(task.model_def, str):
            typer.echo(f"{key}\tshipped (no download)")
    for name in sorted({t.model_def for t in TASK_DICT.values() if isinstance(t.model_def, str)}):
        typer.echo(f"{name}\tTransformerLens (weights downloaded once, or a local directory)")


@app.command("tasks")
@_friendly
def list_tasks() -> None:
    """List the predefined tasks."""
    from auto_circuit.app.tasks import TASK_DICT

    for key, task in TASK_DICT.items():
        model = task.model_def if isinstance(task.model_def, str) else "shipped model"
        typer.echo(f"{key}\t({model}; dataset {task.dataset_name})")


@app.command("algorithms")
@_friendly
def list_algorithms() -> None:
    """List the registered discovery algorithms."""
    from auto_circuit.algorithms.registry import PRUNE_ALGOS

    for algo in PRUNE_ALGOS:
        typer.echo(f"{algo.key}\t{algo.name}")


@app.command()
@_friendly
def discover(
    task: Annotated[str, typer.Argument(help="Task key (see `auto-circuit tasks`).")],
    algorithm: Annotated[str, typer.Option(help="Algorithm key.")] = "Logit Diff Gradients",
    out: Annotated[Path, typer.Option(help="Where to save the scores (.safetensors).")] = Path(
        "scores.safetensors"
    ),
    device: str = "cpu",
) -> None:
    """Score every edge of a task's model with one algorithm and save the scores."""
    from auto_circuit.engine.score_files import save_prune_scores

    (algo,) = _algos(algorithm)
    if out.is_dir():
        raise CircuitError(f"--out {out} is a directory; give a file name.")
    loaded = _load(task, device)
    _say(f"running {algo.name} on {loaded.model.n_edges} edges")
    start = time.perf_counter()
    scores = algo(loaded.model, loaded.train_loader, loaded.true_edges)
    seconds = time.perf_counter() - start
    save_prune_scores(
        out,
        loaded.model,
        scores,
        algorithm=algo.key,
        algorithm_args=algo.kwargs,
        task=task,
        extra={"seconds": seconds},
    )
    typer.echo(f"saved scores of {loaded.model.n_edges} edges to {out} ({seconds:.2f} s)")


@app.command()
@_friendly
def evaluate(
    task: Annotated[str, typer.Argument(help="Task key.")],
    scores: Annotated[Path, typer.Option(help="Scores file from `discover`.")],
    metric: Annotated[str | None, typer.Option(help="Metric key (default: the task's).")] = None,
    ablation: Annotated[str | None, typer.Option(help="Ablation (default: the task's).")] = None,
    out: Annotated[Path, typer.Option(help="Where to write the results (.json).")] = Path(
        "evaluation.json"
    ),
    device: str = "cpu",
) -> None:
    """Faithfulness curve (tree patching) and ROC AUC against the official circuit."""
    from auto_circuit.algorithms.prune import run_circuits
    from auto_circuit.app.tasks import task_by_key
    from auto_circuit.engine.graph_utils import edge_counts_util
    from auto_circuit.evaluation.official_circuits.measure_roc import measure_roc, roc_auc
    from auto_circuit.evaluation.prune_metrics.prune_metrics import prune_metric
    from auto_circuit.vocabulary.types import PatchType

    chosen_metric = prune_metric(metric or task_by_key(task).metric_key)
    ablation_type = _ablation(ablation) if ablation else task_by_key(task).ablation_type
    saved = _read_scores(scores, task)
    loaded = _load(task, device)
    model, prune_scores = loaded.model, _fit_scores(scores, saved, loaded.model)
    true_size = len(loaded.true_edges) if loaded.true_edges else None
    counts = edge_counts_util(model.n_edges, None, prune_scores, true_edge_count=true_size)
    outs = run_circuits(
        model, loaded.test_loader, counts, prune_scores, PatchType.TREE_PATCH, ablation_type
    )
    curve = chosen_metric.metric_func(model, loaded.test_loader, outs)
    result: dict[str, Any] = {
        "task": task,
        "algorithm": saved.algorithm,
        "metric": chosen_metric.key,
        "ablation": ablation_type.name,
        "faithfulness": [[int(x), float(y)] for x, y in curve],
    }
    if loaded.true_edges:
        roc = measure_roc(model, loaded.true_edges, prune_scores, all_edges=True)
        result["roc"] = [[float(x), float(y)] for x, y in roc]
        result["roc_auc"] = roc_auc(roc)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    auc = f", ROC AUC {result['roc_auc']:.3f}" if "roc_auc" in result else ""
    typer.echo(f"wrote {out}{auc}")


@app.command()
@_friendly
def report(
    task: Annotated[str, typer.Argument(help="Task key.")],
    algorithms: Annotated[
        str, typer.Option(help="Comma-separated algorithm keys.")
    ] = DEFAULT_ALGOS,
    metric: Annotated[str | None, typer.Option(help="Metric key (default: the task's).")] = None,
    ablation: Annotated[str | None, typer.Option(help="Ablation (default: the task's).")] = None,
    out: Annotated[Path, typer.Option(help="Where to write the report.")] = Path("report.html"),
    device: str = "cpu",
) -> None:
    """Run several algorithms and write one HTML report (table, curves, circuit browser)."""
    from auto_circuit.app.report import write_report
    from auto_circuit.app.tasks import task_by_key
    from auto_circuit.evaluation.prune_metrics.prune_metrics import prune_metric

    algos = _algos(algorithms)
    task_def = task_by_key(task)
    metric_key = prune_metric(metric or task_def.metric_key).key  # fail early on bad names
    ablation_type = _ablation(ablation) if ablation else task_def.ablation_type
    loaded = _load(task, device)
    results = write_report(loaded, algos, out, metric_key, ablation_type, progress=_say)
    for r in results:
        auc = "-" if r.roc_auc is None else f"{r.roc_auc:.3f}"
        typer.echo(f"{r.key:<28} {r.seconds:7.2f} s   ROC AUC {auc}")
    typer.echo(f"report written to {out.resolve()}")


@app.command()
@_friendly
def export(
    task: Annotated[str, typer.Argument(help="Task key.")],
    scores: Annotated[Path, typer.Option(help="Scores file from `discover`.")],
    edges: Annotated[int | None, typer.Option(help="Keep the top N edges (default: all).")] = None,
    out: Annotated[Path, typer.Option(help="Where to write the MIB circuit JSON.")] = Path(
        "circuit.json"
    ),
    device: str = "cpu",
) -> None:
    """Export a circuit in the MIB circuit format (JSON)."""
    from auto_circuit.app.export import mib_circuit

    saved = _read_scores(scores, task)
    loaded = _load(task, device)
    circuit = mib_circuit(loaded.model, _fit_scores(scores, saved, loaded.model), edges)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(circuit))
    kept = sum(e["in_graph"] for e in circuit["edges"].values())
    typer.echo(f"wrote {out}: {kept} of {len(circuit['edges'])} edges in the circuit")


@app.command("convert-scores")
@_friendly
def convert_scores(
    task: Annotated[str, typer.Argument(help="Task key the scores were made for.")],
    legacy: Annotated[Path, typer.Argument(help="A .pt scores file of an older version.")],
    out: Annotated[Path, typer.Option(help="Where to write the safe file.")] = Path(
        "scores.safetensors"
    ),
    device: str = "cpu",
) -> None:
    """Convert an older .pt scores file (read without running code) to .safetensors."""
    from auto_circuit.engine.score_files import convert_legacy_scores

    loaded = _load(task, device)
    convert_legacy_scores(legacy, out, loaded.model, task)
    typer.echo(f"wrote {out}")


def main() -> None:  # pragma: no cover - console entry
    app(prog_name="auto-circuit")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
