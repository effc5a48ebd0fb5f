"""Tasks and the on-disk experiment sweep: resumable, keyed by the full configuration."""

from __future__ import annotations

from dataclasses import replace

import pytest

from auto_circuit.algorithms.registry import PruneAlgo, prune_algo
from auto_circuit.app.experiments import ResultStore, config_key, run_experiments, task_config
from auto_circuit.app.tasks import MICRO_MODEL_TASK, load_task, task_by_key
from auto_circuit.evaluation.prune_metrics.prune_metrics import PRUNE_METRIC_DICT
from auto_circuit.vocabulary.errors import CircuitError
from auto_circuit.vocabulary.types import AblationType, PatchType

CALLS: list[str] = []
FAIL_ON: set[str] = set()


def counting_prune_scores(model, dataloader, official_edges, label: str = ""):
    """Random scores that record each call (and can fail, to simulate an interruption)."""
    CALLS.append(label)
    if label in FAIL_ON:
        raise KeyboardInterrupt(f"interrupted while running {label}")
    from auto_circuit.algorithms.random_edges import random_prune_scores

    return random_prune_scores(model, dataloader, official_edges, seed=len(label))


def counting_algo(label: str) -> PruneAlgo:
    return PruneAlgo(label, label, __name__, "counting_prune_scores", {"label": label})


def test_micro_task_loads():
    loaded = load_task(MICRO_MODEL_TASK)
    assert loaded.model.n_edges == 13
    assert len(loaded.train_loader.dataset) == 8 and len(loaded.test_loader.dataset) == 8
    assert task_by_key("Micro Model") is MICRO_MODEL_TASK
    with pytest.raises(CircuitError, match="No task 'Micro'.*Did you mean 'Micro Model'"):
        task_by_key("Micro")


def test_interrupted_sweep_resumes_without_recomputing(tmp_path):
    CALLS.clear()
    algos = [counting_algo("a"), counting_algo("b"), counting_algo("c")]
    metrics = [PRUNE_METRIC_DICT[k] for k in ("Logit Diff", "Clean KL Div")]
    ablations = [AblationType.RESAMPLE]
    FAIL_ON.add("b")
    with pytest.raises(KeyboardInterrupt):
        run_experiments([MICRO_MODEL_TASK], algos, ablations, metrics, tmp_path)
    assert CALLS == ["a", "b"]
    FAIL_ON.clear()
    scores, results = run_experiments([MICRO_MODEL_TASK], algos, ablations, metrics, tmp_path)
    assert CALLS == ["a", "b", "b", "c"], "a was not recomputed"
    first = results["RESAMPLE"]["Logit Diff"]["Micro Model"]
    assert set(first) == {"a", "b", "c"}
    # A third run reads everything from the store.
    again_scores, again = run_experiments([MICRO_MODEL_TASK], algos, ablations, metrics, tmp_path)
    assert CALLS == ["a", "b", "b", "c"]
    assert again == results
    for key in scores["Micro Model"]:
        for name, tensor in scores["Micro Model"][key].items():
            assert again_scores["Micro Model"][key][name].equal(tensor)


def test_changed_configuration_is_a_different_cell(tmp_path):
    CALLS.clear()
    metrics = [PRUNE_METRIC_DICT["Logit Diff"]]
    run_experiments(
        [MICRO_MODEL_TASK], [counting_algo("x")], [AblationType.ZERO], metrics, tmp_path
    )
    bigger = replace(MICRO_MODEL_TASK, batch_size=2)
    run_experiments([bigger], [counting_algo("x")], [AblationType.ZERO], metrics, tmp_path)
    assert CALLS == ["x", "x"]
    assert config_key(task_config(bigger)) != config_key(task_config(MICRO_MODEL_TASK))
    run_experiments(
        [MICRO_MODEL_TASK], [counting_algo("x")], [AblationType.ZERO], metrics, tmp_path,
        patch_type=PatchType.EDGE_PATCH,
    )  # fmt: skip
    assert CALLS == ["x", "x"], "scores reused across evaluation settings"


def test_store_writes_atomically(tmp_path):
    store = ResultStore(tmp_path)
    store.put({"a": 1}, [1, 2])
    assert store.get({"a": 1}) == [1, 2] and store.get({"a": 2}) is None
    assert not list(tmp_path.rglob("*.tmp"))


def test_real_algorithm_in_a_sweep(tmp_path):
    _, results = run_experiments(
        [MICRO_MODEL_TASK], [prune_algo("Logit Diff Gradients")], [AblationType.RESAMPLE],
        [PRUNE_METRIC_DICT["Logit Diff"]], tmp_path,
    )  # fmt: skip
    points = dict(results["RESAMPLE"]["Logit Diff"]["Micro Model"]["Logit Diff Gradients"])
    assert set(points) >= {0, 13}


def test_predefined_tasks_name_existing_datasets_and_circuits():
    from auto_circuit.app.tasks import TASKS

    for task in TASKS:
        assert task.dataset_path().exists()
        if task.true_edge_func is not None:
            assert callable(task.true_edge_func)
    keys = [task.key for task in TASKS]
    assert len(keys) == len(set(keys))


def test_a_corrupt_cell_is_reported_and_recomputed(tmp_path):
    store = ResultStore(tmp_path)
    config = {"task": "t", "what": "measurements"}
    store.put(config, [(0, 1.0), (5, 2.5)])
    assert store.get(config) == [(0, 1.0), (5, 2.5)]
    path = store.path(config_key(config))
    path.write_bytes(path.read_bytes()[:40])  # truncated
    calls = []

    def compute():
        calls.append(1)
        return [(0, 3.0)]

    with pytest.warns(UserWarning, match=f"{path.name} is unusable.*truncated"):
        assert store.cached(config, compute) == [(0, 3.0)]
    assert calls == [1] and store.get(config) == [(0, 3.0)]
    # A pickle put where a cell belongs is never unpickled.
    import pickle

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path.write_bytes(pickle.dumps(Payload()))
    with pytest.warns(UserWarning, match="never unpickles"):
        assert store.get(config) is None
    assert not marker.exists()
