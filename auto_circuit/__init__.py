"""auto_circuit: find and test circuits in transformer language models.

The main API, importable from here::

    from auto_circuit import (
        load_datasets_from_json, patchable_model, mask_gradient_prune_scores, run_circuits
    )

Names are imported on first use (``import auto_circuit`` stays light). The stages live
in folders of their own: ``vocabulary`` (nodes, edges, scores), ``families`` (where a
kind of model's graph lives), ``engine`` (patching), ``data``, ``algorithms``,
``evaluation``, ``figures`` and ``app`` (CLI, report, tasks). AutoCircuit's module paths
keep working (``auto_circuit.autocircuit_paths``).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from auto_circuit import autocircuit_paths

autocircuit_paths.install()

_EXPORTS: dict[str, str] = {
    # vocabulary
    "AblationType": "auto_circuit.vocabulary.types",
    "CircuitError": "auto_circuit.vocabulary.errors",
    "DestNode": "auto_circuit.vocabulary.types",
    "Edge": "auto_circuit.vocabulary.types",
    "PatchType": "auto_circuit.vocabulary.types",
    "PruneScores": "auto_circuit.vocabulary.types",
    "SrcNode": "auto_circuit.vocabulary.types",
    # data
    "PromptDataLoader": "auto_circuit.data.loaders",
    "load_datasets_from_json": "auto_circuit.data.loaders",
    # engine
    "PatchableModel": "auto_circuit.engine.patchable_model",
    "patchable_model": "auto_circuit.engine.graph_utils",
    "patch_mode": "auto_circuit.engine.graph_utils",
    "set_all_masks": "auto_circuit.engine.graph_utils",
    "set_masks_from_prune_scores": "auto_circuit.engine.graph_utils",
    "train_mask_mode": "auto_circuit.engine.graph_utils",
    "src_ablations": "auto_circuit.engine.ablation_activations",
    # algorithms
    "acdc_prune_scores": "auto_circuit.algorithms.acdc",
    "eap_ig_prune_scores": "auto_circuit.algorithms.eap_ig",
    "edge_attribution_patching_prune_scores": "auto_circuit.algorithms.edge_attribution_patching",
    "exact_patching_prune_scores": "auto_circuit.algorithms.exact_patching",
    "mask_gradient_prune_scores": "auto_circuit.algorithms.mask_gradient",
    "random_prune_scores": "auto_circuit.algorithms.random_edges",
    "subnetwork_probing_prune_scores": "auto_circuit.algorithms.subnetwork_probing",
    "run_circuits": "auto_circuit.algorithms.prune",
    # evaluation
    "measure_roc": "auto_circuit.evaluation.official_circuits.measure_roc",
    "prune_metric": "auto_circuit.evaluation.prune_metrics.prune_metrics",
    # models
    "MicroModel": "auto_circuit.families.micro",
    "load_tl_model": "auto_circuit.app.experiment_utils",
}

__all__ = [
    "AblationType",
    "CircuitError",
    "DestNode",
    "Edge",
    "MicroModel",
    "PatchType",
    "PatchableModel",
    "PromptDataLoader",
    "PruneScores",
    "SrcNode",
    "acdc_prune_scores",
    "eap_ig_prune_scores",
    "edge_attribution_patching_prune_scores",
    "exact_patching_prune_scores",
    "load_datasets_from_json",
    "load_tl_model",
    "mask_gradient_prune_scores",
    "measure_roc",
    "patch_mode",
    "patchable_model",
    "prune_metric",
    "random_prune_scores",
    "run_circuits",
    "set_all_masks",
    "set_masks_from_prune_scores",
    "src_ablations",
    "subnetwork_probing_prune_scores",
    "train_mask_mode",
]

if TYPE_CHECKING:
    from auto_circuit.algorithms.acdc import acdc_prune_scores
    from auto_circuit.algorithms.eap_ig import eap_ig_prune_scores
    from auto_circuit.algorithms.edge_attribution_patching import (
        edge_attribution_patching_prune_scores,
    )
    from auto_circuit.algorithms.exact_patching import exact_patching_prune_scores
    from auto_circuit.algorithms.mask_gradient import mask_gradient_prune_scores
    from auto_circuit.algorithms.prune import run_circuits
    from auto_circuit.algorithms.random_edges import random_prune_scores
    from auto_circuit.algorithms.subnetwork_probing import subnetwork_probing_prune_scores
    from auto_circuit.app.experiment_utils import load_tl_model
    from auto_circuit.data.loaders import PromptDataLoader, load_datasets_from_json
    from auto_circuit.engine.ablation_activations import src_ablations
    from auto_circuit.engine.graph_utils import (
        patch_mode,
        patchable_model,
        set_all_masks,
        set_masks_from_prune_scores,
        train_mask_mode,
    )
    from auto_circuit.engine.patchable_model import PatchableModel
    from auto_circuit.evaluation.official_circuits.measure_roc import measure_roc
    from auto_circuit.evaluation.prune_metrics.prune_metrics import prune_metric
    from auto_circuit.families.micro import MicroModel
    from auto_circuit.vocabulary.errors import CircuitError
    from auto_circuit.vocabulary.types import (
        AblationType,
        DestNode,
        Edge,
        PatchType,
        PruneScores,
        SrcNode,
    )


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'auto_circuit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
