"""The engine's per-model patching state and its per-site hook records.

``PatchWrapperImpl`` keeps AutoCircuit's name for one hooked site of the graph.
``PatchState`` is what the context managers of ``auto_circuit.engine.graph_utils``
change; the engines read it in every forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch as t
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from auto_circuit.vocabulary.errors import CircuitError
from auto_circuit.vocabulary.types import MaskFn, PatchWrapper


@dataclass
class PatchState:
    """Mutable patching state shared by all hooks of one ``PatchableModel``."""

    patch_mode: bool = False
    patch_src_outs: Tensor | None = None  # [n_src, batch|1, seq|1, d_model]
    curr_src_outs: Tensor | None = None  # outputs of sources that do not run
    patch_is_delta: bool = False  # patch_src_outs holds P - C itself (fixed differences)
    mask_fn: MaskFn = None
    dropout_p: float = 0.0
    training: bool = False
    # Per forward pass (cleared before and after each one):
    outputs: dict[int, Tensor] = field(default_factory=dict)  # hooked source outputs
    currents: dict[int, Tensor | None] = field(default_factory=dict)  # read sources
    mask_samples: dict[str, Tensor] = field(default_factory=dict)
    probes: dict[str, Tensor] = field(default_factory=dict)

    def clear_forward(self) -> None:
        self.outputs.clear()
        self.currents.clear()
        self.mask_samples.clear()
        self.probes.clear()


class PatchWrapperImpl(PatchWrapper):
    """One site of the graph in the wrapped model: a block of sources, or a destination
    module with its mask. Holds the hook handles; does no work outside patch mode."""

    def __init__(
        self,
        module_name: str,
        is_src: bool,
        is_dest: bool,
        src_idxs: range | None = None,
        in_srcs: range | None = None,
        n_heads: int | None = None,
        masks: dict[str, t.nn.Parameter] | None = None,
    ):
        self.module_name = module_name
        self.is_src = is_src
        self.is_dest = is_dest
        self.src_idxs = src_idxs
        self.in_srcs = in_srcs
        self.n_heads = n_heads
        self.head_dim = 2 if n_heads is not None else None
        self._masks = masks
        self.handles: list[RemovableHandle] = []

    @property
    def patch_mask(self) -> t.nn.Parameter:
        if self._masks is None:
            raise CircuitError(f"{self.module_name} is a source site; it has no mask.")
        return self._masks[self.module_name]

    def __repr__(self) -> str:
        kind = "+".join(k for k, on in (("src", self.is_src), ("dest", self.is_dest)) if on)
        return f"PatchWrapperImpl({self.module_name!r}, {kind})"
