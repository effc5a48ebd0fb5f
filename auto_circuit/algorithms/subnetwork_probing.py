"""Subnetwork probing: learn the edges a behaviour needs by optimising their masks.

Every edge's mask is a stochastic gate whose logit is trained with Adam (Cao et al.
2021, "Low-Complexity Probing via Finding Subnetworks"; used for circuits by Conmy et
al. 2023, "Towards Automated Circuit Discovery"). With ``mask_fn="hard_concrete"`` the
gate is a hard-concrete sample (Louizos et al. 2018, "Learning Sparse Neural Networks
through L0 Regularization"), drawn independently for every example, and the size of
the circuit is penalised by its closed-form expected L0 norm.

The patching engine adds ``gate * (P - C)`` to every destination (``P``: the edge's
patch value, ``C``: its value in this forward), so a gate at 0 leaves an edge as it is
in the forward and a gate at 1 makes it carry ``P``. The two modes mirror the two ways
``auto_circuit.algorithms.prune.run_circuits`` evaluates a circuit:

- **edge mode** (``tree_optimisation=False``, like ``PatchType.EDGE_PATCH``): the
  input is the corrupt prompts and ``P`` is the ablation of the *clean* prompts (with
  ``AblationType.RESAMPLE``: the clean activations themselves). An open gate brings
  the clean signal in, so the circuit is the set of open gates (gate > 0).
- **tree mode** (``tree_optimisation=True``, like ``PatchType.TREE_PATCH``): the
  input is the clean prompts and ``P`` is the ablation of the *corrupt* prompts. A
  gate at 1 removes its edge, so the circuit is the set of gates that are not fully
  open (gate < 1): edges that still pass some of their clean value.

Both modes are described by one *circuit logit* ``c`` per edge: the mask logit in edge
mode and its negation in tree mode. For a hard-concrete gate (stretch ``l = -0.1``,
``r = 1.1``, temperature ``2/3``), ``P(gate > 0) = sigmoid(logit - temp * log(-l / r))``
and, by the symmetry of the stretch, ``P(gate < 1) = sigmoid(-logit - temp * log(-l /
r))``; so in both modes ``P(edge in circuit) = sigmoid(c - temp * log(-l / r))``. The
penalty is the sum of these probabilities (the expected circuit size), divided by the
number of edges, or ``ReLU(expected size - circuit_size) / circuit_size`` when a target
size is given. ``c = 0`` starts every gate at a mean of 1/2 (each edge half ablated),
in the circuit with probability 0.83.

Unlike the reference implementation, the ablation follows ``ablation_type`` (the
reference hard-coded a corrupt-prompt mean, so edge mode never saw a clean
activation), the regulariser is the closed-form expectation rather than one noisy
sample, and a run is reproducible for a seed without touching the global RNG.
"""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch as t
from torch import Tensor
from tqdm.auto import tqdm

from auto_circuit.engine.ablation_activations import src_ablations
from auto_circuit.engine.graph_utils import (
    mask_fn_mode,
    masks_saved,
    patch_mode,
    set_all_masks,
    train_mask_mode,
)
from auto_circuit.engine.patchable_model import PatchableModel
from auto_circuit.vocabulary.errors import CircuitError
from auto_circuit.vocabulary.tensor_ops import (
    HARD_CONCRETE_LEFT,
    HARD_CONCRETE_RIGHT,
    HARD_CONCRETE_TEMP,
    batch_avg_answer_diff,
    batch_avg_answer_val,
)
from auto_circuit.vocabulary.types import AblationType, Edge, MaskFn, PruneScores

FaithfulnessTarget = Literal["kl_div", "mse", "answer", "wrong_answer", "logit_diff_percent"]
FAITHFULNESS_TARGETS: tuple[str, ...] = (
    "kl_div",
    "mse",
    "answer",
    "wrong_answer",
    "logit_diff_percent",
)

# P(gate in circuit) = sigmoid(circuit_logit + _L0_SHIFT) for a hard-concrete gate.
_L0_SHIFT = -HARD_CONCRETE_TEMP * math.log(-HARD_CONCRETE_LEFT / HARD_CONCRETE_RIGHT)


@dataclass(frozen=True)
class ProbingEpoch:
    """What one epoch of subnetwork probing achieved (losses averaged over batches).

    ``expected_circuit_size`` is the expected number of edges in the circuit after the
    epoch; ``validation_faithfulness`` is the faithfulness loss on the validation loader
    with every gate at its expected (deterministic) value, or None without one.
    """

    epoch: int
    circuit_size: int | None
    loss: float
    faithfulness: float
    penalty: float
    avoid_penalty: float
    expected_circuit_size: float
    validation_faithfulness: float | None


EpochCallback = Callable[[ProbingEpoch], None]
TrainGraph = bool | str | os.PathLike[str]
"""``show_train_graph``: False, True (show inside IPython) or a file to write."""


def check_validation_reported(
    validation_dataloader: Any, epoch_callback: EpochCallback | None, show_train_graph: TrainGraph
) -> None:
    """A validation loader is useless unless its curve goes somewhere."""
    if validation_dataloader is not None and epoch_callback is None and not show_train_graph:
        raise CircuitError(
            "validation_dataloader is only reported through epoch_callback or the training "
            "graph: pass a callback that records ProbingEpoch.validation_faithfulness, "
            "show_train_graph, or no validation_dataloader."
        )


def with_recorder(
    callback: EpochCallback | None, show_train_graph: TrainGraph
) -> tuple[EpochCallback | None, list[ProbingEpoch]]:
    """``callback``, also recording every epoch when a training graph is asked for."""
    records: list[ProbingEpoch] = []
    if show_train_graph is False:
        return callback, records

    def record(epoch: ProbingEpoch) -> None:
        records.append(epoch)
        if callback is not None:
            callback(epoch)

    return record, records


def render_train_graph(
    records: Sequence[ProbingEpoch], show_train_graph: TrainGraph, title: str
) -> Any:
    """Draw the training curves (``auto_circuit.figures.training``): shown inside
    IPython for True, written to the file otherwise; returns the figure (None if off)."""
    if show_train_graph is False or not records:
        return None
    # The training graph is an opt-in side output, so the figures stage is imported
    # here, only when asked for: algorithms never import a later stage at import time.
    training = importlib.import_module("auto_circuit.figures.training")
    export = importlib.import_module("auto_circuit.figures.export")
    fig = training.probing_training_plot(records, title=title)
    if show_train_graph is True:
        export.show_in_ipython(fig)
    else:
        export.write_figure(fig, show_train_graph)
    return fig


def circuit_probabilities(circuit_logits: Tensor, mask_fn: MaskFn) -> Tensor:
    """Per edge, the probability (``"hard_concrete"``) or degree (``"sigmoid"``) to which
    the edge is in the circuit, from its circuit logit (see the module docstring)."""
    if mask_fn == "hard_concrete":
        return t.sigmoid(circuit_logits + _L0_SHIFT)
    return t.sigmoid(circuit_logits)


def expected_gates(mask_logits: Tensor, mask_fn: MaskFn) -> Tensor:
    """The deterministic gate of a mask logit: the hard-concrete gate with zero noise
    (Louizos et al.'s test-time estimator), or the sigmoid."""
    if mask_fn == "hard_concrete":
        stretch = HARD_CONCRETE_RIGHT - HARD_CONCRETE_LEFT
        return (t.sigmoid(mask_logits) * stretch + HARD_CONCRETE_LEFT).clamp(0.0, 1.0)
    return t.sigmoid(mask_logits)


def faithfulness_loss(
    out: Tensor, batch: Any, target: FaithfulnessTarget, clean_out: Tensor | None
) -> Tensor:
    """How far the patched output ``out`` is from the behaviour (lower is better).

    ``kl_div``: KL(clean || patched) of the output distributions, averaged over examples
    (and positions); ``mse``: mean squared error against float ``batch.answers``;
    ``answer`` / ``wrong_answer``: minus the mean logit of the answers / wrong answers;
    ``logit_diff_percent``: ``|100 - 100 * patched / clean logit difference|``.
    """
    if target in ("kl_div", "logit_diff_percent") and clean_out is None:
        raise CircuitError(f"faithfulness_target={target!r} needs the clean output (clean_out).")
    if target == "kl_div":
        assert clean_out is not None
        vocab = out.shape[-1]
        patched = t.log_softmax(out.reshape(-1, vocab), dim=-1)
        clean = t.log_softmax(clean_out.reshape(-1, vocab), dim=-1)
        return t.nn.functional.kl_div(patched, clean, reduction="batchmean", log_target=True)
    if target == "mse":
        answers = batch.answers
        targets = answers if isinstance(answers, Tensor) else t.stack(list(answers))
        return t.nn.functional.mse_loss(out, targets.to(out.device, out.dtype).view_as(out))
    if target == "answer":
        return -batch_avg_answer_val(out, batch)
    if target == "wrong_answer":
        return -batch_avg_answer_val(out, replace(batch, answers=batch.wrong_answers))
    if target == "logit_diff_percent":
        assert clean_out is not None
        clean_diff = batch_avg_answer_diff(clean_out, batch)
        return (100 - 100 * batch_avg_answer_diff(out, batch) / clean_diff).abs()
    raise CircuitError(
        f"faithfulness_target must be one of {FAITHFULNESS_TARGETS}, got {target!r}."
    )


@dataclass(frozen=True)
class _Batch:
    """A batch ready for training: its input, patch values and clean output."""

    batch: Any
    inputs: Tensor
    patch: Tensor
    clean_out: Tensor | None


def _prepare(
    model: PatchableModel,
    dataloader: Any,
    tree: bool,
    ablation_type: AblationType,
    target: FaithfulnessTarget,
) -> list[_Batch]:
    """Draw the batches once, with their patch values and clean outputs."""
    batches = list(dataloader)
    if not batches:
        raise CircuitError("The dataloader is empty: subnetwork probing needs prompts.")
    shared = (
        src_ablations(model, dataloader, ablation_type) if ablation_type.needs_dataloader else None
    )
    prepared = []
    for batch in batches:
        # Edge mode brings in the clean signal; tree mode ablates with the corrupt one.
        patch_from, inputs = (batch.corrupt, batch.clean) if tree else (batch.clean, batch.corrupt)
        patch = shared if shared is not None else src_ablations(model, patch_from, ablation_type)
        clean_out = None
        if target in ("kl_div", "logit_diff_percent"):
            with t.no_grad():
                clean_out = model(batch.clean)[model.out_slice].detach()
        prepared.append(_Batch(batch, inputs, patch, clean_out))
    return prepared


def _check_args(
    model: PatchableModel,
    learning_rate: float,
    epochs: int,
    regularize_lambda: float,
    mask_fn: MaskFn,
    faithfulness_target: str,
    circuit_size: int | None,
) -> None:
    if mask_fn not in ("hard_concrete", "sigmoid"):
        raise CircuitError(
            f"mask_fn must be 'hard_concrete' or 'sigmoid' (gates need a logit), got {mask_fn!r}."
        )
    if faithfulness_target not in FAITHFULNESS_TARGETS:
        raise CircuitError(
            f"faithfulness_target must be one of {FAITHFULNESS_TARGETS}, got "
            f"{faithfulness_target!r}."
        )
    if learning_rate < 0 or epochs < 0 or regularize_lambda < 0:
        raise CircuitError(
            "learning_rate, epochs and regularize_lambda must be >= 0, got "
            f"{learning_rate}, {epochs} and {regularize_lambda}."
        )
    if circuit_size is not None and circuit_size <= 0:
        raise CircuitError(f"circuit_size must be a positive number of edges, got {circuit_size}.")
    if model.is_patching:
        raise CircuitError("Call subnetwork probing outside patch_mode: it patches by itself.")


def _validation_faithfulness(
    model: PatchableModel,
    batches: Sequence[_Batch],
    mask_fn: MaskFn,
    target: FaithfulnessTarget,
) -> float:
    """Faithfulness with every gate at its expected value, averaged over batches."""
    total = 0.0
    with t.no_grad(), masks_saved(model), mask_fn_mode(model, None):
        for mask in model.patch_masks.values():
            mask.copy_(expected_gates(mask, mask_fn))
        for item in batches:
            with patch_mode(model, item.patch):
                out = model(item.inputs)[model.out_slice]
            total += float(faithfulness_loss(out, item.batch, target, item.clean_out))
    return total / len(batches)


class _CircuitTerms:
    """The circuit-size terms of the loss, from the mask logits."""

    def __init__(
        self,
        sign: float,
        mask_fn: MaskFn,
        n_edges: int,
        circuit_size: int | None,
        avoid: PruneScores | None,
    ):
        self.sign = sign
        self.mask_fn: MaskFn = mask_fn
        self.n_edges = n_edges
        self.circuit_size = circuit_size
        self.avoid = avoid
        self.n_avoid = sum(int(a.sum()) for a in avoid.values()) if avoid is not None else 0

    def __call__(self, masks: dict[str, t.nn.Parameter]) -> tuple[Tensor, Tensor, Tensor]:
        """(expected circuit size, size penalty, avoid penalty)."""
        probs = {k: circuit_probabilities(self.sign * m, self.mask_fn) for k, m in masks.items()}
        size = t.stack([p.sum() for p in probs.values()]).sum()
        if self.circuit_size is None:
            penalty = size / self.n_edges
        else:
            penalty = t.relu(size - self.circuit_size) / self.circuit_size
        avoid_penalty = size.new_zeros(())
        if self.avoid is not None and self.n_avoid > 0:
            used = t.stack([(probs[k] * self.avoid[k]).sum() for k in probs]).sum()
            avoid_penalty = used / self.n_avoid
        return size, penalty, avoid_penalty


def _rng_devices(model: PatchableModel) -> list[int]:
    device = model.device
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else t.cuda.current_device()]


def subnetwork_probing_prune_scores(
    model: PatchableModel,
    dataloader: Any,
    official_edges: Collection[Edge | str] | None = None,
    learning_rate: float = 0.1,
    epochs: int = 200,
    regularize_lambda: float = 0.5,
    mask_fn: MaskFn = "hard_concrete",
    dropout_p: float = 0.0,
    init_val: float = 0.0,
    tree_optimisation: bool = False,
    avoid_edges: Collection[Edge | str] | None = None,
    avoid_lambda: float = 1.0,
    faithfulness_target: FaithfulnessTarget = "kl_div",
    ablation_type: AblationType = AblationType.RESAMPLE,
    circuit_size: int | None = None,
    validation_dataloader: Any = None,
    seed: int = 0,
    epoch_callback: EpochCallback | None = None,
    show_progress: bool = True,
    show_train_graph: TrainGraph = False,
) -> PruneScores:
    """Learn a circuit by optimising one stochastic gate per edge (subnetwork probing).

    Args:
        model: the patchable model. Its masks are restored afterwards.
        dataloader: a ``PromptDataLoader``; its batches are drawn once and reused every
            epoch (one Adam step per batch).
        official_edges: unused (the common signature of prune algorithms).
        learning_rate, epochs: Adam's step size and the number of passes over the data.
        regularize_lambda: weight of the circuit-size penalty (see the module docstring).
        mask_fn: ``"hard_concrete"`` (per-example gate samples, expected-L0 penalty) or
            ``"sigmoid"`` (deterministic gates, penalty = sum of the gates' circuit
            degrees).
        dropout_p: dropout on the gates during training.
        init_val: the initial circuit logit of every edge (0: gates start at a mean of
            1/2; positive: start nearer the full model, negative: nearer the empty
            circuit).
        tree_optimisation: tree mode (clean input, gates ablate) instead of edge mode
            (corrupt input, gates bring in the clean signal); see the module docstring.
        avoid_edges: edges (or edge names) of a previous circuit; using them costs
            ``avoid_lambda`` times their mean circuit probability.
        faithfulness_target: see ``faithfulness_loss``.
        ablation_type: the patch values: in edge mode the ablation of the clean prompts
            (RESAMPLE: the clean activations), in tree mode of the corrupt prompts.
        circuit_size: a target size: the penalty becomes
            ``ReLU(expected size - circuit_size) / circuit_size``.
        validation_dataloader: also record the faithfulness on these prompts with
            deterministic gates after every epoch (``ProbingEpoch.validation_faithfulness``,
            also drawn in the training graph). AutoCircuit's validation curve was the
            logit-difference percentage; this is the training objective's
            faithfulness, so the two curves compare directly.
        seed: seeds the gate samples and dropout; the global RNG state is restored.
        epoch_callback: called with a ``ProbingEpoch`` after every epoch (the loss
            history, e.g. to plot it).
        show_progress: show a tqdm progress bar.
        show_train_graph: draw the training curves after training
            (``auto_circuit.figures.training.probing_training_plot``): True shows them
            inside IPython only (AutoCircuit called ``fig.show()`` anywhere), a path
            writes them there (``.html``, or a static image with Chromium). The figure
            is built lazily; the records are also available through ``epoch_callback``.

    Returns:
        Scores shaped like the masks: each edge's learned circuit logit (the mask logit
        in edge mode, minus it in tree mode) shifted by one constant so that the
        smallest score is 1. Edges in the learned circuit have the largest scores; all
        scores are positive because importance is ``|score|``.
    """
    _check_args(
        model,
        learning_rate,
        epochs,
        regularize_lambda,
        mask_fn,
        faithfulness_target,
        circuit_size,
    )
    check_validation_reported(validation_dataloader, epoch_callback, show_train_graph)
    epoch_callback, records = with_recorder(epoch_callback, show_train_graph)
    sign = -1.0 if tree_optimisation else 1.0
    avoid = model.circuit_prune_scores(edges=avoid_edges, bool=True) if avoid_edges else None
    circuit_terms = _CircuitTerms(sign, mask_fn, model.n_edges, circuit_size, avoid)
    with t.random.fork_rng(devices=_rng_devices(model)):
        # Seeded before the loaders are drawn: DataLoaders draw from the global RNG too.
        t.manual_seed(seed)
        target = faithfulness_target
        train = _prepare(model, dataloader, tree_optimisation, ablation_type, target)
        validation = None
        if validation_dataloader is not None:
            # Iterating a DataLoader draws from the global RNG: fork it, so that a
            # validation loader changes no training sample.
            with t.random.fork_rng(devices=_rng_devices(model)):
                validation = _prepare(
                    model, validation_dataloader, tree_optimisation, ablation_type, target
                )
        with (
            masks_saved(model),
            mask_fn_mode(model, mask_fn, dropout_p),
            train_mask_mode(model) as masks,
        ):
            set_all_masks(model, sign * init_val)
            optimizer = t.optim.Adam([masks[name] for name in sorted(masks)], lr=learning_rate)
            progress = tqdm(range(epochs), desc="Subnetwork probing", disable=not show_progress)
            for epoch in progress:
                sums = t.zeros(4, device=model.device)
                for item in train:
                    optimizer.zero_grad(set_to_none=True)
                    with patch_mode(model, item.patch):
                        out = model(item.inputs)[model.out_slice]
                        faith = faithfulness_loss(out, item.batch, target, item.clean_out)
                        _, penalty, avoid_penalty = circuit_terms(masks)
                        loss = faith + regularize_lambda * penalty + avoid_lambda * avoid_penalty
                        loss.backward()
                    # Step outside patch_mode, which restores the mask values on exit.
                    optimizer.step()
                    sums += t.stack([loss, faith, penalty, avoid_penalty]).detach()
                with t.no_grad():
                    size = float(circuit_terms(masks)[0])
                loss_mean, faith_mean, penalty_mean, avoid_mean = (sums / len(train)).tolist()
                progress.set_postfix(loss=loss_mean, size=size)
                if epoch_callback is None:
                    continue
                val = (
                    _validation_faithfulness(model, validation, mask_fn, target)
                    if validation is not None
                    else None
                )
                epoch_callback(
                    ProbingEpoch(
                        epoch=epoch,
                        circuit_size=circuit_size,
                        loss=loss_mean,
                        faithfulness=faith_mean,
                        penalty=penalty_mean,
                        avoid_penalty=avoid_mean,
                        expected_circuit_size=size,
                        validation_faithfulness=val,
                    )
                )
            circuit_logits = {name: sign * mask.detach().clone() for name, mask in masks.items()}
    render_train_graph(records, show_train_graph, "Subnetwork probing")
    lowest = min(float(v.min()) for v in circuit_logits.values())
    return {name: v - lowest + 1.0 for name, v in circuit_logits.items()}
