"""What an ACDC run returns: ``AcdcResult``, built from the run's final state."""

from __future__ import annotations

from dataclasses import dataclass

import torch as t
from torch import Tensor

from auto_circuit.algorithms.acdc.order import EdgeOrder
from auto_circuit.algorithms.acdc.state import State
from auto_circuit.engine.patchable_model import PatchableModel
from auto_circuit.vocabulary.types import PruneScores


@dataclass(frozen=True)
class AcdcStep:
    """One accepted removal: the edge's mask element and the circuit's metric after it."""

    order_pos: int
    module_name: str
    mask_idx: tuple[int, ...]
    value: float


@dataclass
class AcdcResult:
    """Everything one ACDC run found.

    ``kept[i]`` holds, per mask element, whether the circuit found at ``taus[i]`` kept
    the edge; ``steps[i]`` the accepted removals in order with the metric after each;
    ``final_values[i]`` the metric of that circuit; ``base_value`` the full model's.

    Cost counters: ``n_edges_tested`` decisions, ``n_reused`` of them taken from an
    earlier tau whose circuit was the same so far, ``n_skipped`` of them into a
    destination that no longer reaches the output (``order.Liveness``);
    ``n_evaluations`` rounds of candidates (each one forward per batch); ``n_forwards``
    model calls; ``n_rows`` candidates evaluated (decisions plus those wasted after a
    wrong guess); ``forward_equivalents`` the compute of all of them in units of one
    full forward over the whole dataset (rows / prompts x blocks run / blocks). Setup
    forwards (clean run, ablations) are not counted.
    """

    prune_scores: PruneScores
    taus: list[float]
    kept: list[PruneScores]
    steps: list[list[AcdcStep]]
    final_values: list[float]
    base_value: float
    n_edges_tested: int
    n_reused: int
    n_skipped: int
    n_evaluations: int
    n_forwards: int
    n_rows: int
    forward_equivalents: float

    @property
    def forward_equivalents_per_edge(self) -> float:
        """Forward-equivalents per edge tested (1.0 for the unbatched full-forward ACDC)."""
        return self.forward_equivalents / max(self.n_edges_tested, 1)


def build_result(
    model: PatchableModel, order: EdgeOrder, taus: list[float], state: State
) -> AcdcResult:
    """The scores, circuits and counters of a finished run."""

    def unflatten(flat: Tensor) -> PruneScores:
        return {
            name: flat[off : off + model.patch_masks[name].numel()]
            .view(model.patch_masks[name].shape)
            .to(model.device)
            for name, off in zip(order.modules, order.offsets, strict=True)
        }

    kept = t.ones_like(state.decisions)  # [tau, edges], global layout
    kept[:, order.global_indices()] = ~state.decisions
    scores = t.zeros(kept.shape[1])
    for i, tau in enumerate(taus):
        scores[kept[i]] = tau
    scores[kept.all(dim=0)] = float("inf")

    def step(ti: int, pos: int) -> AcdcStep:
        name = order.modules[order.module_id[pos]]
        shape = model.patch_masks[name].shape
        idx = tuple(int(i) for i in t.unravel_index(t.tensor(order.local_idx[pos]), shape))
        return AcdcStep(pos, name, idx, float(state.values[ti, pos]))

    assert state.base_value is not None
    steps = [
        [step(ti, pos) for pos in state.decisions[ti].nonzero().flatten().tolist()]
        for ti in range(len(taus))
    ]
    return AcdcResult(
        prune_scores=unflatten(scores),
        taus=taus,
        kept=[unflatten(k) for k in kept],
        steps=steps,
        final_values=[s[-1].value if s else state.base_value for s in steps],
        base_value=state.base_value,
        n_edges_tested=state.n_edges_tested,
        n_reused=state.n_reused,
        n_skipped=state.n_skipped,
        n_evaluations=state.n_evaluations,
        n_forwards=state.n_forwards,
        n_rows=state.n_rows,
        forward_equivalents=state.forward_equivalents,
    )
