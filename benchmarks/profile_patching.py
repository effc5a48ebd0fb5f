"""Where the patched forward/backward spends its time and memory.

    python benchmarks/profile_patching.py            # GPT-2-small shape, factorized graph
    python benchmarks/profile_patching.py --seq-len 15   # per-position graph
    python benchmarks/profile_patching.py --quick

Same model, prompts and masks as ``bench_patching.py`` (one batch of 16). Prints
torch.profiler tables (ops by self CPU time; forward+backward also by self CPU memory)
for the bare and the patched passes, and cProfile's top Python functions.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import os
import pstats
import sys
import warnings


def saved_tensor_report(fn, rows: int, preexisting: set[int]) -> None:
    """Group the tensors autograd keeps for backward by the op that made them and the
    library line that ran it (each storage counted once)."""
    import traceback

    import torch as t

    seen: dict[tuple[int, int], tuple[str, str]] = {}
    roots = ("auto_circuit", "transformer_lens")

    def pack(x: t.Tensor) -> t.Tensor:
        storage = x.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key not in seen and key[0] not in preexisting:
            where = "?"
            for frame in reversed(traceback.extract_stack()[:-1]):
                if any(r in frame.filename for r in roots):
                    short = frame.filename.split("site-packages/")[-1].split("/work/main/")[-1]
                    where = f"{short}:{frame.lineno} {frame.name}"
                    break
            op = type(x.grad_fn).__name__ if x.grad_fn is not None else "leaf/no-grad"
            seen[key] = (where, f"{op} {list(x.shape)}")
        return x

    with t.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        fn()
    by_site: dict[tuple[str, str], list[int]] = {}
    for (_, nbytes), site in seen.items():
        by_site.setdefault(site, []).append(nbytes)
    total = sum(k[1] for k in seen)
    print(f"   {len(seen)} storages, {total / 2**20:.1f} MiB kept for backward (not counting")
    print("   parameters, masks and P, alive before). Largest groups:")
    print(f"   {'MiB':>8} {'count':>5}  where (made by op [shape])")
    ranked = sorted(by_site.items(), key=lambda kv: -sum(kv[1]))
    for (where, what), sizes in ranked[:rows]:
        print(f"   {sum(sizes) / 2**20:8.1f} {len(sizes):5d}  {where}  ({what})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--rows", type=int, default=14)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument(
        "--sections",
        default="ops,saved,python",
        help="comma-separated: ops (torch.profiler), saved (saved tensors), python (cProfile)",
    )
    args = p.parse_args()

    import bench_patching as B
    import torch as t
    from torch.profiler import ProfilerActivity, profile

    from auto_circuit.engine.ablation_activations import src_ablations
    from auto_circuit.engine.graph_utils import patch_mode, train_mask_mode

    if args.threads:
        t.set_num_threads(args.threads)
    shape = B.QUICK if args.quick else B.FULL
    bare = B.build_model(shape)
    clean, corrupt = B.make_prompts(shape)
    x = clean[0]
    pm = B.wrap(copy.deepcopy(bare), args.seq_len)
    P = src_ablations(pm, corrupt[0])
    masks = B.random_masks(pm, seed=2)

    def bare_fwd() -> None:
        with t.no_grad():
            bare(x)

    def bare_fwd_bwd() -> None:
        h = bare.hook_embed.register_forward_hook(lambda m, a, o: o.detach().requires_grad_(True))
        try:
            bare(x)[:, -1, B.TOKEN].mean().backward()
        finally:
            h.remove()

    def fwd() -> None:
        B.load_masks(pm, masks)
        with t.no_grad(), patch_mode(pm, P):
            pm(x)

    def fwd_bwd() -> None:
        B.load_masks(pm, masks)
        with train_mask_mode(pm), patch_mode(pm, P):
            pm(x)[:, -1, B.TOKEN].mean().backward()

    graph = f"seq_len={args.seq_len}"
    sections = set(args.sections.split(","))
    preexisting = {
        x.untyped_storage().data_ptr()
        for x in [*bare.parameters(), *pm.parameters(), *pm.patch_masks.values(), P]
    }
    for name, fn, memory in (
        ()
        if "ops" not in sections
        else (
            ("bare forward", bare_fwd, False),
            (f"patched forward, random masks ({graph})", fwd, False),
            ("bare forward+backward", bare_fwd_bwd, True),
            (f"patched forward+backward, random masks ({graph})", fwd_bwd, True),
        )
    ):
        fn()  # warm-up
        with profile(activities=[ProfilerActivity.CPU], profile_memory=memory) as prof:
            fn()
        avg = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in avg) / 1e6
        print(f"\n== torch.profiler: {name}: {total:.3f} s self CPU total; top ops by time ==")
        print(avg.table(sort_by="self_cpu_time_total", row_limit=args.rows))
        if memory:
            print(f"== {name}: top ops by self CPU memory (allocated - freed) ==")
            print(avg.table(sort_by="self_cpu_memory_usage", row_limit=args.rows))

    for name, fn in (("bare", bare_fwd_bwd), (f"patched ({graph})", fwd_bwd)):
        if "saved" in sections:
            print(f"\n== saved tensors of one forward+backward: {name} ==")
            saved_tensor_report(fn, args.rows, preexisting)

    for name, fn in (("patched forward", fwd), ("patched forward+backward", fwd_bwd)):
        if "python" not in sections:
            break
        prof_py = cProfile.Profile()
        prof_py.enable()
        fn()
        prof_py.disable()
        print(f"\n== cProfile: {name} ({graph}), top functions by cumulative time ==")
        pstats.Stats(prof_py).sort_stats("cumulative").print_stats(22)


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
