"""The engine's two table products at the GPT-2-small shapes of ``bench_patching.py``:
the native kernels against torch (the engine's fallback) and ``torch.compile`` of it.

    python benchmarks/bench_kernels.py [--repeats 7] [--no-compile]

The products of one random-mask forward without gradients (12 blocks, batch 16 x 15
tokens, d_model 768; the table ``[240, 158, 768]`` holds every source's ``P - C``):

- masked sums, one per block: ``m [1, 1, 37, n] @ rows [16, 15, n, 768]`` with ``n =
  1 + 13 l + 1`` (the sources below block ``l`` and the block's folded residual), 37 rows
  (Q/K/V of 12 heads and the block's MLP riding along), ``rows`` a strided view of the
  table; the per-position graph's masks are ``[1, 15, 37, n]``;
- head differences, one per block: ``out[h] = P[h] - z[:, :, h] @ W_O[h]`` into the
  heads' 12 rows of the table.

Three ways, each on the same operands and output buffers:

- ``torch``: what the engine runs without the kernels (``torch.matmul(m, rows,
  out=out)``; ``out.copy_(P)`` then ``baddbmm_``);
- ``native``: ``table_ops.masked_sum`` / ``head_differences``, built for this run into a
  temporary directory and loaded as ``enable()`` loads it;
- ``compile``: ``torch.compile`` (CPU inductor, ``dynamic=False``, one graph per
  shape) of the same torch code, returning a new tensor (inductor does not compile
  ``out=``); its compile time is reported.

Median and range over ``--repeats`` timings of a whole forward's worth (12 products).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable

import torch as t

BATCH, SEQ, D_MODEL, N_HEADS, D_HEAD, N_LAYERS = 16, 15, 768, 12, 64, 12
N_SRC = 1 + N_LAYERS * (N_HEADS + 1)  # Resid Start, then each block's heads and MLP
ROWS = 3 * N_HEADS + 1  # a block's Q/K/V heads and its MLP


def block_span(layer: int) -> int:
    """Table rows a block's fused masked sum reads: the sources below it, plus the
    folded residual in its first head's slot."""
    return 1 + layer * (N_HEADS + 1) + 1


def timed(fn: Callable[[], object], repeats: int) -> list[float]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def fmt(times: list[float] | None) -> str:
    if not times:
        return "-"
    ms = [x * 1e3 for x in times]
    return f"{statistics.median(ms):7.1f} ms ({min(ms):.1f}-{max(ms):.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    args = parser.parse_args()

    from auto_circuit.engine.kernels import table_ops

    # A private build for this run (the library the cache would hold, verified the same way).
    with tempfile.TemporaryDirectory() as cache:
        try:
            table_ops.build(cache)
        except (RuntimeError, OSError) as error:
            print(f"no native build: {error}")
        table_ops.enable(cache)
        measure(table_ops, args)


def measure(table_ops, args: argparse.Namespace) -> None:

    gen = t.Generator().manual_seed(0)
    table = t.randn(BATCH * SEQ, N_SRC + 1, D_MODEL, generator=gen)
    out = t.empty(BATCH, SEQ, ROWS, D_MODEL)
    masks = {
        "factorized": [t.rand(1, 1, ROWS, block_span(layer), generator=gen) for layer in range(12)],
        "per-position": [
            t.rand(1, SEQ, ROWS, block_span(layer), generator=gen) for layer in range(12)
        ],
    }

    def rows(layer: int) -> t.Tensor:
        return table[:, : block_span(layer)].view(BATCH, SEQ, -1, D_MODEL)

    z = t.randn(BATCH, SEQ, N_HEADS, D_HEAD, generator=gen)
    w_o = t.randn(N_LAYERS, N_HEADS, D_HEAD, D_MODEL, generator=gen) / 8
    patch = t.randn(N_HEADS, BATCH, SEQ, D_MODEL, generator=gen)

    def head_rows(layer: int) -> t.Tensor:
        first = 1 + layer * (N_HEADS + 1)
        view = table[:, first : first + N_HEADS].view(BATCH, SEQ, N_HEADS, D_MODEL)
        return view.permute(2, 0, 1, 3)

    def torch_masked(m: t.Tensor, r: t.Tensor) -> t.Tensor:
        return t.matmul(m, r, out=out)

    def torch_heads(layer: int) -> None:
        dest = head_rows(layer)
        dest.copy_(patch)
        per_head = z.permute(2, 0, 1, 3).reshape(N_HEADS, BATCH * SEQ, D_HEAD)
        dest.view(N_HEADS, BATCH * SEQ, D_MODEL).baddbmm_(per_head, w_o[layer], alpha=-1)

    def head_diff(zz: t.Tensor, w: t.Tensor, p: t.Tensor) -> t.Tensor:
        per_head = zz.permute(2, 0, 1, 3).reshape(N_HEADS, BATCH * SEQ, D_HEAD)
        return p - t.bmm(per_head, w).view(N_HEADS, BATCH, SEQ, D_MODEL)

    status = table_ops.native_status()
    gflop = sum(2 * BATCH * SEQ * ROWS * block_span(layer) * D_MODEL for layer in range(12)) / 1e9
    print(
        f"torch {t.__version__}, {t.get_num_threads()} threads; table kernels: {status}; "
        f"{args.repeats} repeats of a forward's 12 products"
    )
    results: dict[str, dict[str, list[float] | None]] = {}
    notes: list[str] = []
    with t.no_grad():
        for kind, ms in masks.items():
            name = f"masked sums, {kind} ({gflop:.1f} GFLOP)"
            res: dict[str, list[float] | None] = {}
            res["torch"] = timed(
                lambda ms=ms: [torch_masked(m, rows(i)) for i, m in enumerate(ms)], args.repeats
            )
            expected = [t.matmul(m.double(), rows(i).double()) for i, m in enumerate(ms)]
            if table_ops.native_status().startswith("native"):
                for i, m in enumerate(ms):
                    got = table_ops.masked_sum(m, rows(i), out)
                    assert got is not None
                    t.testing.assert_close(got.double(), expected[i], atol=1e-4, rtol=1e-4)
                res["native"] = timed(
                    lambda ms=ms: [table_ops.masked_sum(m, rows(i), out) for i, m in enumerate(ms)],
                    args.repeats,
                )
            else:
                res["native"] = None
            if not args.no_compile:
                compiled = t.compile(lambda m, r: t.matmul(m, r), dynamic=False)
                start = time.perf_counter()
                for i, m in enumerate(ms):
                    got = compiled(m, rows(i))
                    t.testing.assert_close(got.double(), expected[i], atol=1e-4, rtol=1e-4)
                notes.append(
                    f"torch.compile, {kind} masked sums: "
                    f"{time.perf_counter() - start:.1f} s to compile 12 shapes"
                )
                res["compile"] = timed(
                    lambda ms=ms, c=compiled: [c(m, rows(i)) for i, m in enumerate(ms)],
                    args.repeats,
                )
            results[name] = res

        res = {}
        res["torch"] = timed(
            lambda: [torch_heads(layer) for layer in range(N_LAYERS)], args.repeats
        )
        if table_ops.native_status().startswith("native"):
            for layer in range(N_LAYERS):
                assert table_ops.head_differences(z, w_o[layer], patch, head_rows(layer))
                expected = head_diff(z.double(), w_o[layer].double(), patch.double())
                t.testing.assert_close(head_rows(layer).double(), expected, atol=1e-4, rtol=1e-4)
            res["native"] = timed(
                lambda: [
                    table_ops.head_differences(z, w_o[layer], patch, head_rows(layer))
                    for layer in range(N_LAYERS)
                ],
                args.repeats,
            )
        else:
            res["native"] = None
        if not args.no_compile:
            compiled_heads = t.compile(head_diff, dynamic=False)
            start = time.perf_counter()
            compiled_heads(z, w_o[0], patch)
            notes.append(
                f"torch.compile, head differences: {time.perf_counter() - start:.1f} s to compile"
            )
            res["compile"] = timed(
                lambda: [compiled_heads(z, w_o[layer], patch) for layer in range(N_LAYERS)],
                args.repeats,
            )
        results["head differences"] = res

    ways = ["torch", "native", "compile"]
    width = max(len(name) for name in results)
    print(f"\n{'product':{width}s}  " + "  ".join(f"{w:28s}" for w in ways))
    for name, res in results.items():
        print(f"{name:{width}s}  " + "  ".join(f"{fmt(res.get(w)):28s}" for w in ways))
    for note in notes:
        print(note)


if __name__ == "__main__":
    main()
