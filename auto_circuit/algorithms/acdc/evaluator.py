"""Batched, exact evaluation of ACDC's candidate circuits on the whole dataset.

One forward evaluates ``K`` candidates: the batch holds ``K`` blocks of the ``B``
prompts, and block ``k`` of rows has its own masks. Where the family has a block forward
(``blocks``), each forward starts at the lowest block holding a destination whose mask
is non-zero in any block of rows, from the clean residual cached at that block's input,
and the logits are computed only at the task positions.

Axis names: ``batch`` prompts, ``seq`` positions, ``n_src`` all sources, ``d_model``,
``rows``: ``K`` blocks of the batch, one per candidate.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch as t
from jaxtyping import Float
from torch import Tensor

from auto_circuit.algorithms.acdc.blocks import block_forward, dest_blocks, srcs_before_block
from auto_circuit.algorithms.acdc.config import FaithfulnessTarget
from auto_circuit.algorithms.acdc.order import EdgeOrder
from auto_circuit.algorithms.acdc.state import State
from auto_circuit.engine.ablation_activations import src_ablations, src_outs
from auto_circuit.engine.graph_utils import patch_mode
from auto_circuit.engine.patchable_model import PatchableModel
from auto_circuit.vocabulary.errors import CircuitError
from auto_circuit.vocabulary.tensor_ops import batch_answer_diffs
from auto_circuit.vocabulary.types import AblationType

# Default K: the most rows (at most MAX_K) for which one [n_src, rows, seq, d_model]
# tensor (the patch values, say) fits in ROWS_BYTES.
ROWS_BYTES = 2**29
MAX_K = 128
# Inputs repeated K times are kept between forwards when they all fit in this.
CACHE_BYTES = 2**30


@dataclass
class Batch:
    """What one batch of prompts needs for every evaluation (computed once)."""

    batch: Any
    size: int
    clean: Tensor
    patch: Float[Tensor, "n_src batch_or_1 seq d_model"]
    target: Tensor  # kl_div: clean log-probs; mse: answers [batch, n]; logit_diff: [batch]
    resid: list[Tensor] | None = None  # clean input of every block
    clean_srcs: Float[Tensor, "n_src batch seq d_model"] | None = None
    attention_mask: Tensor | None = None


def prepare_batches(
    model: PatchableModel,
    dataloader,
    target: FaithfulnessTarget,
    ablation_type: AblationType,
) -> list[Batch]:
    """Per batch: the ablations, the metric's target and (for block starts) the clean
    input of every block and the clean source outputs. Masks must all be 0."""
    dataset_patch = (
        src_ablations(model, dataloader, ablation_type) if ablation_type.needs_dataloader else None
    )
    forward = block_forward(model) if srcs_before_block(model) is not None else None
    batches = []
    for batch in dataloader:
        patch = dataset_patch if dataset_patch is not None else None
        if patch is None:
            patch = src_ablations(model, batch.corrupt, ablation_type)
        if patch.shape[1] > 1 and patch.stride(1) == 0:
            patch = patch[:, :1]  # a mean broadcast over the batch
        size = batch.clean.shape[0]
        resid = clean_srcs = attention_mask = None
        if forward is not None:
            clean_srcs = src_outs(model, batch.clean)
            with forward.recording_block_inputs() as recorded:
                logits = model(batch.clean)
            resid = [recorded[i].resid for i in sorted(recorded)]
            attention_mask = recorded[0].attention_mask if recorded else None
        else:
            logits = model(batch.clean)
        out = logits[model.out_slice]
        batches.append(
            Batch(
                batch=batch,
                size=size,
                clean=batch.clean,
                patch=patch,
                target=metric_target(out, batch, target),
                resid=resid,
                clean_srcs=clean_srcs,
                attention_mask=attention_mask,
            )
        )
    if not batches:
        raise CircuitError("The dataloader is empty: ACDC needs prompts.")
    return batches


def metric_target(out: Tensor, batch: Any, target: FaithfulnessTarget) -> Tensor:
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


def default_candidates(batches: list[Batch]) -> int:
    """The default ``K`` (see ``ROWS_BYTES``)."""
    one = batches[0].patch if batches[0].clean_srcs is None else batches[0].clean_srcs
    per_row = max(b.size for b in batches) * one[:, :1].numel() * one.element_size()
    return max(1, min(MAX_K, ROWS_BYTES // max(per_row, 1)))


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


class Evaluator:
    """Evaluates blocks of candidate circuits on the whole dataset."""

    def __init__(
        self,
        model: PatchableModel,
        batches: list[Batch],
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
            {} if cached * k_max <= CACHE_BYTES else None
        )
        self.srcs_before = srcs_before_block(model)
        self.dest_blocks = dest_blocks(model)
        self.forward = block_forward(model) if self.srcs_before is not None else None
        self.n_blocks = self.forward.n_blocks if self.forward is not None else 1
        # The output positions can be taken before the unembedding where it acts per
        # position (not with soft-capped logits).
        self.slice_before_unembed = self.forward is not None and self.forward.unembeds_per_position

    def rows(
        self, order: EdgeOrder, chunk: Sequence[int], guesses: Sequence[bool]
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
        self, order: EdgeOrder, chunk: Sequence[int], guesses: Sequence[bool], state: State
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

    def outputs(self, i: int, bd: Batch, n_rows: int, start: int | None) -> Tensor:
        """The patched model's outputs at ``out_slice`` for ``n_rows`` copies of the batch."""
        model = self.model
        if start is None:
            return model(self.repeated(i, "clean", bd.clean, n_rows, 0))[model.out_slice]
        assert bd.resid is not None and self.forward is not None
        attention_mask = None
        if bd.attention_mask is not None:
            attention_mask = _repeat_rows(bd.attention_mask, n_rows)
        resid = self.repeated(i, f"resid{start}", bd.resid[start], n_rows, 0)
        if not self.slice_before_unembed:
            return self.forward.run_from_block(resid, start, attention_mask)[model.out_slice]
        final = self.forward.run_from_block(resid, start, attention_mask, stop_before_unembed=True)[
            model.out_slice
        ]
        return self.forward.unembed(final)

    def row_sums(self, out: Tensor, bd: Batch, n_rows: int) -> Float[Tensor, " rows"]:
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
