"""The native table kernels against float64 oracles (with one and several threads),
their fallbacks, the rules for loading a built library, and the engine running on them
against the hook oracle.

The kernels are off by default; the tests build them once into a private temporary
directory and switch them on for the tests that use them. Without a C compiler those
tests are skipped (the engine then uses torch).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch as t
from conftest import make_tl_model
from test_tl_patching import CLEAN, CORRUPT, SEQ, edge_mask_values, oracle_masked_patch

from auto_circuit.engine.ablation_activations import src_ablations
from auto_circuit.engine.graph_utils import patch_mode, patchable_model
from auto_circuit.engine.kernels import table_ops as native

COMPILER = shutil.which(os.environ.get("CC", "cc"))
needs_compiler = pytest.mark.skipif(
    COMPILER is None, reason="no C compiler here (the engine then uses torch)"
)
F32 = {"atol": 1e-5, "rtol": 1e-5}  # float32 sums of up to ~160 products against float64
MARKER_SOURCE = """
#include <stdio.h>
#include <stdlib.h>
/* Runs when the library is mapped: proves whether it was loaded. */
__attribute__((constructor)) static void mark_loaded(void) {
  const char *path = getenv("TABLE_OPS_TEST_MARKER");
  FILE *f = path ? fopen(path, "w") : NULL;
  if (f) fclose(f);
}
"""


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private directory holding a library and its record, built once."""
    if COMPILER is None:
        pytest.skip("no C compiler here (the engine then uses torch)")
    directory = tmp_path_factory.mktemp("kernels") / "cache"
    native.build(directory)
    return directory


@pytest.fixture
def kernel(built: Path, monkeypatch: pytest.MonkeyPatch) -> native._Kernel:
    """The kernels switched on in this process for one test, from ``built``."""
    monkeypatch.setattr(native, "_KERNEL", native._Kernel())
    status = native.enable(built)
    assert status.startswith("native"), status
    return native._KERNEL


def table_rows(batch: int, seq: int, n: int, d_model: int, gen: t.Generator) -> t.Tensor:
    """Rows ``[batch, seq, n, d_model]`` cut out of a wider table, as the engine's are."""
    table = t.randn(batch * seq, n + 5, d_model, generator=gen)
    return table[:, 2 : 2 + n].view(batch, seq, n, d_model)


@pytest.mark.parametrize("mask_batch,mask_seq", [(1, 1), (1, 5), (3, 1), (3, 5)])
@pytest.mark.parametrize("heads,n", [(1, 1), (5, 13), (8, 7), (9, 40), (37, 157), (38, 3)])
@pytest.mark.parametrize("d_model", [16, 48, 80, 768])
def test_kernel_equals_a_float64_product(kernel, mask_batch, mask_seq, heads, n, d_model):
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
    t.testing.assert_close(got.double(), t.matmul(mask.double(), rows.double()), **F32)
    into = t.full((batch, seq, heads, d_model), float("nan"))
    assert native.masked_sum(mask, rows, into) is into
    t.testing.assert_close(into, got, atol=0, rtol=0)


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_kernels_with_several_threads_equal_float64(kernel, threads):
    """Both kernels at sizes that split the work over every thread asked for (the tokens
    for the masked sum, the heads for the differences) give the float64 results."""
    gen = t.Generator().manual_seed(threads)
    width = native.vector_floats()
    d_model = 48 * width
    batch, seq, heads, n, d_head = 4, 5, 37, 60, 16
    rows = table_rows(batch, seq, n, d_model, gen)
    mask = t.rand(1, seq, heads, n, generator=gen)
    z = t.randn(batch, seq, 12, d_head, generator=gen)
    w_o = t.randn(12, d_head, d_model, generator=gen)
    patch = t.randn(12, batch, 1, d_model, generator=gen)
    out = t.full((12, batch, seq, d_model), float("nan"))
    before = t.get_num_threads()
    t.set_num_threads(threads)
    try:
        assert native._threads(batch * seq * heads * n * d_model) == threads
        got = native.masked_sum(mask, rows)
        done = native.head_differences(z, w_o, patch, out)
    finally:
        t.set_num_threads(before)
    assert got is not None and done
    t.testing.assert_close(got.double(), t.matmul(mask.double(), rows.double()), **F32)
    expected = patch.double() - t.einsum("bshe,hed->hbsd", z.double(), w_o.double())
    t.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-5)


def test_kernel_declines_what_it_does_not_cover(kernel):
    """None, and nothing written, for another dtype, a width that is not a multiple of
    the vector, a mask that needs gradients, a non-contiguous output, and rows whose
    tokens are not evenly strided; the caller then uses torch.matmul."""
    gen = t.Generator().manual_seed(0)
    width = native.vector_floats()
    rows = table_rows(2, 3, 4, 2 * width, gen)
    mask = t.rand(1, 1, 5, 4, generator=gen)
    assert native.masked_sum(mask.double(), rows.double()) is None
    odd = table_rows(2, 3, 4, width + 1, gen)
    assert native.masked_sum(mask, odd) is None
    assert native.masked_sum(mask.clone().requires_grad_(), rows) is None
    with t.no_grad():  # the engine calls it without gradients: then it applies
        assert native.masked_sum(mask.clone().requires_grad_(), rows) is not None
    out = t.zeros(2, 3, 2 * width, 5).transpose(-1, -2)
    assert native.masked_sum(mask, rows, out) is None
    assert not out.any()
    uneven = t.randn(2, 4, 4, 2 * width, generator=gen)[:, :3]  # batch != seq * token stride
    assert native.masked_sum(mask, uneven) is None


@pytest.mark.parametrize("patch_batch,patch_seq", [(1, 1), (3, 1), (1, 5), (3, 5)])
@pytest.mark.parametrize("heads,d_head", [(1, 4), (9, 16), (12, 64)])
@pytest.mark.parametrize("d_model", [16, 48, 80, 768])
def test_head_differences_equal_a_float64_product(
    kernel, patch_batch, patch_seq, heads, d_head, d_model
):
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


def test_head_differences_decline_what_they_do_not_cover(kernel):
    gen = t.Generator().manual_seed(1)
    width = native.vector_floats()
    z = t.randn(2, 3, 4, 8, generator=gen)
    w_o = t.randn(4, 8, 2 * width, generator=gen)
    patch = t.randn(4, 2, 3, 2 * width, generator=gen)
    out = t.zeros(4, 2, 3, 2 * width)
    assert not native.head_differences(z.double(), w_o.double(), patch.double(), out.double())
    odd_w, odd_p = t.randn(4, 8, width + 1), t.randn(4, 2, 3, width + 1)
    assert not native.head_differences(z, odd_w, odd_p, t.zeros(4, 2, 3, width + 1))
    split = t.zeros(4, 2, 4, 2 * width)[:, :, :3]  # batch and seq do not merge
    assert not native.head_differences(z, w_o, patch, split)
    assert not native.head_differences(z, w_o, patch[:, :, :2], out)  # wrong seq
    assert not out.any() and not split.any()


def test_without_the_kernels_every_product_declines(monkeypatch):
    """Off (the default): the wrappers return None/False and write nothing."""
    monkeypatch.setattr(native, "_KERNEL", native._Kernel())
    monkeypatch.delenv("AUTO_CIRCUIT_NATIVE", raising=False)
    assert native.masked_sum(t.rand(1, 1, 2, 3), t.rand(1, 1, 3, 64)) is None
    out = t.zeros(1, 1, 1, 64)
    assert not native.head_differences(t.rand(1, 1, 1, 4), t.rand(1, 4, 64), out, out)
    assert native.native_status().startswith("torch (off")


# ---------------------------------------------------------------------------------
# loading rules, each in a fresh process


def _load_in_subprocess(env: dict[str, str]) -> dict:
    """In a fresh process with ``env`` added to a copy of this one's environment (less
    any kernel settings of this one): the status, the warnings raised while asking for
    it twice and running a product, and whether the product ran in the kernel."""
    code = """if True:
        import json, warnings
        import torch
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            from auto_circuit.engine.kernels import table_ops
            status = table_ops.native_status()
            table_ops.native_status()
            m, rows = torch.rand(1, 1, 2, 3), torch.rand(1, 1, 3, 64)
            native = table_ops.masked_sum(m, rows)
            fallback = torch.matmul(m, rows)
        warned = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        print(json.dumps({"status": status, "warnings": warned, "native": native is not None}))
    """
    keep = {k: v for k, v in os.environ.items() if not k.startswith("AUTO_CIRCUIT_")}
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=keep | env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _copy_of(built: Path, tmp_path: Path) -> Path:
    directory = tmp_path / "cache"
    shutil.copytree(built, directory)
    return directory


def _the_library(directory: Path) -> Path:
    (library,) = directory.glob("table_ops-*.so")
    return library


def _marker_library(tmp_path: Path) -> Path:
    """The kernels' source plus a constructor that creates ``$TABLE_OPS_TEST_MARKER``."""
    marker_c = tmp_path / "marker.c"
    marker_c.write_text(MARKER_SOURCE)
    library = tmp_path / "marker.so"
    assert COMPILER is not None
    command = [COMPILER, "-O1", "-shared", "-fPIC", "-o", str(library)]
    subprocess.run([*command, str(native._SOURCE), str(marker_c)], check=True, timeout=300)
    return library


def _plant(library: Path, directory: Path) -> Path:
    """Put ``library`` where the loader looks in ``directory``, with a record of its
    true checksum (only the loading rules can refuse it)."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    digest = native._sha256(library.read_bytes())
    name = f"table_ops-{native._build_key()}-{digest[:16]}.so"
    shutil.copyfile(library, directory / name)
    (directory / f"table_ops-{native._build_key()}.sha256").write_text(f"{digest}  {name}\n")
    return directory / name


def test_off_by_default_and_silent():
    result = _load_in_subprocess({})
    assert result["status"].startswith("torch (off"), result
    assert result["warnings"] == [] and not result["native"]


def test_disabled_by_the_environment():
    result = _load_in_subprocess({"AUTO_CIRCUIT_NATIVE": "0"})
    assert result["status"].startswith("torch (off") and result["warnings"] == []


@needs_compiler
def test_a_build_is_private_recorded_and_loaded(built, tmp_path):
    """``build`` makes a 0700 directory holding the library and its SHA-256 record;
    ``AUTO_CIRCUIT_NATIVE=1`` then loads it without compiling anything and without a
    warning, and the products run in it."""
    assert built.stat().st_mode & 0o777 == 0o700
    library = _the_library(built)
    (record,) = built.glob("table_ops-*.sha256")
    digest, name = record.read_text().split()
    assert name == library.name and digest == native._sha256(library.read_bytes())
    result = _load_in_subprocess({"AUTO_CIRCUIT_NATIVE": "1", "AUTO_CIRCUIT_CACHE_DIR": str(built)})
    assert result["status"].startswith("native") and result["native"], result
    assert result["warnings"] == []
    assert sorted(p.name for p in built.iterdir()) == sorted([library.name, record.name])


def test_asked_for_but_not_built_warns_once(tmp_path):
    result = _load_in_subprocess(
        {"AUTO_CIRCUIT_NATIVE": "1", "AUTO_CIRCUIT_CACHE_DIR": str(tmp_path / "none")}
    )
    assert result["status"].startswith("torch (not built") and not result["native"], result
    (warning,) = result["warnings"]
    assert "python -m auto_circuit.engine.kernels build" in warning
    assert not (tmp_path / "none").exists()  # nothing was compiled


@needs_compiler
@pytest.mark.parametrize("writable", ["directory", "parent", "library", "record"])
def test_code_others_can_write_to_is_never_loaded(tmp_path, writable):
    """A library in a directory (or below a directory) that others can write to, or one
    that others can write to itself, or whose record they can, is refused before it is
    mapped: its constructor never runs. With the same files private it does run (the
    test would see a load)."""
    marker = tmp_path / "loaded"
    directory = tmp_path / "parent" / "cache"
    library = _plant(_marker_library(tmp_path), directory)
    env = {
        "AUTO_CIRCUIT_NATIVE": "1",
        "AUTO_CIRCUIT_CACHE_DIR": str(directory),
        "TABLE_OPS_TEST_MARKER": str(marker),
    }
    open_up = {
        "directory": directory,
        "parent": directory.parent,
        "library": library,
        "record": directory / f"table_ops-{native._build_key()}.sha256",
    }[writable]
    mode = open_up.stat().st_mode & 0o777
    open_up.chmod(mode | 0o022)
    result = _load_in_subprocess(env)
    assert not marker.exists(), "the library was loaded"
    assert result["status"].startswith("torch") and not result["native"], result
    (warning,) = result["warnings"]
    assert "writ" in warning, warning

    open_up.chmod(mode)
    result = _load_in_subprocess(env)
    assert marker.exists() and result["status"].startswith("native"), result


@needs_compiler
def test_a_truncated_library_falls_back_with_one_warning(built, tmp_path):
    """A cached library cut short (a full disk, a killed copy) with its old record: one
    warning, the products on torch, no crash (it is never mapped, so no SIGBUS)."""
    directory = _copy_of(built, tmp_path)
    library = _the_library(directory)
    library.chmod(0o700)
    data = library.read_bytes()
    library.write_bytes(data[: len(data) // 2])
    result = _load_in_subprocess(
        {"AUTO_CIRCUIT_NATIVE": "1", "AUTO_CIRCUIT_CACHE_DIR": str(directory)}
    )
    assert result["status"].startswith("torch") and not result["native"], result
    (warning,) = result["warnings"]
    assert "does not match its recorded SHA-256" in warning, warning


@needs_compiler
def test_a_checksum_mismatch_is_refused(built, tmp_path):
    """A complete, working library in place of the built one (same name, same record):
    refused on its checksum, its constructor never runs."""
    directory = _copy_of(built, tmp_path)
    library = _the_library(directory)
    library.chmod(0o700)
    shutil.copyfile(_marker_library(tmp_path), library)
    marker = tmp_path / "loaded"
    result = _load_in_subprocess(
        {
            "AUTO_CIRCUIT_NATIVE": "1",
            "AUTO_CIRCUIT_CACHE_DIR": str(directory),
            "TABLE_OPS_TEST_MARKER": str(marker),
        }
    )
    assert not marker.exists(), "the library was loaded"
    assert result["status"].startswith("torch") and not result["native"], result
    (warning,) = result["warnings"]
    assert "does not match its recorded SHA-256" in warning, warning


@needs_compiler
def test_a_record_that_is_not_one_is_refused(built, tmp_path):
    """A record naming a file outside the pattern (``../elsewhere.so``) is refused."""
    directory = _copy_of(built, tmp_path)
    record = next(directory.glob("table_ops-*.sha256"))
    record.write_text(f"{'0' * 64}  ../elsewhere.so\n")
    result = _load_in_subprocess(
        {"AUTO_CIRCUIT_NATIVE": "1", "AUTO_CIRCUIT_CACHE_DIR": str(directory)}
    )
    assert result["status"].startswith("torch") and len(result["warnings"]) == 1, result
    assert "not a record" in result["warnings"][0]


@needs_compiler
def test_build_refuses_a_directory_others_can_write_to(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(PermissionError, match="writable by others.*chmod go-w"):
        native.build(shared)
    assert list(shared.iterdir()) == []


# ---------------------------------------------------------------------------------
# the engine on the kernels


class _CountingLibrary:
    """The loaded library, counting which kernels are called."""

    def __init__(self, lib) -> None:
        self.lib = lib
        self.calls: dict[str, int] = {"masked_sum": 0, "head_differences": 0}

    def __getattr__(self, name: str):
        if name in self.calls:
            self.calls[name] += 1
        return getattr(self.lib, name)


@pytest.mark.parametrize("seq_len", [None, SEQ])
@pytest.mark.parametrize("d_model", [48, 80])
def test_engine_on_the_kernels_matches_the_hook_oracle(kernel, monkeypatch, d_model, seq_len):
    """Random fractional masks on every edge, without gradients: the engine's masked
    sums and head differences run in the kernels (counted), and the output equals the
    hook oracle and the engine on torch alone."""
    model_kwargs = {"d_model": d_model}
    counting = _CountingLibrary(kernel.lib)
    kernel.lib = counting  # type: ignore[assignment]

    def run() -> tuple[t.Tensor, list]:
        pm = patchable_model(
            make_tl_model(**model_kwargs),
            True,
            seq_len=seq_len,
            separate_qkv=True,
            fast_paths=True,  # the kernels are the fast engine's
        )
        gen = t.Generator().manual_seed(3)
        with t.no_grad():
            for mask in pm.patch_masks.values():
                mask.copy_(t.rand(mask.shape, generator=gen))
            with patch_mode(pm, src_ablations(pm, CORRUPT)):
                return pm(CLEAN), edge_mask_values(pm)

    got, edge_values = run()
    assert all(counting.calls.values()), counting.calls
    monkeypatch.setattr(native, "_KERNEL", native._Kernel())  # off: torch alone
    on_torch, _ = run()
    expected = oracle_masked_patch(model_kwargs, edge_values, True)
    t.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    t.testing.assert_close(got, on_torch, atol=1e-5, rtol=1e-5)
