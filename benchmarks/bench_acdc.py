"""Benchmark ACDC: forward-equivalents per edge tested, against a bare forward.

    python benchmarks/bench_acdc.py            # 4 layers, 4 heads, d_model 64, 16 x 10 tokens
    python benchmarks/bench_acdc.py --quick    # 2 layers, one tau: smoke test

A random HookedTransformer, 16 random prompt pairs of 10 tokens (two batches of 8, so the
whole-dataloader path is exercised), the factorized separate-QKV graph, KL to the clean
model at the last position, tau in 1e-5 ... 1e-2.

Measured, in process CPU time with one thread (on a shared machine wall time also
counts the time other processes hold the cores; wall times are printed too):

1. ``T_fwd``: the median time of one bare forward of the 16 prompts (the unwrapped
   model, in the batches of 8 that ACDC sees);
2. the fast ACDC (default candidates per forward): time ``T`` and edges tested ``E``;
3. the same with one candidate per forward (``K=1``, the reference's schedule, still
   starting at the destination's block), which must find the same circuits.

Edges tested include those decided without a forward: reused from an earlier tau, or
into a destination already cut off from the output (ACDC's module docstring).

Per edge tested: forwards of the dataset (model calls / batches), the compute counted by
ACDC (rows x blocks run, in full forwards of the dataset), and the timed
forward-equivalents ``T / E / T_fwd`` (1.0 is one bare forward of the dataset per edge,
the floor of the unbatched algorithm). Target: 1/20 or less.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings

TARGET_SPEEDUP = 20.0


def build(n_layers: int, n_heads: int, d_model: int, d_vocab: int):
    import torch as t
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=n_layers,
        n_heads=n_heads,
        d_model=d_model,
        d_head=d_model // n_heads,
        d_mlp=4 * d_model,
        d_vocab=d_vocab,
        n_ctx=64,
        act_fn="gelu",
        normalization_type="LN",
        seed=0,
    )
    model = HookedTransformer(cfg)
    gen = t.Generator().manual_seed(0)
    with t.no_grad():
        for name, param in model.named_parameters():
            scale = 1.0 if name.endswith(("W_Q", "W_K")) else 0.3
            param.copy_(t.randn(param.shape, generator=gen) * scale * (16 / d_model) ** 0.5)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description="Benchmark ACDC against a bare forward.")
    parser.add_argument("--quick", action="store_true", help="2-layer model, one tau")
    parser.add_argument("--k", type=int, default=None, help="candidates per forward")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    import torch as t

    t.set_num_threads(args.threads)

    from auto_circuit.algorithms.acdc import run_acdc
    from auto_circuit.data.loaders import PromptDataLoader, PromptDataset
    from auto_circuit.engine.graph_utils import patchable_model

    n_layers = 2 if args.quick else 4
    n_prompts, seq, batch_size, d_vocab = 16, 10, 8, 500
    tao_exps = [-3] if args.quick else list(range(-5, -1))
    model = build(n_layers, 4, 64, d_vocab)
    bare = copy.deepcopy(model)
    gen = t.Generator().manual_seed(1)
    clean = t.randint(0, d_vocab, (n_prompts, seq), generator=gen)
    corrupt = t.randint(0, d_vocab, (n_prompts, seq), generator=gen)
    answers = t.randint(0, d_vocab, (n_prompts, 1), generator=gen)
    dataset = PromptDataset(clean, corrupt, answers, (answers + 1) % d_vocab)
    loader = PromptDataLoader(dataset, seq_len=None, diverge_idx=0, batch_size=batch_size)
    pm = patchable_model(model, factorized=True, slice_output="last_seq", separate_qkv=True)

    with t.no_grad():
        for _ in range(5):
            for x in clean.split(batch_size):
                bare(x)
        cpu_times, wall_times = [], []
        for _ in range(30):
            cpu, wall = time.process_time(), time.perf_counter()
            for x in clean.split(batch_size):
                bare(x)
            cpu_times.append(time.process_time() - cpu)
            wall_times.append(time.perf_counter() - wall)
    t_fwd = statistics.median(cpu_times)

    def timed(k: int | None):
        cpu, wall = time.process_time(), time.perf_counter()
        result = run_acdc(
            pm, loader, tao_exps=tao_exps, candidates_per_forward=k, show_progress=False
        )
        return result, time.process_time() - cpu, time.perf_counter() - wall

    fast, cpu_fast, wall_fast = timed(args.k)
    one, cpu_one, wall_one = timed(1)

    print(
        f"model: {n_layers} layers x 4 heads, d_model 64, vocab {d_vocab}; {n_prompts} prompts "
        f"x {seq} tokens in batches of {batch_size}; {pm.n_edges} edges; taus {fast.taus}; "
        f"torch threads {t.get_num_threads()}"
    )
    print(
        f"bare forward of the dataset: {t_fwd * 1e3:.2f} ms CPU "
        f"({statistics.median(wall_times) * 1e3:.2f} ms wall)"
    )
    timed_per_edge = []
    for name, result, cpu, wall in (
        ("fast", fast, cpu_fast, wall_fast),
        ("K=1", one, cpu_one, wall_one),
    ):
        per_edge = cpu / result.n_edges_tested / t_fwd
        timed_per_edge.append(per_edge)
        dataset_forwards = result.n_forwards / len(loader) / result.n_edges_tested
        print(
            f"{name:>4}: {cpu:6.2f} s CPU ({wall:.2f} s wall); {result.n_edges_tested} edges "
            f"tested ({result.n_reused} reused from an earlier tau, {result.n_skipped} into "
            f"destinations cut off from the output); {result.n_evaluations} "
            f"evaluations = {result.n_forwards} forwards of a batch, {result.n_rows} candidate "
            f"rows. Per edge: {dataset_forwards:.4f} forwards of the dataset, "
            f"{result.forward_equivalents_per_edge:.3f} forward-equivalents counted, "
            f"{per_edge:.3f} timed"
        )
    sizes = [int(sum(k.sum() for k in kept.values())) for kept in fast.kept]
    print(f"circuit sizes per tau: {sizes}")
    same = all(
        all(t.equal(a[name], b[name]) for name in a)
        for a, b in zip(fast.kept, one.kept, strict=True)
    )
    print(f"fast == K=1 circuits: {same}")
    calls = fast.n_forwards / len(loader) / fast.n_edges_tested
    print(
        f"fast: {1 / calls:.0f}x fewer forwards than one per edge; {1 / timed_per_edge[0]:.1f}x "
        f"less CPU time than one bare forward per edge (target >= {TARGET_SPEEDUP:.0f}x); "
        f"{cpu_one / cpu_fast:.1f}x less CPU time than K=1"
    )
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
