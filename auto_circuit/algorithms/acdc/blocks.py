"""Where ACDC can start a forward: the model's blocks, through the family's block forward.

Starting at block ``l`` from the clean residual cached at its input is exact when no
destination before block ``l`` is patched and the sources ``[0, n)`` that run before
block ``l`` are exactly those of earlier blocks (their clean outputs are then given as
``curr_src_outs``). Models whose family has no ``BlockForward``, and models with a
prompt-prefix KV cache, run the full forward.
"""

from __future__ import annotations

from auto_circuit.engine.patchable_model import PatchableModel
from auto_circuit.families.block_forward import BlockForward

NEED = "ACDC's block skipping"


def block_forward(model: PatchableModel) -> BlockForward | None:
    """The family's block forward where ACDC can start at a block (no KV cache), else
    None (full forwards)."""
    if not model.has_block_forward or model.kv_caches:
        return None
    return model.block_forward(NEED)


def dest_blocks(model: PatchableModel) -> dict[str, int]:
    """The block of each destination mask whose hooks all lie in one block."""
    forward = block_forward(model)
    if forward is None:
        return {}
    result = {}
    for name, site in model.mask_sites.items():
        found = {forward.block_of(hook) for hook in site.hook_modules}
        if len(found) == 1 and None not in found:
            result[name] = found.pop()
    return result  # type: ignore[return-value]


def srcs_before_block(model: PatchableModel) -> list[int] | None:
    """For each block ``l`` (and ``n_blocks``): the sources ``[0, n)`` that run before
    block ``l`` (and only those), or None when the sources are not laid out that way."""
    forward = block_forward(model)
    if forward is None:
        return None
    site_blocks = []
    for site in model.source_sites:
        block = forward.block_of(site.hook_module)
        if block is None:
            return None
        site_blocks.append((block, site.src_idxs))
    before = []
    for layer in range(forward.n_blocks + 1):
        n = max((r.stop for b, r in site_blocks if b < layer), default=0)
        if any(r.start < n for b, r in site_blocks if b >= layer):
            return None
        before.append(n)
    return before
