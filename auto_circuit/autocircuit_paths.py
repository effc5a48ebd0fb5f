"""AutoCircuit's module paths, kept working in this one place.

Our modules live in folders named for the pipeline's stages (``vocabulary``,
``families``, ``engine``, ``data``, ``algorithms``, ``evaluation``, ``figures``,
``app``). Scripts written against AutoCircuit 1.0.1 import its paths
(``auto_circuit.utils.graph_utils``, ``auto_circuit.prune_algos.mask_gradient``, ...);
``ALIASES`` maps each of them, and each package prefix it moved whole, to the module
that holds that code now. An import of an old path gives the new module itself (the
same object: patching an attribute through either name changes both).

Installed by ``auto_circuit/__init__.py``; nothing in the package imports an old path.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

ALIASES: dict[str, str] = {
    # vocabulary
    "auto_circuit.types": "auto_circuit.vocabulary.types",
    "auto_circuit.errors": "auto_circuit.vocabulary.errors",
    "auto_circuit.utils.misc": "auto_circuit.vocabulary.misc",
    "auto_circuit.utils.tensor_ops": "auto_circuit.vocabulary.tensor_ops",
    "auto_circuit.utils.custom_tqdm": "auto_circuit.vocabulary.custom_tqdm",
    # families
    "auto_circuit.model_utils.families": "auto_circuit.families.registry",
    "auto_circuit.model_utils.micro_model_utils": "auto_circuit.families.micro",
    "auto_circuit.model_utils.transformer_lens_utils": "auto_circuit.families.transformer_lens",
    "auto_circuit.model_utils.tracr_model_utils": "auto_circuit.families.tracr",
    "auto_circuit.model_utils.induction_model_utils": "auto_circuit.families.induction",
    # engine
    "auto_circuit.utils.patch_wrapper": "auto_circuit.engine.patch_wrapper",
    "auto_circuit.utils.patchable_model": "auto_circuit.engine.patchable_model",
    "auto_circuit.utils.graph_utils": "auto_circuit.engine.graph_utils",
    "auto_circuit.utils.ablation_activations": "auto_circuit.engine.ablation_activations",
    "auto_circuit.kernels": "auto_circuit.engine.kernels",
    # algorithms
    "auto_circuit.prune": "auto_circuit.algorithms.prune",
    "auto_circuit.prune_algos": "auto_circuit.algorithms",
    "auto_circuit.prune_algos.prune_algos": "auto_circuit.algorithms.registry",
    "auto_circuit.prune_algos.ACDC": "auto_circuit.algorithms.acdc",
    # evaluation (and two figure modules AutoCircuit kept beside its metrics)
    "auto_circuit.metrics": "auto_circuit.evaluation",
    "auto_circuit.metrics.official_circuits.roc_plot": "auto_circuit.figures.plots",
    "auto_circuit.metrics.prune_metrics.prune_metrics_plot": "auto_circuit.figures.plots",
    "auto_circuit.metrics.prune_metrics.measure_prune_metrics": (
        "auto_circuit.app.measure_prune_metrics"
    ),
    "auto_circuit.metrics.avoid_edges": "auto_circuit.app.avoid_edges",
    # AutoCircuit modules that joined metrics to the task registry or to figures
    "auto_circuit.metrics.area_under_curve": "auto_circuit.app.area_under_curve",
    "auto_circuit.metrics.official_circuits.measure_roc": "auto_circuit.app.measure_roc",
    "auto_circuit.metrics.prune_scores_similarity": "auto_circuit.app.prune_scores_similarity",
    "auto_circuit.metrics.completeness_metrics.same_under_knockouts": (
        "auto_circuit.app.completeness"
    ),
    "auto_circuit.metrics.completeness_metrics.train_same_under_knockouts": (
        "auto_circuit.app.completeness"
    ),
    "auto_circuit.metrics.official_circuits.circuits.tracr.reverse_official": (
        "auto_circuit.evaluation.official_circuits.circuits.tracr_reverse_official"
    ),
    "auto_circuit.metrics.official_circuits.circuits.tracr.xproportion_official": (
        "auto_circuit.evaluation.official_circuits.circuits.tracr_xproportion_official"
    ),
    # figures
    "auto_circuit.visualize": "auto_circuit.figures",
    # data
    "auto_circuit.datasets_gen": "auto_circuit.data.generate",
    # app
    "auto_circuit.cli": "auto_circuit.app.cli",
    "auto_circuit.report": "auto_circuit.app.report",
    "auto_circuit.tasks": "auto_circuit.app.tasks",
    "auto_circuit.experiments": "auto_circuit.app.experiments",
    "auto_circuit.experiment_utils": "auto_circuit.app.experiment_utils",
    "auto_circuit.demo": "auto_circuit.app.demo",
    "auto_circuit.export": "auto_circuit.app.export",
}

NAMESPACES: frozenset[str] = frozenset(
    {
        "auto_circuit.utils",
        "auto_circuit.model_utils",
        "auto_circuit.metrics.official_circuits.circuits.tracr",
    }
)
"""Old packages that held only moved modules: importable, empty."""


def resolve(name: str) -> str | None:
    """The module that holds old path ``name`` now (a longest-prefix match on
    ``ALIASES``), or None when ``name`` is not an old path."""
    parts = name.split(".")
    for n in range(len(parts), 1, -1):
        prefix = ".".join(parts[:n])
        if prefix in ALIASES:
            return ".".join([ALIASES[prefix], *parts[n:]])
    return None


class _AliasLoader(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path: object = None, target: object = None):
        if fullname in NAMESPACES:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        new = resolve(fullname)
        target = importlib.util.find_spec(new) if new is not None else None
        if target is None:
            return None
        is_package = target.submodule_search_locations is not None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=is_package)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = types.ModuleType(spec.name)
        if spec.submodule_search_locations is not None:
            module.__path__ = []  # type: ignore[attr-defined]  # children resolve here too
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        if module.__name__ in NAMESPACES:
            return
        new = resolve(module.__name__)
        if new is None:  # pragma: no cover - find_spec returned a spec for it
            raise ImportError(module.__name__)
        # The import system returns what sys.modules holds after exec_module: the
        # module under its new name.
        sys.modules[module.__name__] = importlib.import_module(new)

    def get_code(self, fullname: str) -> types.CodeType | None:
        """The moved module's code, so ``python -m OLD.PATH`` runs it."""
        new = resolve(fullname)
        spec = importlib.util.find_spec(new) if new is not None else None
        loader = spec.loader if spec is not None else None
        get_code = getattr(loader, "get_code", None)
        return get_code(new) if get_code is not None else None

    def is_package(self, fullname: str) -> bool:
        new = resolve(fullname)
        spec = importlib.util.find_spec(new) if new is not None else None
        return fullname in NAMESPACES or (
            spec is not None and spec.submodule_search_locations is not None
        )


def install() -> None:
    """Make AutoCircuit's module paths importable (idempotent)."""
    if not any(isinstance(finder, _AliasLoader) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AliasLoader())
