"""The registry of circuit-discovery algorithms and their documented presets.

Every algorithm is a plain function ``(model, dataloader, official_edges, ...) ->
PruneScores``; a ``PruneAlgo`` binds one to its preset parameters. Larger absolute score
= more important edge, for every algorithm.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from importlib import import_module
from typing import Any, overload

from auto_circuit.engine.patchable_model import PatchableModel
from auto_circuit.vocabulary.errors import CircuitError
from auto_circuit.vocabulary.misc import did_you_mean
from auto_circuit.vocabulary.types import AblationType, Edge, PruneScores

PruneFunc = Callable[..., PruneScores]
"""``(model, dataloader, official_edges) -> PruneScores``."""


@dataclass(frozen=True, init=False)
class PruneAlgo:
    """A discovery algorithm: ``module.function`` called with ``kwargs`` preset.

    The function is imported when first run, so the registry costs nothing to import.
    AutoCircuit's form is accepted too: ``PruneAlgo(key, name, func=f)`` (or ``func``
    as the third positional argument, then ``_short_name`` as the fourth, as in
    AutoCircuit), where ``f(model, dataloader, official_edges) -> PruneScores`` is
    called as it is (bind presets with ``functools.partial``); ``module`` and
    ``function`` then name ``f``.
    """

    key: str
    name: str
    module: str
    function: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    _short_name: str | None = None
    _func: PruneFunc | None = field(default=None, compare=False, repr=False)

    def __init__(
        self,
        key: str,
        name: str,
        module: str | PruneFunc | None = None,
        function: str | None = None,
        kwargs: Mapping[str, Any] | None = None,
        _short_name: str | None = None,
        *,
        func: PruneFunc | None = None,
    ):
        if callable(module):  # AutoCircuit's positional order: (key, name, func, _short_name)
            if func is not None:
                raise CircuitError(f"PruneAlgo {key!r}: give func once, not twice.")
            if _short_name is not None or kwargs is not None:
                raise CircuitError(
                    f"PruneAlgo {key!r}: with func as the third argument the fourth is "
                    "_short_name (AutoCircuit's order); pass the rest by keyword."
                )
            func, _short_name, function, module = module, function, None, None
        if func is not None:
            if module is not None or function is not None:
                raise CircuitError(
                    f"PruneAlgo {key!r}: give func (a function) or module and function "
                    "(its import path), not both."
                )
            if not callable(func):
                raise CircuitError(f"PruneAlgo {key!r}: func must be callable, got {func!r}.")
            module = getattr(func, "__module__", None) or "<unknown>"
            function = getattr(func, "__qualname__", None) or repr(func)
        elif module is None or function is None:
            raise CircuitError(
                f"PruneAlgo {key!r}: give func, or module and function (e.g. "
                "'auto_circuit.algorithms.random_edges', 'random_prune_scores')."
            )
        values = {
            "key": key,
            "name": name,
            "module": module,
            "function": function,
            "kwargs": dict(kwargs or {}),
            "_short_name": _short_name,
            "_func": func,
        }
        for name_, value in values.items():
            object.__setattr__(self, name_, value)

    @property
    def short_name(self) -> str:
        return self._short_name or self.name

    @property
    def func(self) -> PruneFunc:
        if self._func is not None:
            return self._func
        return getattr(import_module(self.module), self.function)

    def __call__(
        self, model: PatchableModel, dataloader, official_edges: set[Edge] | None = None
    ) -> PruneScores:
        return self.func(model, dataloader, official_edges, **self.kwargs)


_MG = "auto_circuit.algorithms.mask_gradient"
_SP = "auto_circuit.algorithms.subnetwork_probing"
_CP = "auto_circuit.algorithms.circuit_probing"

PRUNE_ALGOS = [
    PruneAlgo("Official Circuit", "Official Circuit", "auto_circuit.algorithms.ground_truth",
              "ground_truth_prune_scores", _short_name="GT"),
    PruneAlgo("Random", "Random", "auto_circuit.algorithms.random_edges", "random_prune_scores"),
    PruneAlgo("Act Mag", "Activation Magnitude", "auto_circuit.algorithms.activation_magnitude",
              "activation_magnitude_prune_scores", _short_name="AM"),
    PruneAlgo("Edge Attribution Patching", "Edge Attribution Patching (activation gradients)",
              "auto_circuit.algorithms.edge_attribution_patching",
              "edge_attribution_patching_prune_scores", _short_name="EAP (act)"),
    PruneAlgo("Logit Diff Gradients", "EAP", _MG, "mask_gradient_prune_scores",
              {"grad_function": "logit", "answer_function": "avg_diff", "mask_val": 0.0},
              _short_name="EAP"),
    PruneAlgo("Prob Gradients", "EAP (Prob)", _MG, "mask_gradient_prune_scores",
              {"grad_function": "prob", "answer_function": "avg_val", "mask_val": 0.0}),
    PruneAlgo("Exp Logit Gradients", "EAP (Exp Logit)", _MG, "mask_gradient_prune_scores",
              {"grad_function": "logit_exp", "answer_function": "avg_val", "mask_val": 0.0}),
    PruneAlgo("Logprob Gradients", "EAP (Logprob)", _MG, "mask_gradient_prune_scores",
              {"grad_function": "logprob", "answer_function": "avg_val", "mask_val": 0.0}),
    PruneAlgo("Logprob Diff Gradients", "EAP (Logprob Diff)", _MG, "mask_gradient_prune_scores",
              {"grad_function": "logprob", "answer_function": "avg_diff", "mask_val": 0.0}),
    PruneAlgo("Logit MSE Gradients", "EAP (MSE)", _MG, "mask_gradient_prune_scores",
              {"grad_function": "logit", "answer_function": "mse", "mask_val": 0.0}),
    PruneAlgo("Integrated Edge Gradients (Answer Grad)", "IEG", _MG, "mask_gradient_prune_scores",
              {"grad_function": "logit", "answer_function": "avg_diff",
               "integrated_grad_samples": 50}),
    PruneAlgo("Integrated Edge Gradients", "IEG (Answer Logit)", _MG, "mask_gradient_prune_scores",
              {"grad_function": "logit", "answer_function": "avg_val",
               "integrated_grad_samples": 50}),
    PruneAlgo("EAP-IG", "EAP-IG (inputs)", "auto_circuit.algorithms.eap_ig",
              "eap_ig_prune_scores", {"method": "inputs", "steps": 5}),
    PruneAlgo("EAP-IG MSE", "EAP-IG (inputs, MSE)", "auto_circuit.algorithms.eap_ig",
              "eap_ig_prune_scores", {"method": "inputs", "steps": 5, "answer_function": "mse"}),
    PruneAlgo("EAP-IG Activations", "EAP-IG (activations)", "auto_circuit.algorithms.eap_ig",
              "eap_ig_prune_scores", {"method": "activations", "steps": 5}),
    PruneAlgo("Clean-Corrupted", "EAP-IG (clean-corrupted)", "auto_circuit.algorithms.eap_ig",
              "eap_ig_prune_scores", {"method": "clean-corrupted"}),
    PruneAlgo("Exact Patching", "Exact per-edge patching",
              "auto_circuit.algorithms.exact_patching",
              "exact_patching_prune_scores"),
    PruneAlgo("ACDC", "ACDC", "auto_circuit.algorithms.acdc", "acdc_prune_scores",
              {"tao_exps": list(range(-6, -2)), "tao_bases": [1],
               "faithfulness_target": "kl_div"}),
    PruneAlgo("MSE ACDC", "ACDC (MSE)", "auto_circuit.algorithms.acdc", "acdc_prune_scores",
              {"tao_exps": list(range(-10, 0)), "tao_bases": [1], "faithfulness_target": "mse"}),
    PruneAlgo("Subnetwork Edge Probing", "Subnetwork Edge Probing", _SP,
              "subnetwork_probing_prune_scores",
              {"learning_rate": 0.1, "epochs": 200, "regularize_lambda": 0.5,
               "mask_fn": "hard_concrete", "ablation_type": AblationType.RESAMPLE},
              _short_name="SEP"),
    PruneAlgo("Subnetwork Tree Probing", "Subnetwork Tree Probing", _SP,
              "subnetwork_probing_prune_scores",
              {"learning_rate": 0.1, "epochs": 2000, "regularize_lambda": 0.5,
               "mask_fn": "hard_concrete", "tree_optimisation": True}, _short_name="STP"),
    PruneAlgo("MSE Subnetwork Tree Probing", "Subnetwork Tree Probing (MSE)", _SP,
              "subnetwork_probing_prune_scores",
              {"learning_rate": 0.1, "epochs": 2000, "regularize_lambda": 0.5,
               "mask_fn": "hard_concrete", "tree_optimisation": True,
               "faithfulness_target": "mse"}),
    PruneAlgo("Circuit Probing", "Circuit Probing", _CP, "circuit_probing_prune_scores",
              {"learning_rate": 0.1, "epochs": 2000, "regularize_lambda": 0.1,
               "mask_fn": "hard_concrete", "circuit_sizes": ["true_size", 1000]},
              _short_name="CP"),
    PruneAlgo("Circuit Tree Probing", "Circuit Tree Probing", _CP, "circuit_probing_prune_scores",
              {"learning_rate": 0.1, "epochs": 200, "regularize_lambda": 0.1,
               "mask_fn": "hard_concrete", "circuit_sizes": [100, "true_size", 1000, 10000],
               "tree_optimisation": True}, _short_name="TP"),
    PruneAlgo("Opposite Tree Probing", "Opposite Tree Probing", _CP, "circuit_probing_prune_scores",
              {"learning_rate": 0.1, "epochs": 200, "regularize_lambda": 0.1,
               "mask_fn": "hard_concrete", "circuit_sizes": [100, "true_size", 1000, 10000],
               "tree_optimisation": True, "faithfulness_target": "wrong_answer"},
              _short_name="OTP"),
]  # fmt: skip

PRUNE_ALGO_DICT: dict[str, PruneAlgo] = {algo.key: algo for algo in PRUNE_ALGOS}


def prune_algo(key: str) -> PruneAlgo:
    """The registered algorithm ``key``; unknown keys list close matches."""
    if key not in PRUNE_ALGO_DICT:
        raise CircuitError(
            f"No prune algorithm {key!r}.{did_you_mean(key, PRUNE_ALGO_DICT)} "
            f"Known: {', '.join(PRUNE_ALGO_DICT)}."
        )
    return PRUNE_ALGO_DICT[key]


def run_prune_algos_on(
    model: PatchableModel,
    dataloader: Any,
    algos: Iterable[PruneAlgo],
    official_edges: set[Edge] | None = None,
) -> dict[str, PruneScores]:
    """Run each algorithm on ``dataloader``: scores by algorithm key."""
    return {algo.key: algo(model, dataloader, official_edges) for algo in algos}


@overload
def run_prune_algos(
    tasks: Iterable[Any], prune_algos: Iterable[PruneAlgo]
) -> dict[str, dict[str, PruneScores]]: ...


@overload
def run_prune_algos(
    tasks: PatchableModel,
    prune_algos: Any,
    algos: Iterable[PruneAlgo],
    official_edges: set[Edge] | None = None,
) -> dict[str, PruneScores]: ...


def run_prune_algos(
    tasks: Iterable[Any] | PatchableModel,
    prune_algos: Any,
    algos: Iterable[PruneAlgo] | None = None,
    official_edges: set[Edge] | None = None,
) -> dict[str, dict[str, PruneScores]] | dict[str, PruneScores]:
    """AutoCircuit's ``run_prune_algos(tasks, prune_algos)``: for every task, run every
    algorithm on ``task.train_loader`` with ``task.model`` and ``task.true_edges`` (each
    task loads on first use); returns ``{task.key: {algo.key: scores}}``.

    The older form ``run_prune_algos(model, dataloader, algos, official_edges)`` (a
    ``PatchableModel`` first) is ``run_prune_algos_on`` and returns
    ``{algo.key: scores}``.
    """
    if isinstance(tasks, PatchableModel):
        if algos is None:
            raise CircuitError(
                "run_prune_algos(model, dataloader, algos, official_edges) needs algos; "
                "AutoCircuit's form is run_prune_algos(tasks, prune_algos)."
            )
        return run_prune_algos_on(tasks, prune_algos, algos, official_edges)
    if algos is not None or official_edges is not None:
        raise CircuitError(
            "run_prune_algos(tasks, prune_algos) takes no algos or official_edges: each "
            "task's own true_edges are used."
        )
    prune_algos = list(prune_algos)
    return {
        task.key: run_prune_algos_on(task.model, task.train_loader, prune_algos, task.true_edges)
        for task in tasks
    }
