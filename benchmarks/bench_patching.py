"""Benchmark edge patching against the bare model it wraps.

    python benchmarks/bench_patching.py            # GPT-2-small shape, ~2-3 min on 2 cores
    python benchmarks/bench_patching.py --quick    # 2-layer toy model, smoke test
    python benchmarks/bench_patching.py --profile  # also profile the patched forward/backward

A randomly initialised GPT-2-small-shaped HookedTransformer, 64 random prompt pairs of
15 tokens in batches of 16. Every quantity is compared with a floor measured in the
same run on the bare (never wrapped) model:

1. forward time (no_grad) with all masks zero and with random masks, vs a bare forward;
2. peak memory of forward+backward through the masks, vs a bare forward+backward;
3. time of ``patchable_model`` (per-position and factorized graphs) and of ``pm.edges``.

See ``benchmarks/README.md`` for the method.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass

# Workers are started before torch is imported, so that they import in parallel.
SEQ = 15
N_PROMPTS = 64
BATCH = 16
TOKEN = 42  # the answer token whose logit/log-prob the backward benchmarks use
FWD_TARGET = 1.3
MEM_TARGET = 2.0
BUILD_TARGET_S = 0.2
FULL_EDGES_PER_POS = 487_365
FULL_EDGES_FACT = 32_491


@dataclass(frozen=True)
class Shape:
    n_layers: int
    n_heads: int
    d_model: int
    d_head: int
    d_mlp: int
    d_vocab: int


FULL = Shape(12, 12, 768, 64, 3072, 50257)
QUICK = Shape(2, 4, 64, 16, 256, 5000)


def expected_edges(s: Shape, seq_len: int | None) -> int:
    """Edges of the factorized, separate-QKV graph of a sequential GPT-2-style model."""
    total = 0
    for layer in range(s.n_layers):
        n_before = 1 + layer * (s.n_heads + 1)  # Resid Start + heads and MLPs below
        total += 3 * s.n_heads * n_before + (n_before + s.n_heads)  # Q/K/V heads + MLP
    total += 1 + s.n_layers * (s.n_heads + 1)  # Resid End
    return total * (seq_len or 1)


# ---------------------------------------------------------------------------------
# building blocks (import torch lazily: workers are launched before the import)


def build_model(s: Shape):
    import torch as t
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=s.n_layers,
        n_heads=s.n_heads,
        d_model=s.d_model,
        d_head=s.d_head,
        d_mlp=s.d_mlp,
        d_vocab=s.d_vocab,
        n_ctx=1024,
        act_fn="gelu_new",
        normalization_type="LN",
        seed=0,
    )
    t.manual_seed(0)
    model = HookedTransformer(cfg)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def make_prompts(s: Shape):
    import torch as t

    g = t.Generator().manual_seed(1)
    clean = t.randint(0, s.d_vocab, (N_PROMPTS, SEQ), generator=g)
    corrupt = t.randint(0, s.d_vocab, (N_PROMPTS, SEQ), generator=g)
    return list(clean.split(BATCH)), list(corrupt.split(BATCH))


def wrap(model, seq_len: int | None):
    from auto_circuit.utils.graph_utils import patchable_model

    return patchable_model(
        model, factorized=True, separate_qkv=True, seq_len=seq_len, slice_output="last_seq"
    )


def random_masks(pm, seed: int) -> dict:
    import torch as t

    g = t.Generator().manual_seed(seed)
    return {k: t.rand(m.shape, generator=g) for k, m in sorted(pm.patch_masks.items())}


def load_masks(pm, values: dict | float) -> None:
    import torch as t

    with t.no_grad():
        for k, m in pm.patch_masks.items():
            if isinstance(values, dict):
                m.copy_(values[k])
            else:
                m.fill_(values)


# ---------------------------------------------------------------------------------
# 2. memory worker: one fresh process per measurement


def mem_step_bare(model, clean):
    import torch as t

    handle = model.hook_embed.register_forward_hook(
        lambda mod, args, out: out.detach().requires_grad_(True)
    )
    try:
        logits = model(clean)
        loss = logits[:, -1, TOKEN].mean()
        loss.backward()
    finally:
        handle.remove()
    del logits, loss
    assert not t.is_grad_enabled() or True


def mem_step_patched(pm, clean, P):
    from auto_circuit.utils.graph_utils import patch_mode, train_mask_mode

    with train_mask_mode(pm), patch_mode(pm, P):
        logits = pm(clean)
        loss = logits[:, -1, TOKEN].mean()
        loss.backward()
    del logits, loss


def mem_worker(kind: str, shape: Shape, seq_len: int | None) -> dict:
    """Peak RSS growth of one forward+backward, in this fresh process."""
    import torch as t

    import _measure as M

    model = build_model(shape)
    clean, corrupt = make_prompts(shape)
    out: dict = {"kind": kind, "seq_len": seq_len, "threads": t.get_num_threads()}
    if kind == "bare":

        def step() -> None:
            mem_step_bare(model, clean[0])
    else:
        from auto_circuit.utils.ablation_activations import src_ablations

        pm = wrap(model, seq_len)
        P = src_ablations(pm, corrupt[0])
        out["P_bytes"] = P.numel() * P.element_size()
        load_masks(pm, random_masks(pm, seed=2))
        mask_bytes = sum(m.numel() * m.element_size() for m in pm.patch_masks.values())
        out["mask_grad_bytes"] = mask_bytes

        def step() -> None:
            mem_step_patched(pm, clean[0], P)

    # Warm-up: one-time allocations (thread pools, oneDNN/allocator caches) are not
    # part of a step's peak. Then release the warm-up's freed heap so that the RSS
    # before the step is only what is live.
    step()
    for m in getattr(locals().get("pm"), "patch_masks", {}).values():
        m.grad = None
    M.trim_heap()
    out["rss_before"] = M.rss_bytes()
    out["maxrss_before_reset"] = M.maxrss_bytes()
    out["peak_reset"] = M.reset_peak()
    with M.Timer() as tm:
        step()
    out["hwm_after"] = M.hwm_bytes()
    out["maxrss_after"] = M.maxrss_bytes()
    out["rss_after"] = M.rss_bytes()
    out["wall"], out["user"], out["sys"] = tm.wall, tm.user, tm.sys
    # growth of the peak over the RSS just before the step
    out["growth"] = out["maxrss_after"] - out["rss_before"]
    out["growth_hwm"] = out["hwm_after"] - out["rss_before"]
    return out


def launch_mem_workers(quick: bool) -> list[tuple[str, int | None, subprocess.Popen]]:
    jobs: list[tuple[str, int | None]] = [("bare", None), ("patched", None), ("patched", SEQ)]
    procs = []
    for kind, seq_len in jobs:
        cmd = [sys.executable, os.path.abspath(__file__), "--mem-worker", kind]
        if seq_len is not None:
            cmd += ["--seq-len", str(seq_len)]
        if quick:
            cmd.append("--quick")
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append((kind, seq_len, p))
    return procs


def collect_mem_workers(procs) -> dict[tuple[str, int | None], dict]:
    results = {}
    for kind, seq_len, p in procs:
        stdout, stderr = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"memory worker {kind}/{seq_len} failed:\n{stderr[-4000:]}")
        results[(kind, seq_len)] = json.loads(stdout.strip().splitlines()[-1])
    return results


# ---------------------------------------------------------------------------------
# main benchmark


def bench_construction(base, shape: Shape, repeats: int):
    """Time ``patchable_model`` on fresh copies of ``base``; then ``pm.edges``."""
    import gc

    import _measure as M

    rows = {}
    for seq_len in (SEQ, None):
        times = []
        pm = None
        for _ in range(repeats):
            model = copy.deepcopy(base)
            del pm
            gc.collect()
            t0 = time.perf_counter()
            pm = wrap(model, seq_len)
            times.append(time.perf_counter() - t0)
        assert pm is not None
        with M.Timer() as tm:
            n = len(pm.edges)
        rows[seq_len] = {
            "times": times,
            "n_edges": pm.n_edges,
            "n_edges_objects": n,
            "expected": expected_edges(shape, seq_len),
            "edges_wall": tm.wall,
        }
        del pm, model
        gc.collect()
    return rows


def sanity_checks(bare, pm, clean, corrupt, P) -> dict[str, float]:
    """Zero masks give the bare logits; all-ones masks give the corrupt run's logits."""
    import torch as t

    from auto_circuit.utils.graph_utils import patch_mode, set_all_masks

    with t.no_grad():
        ref_clean, ref_corrupt = bare(clean), bare(corrupt)
        set_all_masks(pm, 0.0)
        with patch_mode(pm, P):
            zero = pm(clean)
        set_all_masks(pm, 1.0)
        with patch_mode(pm, P):
            ones = pm(clean)
        set_all_masks(pm, 0.0)
    return {
        "zero masks vs bare": (zero - ref_clean).abs().max().item(),
        "all-ones masks vs bare(corrupt)": (ones - ref_corrupt).abs().max().item(),
    }


def bench_forward(bare, pms, clean, Ps, rounds: int):
    """Interleaved repeats: bare, then each patched variant, on each batch in turn."""
    import torch as t

    import _measure as M
    from auto_circuit.utils.graph_utils import patch_mode

    def run_bare(b: int) -> M.Timer:
        with t.no_grad(), M.Timer() as tm:
            bare(clean[b])
        return tm

    def run_patched(pm, P, masks) -> object:
        def run(b: int) -> M.Timer:
            load_masks(pm, masks)
            with t.no_grad(), patch_mode(pm, P[b]):
                with M.Timer() as tm:
                    pm(clean[b])
            return tm

        return run

    variants = {"bare": run_bare}
    for label, (pm, P, masks) in pms.items():
        variants[label] = run_patched(pm, P, masks)
    samples = {k: M.Samples() for k in variants}
    for fn in variants.values():  # warm-up
        fn(0)
    for _ in range(rounds):
        for b in range(len(clean)):
            for k, fn in variants.items():
                tm = fn(b)
                samples[k].add(tm.wall, tm.user, tm.sys)
    return samples


def profile_patched(pm, clean, P, masks, bare) -> None:
    """torch.profiler (ops) and cProfile (Python functions) of the patched passes."""
    import cProfile
    import pstats

    import torch as t
    from torch.profiler import ProfilerActivity, profile

    from auto_circuit.utils.graph_utils import patch_mode, train_mask_mode

    def fwd() -> None:
        load_masks(pm, masks)
        with t.no_grad(), patch_mode(pm, P):
            pm(clean)

    def fwd_bwd() -> None:
        load_masks(pm, masks)
        with train_mask_mode(pm), patch_mode(pm, P):
            pm(clean)[:, -1, TOKEN].mean().backward()

    def bare_fwd() -> None:
        with t.no_grad():
            bare(clean)

    for name, fn in (("bare forward", bare_fwd), ("patched forward (random masks)", fwd)):
        fn()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        print(f"\n== torch.profiler: {name}, top ops by self CPU time ==")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))
    fwd_bwd()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fwd_bwd()
    print("\n== torch.profiler: patched forward+backward, top ops by self CPU memory ==")
    print(prof.key_averages().table(sort_by="self_cpu_memory_usage", row_limit=14))
    print("== torch.profiler: patched forward+backward, top ops by self CPU time ==")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))
    for name, fn in (("patched forward", fwd), ("patched forward+backward", fwd_bwd)):
        prof_py = cProfile.Profile()
        prof_py.enable()
        fn()
        prof_py.disable()
        print(f"\n== cProfile: {name}, top functions by cumulative time ==")
        pstats.Stats(prof_py).sort_stats("cumulative").print_stats(18)


def main(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    shape = QUICK if args.quick else FULL
    procs = launch_mem_workers(args.quick)

    import torch as t

    import _measure as M
    from auto_circuit.utils.ablation_activations import src_ablations

    print(
        f"torch {t.__version__}, {t.get_num_threads()} threads, {os.cpu_count()} CPUs; "
        f"model {shape}; {N_PROMPTS} prompt pairs x {SEQ} tokens, batch {BATCH}"
    )
    bare = build_model(shape)
    clean, corrupt = make_prompts(shape)

    # Memory workers run while the models are built; timings start after they finish.
    build = bench_construction(bare, shape, repeats=3)
    pm = wrap(copy.deepcopy(bare), None)
    pm_seq = wrap(copy.deepcopy(bare), SEQ)
    P = [src_ablations(pm, c) for c in corrupt]
    P_seq = [src_ablations(pm_seq, c) for c in corrupt]
    p_bytes = P[0].numel() * P[0].element_size()
    checks = sanity_checks(bare, pm, clean[0], corrupt[0], P[0])
    mem = collect_mem_workers(procs)

    # ---- 1. forward time --------------------------------------------------------
    rounds = 1 if args.quick else 2
    pms = {
        "zero": (pm, P, 0.0),
        "random": (pm, P, random_masks(pm, seed=2)),
        "seq zero": (pm_seq, P_seq, 0.0),
        "seq random": (pm_seq, P_seq, random_masks(pm_seq, seed=2)),
    }
    fwd = bench_forward(bare, pms, clean, {}, rounds) if False else None
    fwd = bench_forward(bare, pms, clean, None, rounds)

    # ---- report -----------------------------------------------------------------
    rows: list[list[str]] = []
    failed: list[str] = []

    def row(q: str, measured: str, floor: str, ratio: float | None, target: str, ok) -> None:
        verdict = "-" if ok is None else ("PASS" if ok else "FAIL")
        if ok is False:
            failed.append(q)
        ratio_s = "-" if ratio is None else f"{ratio:.2f}x"
        rows.append([q, measured, floor, ratio_s, target, verdict])

    floor = fwd["bare"].median
    labels = {
        "zero": "fwd, masks zero (factorized)",
        "random": "fwd, masks random (factorized)",
        "seq zero": "fwd, masks zero (per-position)",
        "seq random": "fwd, masks random (per-position)",
    }
    for k, label in labels.items():
        r = fwd[k].median / floor
        row(label, M.fmt_s(fwd[k].median), M.fmt_s(floor), r, f"<= {FWD_TARGET}x", r <= 1.3)

    bare_mem = mem[("bare", None)]
    for seq_len, label in ((None, "factorized"), (SEQ, "per-position")):
        m = mem[("patched", seq_len)]
        r = m["growth"] / bare_mem["growth"]
        row(
            f"peak mem fwd+bwd ({label})",
            M.fmt_bytes(m["growth"]),
            M.fmt_bytes(bare_mem["growth"]),
            r,
            f"<= {MEM_TARGET}x",
            r <= MEM_TARGET,
        )

    for seq_len, label in ((SEQ, "per-position"), (None, "factorized")):
        b = build[seq_len]
        med = statistics.median(b["times"])
        target_ok = med <= BUILD_TARGET_S if seq_len == SEQ else None
        row(
            f"patchable_model ({label}, {b['n_edges']:,} edges)",
            M.fmt_s(med),
            "-",
            None,
            f"<= {BUILD_TARGET_S} s" if seq_len == SEQ else "(report)",
            target_ok,
        )
        full_expected = FULL_EDGES_PER_POS if seq_len == SEQ else FULL_EDGES_FACT
        expected = b["expected"] if args.quick else full_expected
        ok = b["n_edges"] == expected == b["n_edges_objects"]
        row(
            f"pm.n_edges ({label})",
            f"{b['n_edges']:,}",
            "-",
            None,
            f"== {expected:,}",
            ok,
        )
        row(f"pm.edges first access ({label})", M.fmt_s(b["edges_wall"]), "-", None, "(report)", None)

    print()
    M.print_table(["quantity", "measured", "floor", "ratio", "target", "result"], rows)

    print("\nforward loops, per forward of a batch of 16 (median of", end=" ")
    print(f"{len(fwd['bare'].wall)} interleaved repeats after a warm-up; CPU time is the mean):")
    M.print_table(
        ["variant", "median wall", "min-max wall", "user", "sys", "(user+sys)/wall"],
        [
            [
                k,
                M.fmt_s(s.median),
                s.spread,
                M.fmt_s(s.mean_user),
                M.fmt_s(s.mean_sys),
                f"{(s.mean_user + s.mean_sys) / statistics.fmean(s.wall):.2f}",
            ]
            for k, s in fwd.items()
        ],
    )

    print("\npeak memory of one forward+backward (batch 16), each in a fresh subprocess:")
    mrows = []
    for (kind, seq_len), m in mem.items():
        mrows.append(
            [
                f"{kind} {'per-position' if seq_len else 'factorized' if kind != 'bare' else ''}",
                M.fmt_bytes(m["rss_before"]),
                M.fmt_bytes(m["maxrss_after"]),
                M.fmt_bytes(m["growth"]),
                M.fmt_bytes(m["growth_hwm"]),
                "yes" if m["peak_reset"] else "NO",
                f"{m['wall']:.2f}/{m['user']:.2f}/{m['sys']:.2f}",
            ]
        )
    M.print_table(
        [
            "run",
            "RSS before",
            "ru_maxrss after",
            "growth",
            "VmHWM growth",
            "peak reset",
            "step wall/user/sys s",
        ],
        mrows,
    )
    print(
        "  method: fresh process -> build model, inputs, P (and masks) -> one warm-up step ->"
        " gc + malloc_trim(0)\n  -> read VmRSS -> reset the peak (write 5 to"
        " /proc/self/clear_refs, which also resets ru_maxrss) -> measured step ->\n"
        "  growth = ru_maxrss - RSS before. Parameters are frozen in both; the bare run"
        " makes hook_embed's\n  output require grad so every activation is kept for"
        " backward; the patched run trains random masks\n  (train_mask_mode). Loss: mean"
        f" logit of token {TOKEN} at the last position."
    )
    pm_info = mem[("patched", None)]
    print(
        f"  not in the growth (built before): P = {M.fmt_bytes(p_bytes)} per batch of 16"
        f" ({M.fmt_bytes(4 * p_bytes)} for all 4 batches), [n_src={P[0].shape[0]}, 16, {SEQ},"
        f" {shape.d_model}]; mask grads {M.fmt_bytes(pm_info['mask_grad_bytes'])}"
        f" (factorized), {M.fmt_bytes(mem[('patched', SEQ)]['mask_grad_bytes'])}"
        " (per-position)."
    )

    print("\npatchable_model time, each on a fresh deep copy of the model (seconds):")
    for seq_len, b in build.items():
        label = "per-position" if seq_len else "factorized"
        ts = ", ".join(f"{x:.4f}" for x in b["times"])
        print(f"  {label:12s} {ts}   pm.edges: {b['edges_wall']:.3f} s for {b['n_edges']:,}")

    print("\nsanity (max |logit difference|):")
    for k, v in checks.items():
        print(f"  {k}: {v:.2e}")

    print(f"\ntotal benchmark time {time.perf_counter() - t_start:.1f} s")
    if args.profile:
        profile_patched(pm, clean[0], P[0], random_masks(pm, seed=2), bare)
    if failed:
        print(f"FAILED: {', '.join(failed)}")
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2-layer d_model 64 smoke test")
    p.add_argument("--profile", action="store_true", help="profile the patched passes too")
    p.add_argument("--mem-worker", choices=["bare", "patched"], help=argparse.SUPPRESS)
    p.add_argument("--seq-len", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    arguments = parse_args()
    if arguments.mem_worker:
        shape_ = QUICK if arguments.quick else FULL
        print(json.dumps(mem_worker(arguments.mem_worker, shape_, arguments.seq_len)))
        sys.exit(0)
    sys.exit(main(arguments))
