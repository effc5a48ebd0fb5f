"""The native table kernels against float64 oracles, their fallbacks, their build cache,
and the engine running on them against the hook oracle."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch as t
from conftest import make_tl_model
from test_tl_patching import CLEAN, CORRUPT, SEQ, edge_mask_values, oracle_masked_patch

import auto_circuit.engine.patch_wrapper as patch_wrapper
import auto_circuit.families.transformer_lens as tl_family
from auto_circuit.engine.ablation_activations import src_ablations
from auto_circuit.engine.graph_utils import patch_mode, patchable_model
from auto_circuit.engine.kernels import table_ops as native

HAS_COMPILER = shutil.which(os.environ.get("CC", "cc")) is not None
needs_kernel = pytest.mark.skipif(
    not HAS_COMPILER or os.environ.get("AUTO_CIRCUIT_NATIVE") == "0",
    reason="no C compiler here (the engine then uses torch.matmul)",
)


def table_rows(batch: int, seq: int, n: int, d_model: int, gen: t.Generator) -> t.Tensor:
    """Rows ``[batch, seq, n, d_model]`` cut out of a wider table, as the engine's are."""
    table = t.randn(batch * seq, n + 5, d_model, generator=gen)
    return table[:, 2 : 2 + n].view(batch, seq, n, d_model)


@needs_kernel
def test_the_kernel_is_built_where_a_compiler_exists():
    assert native.native_status().startswith("native"), native.native_status()


@needs_kernel
@pytest.mark.parametrize("mask_batch,mask_seq", [(1, 1), (1, 5), (3, 1), (3, 5)])
@pytest.mark.parametrize("heads,n", [(1, 1), (5, 13), (8, 7), (9, 40), (37, 157), (38, 3)])
@pytest.mark.parametrize("d_model", [16, 48, 80, 768])
def test_kernel_equals_a_float64_product(mask_batch, mask_seq, heads, n, d_model):
    """Every tile shape (row blocks of 1..8, column tails of 1..3 vectors) and every mask
    layout (shared, per position, per example, both), with the mask a column slice of a
    wider one and the rows a slice of a wider table."""
    width = native.vector_floats()
    if d_model % width:
        pytest.skip(f"d_model {d_model} is not a multiple of this CPU's {width}-float vectors")
    gen = t.Generator().manual_seed(heads * 1000 + n)
    batch, seq = 3, 5
    rows = table_rows(batch, seq, n, d_model, gen)
    mask = t.rand(mask_batch, mask_seq, heads, n + 4, generator=gen)[..., 1 : 1 + n]
    got = native.masked_sum(mask, rows)
    assert got is not None
    expected = t.matmul(mask.double(), rows.double())
    t.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)
    into = t.full((batch, seq, heads, d_model), float("nan"))
    stats = t.full((batch, seq, heads, 2), float("nan"))
    assert native.masked_sum(mask, rows, into, stats) is into
    t.testing.assert_close(into, got, atol=0, rtol=0)
    expected_stats = t.stack([expected.sum(-1), expected.square().sum(-1)], dim=-1)
    # float32 sums of d_model terms: error bounded against the sums of magnitudes
    scale = t.stack([expected.abs().sum(-1), expected.square().sum(-1)], dim=-1)
    assert ((stats.double() - expected_stats).abs() <= 1e-6 * scale + 1e-6).all()


@needs_kernel
def test_kernel_declines_what_it_does_not_cover():
    """None, and nothing written, for another dtype, a width that is not a multiple of
    the vector, a mask that needs gradients, a non-contiguous output, row statistics of
    the wrong shape, and rows whose tokens are not evenly strided; the caller then uses
    torch.matmul."""
    gen = t.Generator().manual_seed(0)
    rows = table_rows(2, 3, 4, 32, gen)
    mask = t.rand(1, 1, 5, 4, generator=gen)
    assert native.masked_sum(mask.double(), rows.double()) is None
    odd = table_rows(2, 3, 4, native.vector_floats() + 1, gen)
    assert native.masked_sum(mask, odd) is None
    assert native.masked_sum(mask.clone().requires_grad_(), rows) is None
    with t.no_grad():  # the engine calls it without gradients: then it applies
        assert native.masked_sum(mask.clone().requires_grad_(), rows) is not None
    out = t.zeros(2, 3, 32, 5).transpose(-1, -2)
    assert native.masked_sum(mask, rows, out) is None
    assert native.masked_sum(mask, rows, t.zeros(2, 3, 5, 32), t.zeros(2, 3, 5, 3)) is None
    assert not out.any()
    uneven = t.randn(2, 4, 4, 32, generator=gen)[:, :3]  # batch stride != seq * token stride
    assert native.masked_sum(mask, uneven) is None


@needs_kernel
@pytest.mark.parametrize("patch_batch,patch_seq", [(1, 1), (3, 1), (1, 5), (3, 5)])
@pytest.mark.parametrize("heads,d_head", [(1, 4), (9, 16), (12, 64)])
@pytest.mark.parametrize("d_model", [16, 48, 80, 768])
def test_head_differences_equal_a_float64_product(patch_batch, patch_seq, heads, d_head, d_model):
    """``patch_h - z_h W_O_h`` written into the heads' rows of a table (rows of other
    sources untouched), with broadcast patches, against float64."""
    width = native.vector_floats()
    if d_model % width:
        pytest.skip(f"d_model {d_model} is not a multiple of this CPU's {width}-float vectors")
    gen = t.Generator().manual_seed(heads * 100 + d_head)
    batch, seq, n_src = 3, 5, heads + 3
    z = t.randn(batch, seq, heads, d_head, generator=gen)
    w_o = t.randn(heads, d_head, d_model, generator=gen)
    patch = t.randn(heads, patch_batch, patch_seq, d_model, generator=gen)
    table = t.full((batch * seq, n_src, d_model), float("nan"))
    out = table[:, 2 : 2 + heads].view(batch, seq, heads, d_model).permute(2, 0, 1, 3)
    assert native.head_differences(z, w_o, patch, out)
    expected = patch.double() - t.einsum("bshe,hed->hbsd", z.double(), w_o.double())
    t.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-5)
    assert table[:, :2].isnan().all() and table[:, 2 + heads :].isnan().all()


@needs_kernel
def test_head_differences_decline_what_they_do_not_cover():
    gen = t.Generator().manual_seed(1)
    z = t.randn(2, 3, 4, 8, generator=gen)
    w_o = t.randn(4, 8, 32, generator=gen)
    patch = t.randn(4, 2, 3, 32, generator=gen)
    out = t.zeros(4, 2, 3, 32)
    assert not native.head_differences(z.double(), w_o.double(), patch.double(), out.double())
    width = native.vector_floats()
    odd_w, odd_p = t.randn(4, 8, width + 1), t.randn(4, 2, 3, width + 1)
    assert not native.head_differences(z, odd_w, odd_p, t.zeros(4, 2, 3, width + 1))
    split = t.zeros(4, 2, 4, 32)[:, :, :3]  # batch and seq do not merge
    assert not native.head_differences(z, w_o, patch, split)
    assert not native.head_differences(z, w_o, patch[:, :, :2], out)  # wrong seq
    assert not out.any() and not split.any()


def _status_in_subprocess(env: dict[str, str]) -> str:
    """``native_status()`` in a fresh process with ``env`` added to this one's (less any
    cache directory this one was given, unless ``env`` names one)."""
    code = "from auto_circuit.engine.kernels.table_ops import native_status; print(native_status())"
    full_env = {k: v for k, v in os.environ.items() if k != "AUTO_CIRCUIT_CACHE_DIR"} | env
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return done.stdout.strip()


@needs_kernel
def test_build_cache_is_keyed_and_a_broken_entry_falls_back(tmp_path):
    """A fresh cache directory gets one library; a second process loads it as is; a
    corrupt library is reported and the process goes on without the kernel."""
    env = {"AUTO_CIRCUIT_CACHE_DIR": str(tmp_path)}
    assert _status_in_subprocess(env).startswith("native")
    (library,) = tmp_path.glob("table_ops-*.so")
    built = library.stat().st_mtime_ns
    assert _status_in_subprocess(env).startswith("native")
    assert library.stat().st_mtime_ns == built
    library.write_bytes(b"not a shared library")
    assert _status_in_subprocess(env).startswith("could not build or load")


@needs_kernel
def test_a_shared_temporary_directory_is_not_trusted(tmp_path):
    """Where the user cache cannot be made, the library lives in a per-user temporary
    directory; one that others can write to is refused (what is loaded from it runs in
    the process), and the process goes on without the kernels."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    shared = tmp_path / "tmp"
    shared.mkdir()
    env = {"XDG_CACHE_HOME": str(blocker / "cache"), "TMPDIR": str(shared)}
    assert _status_in_subprocess(env).startswith("native")
    (private,) = shared.iterdir()
    assert private.stat().st_mode & 0o777 == 0o700
    private.chmod(0o777)
    status = _status_in_subprocess(env)
    assert "not a private directory" in status, status


def test_disabled_by_the_environment():
    assert _status_in_subprocess({"AUTO_CIRCUIT_NATIVE": "0"}) == (
        "disabled by AUTO_CIRCUIT_NATIVE=0"
    )


@needs_kernel
@pytest.mark.parametrize("seq_len", [None, SEQ])
@pytest.mark.parametrize("d_model", [48, 80])
def test_engine_on_the_kernels_matches_the_hook_oracle(monkeypatch, d_model, seq_len):
    """Random fractional masks on every edge, without gradients: the engine's masked
    sums and head differences run in the kernels (counted), and the output equals the
    hook oracle and the engine on torch alone."""
    model_kwargs = {"d_model": d_model}
    used: dict[str, list[bool]] = {"masked_sum": [], "head_differences": []}

    def masked_sum(*args):
        out = native.masked_sum(*args)
        used["masked_sum"].append(out is not None)
        return out

    def head_differences(*args):
        done = native.head_differences(*args)
        used["head_differences"].append(done)
        return done

    def run(masked_sum, head_differences) -> tuple[t.Tensor, list]:
        monkeypatch.setattr(patch_wrapper, "masked_sum", masked_sum)
        monkeypatch.setattr(tl_family, "head_differences", head_differences)
        pm = patchable_model(
            make_tl_model(**model_kwargs), True, seq_len=seq_len, separate_qkv=True
        )
        gen = t.Generator().manual_seed(3)
        with t.no_grad():
            for mask in pm.patch_masks.values():
                mask.copy_(t.rand(mask.shape, generator=gen))
            with patch_mode(pm, src_ablations(pm, CORRUPT)):
                return pm(CLEAN), edge_mask_values(pm)

    got, edge_values = run(masked_sum, head_differences)
    assert all(used.values()) and all(all(calls) for calls in used.values()), used
    on_torch, _ = run(lambda *args: None, lambda *args: False)
    expected = oracle_masked_patch(model_kwargs, edge_values, True)
    t.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    t.testing.assert_close(got, on_torch, atol=1e-5, rtol=1e-5)
