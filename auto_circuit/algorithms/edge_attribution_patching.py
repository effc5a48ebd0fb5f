"""Edge attribution patching from activation gradients (Syed, Rager and Conmy 2023).

The textbook formulation, written independently of the patching engine to validate the
mask-gradient version (``mask_gradient_prune_scores``): cache every source's output on
the clean and corrupt prompts, take the gradient of the metric at every destination's
input on the clean run, and score edge ``src -> dest`` by

    sum over batch and positions of  grad_dest . (corrupt_src - clean_src).

It runs TransformerLens with its per-head hook flags on (``use_attn_result``,
``use_split_qkv_input`` or ``use_attn_in``, ``use_hook_mlp_in``), which materialise
per-head copies: slower and heavier than the mask-gradient version, which it equals.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch as t
from torch import Tensor

from auto_circuit.algorithms.mask_gradient import (
    AnswerFunction,
    GradFunction,
    answer_metric,
    apply_grad_function,
)
from auto_circuit.engine.patchable_model import PatchableModel
from auto_circuit.vocabulary.errors import CircuitError
from auto_circuit.vocabulary.types import PruneScores

_FLAGS = ("use_attn_result", "use_split_qkv_input", "use_attn_in", "use_hook_mlp_in")


@contextmanager
def tl_hook_flags(model: Any, separate_qkv: bool | None) -> Iterator[None]:
    """Turn on the TransformerLens hooks whose names the graph's nodes use; restore after."""
    saved = {flag: getattr(model.cfg, flag) for flag in _FLAGS}
    try:
        model.cfg.use_attn_result = True
        model.cfg.use_split_qkv_input = bool(separate_qkv)
        model.cfg.use_attn_in = separate_qkv is False
        model.cfg.use_hook_mlp_in = not model.cfg.attn_only
        yield
    finally:
        for flag, value in saved.items():
            setattr(model.cfg, flag, value)


def _answer_function(
    answer_function: AnswerFunction | None, answer_diff: bool | None
) -> AnswerFunction:
    """Our ``answer_function`` or AutoCircuit's ``answer_diff`` flag: one of them."""
    if answer_diff is None:
        return "avg_diff" if answer_function is None else answer_function
    if answer_function is not None:
        raise CircuitError(
            f"Give answer_function ({answer_function!r}) or AutoCircuit's answer_diff "
            f"({answer_diff!r}), not both: answer_diff=True is answer_function='avg_diff', "
            "answer_diff=False is answer_function='avg_val'."
        )
    if not isinstance(answer_diff, bool):
        raise CircuitError(f"answer_diff must be True or False, got {answer_diff!r}.")
    return "avg_diff" if answer_diff else "avg_val"


def _stacked_src_outs(model: PatchableModel, cache: dict[str, Tensor]) -> Tensor:
    """Every source's output from a hook cache, ``[n_src, batch, seq, d_model]``."""
    return t.stack(
        [
            cache[src.module_name]
            if src.head_idx is None
            else cache[src.module_name][:, :, src.head_idx]
            for src in model.sorted_srcs
        ]
    )


def edge_attribution_patching_prune_scores(
    model: PatchableModel,
    dataloader,
    official_edges=None,
    grad_function: GradFunction = "logit",
    answer_function: AnswerFunction | None = None,
    input_interpolation_steps: int | None = None,
    answer_diff: bool | None = None,
) -> PruneScores:
    """Edge attribution patching scores from activation gradients (TransformerLens only).

    Returns scores shaped like the masks: the sum over batches of
    ``grad(-metric)_dest . (corrupt_src - clean_src)``; larger absolute score = more
    important. Equal to ``mask_gradient_prune_scores(..., mask_val=0.0)`` with
    RESAMPLE ablation of the corrupt prompts. With ``input_interpolation_steps=m`` the
    gradient is averaged over runs from the embeddings ``corrupt + k/m (clean -
    corrupt)``, k = 1..m: EAP-IG with input interpolation (Hanna et al. 2024).

    ``answer_function`` (default ``"avg_diff"``) is the metric: ``"avg_diff"`` the mean
    answer minus wrong-answer value, ``"avg_val"`` the mean answer value, ``"mse"``.
    ``answer_diff`` is AutoCircuit's name for the choice between the first two (True:
    ``"avg_diff"``, False: ``"avg_val"``); give one of the two, not both.
    """
    answer_function = _answer_function(answer_function, answer_diff)
    # The unwrapped model with its own hooks: this oracle is independent of the engine.
    inner: Any = model.wrapped_model
    if not model.is_transformer or not hasattr(inner, "hooks"):
        raise CircuitError(
            "edge_attribution_patching_prune_scores needs a TransformerLens model; use "
            "mask_gradient_prune_scores (same scores) for other models."
        )
    input_hook = model.block_forward(
        "edge_attribution_patching_prune_scores (the input residual's hook point)"
    ).input_hook
    steps = input_interpolation_steps
    alphas = [1.0] if steps is None else [k / steps for k in range(1, steps + 1)]
    src_names = sorted({s.module_name for s in model.srcs} | {input_hook})
    dest_names = sorted(model.patch_masks)
    scores = model.new_prune_scores()
    with tl_hook_flags(inner, model.separate_qkv):
        for batch in dataloader:
            with t.no_grad():
                _, corrupt_cache = inner.run_with_cache(batch.corrupt, names_filter=src_names)
                _, clean_cache = inner.run_with_cache(batch.clean, names_filter=src_names)
            grads: dict[str, Tensor] = {}

            def save_grad(grad: Tensor, hook: Any, grads: dict[str, Tensor] = grads) -> None:
                grads[hook.name] = grads.get(hook.name, 0) + grad.detach() / len(alphas)

            for alpha in alphas:

                def interpolated_input(
                    x: Tensor, hook: Any, alpha: float = alpha, ends=(corrupt_cache, clean_cache)
                ) -> Tensor:
                    start = ends[0][hook.name]
                    point = start + alpha * (ends[1][hook.name] - start)
                    return point.detach().requires_grad_(True)

                fwd = [(input_hook, interpolated_input)]
                bwd = [(name, save_grad) for name in dest_names]
                with inner.hooks(fwd_hooks=fwd, bwd_hooks=bwd):
                    logits = inner(batch.clean)[model.out_slice]
                    vals = apply_grad_function(logits, grad_function)
                    (-answer_metric(vals, batch, answer_function)).backward()
            src_diff = _stacked_src_outs(model, corrupt_cache) - _stacked_src_outs(
                model, clean_cache
            )
            for name in dest_names:
                site = model.mask_site(name)
                diff = src_diff[site.in_srcs.start : site.in_srcs.stop]
                heads = "h" if site.n_heads is not None else ""
                seq = "s" if model.seq_len is not None else ""
                equation = f"bs{heads}d,nbsd->{seq}{heads}n"
                scores[name] += t.einsum(equation, grads[name], diff)
    return scores
