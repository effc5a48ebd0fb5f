"""A short end-to-end discovery run on models the package builds itself (no download).

    python -m auto_circuit.app.demo

1. The MicroModel (hand-computable): edge attribution by mask gradients next to the exact
   effect of patching each edge alone. The model is linear in its edges' values, so the
   two agree exactly.
2. A small randomly initialised GPT-2-style HookedTransformer on a synthetic task: the
   top edges by attribution, each with its exact effect on the logit difference.
"""

from __future__ import annotations

import time

import torch as t

from auto_circuit.algorithms.mask_gradient import mask_gradient_prune_scores
from auto_circuit.data.loaders import PromptDataLoader, PromptDataset
from auto_circuit.engine.ablation_activations import src_ablations
from auto_circuit.engine.graph_utils import patch_mode, patchable_model
from auto_circuit.engine.patchable_model import PatchableModel
from auto_circuit.families.micro import MicroModel
from auto_circuit.vocabulary.tensor_ops import batch_avg_answer_diff
from auto_circuit.vocabulary.types import Edge


def exact_effect(model: PatchableModel, loader: PromptDataLoader, edge: Edge) -> float:
    """Change in logit difference when ``edge`` alone carries its corrupt value."""
    change = 0.0
    for batch in loader:
        clean_out = model(batch.clean)[model.out_slice]
        with patch_mode(model, src_ablations(model, batch.corrupt), edges=[edge]):
            patched = model(batch.clean)[model.out_slice]
        diff = batch_avg_answer_diff(patched, batch) - batch_avg_answer_diff(clean_out, batch)
        change += float(diff.detach())
    return change


def top_edges(model: PatchableModel, scores: dict, k: int) -> list[tuple[Edge, float]]:
    ranked = sorted(
        ((edge, float(edge.prune_score(scores))) for edge in model.edges),
        key=lambda pair: (-abs(pair[1]), pair[0].name, pair[0].seq_idx or 0),
    )  # ties by name: the same table in every process (model.edges is a set)
    return ranked[:k]


def print_table(model: PatchableModel, loader: PromptDataLoader, scores: dict, k: int) -> None:
    print(f"  {'edge':<24} {'predicted':>10} {'actual':>10}   (change in logit difference)")
    for edge, score in top_edges(model, scores, k):
        # Scores are gradients of -(logit diff) at mask 0: a first-order prediction of
        # the change that patching the edge (mask 1) makes, with the sign flipped.
        print(f"  {edge.name:<24} {-score:>10.4f} {exact_effect(model, loader, edge):>10.4f}")


def micro_demo() -> None:
    print("MicroModel: 2 blocks x 2 heads, clean [1, 1] vs corrupt [-1, -1]")
    model = patchable_model(MicroModel(2), factorized=True)
    clean = t.tensor([[[1.0, 1.0]], [[2.0, 1.0]]])
    answers, wrong = t.tensor([[0], [0]]), t.tensor([[1], [1]])
    dataset = PromptDataset(clean, -clean, answers, wrong)
    loader = PromptDataLoader(dataset, seq_len=None, diverge_idx=0, batch_size=2)
    scores = mask_gradient_prune_scores(model, loader, None, "logit", "avg_diff", mask_val=0.0)
    print_table(model, loader, scores, k=model.n_edges)


def transformer_demo() -> None:
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    print("\nRandom GPT-2-style transformer: 2 layers x 4 heads, d_model 64")
    cfg = HookedTransformerConfig(
        n_layers=2, n_heads=4, d_model=64, d_head=16, d_mlp=256, n_ctx=32, d_vocab=100,
        act_fn="gelu", normalization_type="LN", seed=0,
    )  # fmt: skip
    raw = HookedTransformer(cfg)
    raw.eval()
    for param in raw.parameters():
        param.requires_grad_(False)
    gen = t.Generator().manual_seed(0)
    clean = t.randint(0, cfg.d_vocab, (32, 8), generator=gen)
    corrupt = clean.clone()
    corrupt[:, 3] = t.randint(0, cfg.d_vocab, (32,), generator=gen)  # one token differs
    with t.no_grad():
        answers = raw(clean)[:, -1].argmax(-1, keepdim=True)
        wrong = raw(corrupt)[:, -1].argmax(-1, keepdim=True)
    dataset = PromptDataset(clean, corrupt, answers, wrong)
    loader = PromptDataLoader(dataset, seq_len=None, diverge_idx=0, batch_size=16)
    model = patchable_model(raw, factorized=True, slice_output="last_seq", separate_qkv=True)
    start = time.perf_counter()
    scores = mask_gradient_prune_scores(model, loader, None, "logit", "avg_diff", mask_val=0.0)
    elapsed = time.perf_counter() - start
    print(f"  scored {model.n_edges} edges in {elapsed:.2f} s (edge attribution patching)")
    print_table(model, loader, scores, k=10)


def main() -> None:
    micro_demo()
    transformer_demo()


if __name__ == "__main__":
    main()
