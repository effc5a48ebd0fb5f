"""ACDC's greedy search over every tau, with batched candidates, reuse across taus and
skipped destinations (the algorithm: ``auto_circuit.algorithms.acdc``)."""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch as t
from tqdm.auto import tqdm

from auto_circuit.algorithms.acdc.config import ACDCConfig
from auto_circuit.algorithms.acdc.evaluator import (
    Batch,
    Evaluator,
    default_candidates,
    prepare_batches,
)
from auto_circuit.algorithms.acdc.order import EdgeOrder, Liveness, chunk, edge_order
from auto_circuit.algorithms.acdc.result import AcdcResult, build_result
from auto_circuit.algorithms.acdc.state import State, load_state, save_state
from auto_circuit.engine.graph_utils import masks_saved, set_all_masks
from auto_circuit.engine.patchable_model import PatchableModel
from auto_circuit.vocabulary.errors import CircuitError
from auto_circuit.vocabulary.types import AblationType, PatchType

# test_mode: how far a step's fast value may be from the plain run_circuits one. Both
# compute the metric in float64 from float32 forwards, which differ only by rounding
# (batched rows, a forward started at a block).
TEST_MODE_RTOL = 1e-3
TEST_MODE_ATOL = 1e-6


def search(model: PatchableModel, dataloader, config: ACDCConfig) -> AcdcResult:
    """Run ACDC with ``config`` on every prompt of ``dataloader`` (see ``run_acdc``).
    The model's masks are restored afterwards."""
    if model.kv_caches and config.candidates_per_forward not in (None, 1):
        raise CircuitError(
            "This model runs with a prompt-prefix KV cache, which has a fixed batch size, so "
            "ACDC can test only one candidate per forward: pass candidates_per_forward=1 "
            "(or None)."
        )
    if any(mask.requires_grad for mask in model.patch_masks.values()):
        raise CircuitError("ACDC needs fixed masks: call it outside train_mask_mode.")

    taus = list(config.taus)
    order = edge_order(model)
    with masks_saved(model), t.no_grad():
        set_all_masks(model, 0.0)
        target = config.faithfulness_target
        batches = prepare_batches(model, dataloader, target, config.ablation_type)
        n_prompts = sum(b.size for b in batches)
        fingerprint = {
            "taus": taus,
            "target": target,
            "ablation": config.ablation_type.name,
            "n_edges": len(order),
            "order": order.digest(),
            "batches": sorted(int(b.batch.key) for b in batches),
            "n_prompts": n_prompts,
        }
        if config.resume_from is not None:
            state = load_state(config.resume_from, fingerprint)
        else:
            state = State.fresh(fingerprint, len(taus), len(order))
        k_max = config.candidates_per_forward or default_candidates(batches)
        if model.kv_caches:
            k_max = 1
        evaluator = Evaluator(model, batches, target, n_prompts, k_max)
        greedy = _Search(
            model, order, evaluator, state, taus, k_max, config.state_path, config.save_every
        )
        if config.test_mode:
            run_circuits = config.run_circuits_ref
            if run_circuits is None:
                run_circuits = importlib.import_module("auto_circuit.algorithms.prune").run_circuits
            greedy.plain_check = _PlainCheck(
                model, dataloader, batches, evaluator, config.ablation_type, run_circuits
            )
        if config.show_graphs:
            greedy.draw = config.draw_seq_graph_ref or _draw_seq_graph
        greedy.run(config.show_progress)
    return build_result(model, order, taus, state)


class _Search:
    """The greedy search over every tau, with batched candidates and reuse."""

    def __init__(
        self,
        model: PatchableModel,
        order: EdgeOrder,
        evaluator: Evaluator,
        state: State,
        taus: list[float],
        k_max: int,
        state_path: str | Path | None,
        save_every: int,
    ):
        self.model = model
        self.order = order
        self.evaluator = evaluator
        self.state = state
        self.taus = taus
        self.k_max = k_max
        self.k_next = k_max
        self.state_path = state_path
        self.save_every = save_every
        self.since_save = 0
        self.liveness = Liveness(model, order) if model.is_factorized else None
        self.plain_check: _PlainCheck | None = None
        self.draw: Callable[..., Any] | None = None

    def run(self, show_progress: bool) -> None:
        state, n_edges = self.state, len(self.order)
        with tqdm(
            total=n_edges * len(self.taus),
            initial=state.tau_idx * n_edges + state.pos,
            desc="ACDC",
            disable=not show_progress,
        ) as progress:
            try:
                while state.tau_idx < len(self.taus):
                    self.run_tau(progress)
                    state.tau_idx += 1
                    state.pos = 0
                    self.save(force=True)
            except BaseException:
                # Interrupted (Ctrl-C, an error): keep the progress made. Decisions are
                # recorded one at a time, so the state is consistent at any point.
                self.save(force=True)
                raise

    def run_tau(self, progress: tqdm) -> None:
        state, order, tau = self.state, self.order, self.taus[self.state.tau_idx]
        ti = state.tau_idx
        set_all_masks(self.model, 0.0)
        if self.liveness is not None:
            self.liveness.reset()
        if state.base_value is None:
            state.base_value = self.evaluator.evaluate(order, [], [], state)[0]
            if self.plain_check is not None:
                self.plain_check(_current_masks(self.model), state.base_value, "the full model")
        decided = state.decisions[ti, : state.pos].clone()
        for pos in decided.nonzero().flatten().tolist():
            _set_mask(self.model, order, pos, 1.0)
        current = state.current_value()
        # Reuse: an earlier tau whose decisions so far equal this tau's had this very
        # circuit before ``pos``, so its value for ``pos`` is this one's too.
        matching = [
            i for i in range(ti) if bool((state.decisions[i, : state.pos] == decided).all())
        ]
        while state.pos < len(order):
            if matching:
                pos = state.pos
                value = float(state.values[matching[0], pos])
                accept = self.decide(pos, value, current, tau)
                current = value if accept else current
                matching = [i for i in matching if bool(state.decisions[i, pos]) == accept]
                state.n_reused += 1
                progress.update(1)
                continue
            if self.skip_if_unreachable(state.pos, current, tau):
                progress.update(1)
                continue
            candidates = chunk(order, state.pos, self.k_next, self.liveness)
            guesses = _guesses(candidates, state, tau)
            values = self.evaluator.evaluate(order, candidates, guesses, state)
            state.n_evaluations += 1
            _update_estimates(candidates, guesses, values, current, state)
            n_decided = 0
            for k, pos in enumerate(candidates):
                # Earlier decisions of this walk may have cut the destination off.
                if k > 0 and self.skip_if_unreachable(pos, current, tau):
                    accept = True
                else:
                    accept = self.decide(pos, values[k], current, tau)
                    current = values[k] if accept else current
                n_decided += 1
                if accept != guesses[k]:
                    break
            # Rows after a wrong guess are wasted: shrink the chunks while guesses fail,
            # grow them back while they hold.
            wrong = n_decided < len(candidates) or accept != guesses[-1]
            self.k_next = max(1, self.k_next // 2) if wrong else min(self.k_max, 2 * self.k_next)
            progress.update(n_decided)
            self.save()

    def decide(self, pos: int, value: float, current: float, tau: float) -> bool:
        """The ACDC rule for the edge at ``pos``: removed iff the metric rises by < tau."""
        state = self.state
        if self.plain_check is not None:
            masks = _current_masks(self.model)
            masks[self.order.modules[self.order.module_id[pos]]].view(-1)[
                self.order.local_idx[pos]
            ] = 1.0
            self.plain_check(masks, value, f"the circuit without {_edge_label(self.order, pos)}")
        accept = value - current < tau
        state.decisions[state.tau_idx, pos] = accept
        state.values[state.tau_idx, pos] = value
        state.estimates[pos] = value - current
        if accept:
            _set_mask(self.model, self.order, pos, 1.0)
            if self.draw is not None:
                # The circuit: the edges still in (mask 0), score 1.
                circuit = {k: (m.detach() == 0).float() for k, m in self.model.patch_masks.items()}
                self.draw(self.model, circuit, score_threshold=0.5)
        state.pos = pos + 1
        state.n_edges_tested += 1
        return accept

    def skip_if_unreachable(self, pos: int, current: float, tau: float) -> bool:
        """Remove the edge at ``pos`` without a forward if its destination no longer
        reaches the output (its removal changes the metric by exactly 0)."""
        if self.liveness is None or not self.liveness.is_cut_off(pos, self.state.pos):
            return False
        accepted = self.decide(pos, current, current, tau)
        assert accepted  # an increase of 0 is below every tau (taus are positive)
        self.state.n_skipped += 1
        return True

    def save(self, force: bool = False) -> None:
        self.since_save += 1
        if self.state_path is not None and (force or self.since_save >= self.save_every):
            save_state(self.state_path, self.state)
            self.since_save = 0


class _PlainCheck:
    """``test_mode``: a step's metric, recomputed with a plain TREE_PATCH ``run_circuits``
    (full forwards, one circuit at a time) from its masks; an error if they differ."""

    def __init__(
        self,
        model: PatchableModel,
        dataloader: Any,
        batches: list[Batch],
        evaluator: Evaluator,
        ablation_type: AblationType,
        run_circuits: Callable[..., Any],
    ):
        self.model = model
        self.dataloader = dataloader
        self.batches = batches
        self.evaluator = evaluator
        self.ablation_type = ablation_type
        self.run_circuits = run_circuits
        self.n_prompts = sum(b.size for b in batches)

    def value(self, masks: dict[str, t.Tensor]) -> float:
        """The metric of the circuit of the edges whose mask is 0 in ``masks``."""
        kept = {name: (mask == 0).float() for name, mask in masks.items()}
        n_kept = int(sum(int(v.sum()) for v in kept.values()))
        outs = self.run_circuits(
            self.model,
            self.dataloader,
            [n_kept],
            kept,
            patch_type=PatchType.TREE_PATCH,
            ablation_type=self.ablation_type,
        )
        (by_batch,) = outs.values()
        total = 0.0
        for bd in self.batches:
            out = by_batch[bd.batch.key].to(bd.target.device)
            total += float(self.evaluator.row_sums(out, bd, 1)[0])
        value = total / self.n_prompts
        return abs(value) if self.evaluator.target == "logit_diff" else value

    def __call__(self, masks: dict[str, t.Tensor], fast: float, what: str) -> None:
        plain = self.value(masks)
        if not math.isclose(fast, plain, rel_tol=TEST_MODE_RTOL, abs_tol=TEST_MODE_ATOL):
            raise CircuitError(
                f"ACDC test_mode: the fast evaluation of {what} gives "
                f"{self.evaluator.target} = {fast!r}, but a plain run_circuits (TREE_PATCH) of "
                f"the same circuit gives {plain!r} (tolerance rel {TEST_MODE_RTOL}, abs "
                f"{TEST_MODE_ATOL}). The batched or start-at-block evaluation is wrong for "
                "this model: rerun with candidates_per_forward=1 to narrow it down, and "
                "report it."
            )


def _edge_label(order: EdgeOrder, pos: int) -> str:
    name = order.modules[order.module_id[pos]]
    return (
        f"edge {pos} of the visiting order (into {order.dest[pos].name}: element "
        f"{order.local_idx[pos]} of the mask {name!r})"
    )


def _current_masks(model: PatchableModel) -> dict[str, t.Tensor]:
    return {name: mask.detach().clone() for name, mask in model.patch_masks.items()}


def _draw_seq_graph(*args: Any, **kwargs: Any) -> Any:
    # show_graphs is an opt-in side output: the figures stage is imported only then,
    # so the algorithms stage never imports a later stage at import time.
    return importlib.import_module("auto_circuit.figures").draw_seq_graph(*args, **kwargs)


def _set_mask(model: PatchableModel, order: EdgeOrder, pos: int, value: float) -> None:
    mask = model.patch_masks[order.modules[order.module_id[pos]]]
    mask.view(-1)[order.local_idx[pos]] = value


def _guesses(candidates: Sequence[int], state: State, tau: float) -> list[bool]:
    """Predicted decisions (they only affect speed): accept where the edge's last
    measured increase is below ``tau`` or it was never measured (most edges go)."""
    guesses = []
    for pos in candidates:
        estimate = float(state.estimates[pos])
        guesses.append(math.isnan(estimate) or estimate < tau)
    return guesses


def _update_estimates(
    candidates: Sequence[int],
    guesses: Sequence[bool],
    values: Sequence[float],
    current: float,
    state: State,
) -> None:
    """Record each candidate's increase over its block's circuit without it (for the
    candidates after the first wrong guess, an estimate against a stale circuit)."""
    base = current
    for pos, guess, value in zip(candidates, guesses, values, strict=True):
        state.estimates[pos] = value - base
        if guess:
            base = value
