"""Benchmark edge patching against the bare model it wraps.

    python benchmarks/bench_patching.py            # GPT-2-small shape, ~5 min on 2 cores
    python benchmarks/bench_patching.py --quick    # 2-layer toy model, smoke test
    python benchmarks/profile_patching.py          # where the patched passes spend time/memory

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
# building blocks (torch is imported lazily, so --help is instant)


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
    from auto_circuit.engine.graph_utils import patchable_model

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


def mem_step_patched(pm, clean, P):
    from auto_circuit.engine.graph_utils import patch_mode, train_mask_mode

    with train_mask_mode(pm), patch_mode(pm, P):
        logits = pm(clean)
        loss = logits[:, -1, TOKEN].mean()
        loss.backward()
    del logits, loss


def mem_worker(kind: str, shape: Shape, seq_len: int | None) -> dict:
    """Peak RSS growth of one forward+backward, in this fresh process."""
    import _measure as M
    import torch as t

    # One intra-op thread: the three workers run side by side on a small machine, and
    # the activations a step keeps do not depend on the thread count.
    t.set_num_threads(1)
    model = build_model(shape)
    clean, corrupt = make_prompts(shape)
    out: dict = {"kind": kind, "seq_len": seq_len, "threads": t.get_num_threads()}
    pm = None
    if kind == "bare":

        def step(n: int = BATCH) -> None:
            mem_step_bare(model, clean[0][:n])
    else:
        from auto_circuit.engine.ablation_activations import src_ablations

        pm = wrap(model, seq_len)
        P = src_ablations(pm, corrupt[0])
        out["P_bytes"] = P.numel() * P.element_size()
        load_masks(pm, random_masks(pm, seed=2))
        mask_bytes = sum(m.numel() * m.element_size() for m in pm.patch_masks.values())
        out["mask_grad_bytes"] = mask_bytes

        def step(n: int = BATCH) -> None:
            mem_step_patched(pm, clean[0][:n], P[:, :n])

    # Warm-up on one prompt (cheap): one-time allocations (thread pools, kernel and
    # autograd-engine setup) are not part of a step's peak. Then release the warm-up's
    # freed heap so that the RSS before the step is only what is live.
    step(1)
    for m in pm.patch_masks.values() if pm is not None else ():
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


def run_forked(fn, *args) -> dict:
    """Run ``fn(*args)`` in a forked child and return its (JSON) result."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_fd)
        code = 0
        try:
            payload = json.dumps(fn(*args))
        except BaseException as e:  # report any failure to the parent
            payload = json.dumps({"error": f"{type(e).__name__}: {e}"})
            code = 1
        with os.fdopen(write_fd, "w") as f:
            f.write(payload)
        os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd) as f:
        payload = f.read()
    os.waitpid(pid, 0)
    return json.loads(payload) if payload else {"error": "no output"}


MEM_JOBS: list[tuple[str, int | None]] = [("bare", None), ("patched", None), ("patched", SEQ)]


def mem_server(quick: bool, jobs: list[tuple[str, int | None]]) -> None:
    """Entry point of a memory subprocess: import the libraries, then measure each job in
    its own forked child (fresh: no tensor work was done before the fork, so no thread
    pool exists), one after another so that peaks don't add up; print the results."""
    import torch  # noqa: F401
    import transformer_lens  # noqa: F401

    import auto_circuit.engine.ablation_activations  # noqa: F401
    import auto_circuit.engine.graph_utils  # noqa: F401

    shape = QUICK if quick else FULL
    results = []
    for kind, seq_len in jobs:
        result = run_forked(mem_worker, kind, shape, seq_len)
        if "error" in result:
            raise RuntimeError(f"memory worker {kind}/{seq_len} failed: {result['error']}")
        results.append(result)
    print(json.dumps(results))


# Allocator settings of the two memory servers. "default": glibc as it is (tensors
# up to 32 MiB come from the heap, whose freed chunks stay resident until reused or
# trimmed). "mmap": MALLOC_MMAP_THRESHOLD_=65536, so every tensor >= 64 KiB is its own
# mapping, returned when freed: RSS then follows the live tensor bytes.
ALLOCATORS = {"default": {}, "mmap": {"MALLOC_MMAP_THRESHOLD_": "65536"}}
# The diagnostic (mmap) server skips the per-position graph to keep the run short.
ALLOCATOR_JOBS = {"default": MEM_JOBS, "mmap": MEM_JOBS[:2]}


def launch_mem_server(quick: bool, allocator: str) -> subprocess.Popen:
    """Started first, so that it imports while this process imports; this process
    itself never forks (its timings stay clean)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--mem-server", allocator]
    if quick:
        cmd.append("--quick")
    env = {**os.environ, **ALLOCATORS[allocator]}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_mem_server(proc: subprocess.Popen) -> dict[tuple[str, int | None], dict]:
    """The results of a memory server, by (kind, seq_len)."""
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"memory measurement failed:\n{stderr[-4000:]}")
    results = json.loads(stdout.strip().splitlines()[-1])
    return {(r["kind"], r["seq_len"]): r for r in results}


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

    from auto_circuit.engine.graph_utils import patch_mode, set_all_masks

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


STEADY_FORWARDS = 2  # timed forwards per patch_mode context after its first one


def bench_forward(bare, pms, clean, rounds: int):
    """Interleaved repeats: bare, then each patched variant, on each batch in turn.

    A patched variant enters ``patch_mode`` once per batch and runs ``1 +
    STEADY_FORWARDS`` forwards in it, as ``run_circuits`` and ACDC do (one context per
    batch, a forward per circuit size or candidate edge). The first forward of a
    context is reported apart (``"<variant> first"``): it also allocates the engine's
    buffers, which the later forwards reuse. The bare model runs ``STEADY_FORWARDS``
    timed forwards per turn.
    """
    import _measure as M
    import torch as t

    from auto_circuit.engine.graph_utils import patch_mode

    def run_bare(b: int) -> list[M.Timer]:
        timers = []
        for _ in range(STEADY_FORWARDS):
            with t.no_grad(), M.Timer() as tm:
                bare(clean[b])
            timers.append(tm)
        return timers

    def run_patched(pm, P, masks) -> object:
        def run(b: int) -> list[M.Timer]:
            load_masks(pm, masks)
            timers = []
            with t.no_grad(), patch_mode(pm, P[b]):
                for _ in range(1 + STEADY_FORWARDS):
                    with M.Timer() as tm:
                        pm(clean[b])
                    timers.append(tm)
            return timers

        return run

    variants = {"bare": run_bare}
    for label, (pm, P, masks) in pms.items():
        variants[label] = run_patched(pm, P, masks)
    samples = {k: M.Samples() for k in variants}
    samples.update({f"{k} first": M.Samples() for k in pms})
    for fn in variants.values():  # warm-up
        fn(0)
    for _ in range(rounds):
        for b in range(len(clean)):
            for k, fn in variants.items():
                timers = fn(b)
                if k != "bare":
                    first, *timers = timers
                    samples[f"{k} first"].add(first.wall, first.user, first.sys)
                for tm in timers:
                    samples[k].add(tm.wall, tm.user, tm.sys)
    return samples


def code_version() -> str:
    """The commit, and whether the library has uncommitted changes (others edit it)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "auto_circuit"],
            cwd=root,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return f"{head}{' + uncommitted changes in auto_circuit/' if dirty else ''}"


def main(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    shape = QUICK if args.quick else FULL
    # --quick: the smoke test skips the diagnostic allocator (one import fewer).
    allocators = ["default"] if args.quick else list(ALLOCATORS)
    servers = {a: launch_mem_server(args.quick, a) for a in allocators}

    import _measure as M
    import torch as t

    from auto_circuit.engine.ablation_activations import src_ablations
    from auto_circuit.engine.kernels.table_ops import native_status

    print(
        f"torch {t.__version__}, {t.get_num_threads()} threads, {os.cpu_count()} CPUs; "
        f"model {shape}; {N_PROMPTS} prompt pairs x {SEQ} tokens, batch {BATCH}; "
        f"code {code_version()}; table kernels: {native_status()}"
    )
    load_start = os.getloadavg()
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
    mems = {a: wait_mem_server(p) for a, p in servers.items()}
    t_mem = time.perf_counter() - t_start
    mem = mems["default"]

    # ---- 1. forward time --------------------------------------------------------
    rounds = 1 if args.quick else 2
    pms = {
        "zero": (pm, P, 0.0),
        "random": (pm, P, random_masks(pm, seed=2)),
        "seq zero": (pm_seq, P_seq, 0.0),
        "seq random": (pm_seq, P_seq, random_masks(pm_seq, seed=2)),
    }
    fwd = bench_forward(bare, pms, clean, rounds)
    # The same forwards with one intra-op thread: their CPU time (user+sys) barely
    # depends on other processes competing for the cores, unlike wall time with two
    # threads that wait for each other. A diagnostic of the work done.
    threads = t.get_num_threads()
    t.set_num_threads(1)
    try:
        fwd1 = bench_forward(bare, pms, clean, 1)
    finally:
        t.set_num_threads(threads)

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
    for k, label in labels.items():
        r = fwd[f"{k} first"].median / floor
        row(
            f"{label}, first in its patch_mode",
            M.fmt_s(fwd[f"{k} first"].median),
            M.fmt_s(floor),
            r,
            "(report)",
            None,
        )
    cpu_floor = fwd1["bare"].median_cpu
    for k, label in labels.items():
        r = fwd1[k].median_cpu / cpu_floor
        row(
            f"{label}, CPU time @1 thread",
            M.fmt_s(fwd1[k].median_cpu),
            M.fmt_s(cpu_floor),
            r,
            "(diagnostic)",
            None,
        )

    for allocator, m_all in mems.items():
        bare_mem = m_all[("bare", None)]
        for seq_len, label in ((None, "factorized"), (SEQ, "per-position")):
            if ("patched", seq_len) not in m_all:
                continue
            m = m_all[("patched", seq_len)]
            r = m["growth"] / bare_mem["growth"]
            primary = allocator == "default"
            row(
                f"peak mem fwd+bwd ({label})" + ("" if primary else ", live tensors (mmap malloc)"),
                M.fmt_bytes(m["growth"]),
                M.fmt_bytes(bare_mem["growth"]),
                r,
                f"<= {MEM_TARGET}x" if primary else "(diagnostic)",
                r <= MEM_TARGET if primary else None,
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
        row(
            f"pm.edges first access ({label})",
            M.fmt_s(b["edges_wall"]),
            "-",
            None,
            "(report)",
            None,
        )

    print()
    M.print_table(["quantity", "measured", "floor", "ratio", "target", "result"], rows)

    print("\nforward loops, per forward of a batch of 16 (median of", end=" ")
    print(f"{len(fwd['bare'].wall)} interleaved repeats after a warm-up; CPU time is the mean;")
    print(f"patched: the {STEADY_FORWARDS} forwards after the first in each patch_mode context,")
    print("'first': that first one, which also allocates the engine's buffers):")
    M.print_table(
        [
            "variant",
            "median wall",
            "min-max wall",
            "min/bare min",
            "user",
            "sys",
            "(user+sys)/wall",
        ],
        [
            [
                k,
                M.fmt_s(s.median),
                s.spread,
                f"{min(s.wall) / min(fwd['bare'].wall):.2f}x",
                M.fmt_s(s.mean_user),
                M.fmt_s(s.mean_sys),
                f"{(s.mean_user + s.mean_sys) / statistics.fmean(s.wall):.2f}",
            ]
            for k, s in fwd.items()
        ],
    )
    print(
        f"with 1 intra-op thread ({len(fwd1['bare'].wall)} repeats each, interleaved;"
        " medians of wall and of user+sys):"
    )
    M.print_table(
        ["variant", "wall", "user+sys", "user", "sys", "(user+sys)/bare"],
        [
            [
                k,
                M.fmt_s(s.median),
                M.fmt_s(s.median_cpu),
                M.fmt_s(s.mean_user),
                M.fmt_s(s.mean_sys),
                f"{s.median_cpu / fwd1['bare'].median_cpu:.2f}x",
            ]
            for k, s in fwd1.items()
        ],
    )

    print(
        "\npeak memory of one forward+backward (batch 16), each in a fresh process"
        f" ({mem[('bare', None)]['threads']} intra-op thread):"
    )
    mrows = []
    for allocator, m_all in mems.items():
        for (kind, seq_len), m in m_all.items():
            graph = "per-position" if seq_len else "factorized" if kind != "bare" else ""
            mrows.append(
                [
                    f"{kind} {graph}".strip(),
                    allocator,
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
            "malloc",
            "RSS before",
            "ru_maxrss after",
            "growth",
            "VmHWM growth",
            "peak reset",
            "step wall/user/sys s",
        ],
        mrows,
    )
    method = [
        "method: fresh process -> build model, inputs, P (and masks) -> a warm-up step on 1",
        "prompt -> gc + malloc_trim(0) -> read VmRSS -> reset the peak (write 5 to",
        "/proc/self/clear_refs, which also resets ru_maxrss) -> the measured step ->",
        "growth = ru_maxrss - RSS before. Parameters are frozen in both; the bare run makes",
        "hook_embed's output require grad so every activation is kept for backward; the",
        "patched run trains random masks (train_mask_mode). Loss: mean logit of token",
        f"{TOKEN} at the last position.",
        "malloc: default = glibc as is (the PASS/FAIL numbers: what a user's process",
        "really holds; tensors up to 32 MiB come from the heap, whose freed chunks stay",
        "resident until reused); mmap = the same with MALLOC_MMAP_THRESHOLD_=65536 (each",
        "tensor >= 64 KiB is its own mapping, unmapped when freed), so the growth is ~ the",
        "peak of live tensor bytes, without allocator retention.",
    ]
    print("\n".join("  " + line for line in method))
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

    load_end = os.getloadavg()
    print(
        f"\nload average (1/5/15 min) at start {load_start[0]:.2f}/{load_start[1]:.2f}/"
        f"{load_start[2]:.2f}, at end {load_end[0]:.2f}/{load_end[1]:.2f}/{load_end[2]:.2f}"
        f" (this benchmark itself adds ~{t.get_num_threads()} while it times)."
    )
    ratio_cpu = (fwd["bare"].mean_user + fwd["bare"].mean_sys) / statistics.fmean(fwd["bare"].wall)
    if ratio_cpu < 0.75 * t.get_num_threads():
        print(
            f"WARNING: the bare forward got only {ratio_cpu:.2f} CPUs of {t.get_num_threads()}"
            " threads: other processes were competing, timings are noisy."
        )
    print(
        f"total benchmark time {time.perf_counter() - t_start:.1f} s (memory results in"
        f" after {t_mem:.1f} s)"
    )
    if failed:
        print(f"FAILED: {', '.join(failed)}")
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2-layer d_model 64 smoke test")
    p.add_argument("--mem-server", choices=list(ALLOCATORS), help=argparse.SUPPRESS)
    return p.parse_args(argv)


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    arguments = parse_args()
    if arguments.mem_server:
        mem_server(arguments.quick, ALLOCATOR_JOBS[arguments.mem_server])
        sys.exit(0)
    sys.exit(main(arguments))
