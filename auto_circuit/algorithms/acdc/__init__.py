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

Starting at a block. Where the model's family has a block forward
(``auto_circuit.families.block_forward``; TransformerLens models) each forward starts at
block ``l``, the lowest block holding a destination whose mask is non-zero in any block
of rows, from the clean residual stream cached at that block's input, with the
clean outputs of the sources of earlier blocks as ``curr_src_outs``. This is exact: no
destination before block ``l`` is patched, so everything computed before it (the
residual stream and every earlier source's output) equals the clean run. As edges are
visited by descending destination layer, every edge removed so far enters block ``l``
or a later one, so ``l`` is the block of the candidates being tested (chunks never mix
blocks). The logits are computed only at the task positions (the unembedding acts per
position). Other models, and models with a prompt-prefix KV cache, run the full forward.

Scores. With ``taus`` ascending, an edge's score is the largest ``tau`` whose circuit
kept it, ``+inf`` if every ``tau``'s circuit kept it, and ``0`` if none did. Larger score
= more important; when the circuits are nested (they usually are), the circuit found at
``tau`` is exactly the set of edges with ``score >= tau``.

Cost. The reference made one partial forward per edge per ``tau`` on one batch. Here
each forward tests up to ``K`` candidates on the whole dataloader; the result records
the forwards made and their cost in forward-equivalents (rows and blocks run, relative
to one full forward over the dataset).

The modules: ``config`` (``ACDCConfig``, every option), ``order`` (edge order and
destinations cut off from the output), ``blocks`` (where a forward can start),
``evaluator`` (batched candidate evaluation), ``state`` (resumable progress), ``search``
(the main loop), ``result`` (``AcdcResult``).

Axis names: ``batch`` prompts, ``seq`` positions, ``n_src`` all sources, ``d_model``,
``rows``: ``K`` blocks of the batch, one per candidate.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from pathlib import Path
from typing import Any

from auto_circuit.algorithms.acdc.config import ACDCConfig, FaithfulnessTarget, taus_from
from auto_circuit.algorithms.acdc.result import AcdcResult, AcdcStep
from auto_circuit.algorithms.acdc.search import search
from auto_circuit.engine.patchable_model import PatchableModel
from auto_circuit.vocabulary.types import AblationType, Edge, PruneScores

__all__ = [
    "ACDCConfig",
    "AcdcResult",
    "AcdcStep",
    "FaithfulnessTarget",
    "acdc_prune_scores",
    "run_acdc",
]


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
    test_mode: bool = False,
    run_circuits_ref: Callable[..., Any] | None = None,
    show_graphs: bool = False,
    draw_seq_graph_ref: Callable[..., Any] | None = None,
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
        test_mode,
        run_circuits_ref,
        show_graphs,
        draw_seq_graph_ref,
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
    test_mode: bool = False,
    run_circuits_ref: Callable[..., Any] | None = None,
    show_graphs: bool = False,
    draw_seq_graph_ref: Callable[..., Any] | None = None,
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
        test_mode: check every step: the metric of each decided circuit (and of the full
            model), computed by the fast evaluation (batched candidates, forwards
            started at a block, skipped destinations, values reused across taus), is
            recomputed with a plain TREE_PATCH ``run_circuits`` and must agree (relative
            1e-3, absolute 1e-6), else a ``CircuitError`` names the step. One plain
            evaluation per edge per tau: for debugging, not for speed.
        run_circuits_ref: the ``run_circuits`` used by ``test_mode`` (AutoCircuit passed
            it to avoid a circular import; default:
            ``auto_circuit.algorithms.prune.run_circuits``).
        show_graphs: after every removed edge, draw the current circuit (the edges still
            in, score 1) with ``draw_seq_graph_ref``; shown only inside IPython.
        draw_seq_graph_ref: the drawing function, called as ``(model, prune_scores,
            score_threshold=0.5)`` (default: ``auto_circuit.figures.draw_seq_graph``,
            imported only when ``show_graphs`` is on). AutoCircuit drew the masks,
            i.e. the removed edges; this draws the circuit.

    Returns:
        An ``AcdcResult``; its ``prune_scores`` are those of ``acdc_prune_scores``.
    """
    del official_edges
    config = ACDCConfig(
        taus=taus_from(tao_exps, tao_bases),
        faithfulness_target=faithfulness_target,
        ablation_type=ablation_type,
        candidates_per_forward=candidates_per_forward,
        resume_from=resume_from,
        state_path=state_path,
        show_progress=show_progress,
        save_every=save_every,
        test_mode=test_mode,
        run_circuits_ref=run_circuits_ref,
        show_graphs=show_graphs,
        draw_seq_graph_ref=draw_seq_graph_ref,
    )
    return search(model, dataloader, config)
