"""Sweeps of tasks x algorithms x ablations x metrics, with results kept on disk.

Every cell of a sweep (the prune scores of an algorithm on a task; the measurements of
a metric under an ablation) is stored under the hash of its full configuration: the
task (model definition, dataset file contents, batch sizes, graph options), the
algorithm (function and parameters) and the evaluation settings. A cell is written
atomically when it is finished and reused when present, so an interrupted sweep resumes
where it stopped and a changed configuration never reads stale results.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch as t

from auto_circuit.algorithms.prune import run_circuits
from auto_circuit.algorithms.registry import PruneAlgo
from auto_circuit.app.tasks import LoadedTask, Task, load_task
from auto_circuit.engine.graph_utils import edge_counts_util
from auto_circuit.evaluation.prune_metrics.prune_metrics import PruneMetric
from auto_circuit.vocabulary.errors import CircuitError
from auto_circuit.vocabulary.safe_files import read_safe, write_safe
from auto_circuit.vocabulary.types import (
    AblationType,
    Measurements,
    PatchType,
    PruneScores,
    TestEdges,
)


def _describe(value: Any) -> Any:
    """A JSON-able description of a configuration value (functions by qualified name)."""
    if isinstance(value, dict):
        return {str(k): _describe(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_describe(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if callable(value):
        return f"{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', repr(value))}"
    return repr(value)


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def task_config(task: Task) -> dict[str, Any]:
    """Everything that determines a task's data and model, for cache keys."""
    fields = {k: v for k, v in vars(task).items() if k not in ("name", "_loaded")}
    return {"task": _describe(fields), "dataset_sha256": _file_digest(task.dataset_path())}


def algo_config(algo: PruneAlgo) -> dict[str, Any]:
    return {"module": algo.module, "function": algo.function, "kwargs": _describe(algo.kwargs)}


def config_key(config: dict[str, Any]) -> str:
    """The sha256 of a configuration's canonical JSON."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class ResultStore:
    """A folder of results, one safe file per configuration hash, written atomically.

    A cell holds prune scores (tensors) or measurements (JSON), with the configuration
    that produced it; nothing is unpickled. A cell that cannot be read (truncated,
    tampered, or made for another configuration) is reported with its path, removed
    and recomputed."""

    root: Path

    def path(self, key: str) -> Path:
        return Path(self.root) / key[:2] / f"{key}.safetensors"

    def get(self, config: dict[str, Any]) -> Any | None:
        path = self.path(config_key(config))
        if not path.exists():
            return None
        try:
            tensors, meta = read_safe(path)
            if meta.get("config") != json.loads(json.dumps(config)):
                raise CircuitError(f"{path} was written for another configuration.")
        except CircuitError as err:
            warnings.warn(
                f"Result store cell {path} is unusable ({err}); recomputing it.", stacklevel=2
            )
            path.unlink(missing_ok=True)
            return None
        if meta.get("kind") == "tensors":
            return tensors
        return _from_json(meta.get("value"))

    def put(self, config: dict[str, Any], value: Any) -> None:
        path = self.path(config_key(config))
        if isinstance(value, dict) and all(isinstance(v, t.Tensor) for v in value.values()):
            write_safe(path, value, {"config": config, "kind": "tensors"})
        else:
            write_safe(path, {}, {"config": config, "kind": "json", "value": _to_json(value)})

    def cached(self, config: dict[str, Any], compute: Callable[[], Any]) -> Any:
        """The stored value for ``config``, computing and storing it if absent."""
        value = self.get(config)
        if value is None:
            value = compute()
            self.put(config, value)
        return value


def _to_json(value: Any) -> Any:
    """Measurements (lists of (edge count, value) pairs, possibly nested in dicts)."""
    if isinstance(value, dict):
        return {"dict": {str(k): _to_json(v) for k, v in value.items()}}
    if isinstance(value, (list, tuple)):
        return {"list": [_to_json(v) for v in value], "tuple": isinstance(value, tuple)}
    if isinstance(value, t.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    raise CircuitError(f"ResultStore can only store scores and measurements, not {type(value)}.")


def _from_json(value: Any) -> Any:
    if isinstance(value, dict) and "dict" in value:
        return {k: _from_json(v) for k, v in value["dict"].items()}
    if isinstance(value, dict) and "list" in value:
        items = [_from_json(v) for v in value["list"]]
        return tuple(items) if value.get("tuple") else items
    return value


SweepResults = dict[str, dict[str, dict[str, dict[str, Measurements]]]]
"""ablation -> metric key -> task key -> algorithm key -> measurements."""


def run_experiments(
    tasks: Sequence[Task],
    algos: Sequence[PruneAlgo],
    ablation_types: Sequence[AblationType],
    metrics: Sequence[PruneMetric],
    store_dir: str | Path,
    patch_type: PatchType = PatchType.TREE_PATCH,
    test_edge_counts: TestEdges | None = None,
    device: t.device | str = "cpu",
) -> tuple[dict[str, dict[str, PruneScores]], SweepResults]:
    """Run every algorithm on every task and measure every metric under every ablation.

    Returns (prune scores by task and algorithm, measurements by ablation, metric, task
    and algorithm). Finished cells are read from ``store_dir`` instead of recomputed.
    """
    store = ResultStore(Path(store_dir))
    scores: dict[str, dict[str, PruneScores]] = {}
    results: SweepResults = {}
    for task in tasks:
        loaded: LoadedTask | None = None

        def get_loaded(task: Task = task) -> LoadedTask:
            nonlocal loaded
            if loaded is None:
                loaded = load_task(task, device)
            return loaded

        base = task_config(task)
        for algo in algos:
            score_config = {**base, "algo": algo_config(algo), "what": "prune_scores"}

            def discover(algo: PruneAlgo = algo) -> PruneScores:
                lt = get_loaded()
                found = algo(lt.model, lt.train_loader, lt.true_edges)
                return {k: v.detach().cpu() for k, v in found.items()}

            algo_scores = store.cached(score_config, discover)
            scores.setdefault(task.key, {})[algo.key] = algo_scores
            for ablation in ablation_types:
                for metric in metrics:
                    cell = {
                        **score_config,
                        "what": "measurements",
                        "ablation": ablation.name,
                        "patch_type": patch_type.name,
                        "metric": metric.key,
                        "test_edge_counts": _describe(test_edge_counts),
                    }

                    def measure(
                        algo_scores: PruneScores = algo_scores,
                        ablation: AblationType = ablation,
                        metric: PruneMetric = metric,
                    ) -> Measurements:
                        lt = get_loaded()
                        counts = edge_counts_util(lt.model.n_edges, test_edge_counts, algo_scores)
                        outs = run_circuits(
                            lt.model, lt.test_loader, counts, algo_scores, patch_type, ablation
                        )
                        return metric.metric_func(lt.model, lt.test_loader, outs)

                    measurements = store.cached(cell, measure)
                    results.setdefault(ablation.name, {}).setdefault(metric.key, {}).setdefault(
                        task.key, {}
                    )[algo.key] = measurements
    return scores, results
