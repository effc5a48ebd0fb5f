"""Tasks: a model, a prompt dataset, batch sizes and the task's official circuit.

A ``Task`` is plain configuration. ``load_task`` builds everything it names (a fresh
model each time: no global caches, so two tasks never share or re-wrap a model and a
dataset is always tokenised by the model it is used with).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch as t

from auto_circuit.data.loaders import PromptDataLoader, load_datasets_from_json
from auto_circuit.engine.graph_utils import patchable_model
from auto_circuit.engine.patchable_model import PatchableModel
from auto_circuit.vocabulary.errors import CircuitError
from auto_circuit.vocabulary.misc import did_you_mean, repo_path_to_abs_path
from auto_circuit.vocabulary.types import AblationType, Edge

ModelDef = str | Callable[[t.device], t.nn.Module]
TrueEdgeFunc = Callable[..., set[Edge]]


_AUTOENCODER_FIELDS = (
    "autoencoder_input",
    "autoencoder_max_latents",
    "autoencoder_pythia_size",
    "autoencoder_prune_with_corrupt",
)


@dataclass(frozen=True, init=False)
class Task:
    """A behaviour to find a circuit for: configuration, and the loaded task on demand.

    Args (AutoCircuit's fields; ``model_def``, ``dataset_name`` and ``true_edge_func``
    are accepted for the underscored three):
        key, name: identifier and display name.
        batch_size, batch_count: per split (an int for both, or ``(train, test)``); the
            split sizes are ``batch_size * batch_count``.
        token_circuit: give every token position its own edges.
        _model_def: a TransformerLens model name or a local checkpoint directory (loaded
            with ``load_tl_model``: weights as published, no folding, in ``dtype``) or a
            function ``device -> model``.
        _dataset_name: a packaged dataset (``"ioi/ioi_vanilla_template_prompts"``) or a
            path to a JSON file, without or with ``.json``.
        factorized, separate_qkv, slice_output: the graph (``patchable_model``).
        _true_edge_func: the official circuit function
            ``(model, token_positions, word_idxs, seq_start_idx) -> set[Edge]``.
        autoencoder_input, autoencoder_max_latents, autoencoder_pythia_size,
        autoencoder_prune_with_corrupt: AutoCircuit's sparse-autoencoder tasks. Accepted;
            loading such a task raises an error (not supported yet).
        dtype: the model's dtype.
        __init_complete__: AutoCircuit's internal flag; accepted and ignored.
        tail_divergence, prepend_bos, load_kwargs: passed to ``load_datasets_from_json``.
        metric_key, ablation_type: how the task's circuits are evaluated by default
            (a key of ``PRUNE_METRIC_DICT``; the ablation its official circuit assumes).

    ``task.model``, ``task.train_loader``, ``task.test_loader``, ``task.true_edges`` and
    ``task.true_edge_count`` load the task on first use (``init_task``), as in
    AutoCircuit, but for this ``Task`` object only: there is no global model cache, so
    two tasks never share or re-wrap a model. ``load_task(task, device)`` builds a fresh
    ``LoadedTask`` each time.
    """

    key: str
    name: str
    batch_size: int | tuple[int, int]
    batch_count: int | tuple[int, int]
    token_circuit: bool
    _model_def: ModelDef
    _dataset_name: str
    factorized: bool = True
    separate_qkv: bool | None = True
    _true_edge_func: TrueEdgeFunc | None = None
    slice_output: Literal["last_seq", "not_first_seq"] | None = "last_seq"
    autoencoder_input: str | None = None
    autoencoder_max_latents: int | None = None
    autoencoder_pythia_size: str | None = None
    autoencoder_prune_with_corrupt: bool | None = None
    dtype: t.dtype = t.float32
    tail_divergence: bool = False
    prepend_bos: bool = True
    load_kwargs: dict[str, Any] = field(default_factory=dict)
    metric_key: str = "Logit Diff Percent"
    ablation_type: AblationType = AblationType.RESAMPLE
    _loaded: dict[str, LoadedTask] = field(
        default_factory=dict, init=False, compare=False, repr=False
    )

    def __init__(
        self,
        key: str,
        name: str,
        batch_size: int | tuple[int, int],
        batch_count: int | tuple[int, int],
        token_circuit: bool,
        _model_def: ModelDef | None = None,
        _dataset_name: str | None = None,
        factorized: bool = True,
        separate_qkv: bool | None = True,
        _true_edge_func: TrueEdgeFunc | None = None,
        slice_output: Literal["last_seq", "not_first_seq"] | None = "last_seq",
        autoencoder_input: str | None = None,
        autoencoder_max_latents: int | None = None,
        autoencoder_pythia_size: str | None = None,
        autoencoder_prune_with_corrupt: bool | None = None,
        dtype: t.dtype = t.float32,
        __init_complete__: bool = False,
        *,
        model_def: ModelDef | None = None,
        dataset_name: str | None = None,
        true_edge_func: TrueEdgeFunc | None = None,
        tail_divergence: bool = False,
        prepend_bos: bool = True,
        load_kwargs: dict[str, Any] | None = None,
        metric_key: str = "Logit Diff Percent",
        ablation_type: AblationType = AblationType.RESAMPLE,
    ):
        values = {
            "key": key,
            "name": name,
            "batch_size": batch_size,
            "batch_count": batch_count,
            "token_circuit": token_circuit,
            "_model_def": _either("model_def", _model_def, model_def, key),
            "_dataset_name": _either("dataset_name", _dataset_name, dataset_name, key),
            "factorized": factorized,
            "separate_qkv": separate_qkv,
            "_true_edge_func": _either(
                "true_edge_func", _true_edge_func, true_edge_func, key, required=False
            ),
            "slice_output": slice_output,
            "autoencoder_input": autoencoder_input,
            "autoencoder_max_latents": autoencoder_max_latents,
            "autoencoder_pythia_size": autoencoder_pythia_size,
            "autoencoder_prune_with_corrupt": autoencoder_prune_with_corrupt,
            "dtype": dtype,
            "tail_divergence": tail_divergence,
            "prepend_bos": prepend_bos,
            "load_kwargs": dict(load_kwargs or {}),
            "metric_key": metric_key,
            "ablation_type": ablation_type,
            "_loaded": {},
        }
        for name_, value in values.items():
            object.__setattr__(self, name_, value)

    @property
    def model_def(self) -> ModelDef:
        return self._model_def

    @property
    def dataset_name(self) -> str:
        return self._dataset_name

    @property
    def true_edge_func(self) -> TrueEdgeFunc | None:
        return self._true_edge_func

    @property
    def uses_autoencoder(self) -> bool:
        return any(getattr(self, name) is not None for name in _AUTOENCODER_FIELDS)

    def dataset_path(self) -> Path:
        name = (
            self.dataset_name
            if self.dataset_name.endswith(".json")
            else f"{self.dataset_name}.json"
        )
        path = repo_path_to_abs_path(Path("datasets") / name)
        if not path.exists():  # other package data (a shipped model's prompts) or a file
            path = repo_path_to_abs_path(name)
        if not path.exists():
            raise CircuitError(f"Task {self.key!r}: no dataset {self.dataset_name!r} ({path}).")
        return path

    # ---- AutoCircuit's lazy task ------------------------------------------------------

    def init_task(self, device: t.device | str | None = None) -> LoadedTask:
        """Load the task (once per ``Task`` object), on ``device`` (default: CUDA if
        available, else the CPU)."""
        if "task" not in self._loaded:
            if device is None:
                device = "cuda" if t.cuda.is_available() else "cpu"
            self._loaded["task"] = load_task(self, device)
        return self._loaded["task"]

    @property
    def model(self) -> PatchableModel:
        return self.init_task().model

    @property
    def train_loader(self) -> PromptDataLoader:
        return self.init_task().train_loader

    @property
    def test_loader(self) -> PromptDataLoader:
        return self.init_task().test_loader

    @property
    def true_edges(self) -> set[Edge] | None:
        return self.init_task().true_edges

    @property
    def true_edge_count(self) -> int | None:
        edges = self.true_edges
        return None if edges is None else len(edges)


def _either(name: str, underscored: Any, plain: Any, key: str, required: bool = True) -> Any:
    """AutoCircuit's ``_name`` or our ``name`` for the same Task field: one of them."""
    if underscored is not None and plain is not None:
        raise CircuitError(f"Task {key!r}: give _{name} or {name}, not both.")
    value = underscored if underscored is not None else plain
    if value is None and required:
        raise CircuitError(f"Task {key!r}: _{name} (or {name}) is required.")
    return value


@dataclass(frozen=True)
class LoadedTask:
    """A task with its model made patchable, its loaders and its official edges."""

    task: Task
    model: PatchableModel
    train_loader: PromptDataLoader
    test_loader: PromptDataLoader
    true_edges: set[Edge] | None


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else value


def load_task(task: Task, device: t.device | str = "cpu") -> LoadedTask:
    """Build the task's model, dataloaders and official circuit."""
    if task.uses_autoencoder:
        raise CircuitError(
            f"Task {task.key!r} uses a sparse autoencoder (autoencoder_* fields); "
            "sparse-autoencoder tasks are not supported yet. Remove those fields to "
            "find the circuit of the model itself."
        )
    device = t.device(device)
    if isinstance(task.model_def, str):
        from auto_circuit.app.experiment_utils import load_tl_model

        raw = load_tl_model(task.model_def, device, dtype=task.dtype)
    else:
        raw = task.model_def(device)
    batch_sizes, batch_counts = _pair(task.batch_size), _pair(task.batch_count)
    tokenizer = getattr(raw, "tokenizer", None)
    train, test = load_datasets_from_json(
        model=raw if tokenizer is not None else None,  # type: ignore[arg-type]
        path=task.dataset_path(),
        device=device,
        prepend_bos=task.prepend_bos,
        batch_size=batch_sizes,
        train_test_size=(batch_sizes[0] * batch_counts[0], batch_sizes[1] * batch_counts[1]),
        return_seq_length=task.token_circuit,
        tail_divergence=task.tail_divergence,
        **task.load_kwargs,
    )
    caches = tuple(c for c in (train.kv_cache, test.kv_cache) if c is not None) or (None,)
    model = patchable_model(
        raw,
        factorized=task.factorized,
        slice_output=task.slice_output,
        seq_len=test.seq_len if task.token_circuit else None,
        separate_qkv=task.separate_qkv if getattr(raw, "cfg", None) is not None else None,
        kv_caches=caches,
        device=device,
    )
    true_edges = None
    if task.true_edge_func is not None:
        true_edges = task.true_edge_func(
            model,
            token_positions=task.token_circuit,
            word_idxs=test.word_idxs,
            seq_start_idx=test.diverge_idx,
        )
    return LoadedTask(task, model, train, test, true_edges)


def micro_model_def(device: t.device) -> t.nn.Module:
    from auto_circuit.families.micro import MicroModel

    return MicroModel(n_layers=2).to(device)


MICRO_MODEL_TASK = Task(
    key="Micro Model",
    name="Micro Model",
    model_def=micro_model_def,
    dataset_name="micro_model_inputs",
    batch_size=4,
    batch_count=2,
    token_circuit=False,
    separate_qkv=None,
)


def _official(module: str, function: str) -> TrueEdgeFunc:
    """An official-circuit function, imported when the task first asks for it."""

    def true_edges(model: PatchableModel, **kwargs: Any) -> set[Edge]:
        from importlib import import_module

        circuits = import_module(f"auto_circuit.evaluation.official_circuits.circuits.{module}")
        return getattr(circuits, function)(model, **kwargs)

    true_edges.__qualname__ = f"{module}.{function}"
    return true_edges


# Tasks on published models: they need the model weights (downloaded once by
# TransformerLens, or a local checkpoint directory as model_def).
IOI_TOKEN_CIRCUIT_TASK = Task(
    key="Indirect Object Identification Token Circuit",
    name="IOI",
    model_def="gpt2",
    dataset_name="ioi/ioi_vanilla_template_prompts",
    batch_size=(100, 100),
    batch_count=(2, 2),
    token_circuit=True,
    true_edge_func=_official("ioi_official", "ioi_head_based_official_edges"),
    tail_divergence=True,
)
IOI_COMPONENT_CIRCUIT_TASK = Task(
    key="Indirect Object Identification",
    name="IOI",
    model_def="gpt2",
    dataset_name="ioi/ioi_vanilla_template_prompts",
    batch_size=64,
    batch_count=2,
    token_circuit=False,
    true_edge_func=_official("ioi_official", "ioi_true_edges"),
)
GREATERTHAN_COMPONENT_CIRCUIT_TASK = Task(
    key="Greaterthan",
    name="Greaterthan",
    model_def="gpt2",
    dataset_name="greaterthan_gpt2-small_prompts",
    batch_size=50,
    batch_count=2,
    token_circuit=False,
    true_edge_func=_official("greaterthan_official", "greaterthan_true_edges"),
)
DOCSTRING_TOKEN_CIRCUIT_TASK = Task(
    key="Docstring Token Circuit",
    name="Docstring",
    model_def="attn-only-4l",
    dataset_name="docstring_prompts",
    batch_size=50,
    batch_count=2,
    token_circuit=True,
    true_edge_func=_official("docstring_official", "docstring_node_based_official_edges"),
)
DOCSTRING_COMPONENT_CIRCUIT_TASK = Task(
    key="Docstring",
    name="Docstring",
    model_def="attn-only-4l",
    dataset_name="docstring_prompts",
    batch_size=50,
    batch_count=2,
    token_circuit=False,
    true_edge_func=_official("docstring_official", "docstring_true_edges"),
)


def _tracr_model(name: Literal["reverse", "xproportion"]) -> Callable[[t.device], t.nn.Module]:
    def build(device: t.device) -> t.nn.Module:
        from auto_circuit.families.tracr import get_tracr_model

        return get_tracr_model(name, device)[0]

    build.__qualname__ = f"tracr_model.{name}"
    return build


# Shipped models: they load with no download.
TRACR_REVERSE_TOKEN_CIRCUIT_TASK = Task(
    key="Tracr Reverse",
    name="Tracr Reverse",
    model_def=_tracr_model("reverse"),
    dataset_name="tracr/tracr_reverse_len_5_prompts",
    batch_size=32,
    batch_count=(2, 2),
    token_circuit=True,
    true_edge_func=_official("tracr_reverse_official", "tracr_reverse_true_edges"),
    slice_output="not_first_seq",
    metric_key="Clean KL Div",
)
TRACR_XPROPORTION_TOKEN_CIRCUIT_TASK = Task(
    key="Tracr Xproportion",
    name="Tracr Xproportion",
    model_def=_tracr_model("xproportion"),
    dataset_name="tracr/tracr_xproportion_len_5_prompts",
    batch_size=64,
    batch_count=(2, 2),
    token_circuit=True,
    true_edge_func=_official("tracr_xproportion_official", "tracr_xproportion_official_edges"),
    slice_output="not_first_seq",
    metric_key="Answer Logit",
)


def _induction_model(device: t.device) -> t.nn.Module:
    from auto_circuit.families.induction import get_induction_model

    return get_induction_model(device)


INDUCTION_TOKEN_CIRCUIT_TASK = Task(
    key="Induction",
    name="Induction",
    model_def=_induction_model,
    dataset_name="models/induction/induction_prompts",
    batch_size=50,
    batch_count=2,
    token_circuit=True,
    true_edge_func=_official("induction_official", "induction_true_edges"),
)

TASKS: list[Task] = [
    MICRO_MODEL_TASK,
    INDUCTION_TOKEN_CIRCUIT_TASK,
    TRACR_REVERSE_TOKEN_CIRCUIT_TASK,
    TRACR_XPROPORTION_TOKEN_CIRCUIT_TASK,
    IOI_TOKEN_CIRCUIT_TASK,
    IOI_COMPONENT_CIRCUIT_TASK,
    GREATERTHAN_COMPONENT_CIRCUIT_TASK,
    DOCSTRING_TOKEN_CIRCUIT_TASK,
    DOCSTRING_COMPONENT_CIRCUIT_TASK,
]


def register_task(task: Task) -> Task:
    """Add a task to ``TASK_DICT`` (e.g. the shipped-model tasks)."""
    TASK_DICT[task.key] = task
    return task


TASK_DICT: dict[str, Task] = {task.key: task for task in TASKS}


def task_by_key(key: str) -> Task:
    if key not in TASK_DICT:
        raise CircuitError(
            f"No task {key!r}.{did_you_mean(key, TASK_DICT)} Known: {', '.join(TASK_DICT)}."
        )
    return TASK_DICT[key]
