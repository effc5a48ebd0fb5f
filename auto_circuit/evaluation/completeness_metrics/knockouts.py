"""Completeness by knockouts ("same under knockouts", Wang et al. 2022, section 4).

A circuit ``C`` (the edges of the ``circuit_size`` largest ``|score|``) is complete when
it stays like the model under knockouts: for a set ``K`` of circuit edges, the circuit
without ``K`` should behave like the model without ``K``. Knocked-out edges and edges
outside the circuit carry the corrupt prompts' activations (resample ablation) in a run
on the clean prompts, so four runs are compared:

- the model (nothing patched) and the circuit ``C`` (every edge outside ``C`` patched):
  ``KL(model || circuit)``, the usual faithfulness;
- the model without ``K`` (only ``K`` patched) and the circuit without ``K`` (every
  edge outside ``C \\ K`` patched): ``KL(model - K || circuit - K)``.

A complete circuit has both near 0; an incomplete one (it lacks a backup path that the
model uses once ``K`` is knocked out) has a much larger knockout KL. KL divergences are
of the output distributions at the task positions (``model.out_slice``), summed over the
vocabulary and averaged over prompts and positions.

:func:`learn_knockouts` searches for the ``K`` that shows incompleteness best: one
hard-concrete gate per circuit edge (Louizos et al. 2018), trained with Adam to
maximise ``KL(model - K || circuit - K)`` under a penalty on the expected number of
knockouts above a target (a fifth of the circuit).

Axis names: ``batch`` prompts, ``pos`` output positions, ``vocab`` the output classes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch as t
from torch import Tensor

from auto_circuit.engine.ablation_activations import iter_batch_ablations
from auto_circuit.engine.graph_utils import (
    mask_fn_mode,
    masks_saved,
    patch_mode,
    set_masks_from_prune_scores,
    train_mask_mode,
)
from auto_circuit.engine.patchable_model import PatchableModel
from auto_circuit.vocabulary.errors import CircuitError
from auto_circuit.vocabulary.tensor_ops import (
    HARD_CONCRETE_LEFT,
    HARD_CONCRETE_RIGHT,
    HARD_CONCRETE_TEMP,
    batch_avg_answer_diff,
    multibatch_kl_div,
    prune_scores_threshold,
)
from auto_circuit.vocabulary.types import AblationType, MaskFn, PruneScores

KnockoutTarget = Literal["kl_div", "logit_diff"]

# A mask logit this large gives a gate of exactly 1 (hard concrete clamps; the sigmoid
# saturates in float32); its negation a gate of 0.
_SURE_LOGIT = 99.0
# P(hard-concrete gate > 0) = sigmoid(logit + _L0_SHIFT).
_L0_SHIFT = -HARD_CONCRETE_TEMP * math.log(-HARD_CONCRETE_LEFT / HARD_CONCRETE_RIGHT)
# The initial logit: a mean gate of 0.1, so training starts with few knockouts.
_INIT_GATE = 0.1
_INIT_LOGIT = math.log((_INIT_GATE - HARD_CONCRETE_LEFT) / (HARD_CONCRETE_RIGHT - _INIT_GATE))


@dataclass(frozen=True)
class KnockoutScore:
    """One completeness measurement (AutoCircuit's tuple, with names).

    Attributes:
        circuit_size: Edges in the circuit (more than asked for when scores tie).
        n_knockouts: Edges of the circuit knocked out.
        kl: ``KL(model || circuit)``.
        knockout_kl: ``KL(model - K || circuit - K)``.
    """

    circuit_size: int
    n_knockouts: int
    kl: float
    knockout_kl: float

    def __iter__(self):  # unpacks like AutoCircuit's (size, n_knockouts, kl, ko_kl)
        return iter((self.circuit_size, self.n_knockouts, self.kl, self.knockout_kl))


def circuit_edge_masks(prune_scores: PruneScores, circuit_size: int) -> dict[str, Tensor]:
    """True at the edges of the circuit: ``|score| >=`` the ``circuit_size``-th largest."""
    n_edges = sum(s.numel() for s in prune_scores.values())
    if not 0 < circuit_size <= n_edges:
        raise CircuitError(f"circuit_size must be in [1, {n_edges}], got {circuit_size}.")
    threshold = prune_scores_threshold(prune_scores, circuit_size)
    return {k: s.abs() >= threshold.to(s.device) for k, s in prune_scores.items()}


def _check_keys(model: PatchableModel, scores: PruneScores, what: str) -> None:
    missing = sorted(set(model.patch_masks) - set(scores))
    if missing:
        raise CircuitError(f"{what} has no scores for the masks {missing}; score this model.")


def _log_probs(
    model: PatchableModel,
    dataloader: Any,
    masks: dict[str, Tensor] | None,
) -> Tensor:
    """Log-softmax outputs on the clean prompts, ``masks`` (True = patched) patched to
    the corrupt prompts' activations; None runs the model unpatched."""
    outs = []
    with t.no_grad():
        for batch, patch in iter_batch_ablations(model, dataloader, AblationType.RESAMPLE):
            if masks is None:
                out = model(batch.clean)[model.out_slice]
            else:
                with masks_saved(model), mask_fn_mode(model, None), patch_mode(model, patch):
                    set_masks_from_prune_scores(model, {k: m.float() for k, m in masks.items()})
                    out = model(batch.clean)[model.out_slice]
            outs.append(t.log_softmax(out.float(), dim=-1).flatten(0, -2))
    return t.cat(outs)


def knockout_kl_divs(
    model: PatchableModel,
    dataloader: Any,
    circuit_ps: PruneScores,
    knockout_ps: PruneScores,
    circuit_size: int,
    knockout_threshold: float = 0.0,
) -> KnockoutScore:
    """The completeness of a circuit under one set of knockouts (module docstring).

    Args:
        model: The patchable model; its masks are as before afterwards.
        dataloader: Prompt pairs: run on the clean prompts, ablated to the corrupt ones.
        circuit_ps: Scores whose ``circuit_size`` largest ``|score|`` make the circuit.
        knockout_ps: The circuit edges with ``knockout_ps >= knockout_threshold`` are
            knocked out (e.g. :func:`learn_knockouts`' gate logits); edges outside the
            circuit never are.
        circuit_size: The number of edges in the circuit (ties add more).
        knockout_threshold: See ``knockout_ps``.
    """
    _check_keys(model, circuit_ps, "circuit_ps")
    _check_keys(model, knockout_ps, "knockout_ps")
    circuit = circuit_edge_masks({k: circuit_ps[k] for k in model.patch_masks}, circuit_size)
    knockouts = {
        k: circuit[k] & (knockout_ps[k].to(circuit[k].device) >= knockout_threshold)
        for k in circuit
    }
    model_lp = _log_probs(model, dataloader, None)
    circuit_lp = _log_probs(model, dataloader, {k: ~c for k, c in circuit.items()})
    ko_model_lp = _log_probs(model, dataloader, knockouts)
    ko_circuit_lp = _log_probs(
        model, dataloader, {k: ~c | knockouts[k] for k, c in circuit.items()}
    )
    return KnockoutScore(
        circuit_size=int(sum(int(c.sum()) for c in circuit.values())),
        n_knockouts=int(sum(int(k.sum()) for k in knockouts.values())),
        kl=float(multibatch_kl_div(circuit_lp, model_lp)),
        knockout_kl=float(multibatch_kl_div(ko_circuit_lp, ko_model_lp)),
    )


@dataclass(frozen=True)
class KnockoutStep:
    """One Adam step of :func:`learn_knockouts` (for loss curves)."""

    epoch: int
    loss: float
    faithfulness: float
    penalty: float
    expected_knockouts: float


def learn_knockouts(
    model: PatchableModel,
    dataloader: Any,
    circuit_ps: PruneScores,
    circuit_size: int,
    learning_rate: float = 0.1,
    epochs: int = 20,
    regularize_lambda: float = 1.0,
    mask_fn: MaskFn = "hard_concrete",
    faithfulness_target: KnockoutTarget = "kl_div",
    n_target: int | None = None,
    seed: int = 0,
    step_callback: Callable[[KnockoutStep], None] | None = None,
) -> PruneScores:
    """Learn the circuit edges whose knockout most separates circuit and model.

    One gate per circuit edge (``mask_fn``: hard-concrete samples or a sigmoid of the
    logit) says how much the edge is knocked out, in both the circuit run (edges outside
    the circuit fully patched) and the model run (edges outside the circuit never
    patched). Adam minimises ``faith + regularize_lambda * penalty`` with

    - ``faith = -KL(model - K || circuit - K)`` (``"kl_div"``), or ``-(model - circuit
      answer-logit difference)`` (``"logit_diff"``), per batch;
    - ``penalty = ReLU(E[#knockouts] - n_target) / n_target``, ``E[#knockouts]`` the sum
      over circuit edges of ``P(gate > 0)`` (hard concrete) or of the gate (sigmoid).

    Args:
        model: The patchable model; its masks are as before afterwards.
        dataloader: Prompt pairs (clean run, corrupt-prompt ablations).
        circuit_ps: Scores whose ``circuit_size`` largest ``|score|`` make the circuit.
        circuit_size: The number of edges in the circuit.
        learning_rate, epochs: Adam's step size and the passes over ``dataloader``.
        regularize_lambda: The weight of the penalty.
        mask_fn: ``"hard_concrete"`` or ``"sigmoid"``.
        faithfulness_target: ``"kl_div"`` or ``"logit_diff"``.
        n_target: The number of knockouts the penalty allows (default: a fifth of the
            circuit, at least 1).
        seed: Seeds the gate samples; the global RNG state is restored.
        step_callback: Called after every step with a :class:`KnockoutStep`.

    Returns:
        Scores shaped like the masks: the learnt gate logit of each circuit edge and
        ``-inf`` outside the circuit. Pass them to :func:`knockout_kl_divs` as
        ``knockout_ps`` (threshold 0: the edges whose gate is more likely on than off).
    """
    if mask_fn not in ("hard_concrete", "sigmoid"):
        raise CircuitError(f"mask_fn must be 'hard_concrete' or 'sigmoid', got {mask_fn!r}.")
    if faithfulness_target not in ("kl_div", "logit_diff"):
        raise CircuitError(
            f"faithfulness_target must be 'kl_div' or 'logit_diff', got {faithfulness_target!r}."
        )
    if learning_rate <= 0 or epochs < 0 or regularize_lambda < 0:
        raise CircuitError(
            "learning_rate must be > 0, epochs and regularize_lambda >= 0; got "
            f"{learning_rate}, {epochs}, {regularize_lambda}."
        )
    _check_keys(model, circuit_ps, "circuit_ps")
    circuit = circuit_edge_masks({k: circuit_ps[k] for k in model.patch_masks}, circuit_size)
    target = n_target if n_target is not None else max(1, circuit_size // 5)
    if target < 1:
        raise CircuitError(f"n_target must be >= 1, got {n_target}.")
    batches = list(iter_batch_ablations(model, dataloader, AblationType.RESAMPLE))
    devices = [model.device.index or 0] if model.device.type == "cuda" else []
    with (
        t.random.fork_rng(devices=devices),
        masks_saved(model),
        mask_fn_mode(model, mask_fn),
        train_mask_mode(model) as masks,
    ):
        t.manual_seed(seed)
        names = sorted(masks)
        init = (
            _INIT_LOGIT if mask_fn == "hard_concrete" else math.log(_INIT_GATE / (1 - _INIT_GATE))
        )
        with t.no_grad():
            for name in names:
                masks[name].fill_(init)
        optimizer = t.optim.Adam([masks[n] for n in names], lr=learning_rate)
        for epoch in range(epochs):
            for batch, patch in batches:
                optimizer.zero_grad(set_to_none=True)
                with patch_mode(model, patch):
                    # ``.data``: the gates are recomputed from the logits in each
                    # forward (mask_fn), so the graph keeps no reference to them.
                    _fill_outside(masks, circuit, _SURE_LOGIT)
                    circuit_out = model(batch.clean)[model.out_slice]
                    _fill_outside(masks, circuit, -_SURE_LOGIT)
                    model_out = model(batch.clean)[model.out_slice]
                    if faithfulness_target == "kl_div":
                        faith = -multibatch_kl_div(
                            t.log_softmax(circuit_out.float(), dim=-1),
                            t.log_softmax(model_out.float(), dim=-1),
                        )
                    else:
                        faith = -(
                            batch_avg_answer_diff(model_out, batch)
                            - batch_avg_answer_diff(circuit_out, batch)
                        )
                    expected = _expected_knockouts(masks, circuit, mask_fn)
                    penalty = t.relu(expected - target) / target
                    loss = faith + regularize_lambda * penalty
                    loss.backward()
                optimizer.step()
                if step_callback is not None:
                    step_callback(
                        KnockoutStep(
                            epoch,
                            float(loss.detach()),
                            float(faith.detach()),
                            float(penalty.detach()),
                            float(expected.detach()),
                        )
                    )
        learnt = {
            name: t.where(circuit[name], masks[name].detach(), float("-inf")).clone()
            for name in names
        }
    return learnt


def _fill_outside(masks: dict[str, t.nn.Parameter], circuit: dict[str, Tensor], val: float) -> None:
    for name, mask in masks.items():
        mask.data = t.where(circuit[name], mask.data, t.full_like(mask.data, val))


def _expected_knockouts(
    masks: dict[str, t.nn.Parameter], circuit: dict[str, Tensor], mask_fn: MaskFn
) -> Tensor:
    total = None
    for name, mask in masks.items():
        shift = _L0_SHIFT if mask_fn == "hard_concrete" else 0.0
        on = t.sigmoid(mask + shift)[circuit[name]].sum()
        total = on if total is None else total + on
    assert total is not None
    return total
