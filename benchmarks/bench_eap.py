"""Mask-gradient edge attribution patching vs the bare model, on a GPT-2-small shape.

Floor: the bare model's corrupt forward plus clean forward+backward (activations kept
through a gradient at the embeddings), the work plain EAP needs. Measured as CPU time
with one intra-op thread (robust to other load on a shared machine), median of repeats.

    python benchmarks/bench_eap.py [--quick]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch as t
from transformer_lens import HookedTransformer, HookedTransformerConfig

from auto_circuit.algorithms.mask_gradient import mask_gradient_prune_scores
from auto_circuit.data.loaders import PromptDataLoader, PromptDataset
from auto_circuit.engine.graph_utils import patchable_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="a 2-layer model (smoke test)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    t.set_num_threads(1)
    t.manual_seed(0)
    shape = (2, 4, 64, 16, 256, 1000) if args.quick else (12, 12, 768, 64, 3072, 50257)
    n_layers, n_heads, d_model, d_head, d_mlp, d_vocab = shape
    cfg = HookedTransformerConfig(
        n_layers=n_layers, n_heads=n_heads, d_model=d_model, d_head=d_head, d_mlp=d_mlp,
        d_vocab=d_vocab, n_ctx=64, act_fn="gelu_new", normalization_type="LN",
    )  # fmt: skip
    bare = HookedTransformer(cfg)
    bare.eval()
    for param in bare.parameters():
        param.requires_grad_(False)
    n, seq, batch = 32, 15, 16
    clean, corrupt = t.randint(0, d_vocab, (n, seq)), t.randint(0, d_vocab, (n, seq))
    answers, wrong = t.randint(0, d_vocab, (n, 1)), t.randint(0, d_vocab, (n, 1))
    loader = PromptDataLoader(
        PromptDataset(clean, corrupt, answers, wrong), None, 0, batch_size=batch
    )

    def bare_eap_floor() -> None:
        for b in loader:
            with t.no_grad():
                bare(b.corrupt)

            def keep(x: t.Tensor, hook) -> t.Tensor:
                return x.detach().requires_grad_(True)

            with bare.hooks(fwd_hooks=[("hook_embed", keep)]):
                logits = bare(b.clean)[:, -1]
                (logits.gather(1, b.answers) - logits.gather(1, b.wrong_answers)).mean().backward()

    model = patchable_model(copy.deepcopy(bare), True, slice_output="last_seq", separate_qkv=True)

    def eap() -> None:
        mask_gradient_prune_scores(model, loader, None, "logit", "avg_diff", mask_val=0.0)

    def cpu_time(fn) -> float:
        fn()  # warm-up
        times = []
        for _ in range(args.repeats):
            start = time.process_time()
            fn()
            times.append(time.process_time() - start)
        return statistics.median(times)

    floor, ours = cpu_time(bare_eap_floor), cpu_time(eap)
    ratio = ours / floor
    print(f"model {shape}, {n} prompts x {seq} tokens, batch {batch}, 1 thread, CPU time")
    print(f"bare corrupt fwd + clean fwd+bwd: {floor:.3f} s")
    print(f"mask-gradient EAP ({model.n_edges} edges): {ours:.3f} s")
    print(f"ratio {ratio:.2f}x (target <= 1.5x): {'PASS' if ratio <= 1.5 else 'FAIL'}")


if __name__ == "__main__":
    main()
