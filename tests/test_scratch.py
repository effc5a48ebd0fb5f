"""Large scratch buffers ask the kernel for transparent huge pages (the patching
engine's table of source differences is one): checked on the memory mapping itself."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch as t

from auto_circuit.utils.scratch import empty_scratch


def vma_flags(address: int) -> list[str]:
    """The VmFlags of this process's memory mapping that contains ``address``."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= address < hi
        elif inside and line.startswith("VmFlags:"):
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


requires_thp = pytest.mark.skipif(
    not Path("/proc/self/smaps").exists()
    or not Path("/sys/kernel/mm/transparent_hugepage/enabled").exists(),
    reason="needs Linux with transparent huge pages",
)


@requires_thp
def test_large_buffers_are_advised_huge_pages_and_small_ones_are_not():
    big = empty_scratch((64, 1 << 18), t.float32, t.device("cpu"))  # 64 MiB
    assert big.shape == (64, 1 << 18) and big.dtype == t.float32
    big.fill_(1.5)
    assert float(big.sum()) == 1.5 * big.numel()
    middle = big.data_ptr() + big.numel() * 2  # a byte in the middle
    assert "hg" in vma_flags(middle), "MADV_HUGEPAGE was not applied to the buffer"
    plain = t.empty(64, 1 << 18)
    assert "hg" not in vma_flags(plain.data_ptr() + plain.numel() * 2)


def test_other_devices_and_dtypes_are_plain_empty_tensors():
    x = empty_scratch((3, 5), t.float64, t.device("meta"))
    assert x.shape == (3, 5) and x.dtype == t.float64 and x.device.type == "meta"
    y = empty_scratch((7,), t.bfloat16, t.device("cpu"))
    assert y.shape == (7,) and y.dtype == t.bfloat16


@requires_thp
def test_the_engine_table_is_advised(tl_model_factory):
    """The engine's table comes from ``empty_scratch``: with a table over the size
    threshold, its mapping carries the huge-page advice."""
    from auto_circuit.utils.ablation_activations import src_ablations
    from auto_circuit.utils.graph_utils import patch_mode, patchable_model, set_all_masks

    model = tl_model_factory(n_layers=2, n_heads=4, d_model=256)
    pm = patchable_model(model, True, separate_qkv=True)
    tokens = t.randint(0, 50, (64, 32), generator=t.Generator().manual_seed(0))
    set_all_masks(pm, 0.5)
    with t.no_grad(), patch_mode(pm, src_ablations(pm, tokens.flip(0))):
        pm(tokens)
        table = pm.engine.state.spare_table
        assert table is not None and table.numel() * 4 >= 8 << 20
        assert "hg" in vma_flags(table.data_ptr() + table.numel() * 2)
