"""The registry of circuit-discovery algorithms and their documented presets.

Every algorithm is a plain function ``(model, dataloader, official_edges, ...) ->
PruneScores``; a ``PruneAlgo`` binds one to its preset parameters. Larger absolute score
= more important edge, for every algorithm.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import import_module
from typing import Any

from auto_circuit.engine.patchable_model import PatchableModel
from auto_circuit.vocabulary.errors import CircuitError
from auto_circuit.vocabulary.misc import did_you_mean
from auto_circuit.vocabulary.types import AblationType, Edge, PruneScores


@dataclass(frozen=True)
class PruneAlgo:
    """A discovery algorithm: ``module.function`` called with ``kwargs`` preset.

    The function is imported when first run, so the registry costs nothing to import.
    """

    key: str
    name: str
    module: str
    function: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    _short_name: str | None = None

    @property
    def short_name(self) -> str:
        return self._short_name or self.name

    @property
    def func(self) -> Callable[..., PruneScores]:
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


def run_prune_algos(
    model: PatchableModel, dataloader, algos: list[PruneAlgo], official_edges=None
) -> dict[str, PruneScores]:
    """Run each algorithm on ``dataloader``: scores by algorithm key."""
    return {algo.key: algo(model, dataloader, official_edges) for algo in algos}
