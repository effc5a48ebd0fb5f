"""The vocabulary of the computation graph: nodes, edges, scores and results.

A model's computation graph has *source* nodes (modules that write one additive term
into the residual stream: the embedding, each attention head, each MLP) and
*destination* nodes (modules that read the residual stream: each head's query, key
and value input, each MLP input, the final residual). An edge ``src -> dest`` exists
when the source writes before the destination reads. Each edge is ablated by one mask
element; every algorithm scores edges with tensors shaped exactly like the masks.

Axis names used in shape annotations throughout the package:

- ``batch``: prompts in a batch; ``seq``: token positions;
- ``head``: heads of a destination module; ``src``: the sources feeding a module;
- ``d_model``: the residual stream width; ``n_src``: all sources of the model.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import Enum
from typing import Any, Literal

import torch as t
from torch import Tensor

from auto_circuit.vocabulary.errors import CircuitError

MaskFn = Literal["hard_concrete", "sigmoid"] | None
"""How raw mask parameters become mask values in the forward pass."""

PruneScores = dict[str, Tensor]
"""Edge scores keyed by destination module name, each shaped like that module's mask.

Larger absolute score = more important edge, for every algorithm."""


class PatchWrapper(ABC):
    """AutoCircuit's abstract base of the objects that patch one site of the graph.

    The engine's ``PatchWrapperImpl`` (``auto_circuit.engine.patch_wrapper``) is the one
    implementation, so ``isinstance(w, PatchWrapper)`` holds for every wrapper of a
    ``PatchableModel``. AutoCircuit's base was an ``nn.Module`` that replaced the wrapped
    module; ours hooks the unchanged module instead, so a wrapper is plain data about a
    site: its ``module_name``, whether it ``is_src`` and/or ``is_dest``, and, for a
    destination, its ``patch_mask``.
    """

    module_name: str
    is_src: bool
    is_dest: bool

    @property
    @abstractmethod
    def patch_mask(self) -> t.nn.Parameter:
        """The mask of a destination site (an error for a source-only site)."""


BatchKey = int
"""A stable identifier of a batch of prompts (see ``PromptPairBatch.key``)."""

BatchOutputs = dict[BatchKey, Tensor]
CircuitOutputs = dict[int, BatchOutputs]
"""Model outputs keyed by circuit size (number of edges), then by batch key."""

Measurements = list[tuple[int | float, int | float]]
"""(x, y) points, usually (circuit size, metric value)."""

TaskMeasurements = dict[str, dict[str, Measurements]]
AlgoMeasurements = dict[str, Measurements]
TaskPruneScores = dict[str, dict[str, PruneScores]]
AlgoPruneScores = dict[str, PruneScores]


class EdgeCounts(Enum):
    """Presets for the circuit sizes evaluated by ``run_circuits``."""

    ALL = 1
    LOGARITHMIC = 2
    GROUPS = 3


TestEdges = EdgeCounts | list[int | float]


class PatchType(Enum):
    """How a circuit is evaluated.

    EDGE_PATCH: run the corrupt input and patch the circuit's edges with clean values.
    TREE_PATCH: run the clean input and ablate every edge outside the circuit.
    """

    EDGE_PATCH = 1
    TREE_PATCH = 2

    def __str__(self) -> str:
        return self.name.replace("_", " ").title()


class AblationType(Enum):
    """What value an ablated edge carries from its source."""

    RESAMPLE = 1
    ZERO = 2
    TOKENWISE_MEAN_CLEAN = 3
    TOKENWISE_MEAN_CORRUPT = 4
    TOKENWISE_MEAN_CLEAN_AND_CORRUPT = 5
    BATCH_TOKENWISE_MEAN = 6
    BATCH_ALL_TOK_MEAN = 7

    def __str__(self) -> str:
        return self.name.replace("_", " ").title()

    @property
    def needs_dataloader(self) -> bool:
        """Whether the ablation is a mean over a whole dataset."""
        return self in (
            AblationType.TOKENWISE_MEAN_CLEAN,
            AblationType.TOKENWISE_MEAN_CORRUPT,
            AblationType.TOKENWISE_MEAN_CLEAN_AND_CORRUPT,
        )

    @property
    def clean_dataset(self) -> bool:
        return self in (
            AblationType.TOKENWISE_MEAN_CLEAN,
            AblationType.TOKENWISE_MEAN_CLEAN_AND_CORRUPT,
        )

    @property
    def corrupt_dataset(self) -> bool:
        return self in (
            AblationType.TOKENWISE_MEAN_CORRUPT,
            AblationType.TOKENWISE_MEAN_CLEAN_AND_CORRUPT,
        )


@dataclass(frozen=True)
class Node:
    """A point of the computation graph, hosted by the module ``module_name``.

    ``head_idx`` and ``head_dim`` locate the node inside a module that holds several
    heads (``head_dim`` is the tensor dimension of the head axis). ``layer`` orders the
    graph: an edge goes from a source in an earlier layer to a destination in a later one.
    """

    name: str
    module_name: str
    layer: int
    head_idx: int | None = None
    head_dim: int | None = None
    weight: str | None = None
    weight_head_dim: int | None = None

    def __post_init__(self) -> None:
        if (self.head_idx is None) != (self.head_dim is None):
            raise CircuitError(
                f"Node {self.name!r}: head_idx and head_dim must be given together "
                f"(got head_idx={self.head_idx}, head_dim={self.head_dim})."
            )
        if self.layer < 0:
            raise CircuitError(f"Node {self.name!r}: layer must be >= 0, got {self.layer}.")

    def module(self, model: t.nn.Module) -> t.nn.Module:
        """The module hosting this node (looked up inside the wrapped model if any)."""
        from auto_circuit.vocabulary.misc import module_by_name

        inner = getattr(model, "wrapped_model", model)
        return module_by_name(inner, self.module_name)

    def __repr__(self) -> str:
        return self.name

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class SrcNode(Node):
    """A node that writes to the residual stream. ``src_idx`` is its topological index."""

    src_idx: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.src_idx < 0:
            raise CircuitError(f"SrcNode {self.name!r}: src_idx must be >= 0.")


@dataclass(frozen=True)
class DestNode(Node):
    """A node that reads the residual stream.

    Its mask's last axis runs over the sources ``min_src_idx, min_src_idx + 1, ...`` (0
    in factorized graphs, where every earlier source feeds every later destination).
    """

    min_src_idx: int = 0


@dataclass(frozen=True)
class Edge:
    """An edge ``src -> dest``, at token position ``seq_idx`` (None: all positions)."""

    src: SrcNode
    dest: DestNode
    seq_idx: int | None = None

    def __post_init__(self) -> None:
        if self.src.layer >= self.dest.layer:
            raise CircuitError(
                f"Edge {self.src.name}->{self.dest.name}: the source (layer "
                f"{self.src.layer}) must come before the destination (layer {self.dest.layer})."
            )

    @property
    def name(self) -> str:
        return f"{self.src.name}->{self.dest.name}"

    @property
    def patch_idx(self) -> tuple[int, ...]:
        """Index of this edge's element in its destination module's mask."""
        seq = () if self.seq_idx is None else (self.seq_idx,)
        head = () if self.dest.head_idx is None else (self.dest.head_idx,)
        return seq + head + (self.src.src_idx - self.dest.min_src_idx,)

    def patch_mask(self, model: Any) -> t.nn.Parameter:
        """The mask Parameter (of the destination module) that holds this edge."""
        return model.patch_masks[self.dest.module_name]

    def prune_score(self, prune_scores: PruneScores) -> Tensor:
        """This edge's score in ``prune_scores``."""
        return prune_scores[self.dest.module_name][self.patch_idx]

    def __repr__(self) -> str:
        return self.name if self.seq_idx is None else f"{self.name}@{self.seq_idx}"

    def __str__(self) -> str:
        return self.__repr__()


def prune_scores_to(prune_scores: PruneScores, device: t.device | str) -> PruneScores:
    """Move every tensor of ``prune_scores`` to ``device``."""
    return {mod: score.to(device) for mod, score in prune_scores.items()}
