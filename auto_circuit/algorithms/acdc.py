"""ACDC: Automated Circuit DisCovery (Conmy et al. 2023, "Towards Automated Circuit
Discovery for Mechanistic Interpretability"), exact, batched and resumable.

The algorithm. Start from the full model: the clean prompts with no edge ablated. Visit
every edge once, in reverse topological order (see *Edge order*). Tentatively ablate it
(its mask set to 1: it carries its source's value on the corrupt prompts, or the chosen
ablation) on top of the edges already removed, and measure the faithfulness metric of
the circuit, averaged over every prompt of the dataloader:

- ``"kl_div"``: KL(clean model || circuit) of the output distributions at the task
  positions (``model.out_slice``), averaged over prompts (and over positions, when the
  task has several);
- ``"mse"``: the mean squared error of the outputs against the float ``answers``;
- ``"logit_diff"``: ``|mean logit difference of the circuit - that of the clean model|``
  (answers minus wrong answers at the last position).

If the metric rises by less than ``tau`` over the current circuit's value, the edge
stays removed (and the current value becomes the new one); otherwise it is restored.
Each ``tau`` is a separate run from the full model.

Edge order. Destinations by layer, descending; ties by destination module name, then
head; within a destination its sources by ``src_idx`` descending, and in per-position
graphs token positions ascending within a source. The order depends on nothing but the
graph (the reference iterated a Python set, whose order changes with the hash seed).

Batched candidates, exactly. One forward evaluates ``K`` candidates: the batch holds
``K`` blocks of the ``B`` prompts, and block ``k`` has its own masks (the current
circuit plus some candidate edges removed). Each candidate ``c_k`` of a chunk gets a
*guess* ``g_k`` (accept or reject) and block ``k`` is the circuit
``C + {c_j : j < k, g_j = accept} + {c_k}``. Walking the chunk in order, decision ``k``
compares block ``k``'s metric with the current value, exactly as the sequential
algorithm would, *provided* ``d_j = g_j`` for every ``j < k``: then the circuit before
``c_k`` is ``C + {c_j : j < k, d_j = accept}``, which is block ``k`` without ``c_k``,
and the current value is that of the last accepted block (or the value before the
chunk). So the walk takes decisions until the first ``k`` with ``d_k != g_k``
(decision ``k`` itself is still valid: it only needs ``j < k``), stops, and the next
chunk starts at ``k + 1`` from the updated circuit. By induction every decision equals
the sequential one, whatever the guesses; each chunk makes at least one. The guesses
only decide the speed: a candidate is guessed accepted when its last measured increase
(from an earlier chunk, possibly against a slightly older circuit, or an earlier tau)
is below ``tau``, or when it was never measured (most edges are removed); after a
wrong guess the next chunk is half as long, after a right one twice (up to ``K``). (In floating
point a metric computed in a ``K * B`` batch may differ from a ``B`` batch by rounding,
so the two can differ only where an increase lies within rounding of ``tau``.)

Reuse across taus. Every tau starts from the full model and visits the edges in the
same order, so while a tau's decisions so far equal an earlier tau's, its circuit is
that tau's circuit and the metric of the next candidate is already known: it is
reused, without a forward.

Destinations that no longer reach the output. In a factorized graph a node's output
reaches the rest of the model only through its outgoing edges. Once every outgoing
edge of a head or MLP is removed (at the token positions its input feeds: the same
position for a query or an MLP, that and every later one for a key or value), its
input no longer changes the output at all, so removing any of its incoming edges
changes the metric by exactly 0 and is accepted without a forward (the paper's
implementation likewise skips nodes no longer connected to the output). These
decisions are counted in ``n_skipped``; as edges are visited by descending destination
layer, a node's outgoing edges are all decided before its incoming ones.

Starting at a block. For TransformerLens models each forward starts at block ``l``, the
lowest block holding a destination whose mask is non-zero in any block of rows, from
the clean residual stream cached at that block's input (``start_at_layer=l``), with the
clean outputs of the sources of earlier blocks as ``curr_src_outs``. This is exact: no
destination before block ``l`` is patched, so everything computed before it (the
residual stream and every earlier source's output) equals the clean run. As edges are
visited by descending destination layer, every edge removed so far enters block ``l``
or a later one, so ``l`` is the block of the candidates being tested (chunks never mix
blocks). The logits are computed only at the task positions (the unembedding acts per
position). Other models run the full forward.

Scores. With ``taus`` ascending, an edge's score is the largest ``tau`` whose circuit
kept it, ``+inf`` if every ``tau``'s circuit kept it, and ``0`` if none did. Larger score
= more important; when the circuits are nested (they usually are), the circuit found at
``tau`` is exactly the set of edges with ``score >= tau``.

Cost. The reference made one partial forward per edge per ``tau`` on one batch. Here
each forward tests up to ``K`` candidates on the whole dataloader; the result records
the forwards made and their cost in forward-equivalents (rows and blocks run, relative
to one full forward over the dataset).

Axis names: ``batch`` prompts, ``seq`` positions, ``n_src`` all sources, ``d_model``,
``rows``: ``K`` blocks of the batch, one per candidate.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch as t
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from auto_circuit.engine.ablation_activations import src_ablations, src_outs
from auto_circuit.engine.graph_utils import masks_saved, patch_mode, set_all_masks
from auto_circuit.engine.patchable_model import PatchableModel
from auto_circuit.vocabulary.errors import CircuitError
from auto_circuit.vocabulary.tensor_ops import batch_answer_diffs
from auto_circuit.vocabulary.types import AblationType, DestNode, Edge, PruneScores

FaithfulnessTarget = Literal["kl_div", "mse", "logit_diff"]
_TARGETS = ("kl_div", "mse", "logit_diff")
_STATE_VERSION = 1
# Default K: the most rows (at most _MAX_K) for which one [n_src, rows, seq, d_model]
# tensor (the patch values, say) fits in _ROWS_BYTES.
_ROWS_BYTES = 2**29
_MAX_K = 128
# Inputs repeated K times are kept between forwards when they all fit in this.
_CACHE_BYTES = 2**30


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
    destination that no longer reaches the output (module docstring);
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


@dataclass(frozen=True)
class _EdgeOrder:
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


@dataclass
class _Batch:
    """What one batch of prompts needs for every evaluation (computed once)."""

    batch: Any
    size: int
    clean: Tensor
    patch: Float[Tensor, "n_src batch seq d_model"]
    target: Tensor  # kl_div: clean log-probs; mse: answers [batch, n]; logit_diff: [batch]
    resid: list[Tensor] | None = None  # clean input of every block
    clean_srcs: Float[Tensor, "n_src batch seq d_model"] | None = None
    attention_mask: Tensor | None = None


@dataclass
class _State:
    """Progress of a run; what ``state_path`` saves and ``resume_from`` loads.

    ``decisions[i, p]`` / ``values[i, p]``: at ``taus[i]``, whether the edge at order
    position ``p`` was removed and the metric of the circuit that decided it (the
    circuit before it, plus it removed); set for the finished taus and, in the current
    one, for positions before ``pos``.
    """

    fingerprint: dict[str, Any]
    decisions: Tensor
    values: Tensor
    estimates: Tensor  # per position, its last measured increase (NaN: never measured)
    tau_idx: int = 0
    pos: int = 0
    base_value: float | None = None
    n_edges_tested: int = 0
    n_reused: int = 0
    n_skipped: int = 0
    n_evaluations: int = 0
    n_forwards: int = 0
    n_rows: int = 0
    forward_equivalents: float = 0.0

    @classmethod
    def fresh(cls, fingerprint: dict[str, Any], n_taus: int, n_edges: int) -> _State:
        return cls(
            fingerprint,
            decisions=t.zeros(n_taus, n_edges, dtype=t.bool),
            values=t.full((n_taus, n_edges), float("nan"), dtype=t.float64),
            estimates=t.full((n_edges,), float("nan"), dtype=t.float64),
        )

    def current_value(self) -> float:
        """The metric of the current circuit (the last accepted removal's)."""
        accepted = self.decisions[self.tau_idx, : self.pos].nonzero()
        if len(accepted) == 0:
            assert self.base_value is not None
            return self.base_value
        return float(self.values[self.tau_idx, int(accepted[-1])])

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            **{k: getattr(self, k) for k in self.__dataclass_fields__},
        }


def acdc_prune_scores(
    model: PatchableModel,
    dataloader,
    official_edges: Collection[Edge] | None = None,
    tao_exps: Iterable[int | float] = range(-5, -1),
    tao_bases: Iterable[int | float] = (1,),
    faithfulness_target: FaithfulnessTarget = "kl_div",
    ablation_type: AblationType = AblationType.RESAMPLE,
    candidates_per_forward: int | None = None,
    resume_from: str | Path | None = None,
    state_path: str | Path | None = None,
    show_progress: bool = True,
    save_every: int = 20,
) -> PruneScores:
    """ACDC prune scores (Conmy et al. 2023): see the module docstring and ``run_acdc``.

    Returns scores shaped like the masks: the largest ``tau = base * 10**exp`` whose
    circuit kept the edge, ``+inf`` if every ``tau``'s circuit kept it, ``0`` if none did.
    """
    return run_acdc(
        model,
        dataloader,
        official_edges,
        tao_exps,
        tao_bases,
        faithfulness_target,
        ablation_type,
        candidates_per_forward,
        resume_from,
        state_path,
        show_progress,
        save_every,
    ).prune_scores


def run_acdc(
    model: PatchableModel,
    dataloader,
    official_edges: Collection[Edge] | None = None,
    tao_exps: Iterable[int | float] = range(-5, -1),
    tao_bases: Iterable[int | float] = (1,),
    faithfulness_target: FaithfulnessTarget = "kl_div",
    ablation_type: AblationType = AblationType.RESAMPLE,
    candidates_per_forward: int | None = None,
    resume_from: str | Path | None = None,
    state_path: str | Path | None = None,
    show_progress: bool = True,
    save_every: int = 20,
) -> AcdcResult:
    """Run ACDC for every ``tau = base * 10**exp`` and return the circuits and scores.

    Args:
        model: the patchable model (any graph: factorized or not, per position or not).
        dataloader: a ``PromptDataLoader``; every batch is used, the metric is the mean
            over all prompts. Inputs are the clean prompts; ablations come from the
            corrupt ones (or are the chosen ``ablation_type``).
        official_edges: unused (the common signature of prune algorithms).
        tao_exps, tao_bases: the thresholds ``tau = base * 10**exp`` (positive), each
            run separately from the full model.
        faithfulness_target: ``"kl_div"``, ``"mse"`` or ``"logit_diff"`` (module docstring).
        ablation_type: what a removed edge carries.
        candidates_per_forward: ``K``, candidates tested per forward (``K`` copies of
            each batch). Default: the most, up to 128, for which one
            ``[n_src, K * batch, seq, d_model]`` tensor takes at most 512 MiB. Memory
            grows with it; the result does not depend on it. A model with a prompt-prefix
            KV cache tests one candidate per forward.
        resume_from: a state file written (``state_path``) by an earlier run with the
            same model, dataloader and arguments; the run continues from it, with the
            same result as an uninterrupted run.
        state_path: where to save progress, atomically (a temporary file, then
            ``os.replace``): every ``save_every`` rounds of candidates, after each
            ``tau``, and when the run is interrupted (an exception or Ctrl-C).
        show_progress: a progress bar over the edges tested.

    Returns:
        An ``AcdcResult``; its ``prune_scores`` are those of ``acdc_prune_scores``.
    """
    del official_edges
    taus = _taus(tao_exps, tao_bases)
    if faithfulness_target not in _TARGETS:
        raise CircuitError(
            f"faithfulness_target must be one of {_TARGETS}, got {faithfulness_target!r}."
        )
    if candidates_per_forward is not None and (
        not isinstance(candidates_per_forward, int) or candidates_per_forward < 1
    ):
        raise CircuitError(
            "candidates_per_forward must be a positive int or None, got "
            f"{candidates_per_forward!r}."
        )
    if not isinstance(save_every, int) or save_every < 1:
        raise CircuitError(f"save_every must be a positive int, got {save_every!r}.")
    if model.kv_caches and candidates_per_forward not in (None, 1):
        raise CircuitError(
            "This model runs with a prompt-prefix KV cache, which has a fixed batch size, so "
            "ACDC can test only one candidate per forward: pass candidates_per_forward=1 "
            "(or None)."
        )
    if any(mask.requires_grad for mask in model.patch_masks.values()):
        raise CircuitError("ACDC needs fixed masks: call it outside train_mask_mode.")

    order = _edge_order(model)
    with masks_saved(model), t.no_grad():
        set_all_masks(model, 0.0)
        batches = _prepare_batches(model, dataloader, faithfulness_target, ablation_type)
        n_prompts = sum(b.size for b in batches)
        fingerprint = {
            "taus": taus,
            "target": faithfulness_target,
            "ablation": ablation_type.name,
            "n_edges": len(order),
            "order": order.digest(),
            "batches": sorted(int(b.batch.key) for b in batches),
            "n_prompts": n_prompts,
        }
        if resume_from is not None:
            state = _load_state(resume_from, fingerprint)
        else:
            state = _State.fresh(fingerprint, len(taus), len(order))
        k_max = candidates_per_forward or _default_candidates(batches)
        if model.kv_caches:
            k_max = 1
        evaluator = _Evaluator(model, batches, faithfulness_target, n_prompts, k_max)
        search = _Search(model, order, evaluator, state, taus, k_max, state_path, save_every)
        search.run(show_progress)
    return _result(model, order, taus, state)


class _Search:
    """The greedy search over every tau, with batched candidates and reuse."""

    def __init__(
        self,
        model: PatchableModel,
        order: _EdgeOrder,
        evaluator: _Evaluator,
        state: _State,
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
        self.liveness = _Liveness(model, order) if model.is_factorized else None

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
            chunk = _chunk(order, state.pos, self.k_next, self.liveness)
            guesses = _guesses(chunk, state, tau)
            values = self.evaluator.evaluate(order, chunk, guesses, state)
            state.n_evaluations += 1
            _update_estimates(chunk, guesses, values, current, state)
            n_decided = 0
            for k, pos in enumerate(chunk):
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
            wrong = n_decided < len(chunk) or accept != guesses[-1]
            self.k_next = max(1, self.k_next // 2) if wrong else min(self.k_max, 2 * self.k_next)
            progress.update(n_decided)
            self.save()

    def decide(self, pos: int, value: float, current: float, tau: float) -> bool:
        """The ACDC rule for the edge at ``pos``: removed iff the metric rises by < tau."""
        state = self.state
        accept = value - current < tau
        state.decisions[state.tau_idx, pos] = accept
        state.values[state.tau_idx, pos] = value
        state.estimates[pos] = value - current
        if accept:
            _set_mask(self.model, self.order, pos, 1.0)
        state.pos = pos + 1
        state.n_edges_tested += 1
        return accept

    def skip_if_unreachable(self, pos: int, current: float, tau: float) -> bool:
        """Remove the edge at ``pos`` without a forward if its destination no longer
        reaches the output (its removal changes the metric by exactly 0)."""
        if self.liveness is None or not self.liveness.is_cut_off(pos, self.state.pos):
            return False
        assert self.decide(pos, current, current, tau)  # 0 < tau
        self.state.n_skipped += 1
        return True

    def save(self, force: bool = False) -> None:
        self.since_save += 1
        if self.state_path is not None and (force or self.since_save >= self.save_every):
            _save_state(self.state_path, self.state)
            self.since_save = 0


def _chunk(order: _EdgeOrder, pos: int, k_max: int, liveness: _Liveness | None = None) -> list[int]:
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


class _Liveness:
    """Whether an edge's destination still reaches the output in the current circuit
    (the model's masks: 1 = removed), for factorized graphs (module docstring)."""

    def __init__(self, model: PatchableModel, order: _EdgeOrder):
        self.model = model
        self.order = order
        engine = model.engine
        src_by_name = {src.name: src.src_idx for src in model.srcs}
        # Readers of each source: (mask module, column), and the last order position
        # of an edge out of it (until then some outgoing edge is undecided, so kept).
        self.readers: dict[int, list[tuple[str, int]]] = {}
        for site in engine.dest_sites.values():
            for j in site.in_srcs:
                self.readers.setdefault(j, []).append((site.module_name, j - site.in_srcs.start))
        n_in = [len(engine.dest_sites[name].in_srcs) for name in order.modules]
        first = [engine.dest_sites[name].in_srcs.start for name in order.modules]
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


def _guesses(chunk: Sequence[int], state: _State, tau: float) -> list[bool]:
    """Predicted decisions (they only affect speed): accept where the edge's last
    measured increase is below ``tau`` or it was never measured (most edges go)."""
    guesses = []
    for pos in chunk:
        estimate = float(state.estimates[pos])
        guesses.append(math.isnan(estimate) or estimate < tau)
    return guesses


def _update_estimates(
    chunk: Sequence[int],
    guesses: Sequence[bool],
    values: Sequence[float],
    current: float,
    state: _State,
) -> None:
    """Record each candidate's increase over its block's circuit without it (for the
    candidates after the first wrong guess, an estimate against a stale circuit)."""
    base = current
    for pos, guess, value in zip(chunk, guesses, values, strict=True):
        state.estimates[pos] = value - base
        if guess:
            base = value


def _taus(tao_exps: Iterable[int | float], tao_bases: Iterable[int | float]) -> list[float]:
    """The sorted distinct thresholds ``base * 10**exp``."""
    exps, bases = list(tao_exps), list(tao_bases)
    if not exps or not bases:
        raise CircuitError("tao_exps and tao_bases must each hold at least one value.")
    taus = sorted({float(b) * 10.0 ** float(e) for b in bases for e in exps})
    bad = [tau for tau in taus if not (math.isfinite(tau) and tau > 0)]
    if bad:
        raise CircuitError(
            f"Every tau = base * 10**exp must be finite and positive, got {bad}; use "
            "positive tao_bases (e.g. tao_bases=(1, 5))."
        )
    return taus


def _edge_order(model: PatchableModel) -> _EdgeOrder:
    """The deterministic reverse-topological visiting order (module docstring)."""
    engine = model.engine
    modules = sorted(model.patch_masks)
    offsets, total = [], 0
    for name in modules:
        offsets.append(total)
        total += model.patch_masks[name].numel()
    module_ids = {name: i for i, name in enumerate(modules)}
    blocks = _dest_blocks(model)
    module_id: list[int] = []
    local_idx: list[int] = []
    block: list[int] = []
    dests: list[DestNode] = []
    seq_pos: list[int] = []
    for dest in sorted(
        model.dests,
        key=lambda d: (-d.layer, d.module_name, -1 if d.head_idx is None else d.head_idx),
    ):
        site = engine.dest_sites[dest.module_name]
        shape = engine.mask_shape(site)
        idx = t.arange(math.prod(shape)).view(shape)
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
    return _EdgeOrder(modules, offsets, module_id, local_idx, block, dests, seq_pos)


def _block_owner(model: PatchableModel) -> dict[int, int] | None:
    """``id(module) -> block index`` for a TransformerLens model that can start at a
    block (no KV cache), else None."""
    wrapped = model.wrapped_model
    blocks = getattr(wrapped, "blocks", None)
    if not model.is_transformer or model.kv_caches or not isinstance(blocks, t.nn.ModuleList):
        return None
    return {id(mod): i for i, block in enumerate(blocks) for mod in block.modules()}


def _dest_blocks(model: PatchableModel) -> dict[str, int]:
    """The block of each destination module whose hooks all lie in one block."""
    owner = _block_owner(model)
    if owner is None:
        return {}
    wrapped = model.wrapped_model
    result = {}
    for name, site in model.engine.dest_sites.items():
        found = {owner.get(id(wrapped.get_submodule(h.hook_module))) for h in site.hooks}
        if len(found) == 1 and None not in found:
            result[name] = found.pop()
    return result  # type: ignore[return-value]


def _srcs_before_block(model: PatchableModel) -> list[int] | None:
    """For each block ``l``: the sources ``[0, n)`` that run before block ``l`` (and only
    those), or None when the sources are not laid out that way."""
    owner = _block_owner(model)
    if owner is None:
        return None
    wrapped = model.wrapped_model
    n_blocks = len(wrapped.blocks)  # type: ignore[arg-type]
    site_blocks = []
    for site in model.engine.src_sites:
        block = owner.get(id(wrapped.get_submodule(site.hook_module)))
        if block is None:
            return None
        site_blocks.append((block, site.src_idxs))
    before = []
    for layer in range(n_blocks + 1):
        n = max((r.stop for b, r in site_blocks if b < layer), default=0)
        if any(r.start < n for b, r in site_blocks if b >= layer):
            return None
        before.append(n)
    return before


def _default_candidates(batches: list[_Batch]) -> int:
    one = batches[0].patch if batches[0].clean_srcs is None else batches[0].clean_srcs
    per_row = max(b.size for b in batches) * one[:, :1].numel() * one.element_size()
    return max(1, min(_MAX_K, _ROWS_BYTES // max(per_row, 1)))


# ---- setup ---------------------------------------------------------------------------


@contextmanager
def _block_inputs(model: PatchableModel) -> Iterator[dict[int, tuple[Tensor, Any]]]:
    """Record each block's input residual and attention mask during a forward."""
    recorded: dict[int, tuple[Tensor, Any]] = {}
    handles = []
    for i, block in enumerate(model.wrapped_model.blocks):  # type: ignore[arg-type]

        def hook(mod, args, kwargs, i=i) -> None:
            recorded[i] = (args[0].detach(), kwargs.get("attention_mask"))

        handles.append(block.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield recorded
    finally:
        for handle in handles:
            handle.remove()


def _prepare_batches(
    model: PatchableModel,
    dataloader,
    target: FaithfulnessTarget,
    ablation_type: AblationType,
) -> list[_Batch]:
    dataset_patch = (
        src_ablations(model, dataloader, ablation_type) if ablation_type.needs_dataloader else None
    )
    start_at_block = _srcs_before_block(model) is not None
    batches = []
    for batch in dataloader:
        patch = dataset_patch if dataset_patch is not None else None
        if patch is None:
            patch = src_ablations(model, batch.corrupt, ablation_type)
        if patch.shape[1] > 1 and patch.stride(1) == 0:
            patch = patch[:, :1]  # a mean broadcast over the batch
        size = batch.clean.shape[0]
        resid = clean_srcs = attention_mask = None
        if start_at_block:
            clean_srcs = src_outs(model, batch.clean)
            with _block_inputs(model) as recorded:
                logits = model(batch.clean)
            resid = [recorded[i][0] for i in sorted(recorded)]
            attention_mask = recorded[0][1] if recorded else None
        else:
            logits = model(batch.clean)
        out = logits[model.out_slice]
        batches.append(
            _Batch(
                batch=batch,
                size=size,
                clean=batch.clean,
                patch=patch,
                target=_target(out, batch, target),
                resid=resid,
                clean_srcs=clean_srcs,
                attention_mask=attention_mask,
            )
        )
    if not batches:
        raise CircuitError("The dataloader is empty: ACDC needs prompts.")
    return batches


def _target(out: Tensor, batch: Any, target: FaithfulnessTarget) -> Tensor:
    """What the metric compares a circuit's outputs with, for one batch."""
    # Metrics in float64: a KL near 0 computed in float32 has rounding noise of about
    # 1e-7 x |log p|, far above its true value for nearly unchanged outputs.
    if target == "kl_div":
        return out.double().log_softmax(dim=-1)
    if target == "logit_diff":
        if out.ndim != 2:
            raise CircuitError(
                "faithfulness_target='logit_diff' needs one output position per prompt "
                f"(outputs [batch, vocab]), got outputs of shape {list(out.shape)}. Build the "
                "model with patchable_model(..., slice_output='last_seq')."
            )
        return batch_answer_diffs(out.double(), batch)
    answers = batch.answers if isinstance(batch.answers, Tensor) else None
    size = out.shape[0]
    if answers is None or not answers.is_floating_point() or answers.numel() != out.numel():
        raise CircuitError(
            "faithfulness_target='mse' compares outputs with float answers of the same size: "
            f"outputs are {list(out.shape)} per batch, answers are "
            f"{list(answers.shape) if answers is not None else 'ragged'}"
            f"{'' if answers is None or answers.is_floating_point() else ' (integer)'}."
        )
    return answers.to(out.device, t.float64).reshape(size, -1)


# ---- evaluation ----------------------------------------------------------------------


@dataclass(frozen=True)
class _RepeatedAnswers:
    answers: Tensor | list[Tensor]
    wrong_answers: Tensor | list[Tensor]


def _repeat_answers(answers: Tensor | list[Tensor], n: int) -> Tensor | list[Tensor]:
    if isinstance(answers, Tensor):
        return answers.repeat(n, *([1] * (answers.ndim - 1)))
    return list(answers) * n


def _repeat_rows(x: Tensor, n: int, dim: int = 0) -> Tensor:
    """``n`` copies of ``x`` along ``dim``: row ``k * len + b`` is ``x[b]``."""
    if n == 1:
        return x
    reps = [1] * x.ndim
    reps[dim] = n
    return x.repeat(*reps)


@contextmanager
def _row_masks(model: PatchableModel, rows: dict[str, Tensor], batch_size: int) -> Iterator[None]:
    """Give the masks named in ``rows`` (``[K, numel]``: one mask per block of rows) a
    leading ``K * batch_size`` axis; the other masks stay shared. Restored on exit.

    Like ``set_mask_batch_size``, but only for the masks that differ between blocks, so
    memory does not grow with the size of the whole graph."""
    originals = {name: model.patch_masks[name] for name in rows}
    try:
        for name, flat in rows.items():
            mask = originals[name]
            n_rows = flat.shape[0]
            batched = (
                flat[:, None]
                .expand(n_rows, batch_size, flat.shape[1])
                .reshape(n_rows * batch_size, *mask.shape)
            )
            model.patch_masks[name] = t.nn.Parameter(batched, requires_grad=False)
        yield
    finally:
        model.patch_masks.update(originals)


class _Evaluator:
    """Evaluates blocks of candidate circuits on the whole dataset."""

    def __init__(
        self,
        model: PatchableModel,
        batches: list[_Batch],
        target: FaithfulnessTarget,
        n_prompts: int,
        k_max: int,
    ):
        self.model = model
        self.batches = batches
        self.target = target
        self.n_prompts = n_prompts
        self.k_max = k_max
        cached = sum(
            sum(x.numel() * x.element_size() for x in (b.patch, b.clean_srcs) if x is not None)
            + sum(x.numel() * x.element_size() for x in b.resid or [])
            for b in batches
        )
        self.cache: dict[tuple[int, str], Tensor] | None = (
            {} if cached * k_max <= _CACHE_BYTES else None
        )
        self.srcs_before = _srcs_before_block(model)
        self.dest_blocks = _dest_blocks(model)
        blocks = getattr(model.wrapped_model, "blocks", None)
        self.n_blocks = len(blocks) if isinstance(blocks, t.nn.ModuleList) else 1
        cfg = getattr(model.wrapped_model, "cfg", None)
        # The output positions can be taken before the unembedding (it acts per position)
        # unless logits are soft-capped, which this shortcut does not reproduce.
        self.slice_before_unembed = (
            self.srcs_before is not None
            and cfg is not None
            and not (getattr(cfg, "output_logits_soft_cap", -1.0) or -1.0) > 0
        )

    def rows(
        self, order: _EdgeOrder, chunk: Sequence[int], guesses: Sequence[bool]
    ) -> dict[str, Tensor]:
        """Per touched mask, ``[K, numel]``: block ``k`` = current circuit plus
        ``{c_j : j < k, guesses[j]} + {c_k}`` removed."""
        n_rows = len(chunk)
        by_module: dict[str, tuple[list[int], list[int]]] = {}
        for j, pos in enumerate(chunk):
            name = order.modules[order.module_id[pos]]
            ks, fs = by_module.setdefault(name, ([], []))
            for k in range(j, n_rows if guesses[j] else j + 1):
                ks.append(k)
                fs.append(order.local_idx[pos])
        rows = {}
        for name, (ks, fs) in by_module.items():
            base = self.model.patch_masks[name].detach().flatten()
            flat = base.expand(n_rows, base.numel()).clone()
            flat[t.tensor(ks), t.tensor(fs)] = 1.0
            rows[name] = flat
        return rows

    def start_block(self, rows: dict[str, Tensor]) -> int | None:
        """The block to start at: the lowest block holding a destination with a non-zero
        mask in any row (None: run the whole model). Everything before it is clean."""
        if self.srcs_before is None:
            return None
        blocks = [
            self.dest_blocks.get(name)
            for name, mask in self.model.patch_masks.items()
            if name in rows or bool(mask.any())
        ]
        if any(b is None for b in blocks):
            return None
        return min((b for b in blocks if b is not None), default=self.n_blocks - 1)

    def evaluate(
        self, order: _EdgeOrder, chunk: Sequence[int], guesses: Sequence[bool], state: _State
    ) -> list[float]:
        """The metric of each block of rows (one per candidate, or one for the current
        circuit when ``chunk`` is empty), averaged over every prompt."""
        model = self.model
        n_rows = max(len(chunk), 1)
        rows = self.rows(order, chunk, guesses) if chunk else {}
        start = self.start_block(rows)
        totals = t.zeros(n_rows, dtype=t.float64)
        for i, bd in enumerate(self.batches):
            patch = bd.patch
            if patch.shape[1] > 1:
                patch = self.repeated(i, "patch", patch, n_rows, 1)
            curr = None
            if start is not None and start > 0:
                # Only the sources before block ``start`` are read from here: the others
                # run in the forward, and their outputs there take precedence.
                assert bd.clean_srcs is not None
                curr = self.repeated(i, "clean_srcs", bd.clean_srcs, n_rows, 1)
            with patch_mode(model, patch, curr_src_outs=curr), _row_masks(model, rows, bd.size):
                out = self.outputs(i, bd, n_rows, start)
            totals += self.row_sums(out, bd, n_rows).to(t.float64).cpu()
            state.n_forwards += 1
            blocks_run = self.n_blocks - (start or 0)
            state.forward_equivalents += (
                n_rows * bd.size / self.n_prompts * blocks_run / self.n_blocks
            )
        state.n_rows += len(chunk)
        values = totals / self.n_prompts
        if self.target == "logit_diff":
            values = values.abs()
        return values.tolist()

    def repeated(self, i: int, kind: str, x: Tensor, n_rows: int, dim: int) -> Tensor:
        """``n_rows`` copies of batch ``i``'s tensor ``x`` along ``dim`` (a view of one
        cached ``k_max``-fold copy where memory allows)."""
        if n_rows == 1:
            return x
        if self.cache is None:
            return _repeat_rows(x, n_rows, dim)
        full = self.cache.get((i, kind))
        if full is None:
            full = self.cache[(i, kind)] = _repeat_rows(x, self.k_max, dim)
        return full.narrow(dim, 0, n_rows * x.shape[dim])

    def outputs(self, i: int, bd: _Batch, n_rows: int, start: int | None) -> Tensor:
        """The patched model's outputs at ``out_slice`` for ``n_rows`` copies of the batch."""
        model = self.model
        if start is None:
            return model(self.repeated(i, "clean", bd.clean, n_rows, 0))[model.out_slice]
        assert bd.resid is not None
        kwargs: dict[str, Any] = {"start_at_layer": start}
        if bd.attention_mask is not None:
            kwargs["attention_mask"] = _repeat_rows(bd.attention_mask, n_rows)
        resid = self.repeated(i, f"resid{start}", bd.resid[start], n_rows, 0)
        if not self.slice_before_unembed:
            return model(resid, **kwargs)[model.out_slice]
        wrapped: Any = model.wrapped_model
        resid = model(resid, stop_at_layer=self.n_blocks, **kwargs)[model.out_slice]
        if wrapped.cfg.normalization_type is not None:
            resid = wrapped.ln_final(resid)
        return wrapped.unembed(resid)

    def row_sums(self, out: Tensor, bd: _Batch, n_rows: int) -> Float[Tensor, " rows"]:
        """Per block of rows, the metric summed over the batch's prompts."""
        size = bd.size
        if self.target == "kl_div":
            logp = out.double().log_softmax(dim=-1).view(n_rows, size, *out.shape[1:])
            logq = bd.target
            kl = (logq.exp() * (logq - logp)).sum(dim=-1)  # [rows, batch, (pos)]
            return kl.reshape(n_rows, size, -1).mean(dim=-1).sum(dim=-1)
        if self.target == "mse":
            diff = out.double().reshape(n_rows, size, -1) - bd.target
            return diff.square().mean(dim=-1).sum(dim=-1)
        repeated = _RepeatedAnswers(
            _repeat_answers(bd.batch.answers, n_rows),
            _repeat_answers(bd.batch.wrong_answers, n_rows),
        )
        diffs = batch_answer_diffs(out.double(), repeated).view(n_rows, size)
        return (diffs - bd.target).sum(dim=-1)


# ---- masks, state and result ---------------------------------------------------------


def _set_mask(model: PatchableModel, order: _EdgeOrder, pos: int, value: float) -> None:
    mask = model.patch_masks[order.modules[order.module_id[pos]]]
    mask.view(-1)[order.local_idx[pos]] = value


def _save_state(path: str | Path, state: _State) -> None:
    """Write the state to a temporary file, then atomically replace ``path``."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        t.save(state.to_dict(), f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _load_state(path: str | Path, fingerprint: dict[str, Any]) -> _State:
    path = Path(path)
    if not path.exists():
        raise CircuitError(
            f"resume_from={str(path)!r} does not exist. Pass a state file written by an "
            "earlier run's state_path, or resume_from=None to start afresh."
        )
    data = t.load(path, weights_only=True)
    if not isinstance(data, dict) or data.get("version") != _STATE_VERSION:
        raise CircuitError(f"{str(path)!r} is not an ACDC state file of this version.")
    saved = data["fingerprint"]
    differs = [k for k in fingerprint if saved.get(k) != fingerprint[k]]
    if differs:
        raise CircuitError(
            f"The ACDC state in {str(path)!r} was made by a different run: it differs in "
            f"{differs}. Resume with the same model, graph, dataloader, taus, "
            "faithfulness_target and ablation_type, or start afresh (resume_from=None)."
        )
    data.pop("version")
    data.pop("last_decision", None)  # written by earlier versions, no longer used
    return _State(**data)


def _result(
    model: PatchableModel, order: _EdgeOrder, taus: list[float], state: _State
) -> AcdcResult:
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
