"""A tiny residual model whose outputs can be worked out by hand, used mostly in tests.

Each block has two "heads": head ``i`` multiplies its input elementwise by row ``i`` of
``[[1, 2], [3, 4]]``; the block adds both heads' outputs to the residual stream. With
input ``[1, 1]`` and two blocks the output is ``[25, 49]``.
"""

from __future__ import annotations

from itertools import count

import torch as t
from jaxtyping import Float
from torch import Tensor

from auto_circuit.families.contract import (
    DestHook,
    DestSite,
    FamilyGraph,
    SrcSite,
    contiguous_range,
    dest_in_srcs,
    dests_by_module,
)
from auto_circuit.families.registry import register_family
from auto_circuit.vocabulary.errors import CircuitError
from auto_circuit.vocabulary.types import DestNode, SrcNode


class Block(t.nn.Module):
    """Trivial linear layer with input and output of size 2."""

    def __init__(self):
        super().__init__()
        self.head_inputs = t.nn.Identity()
        self.head_outputs = t.nn.Identity()
        self.weights = t.nn.Parameter(t.tensor([[1.0, 2.0], [3.0, 4.0]]))

    def forward(self, x: Float[Tensor, "batch seq 2"]) -> Float[Tensor, "batch seq 2"]:
        heads_in = self.head_inputs(x.unsqueeze(-2).expand(*x.shape[:-1], 2, 2))
        heads_out = self.head_outputs(heads_in * self.weights)
        return heads_out.sum(dim=-2)


class MicroModel(t.nn.Module):
    """A trivial model with two "heads" per layer that perform simple multiplication."""

    def __init__(self, n_layers: int = 2):
        super().__init__()
        self.input = t.nn.Identity()
        self.n_layers = n_layers
        self.blocks, self.resids = t.nn.ModuleList(), t.nn.ModuleList()
        for _ in range(n_layers):
            self.blocks.append(Block())
            self.resids.append(t.nn.Identity())
        self.output = t.nn.Identity()

    def forward(self, x: Float[Tensor, "batch seq 2"]) -> Float[Tensor, "batch seq 2"]:
        x = self.input(x)
        for block, resid in zip(self.blocks, self.resids, strict=True):
            x = resid(x + block(x))
        return self.output(x)


def factorized_src_nodes(model: MicroModel) -> set[SrcNode]:
    """The sources of the factorized graph: the input, then each block's two heads."""
    nodes = set()
    layers, idxs = count(), count()
    nodes.add(SrcNode("Resid Start", "input", next(layers), src_idx=next(idxs)))
    for layer_idx in range(model.n_layers):
        layer = next(layers)
        for elem in [0, 1]:
            nodes.add(
                SrcNode(
                    name=f"B{layer_idx}.{elem}",
                    module_name=f"blocks.{layer_idx}.head_outputs",
                    layer=layer,
                    head_idx=elem,
                    head_dim=2,
                    weight="weights",
                    weight_head_dim=0,
                    src_idx=next(idxs),
                )
            )
    return nodes


def factorized_dest_nodes(model: MicroModel) -> set[DestNode]:
    """The destinations of the factorized graph: each head's input, then the output."""
    nodes = set()
    layers = count(1)
    for layer_idx in range(model.n_layers):
        layer = next(layers)
        for elem in [0, 1]:
            nodes.add(
                DestNode(
                    name=f"B{layer_idx}.{elem}",
                    module_name=f"blocks.{layer_idx}.head_inputs",
                    layer=layer,
                    head_idx=elem,
                    head_dim=2,
                )
            )
    nodes.add(DestNode("Resid End", "output", next(layers)))
    return nodes


def simple_graph_nodes(model: MicroModel) -> tuple[set[SrcNode], set[DestNode]]:
    """The nodes of the unfactorized (node-level) graph.

    Each residual checkpoint is a destination reading the previous checkpoint and the
    block's heads, and a source for the next checkpoint.
    """
    src_nodes, dest_nodes = set(), set()
    layers, src_idxs = count(), count()
    layer = next(layers)
    for layer_idx in range(model.n_layers):
        min_src_idx = next(src_idxs)
        first_block = layer_idx == 0
        src_nodes.add(
            SrcNode(
                name="Resid Start" if first_block else f"Resid Post {layer_idx - 1}",
                module_name="input" if first_block else f"resids.{layer_idx - 1}",
                layer=layer,
                src_idx=min_src_idx,
            )
        )
        for elem in [0, 1]:
            src_nodes.add(
                SrcNode(
                    name=f"B{layer_idx}.{elem}",
                    module_name=f"blocks.{layer_idx}.head_outputs",
                    layer=layer,
                    head_idx=elem,
                    head_dim=2,
                    weight="weights",
                    weight_head_dim=0,
                    src_idx=next(src_idxs),
                )
            )
        last_block = layer_idx == model.n_layers - 1
        layer = next(layers)
        dest_nodes.add(
            DestNode(
                name="Resid End" if last_block else f"Resid Post {layer_idx}",
                module_name="output" if last_block else f"resids.{layer_idx}",
                layer=layer,
                min_src_idx=min_src_idx,
            )
        )
    return src_nodes, dest_nodes


def _read_whole(x: Tensor) -> Tensor:
    return x.unsqueeze(0)


def _read_heads(x: Float[Tensor, "batch seq head d"]) -> Float[Tensor, "head batch seq d"]:
    return x.permute(2, 0, 1, 3)


class MicroModelFamily:
    name = "micro"
    description = "auto_circuit.families.micro.MicroModel (the test toy model)"

    def accepts(self, model: t.nn.Module) -> bool:
        return isinstance(model, MicroModel)

    def build(self, model: t.nn.Module, factorized: bool, separate_qkv: bool | None) -> FamilyGraph:
        """``separate_qkv`` has no meaning here (no attention) and is ignored, as in
        AutoCircuit."""
        if not isinstance(model, MicroModel):
            raise CircuitError(f"The micro family builds MicroModels, not {type(model)}.")
        if factorized:
            srcs, dests = factorized_src_nodes(model), factorized_dest_nodes(model)
        else:
            srcs, dests = simple_graph_nodes(model)
        return FamilyGraph(
            srcs=srcs,
            dests=dests,
            src_sites=_src_sites(srcs),
            dest_sites=_dest_sites(model, srcs, dests, factorized),
            probes=[],
            is_transformer=False,
            separate_qkv=None,
        )


def _src_sites(srcs: set[SrcNode]) -> list[SrcSite]:
    by_module: dict[str, list[SrcNode]] = {}
    for src in sorted(srcs, key=lambda s: s.src_idx):
        by_module.setdefault(src.module_name, []).append(src)
    return [
        SrcSite(
            module_name=name,
            hook_module=name,
            src_idxs=contiguous_range([s.src_idx for s in nodes], name),
            read=_read_heads if nodes[0].head_idx is not None else _read_whole,
        )
        for name, nodes in by_module.items()
    ]


def _dest_sites(
    model: t.nn.Module, srcs: set[SrcNode], dests: set[DestNode], factorized: bool
) -> list[DestSite]:
    sites = []
    for name, nodes in dests_by_module(model, dests).items():
        dest = nodes[0]
        heads = len(nodes) if dest.head_idx is not None else None
        sites.append(
            DestSite(
                module_name=name,
                hooks=(DestHook(name, "output"),),
                n_heads=heads,
                in_srcs=dest_in_srcs(srcs, dest, factorized),
            )
        )
    return sites


register_family(MicroModelFamily())
