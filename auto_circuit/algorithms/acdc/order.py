"""The order in which ACDC visits edges, and which destinations still reach the output.

Edge order: destinations by layer, descending; ties by destination module name, then
head; within a destination its sources by ``src_idx`` descending, and in per-position
graphs token positions ascending within a source.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch as t
from torch import Tensor

from auto_circuit.algorithms.acdc.blocks import dest_blocks
from auto_circuit.engine.patchable_model import PatchableModel
from auto_circuit.vocabulary.types import DestNode


@dataclass(frozen=True)
class EdgeOrder:
    """The visiting order: per position, the edge's mask module, flat element and block."""

    modules: list[str]
    offsets: list[int]
    module_id: list[int]
    local_idx: list[int]
    block: list[int]  # -1: unknown block, run the full forward
    dest: list[DestNode]
    seq_pos: list[int]  # the edge's token position (-1: all positions)

    def __len__(self) -> int:
        return len(self.module_id)

    def global_indices(self) -> Tensor:
        """Per order position, the edge's index in the flat mask layout (sorted modules)."""
        offsets = t.tensor(self.offsets)[t.tensor(self.module_id)]
        return offsets + t.tensor(self.local_idx)

    def digest(self) -> str:
        data = repr((self.modules, self.module_id, self.local_idx)).encode()
        return hashlib.blake2b(data, digest_size=16).hexdigest()


def edge_order(model: PatchableModel) -> EdgeOrder:
    """The deterministic reverse-topological visiting order (module docstring)."""
    modules = sorted(model.patch_masks)
    offsets, total = [], 0
    for name in modules:
        offsets.append(total)
        total += model.patch_masks[name].numel()
    module_ids = {name: i for i, name in enumerate(modules)}
    blocks = dest_blocks(model)
    module_id: list[int] = []
    local_idx: list[int] = []
    block: list[int] = []
    dests: list[DestNode] = []
    seq_pos: list[int] = []
    for dest in sorted(
        model.dests,
        key=lambda d: (-d.layer, d.module_name, -1 if d.head_idx is None else d.head_idx),
    ):
        site = model.mask_site(dest.module_name)
        idx = t.arange(math.prod(site.shape)).view(site.shape)
        if site.n_heads is not None:
            idx = idx[..., dest.head_idx, :]  # type: ignore[index]
        # [(seq,) n_in] -> sources descending, positions ascending within a source.
        idx = idx.flip(-1)
        idx = idx.T if idx.ndim == 2 else idx
        flat = idx.flatten().tolist()
        local_idx += flat
        module_id += [module_ids[dest.module_name]] * len(flat)
        block += [blocks.get(dest.module_name, -1)] * len(flat)
        dests += [dest] * len(flat)
        seq = model.seq_len
        seq_pos += [i % seq for i in range(len(flat))] if seq else [-1] * len(flat)
    assert len(local_idx) == total == model.n_edges
    return EdgeOrder(modules, offsets, module_id, local_idx, block, dests, seq_pos)


def chunk(order: EdgeOrder, pos: int, k_max: int, liveness: Liveness | None = None) -> list[int]:
    """The next candidates: up to ``k_max`` from ``pos``, all into one block (so that
    candidates of later blocks do not pay for running earlier ones), stopping before an
    edge into a destination cut off from the output (it needs no forward) or one that
    this chunk's own decisions may still cut off."""
    stop = min(pos + k_max, len(order))
    block = order.block[pos]
    end = pos + 1
    while (
        end < stop
        and order.block[end] == block
        and (liveness is None or liveness.settled(end, pos) and not liveness.is_cut_off(end, pos))
    ):
        end += 1
    return list(range(pos, end))


class Liveness:
    """Whether an edge's destination still reaches the output in the current circuit
    (the model's masks: 1 = removed), for factorized graphs.

    Once every outgoing edge of a head or MLP is removed (at the token positions its
    input feeds: the same position for a query or an MLP, that and every later one for
    a key or value), its input no longer changes the output at all, so removing any of
    its incoming edges changes the metric by exactly 0."""

    def __init__(self, model: PatchableModel, order: EdgeOrder):
        self.model = model
        self.order = order
        sites = model.mask_sites
        src_by_name = {src.name: src.src_idx for src in model.srcs}
        # Readers of each source: (mask module, column), and the last order position
        # of an edge out of it (until then some outgoing edge is undecided, so kept).
        self.readers: dict[int, list[tuple[str, int]]] = {}
        for site in sites.values():
            for j in site.in_srcs:
                self.readers.setdefault(j, []).append((site.module_name, j - site.in_srcs.start))
        n_in = [len(sites[name].in_srcs) for name in order.modules]
        first = [sites[name].in_srcs.start for name in order.modules]
        module_id = t.tensor(order.module_id)
        src_of_pos = (
            t.tensor(first)[module_id] + t.tensor(order.local_idx) % t.tensor(n_in)[module_id]
        )
        self.last_out_pos = t.full((len(model.srcs),), -1, dtype=t.long)
        self.last_out_pos.scatter_reduce_(
            0, src_of_pos, t.arange(len(order)), reduce="amax", include_self=True
        )
        self.owner: dict[str, int] = {}
        for dest in set(order.dest):
            name = dest.name
            if name.endswith((".Q", ".K", ".V")):
                name = name[:-2]
            if name in src_by_name:
                self.owner[dest.name] = src_by_name[name]
        self.cut_off: dict[tuple[str, int], bool] = {}  # final answers, this circuit

    def settled(self, pos: int, n_decided: int) -> bool:
        """Whether every outgoing edge of the node fed by the edge at ``pos`` lies among
        the first ``n_decided`` order positions (so whether it is cut off is known)."""
        src = self.owner.get(self.order.dest[pos].name)
        return src is None or int(self.last_out_pos[src]) < n_decided

    def is_cut_off(self, pos: int, n_decided: int) -> bool:
        """Whether the edge at ``pos`` feeds a destination cut off from the output, given
        the decisions at the first ``n_decided`` order positions."""
        order = self.order
        dest = order.dest[pos]
        src = self.owner.get(dest.name)
        if src is None or not self.settled(pos, n_decided):
            return False  # the output itself, or an outgoing edge still undecided (kept)
        key = (dest.name, order.seq_pos[pos])
        if key not in self.cut_off:
            self.cut_off[key] = not self._reaches_output(src, dest, order.seq_pos[pos])
        return self.cut_off[key]

    def reset(self) -> None:
        """Forget the answers (a new circuit: the next tau)."""
        self.cut_off.clear()

    def _reaches_output(self, src: int, dest: DestNode, seq_pos: int) -> bool:
        """Whether source ``src`` (the node ``dest`` feeds) keeps an outgoing edge at the
        positions ``dest``'s input at ``seq_pos`` influences."""
        if seq_pos < 0:
            positions = slice(None)
        elif dest.name.endswith(".Q") or dest.head_idx is None:
            positions = slice(seq_pos, seq_pos + 1)  # a query, an MLP: this position only
        else:
            positions = slice(seq_pos, None)  # keys, values: this and later positions
        for module_name, col in self.readers.get(src, []):
            kept = self.model.patch_masks[module_name][..., col] == 0
            if seq_pos >= 0:
                kept = kept[positions]
            if bool(kept.any()):
                return True
        return False
