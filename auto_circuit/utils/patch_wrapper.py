"""The patching engine: exact edge patching with hooks, independent of any model library.

In patch mode every source site records its output during the forward pass, and
every destination adds to its input

    delta = sum over incoming edges (src -> dest) of mask[edge] * (P[src] - C[src])

where ``P`` are the patch values of the sources (``patch_src_outs``: corrupt, zero or
mean activations) and ``C`` their outputs in this very forward. Because destinations
read the residual stream before any normalisation and the residual stream is the sum
of source outputs, this replaces exactly the edge's contribution and nothing else; a
patched edge always carries ``P[src]`` whatever upstream patches did to ``C[src]``.

Work is only done where it matters: a destination whose mask is all zero (and needs no
gradient) is skipped, as are sources none of whose masks are non-zero; per-head source
outputs and per-head destination inputs are built only for such destinations.

All state lives in ``PatchState`` and is changed only by the context managers of
``auto_circuit.utils.graph_utils``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch as t
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from auto_circuit.errors import CircuitError
from auto_circuit.model_utils.families import DestSite, FamilyGraph, SrcSite
from auto_circuit.types import MaskFn
from auto_circuit.utils.tensor_ops import sample_hard_concrete


@dataclass
class PatchState:
    """Mutable patching state shared by all hooks of one ``PatchableModel``."""

    patch_mode: bool = False
    patch_src_outs: Tensor | None = None
    curr_src_outs: Tensor | None = None
    patch_is_delta: bool = False  # patch_src_outs holds P - C itself (fixed differences)
    mask_fn: MaskFn = None
    dropout_p: float = 0.0
    training: bool = False
    # Per forward pass (cleared before and after each one):
    outputs: dict[int, Tensor] = field(default_factory=dict)
    src_deltas: dict[int, Tensor] = field(default_factory=dict)
    dest_deltas: dict[str, Tensor | None] = field(default_factory=dict)
    probes: dict[str, Tensor] = field(default_factory=dict)

    def clear_forward(self) -> None:
        self.outputs.clear()
        self.src_deltas.clear()
        self.dest_deltas.clear()
        self.probes.clear()


class PatchWrapperImpl:
    """One site of the graph in the wrapped model: a block of sources, or a destination
    module with its mask. Holds the hook handles; does no work outside patch mode."""

    def __init__(
        self,
        module_name: str,
        is_src: bool,
        is_dest: bool,
        src_idxs: range | None = None,
        in_srcs: range | None = None,
        n_heads: int | None = None,
        masks: dict[str, t.nn.Parameter] | None = None,
    ):
        self.module_name = module_name
        self.is_src = is_src
        self.is_dest = is_dest
        self.src_idxs = src_idxs
        self.in_srcs = in_srcs
        self.n_heads = n_heads
        self.head_dim = 2 if n_heads is not None else None
        self._masks = masks
        self.handles: list[RemovableHandle] = []

    @property
    def patch_mask(self) -> t.nn.Parameter:
        if self._masks is None:
            raise CircuitError(f"{self.module_name} is a source site; it has no mask.")
        return self._masks[self.module_name]

    def __repr__(self) -> str:
        kind = "+".join(k for k, on in (("src", self.is_src), ("dest", self.is_dest)) if on)
        return f"PatchWrapperImpl({self.module_name!r}, {kind})"


class PatchEngine:
    """Installs the hooks of a ``FamilyGraph`` on a model and computes patch deltas."""

    def __init__(
        self,
        model: t.nn.Module,
        graph: FamilyGraph,
        seq_len: int | None,
        device: t.device,
        dtype: t.dtype,
    ):
        self.model = model
        self.graph = graph
        self.seq_len = seq_len
        self.state = PatchState()
        self.src_sites: list[SrcSite] = sorted(graph.src_sites, key=lambda s: s.src_idxs.start)
        self.dest_sites: dict[str, DestSite] = {d.module_name: d for d in graph.dest_sites}
        self.masks: dict[str, t.nn.Parameter] = {
            d.module_name: t.nn.Parameter(
                t.zeros(self.mask_shape(d), device=device, dtype=dtype), requires_grad=False
            )
            for d in graph.dest_sites
        }
        self.src_wrappers = [
            PatchWrapperImpl(s.module_name, True, False, src_idxs=s.src_idxs)
            for s in self.src_sites
        ]
        self.dest_wrappers = [
            PatchWrapperImpl(
                d.module_name, False, True, in_srcs=d.in_srcs, n_heads=d.n_heads, masks=self.masks
            )
            for d in graph.dest_sites
        ]
        self._handles: list[RemovableHandle] = []
        self._install()

    def mask_shape(self, site: DestSite) -> tuple[int, ...]:
        seq = (self.seq_len,) if self.seq_len is not None else ()
        heads = (site.n_heads,) if site.n_heads is not None else ()
        return seq + heads + (len(site.in_srcs),)

    # ---- hooks -------------------------------------------------------------------

    def _install(self) -> None:
        state = self.state
        model = self.model

        def reset(*_: Any) -> None:
            state.clear_forward()

        self._handles.append(model.register_forward_pre_hook(reset))
        self._handles.append(model.register_forward_hook(reset))
        # Destinations first: where a module is both, the source records patched output.
        for wrapper, site in zip(self.dest_wrappers, self.graph.dest_sites, strict=True):
            for hook in site.hooks:
                module = model.get_submodule(hook.hook_module)
                if hook.where == "output":
                    handle = module.register_forward_hook(self._dest_output_hook(site, hook.apply))
                else:
                    handle = module.register_forward_pre_hook(
                        self._dest_input_hook(site, hook.apply)
                    )
                wrapper.handles.append(handle)
        for i, (wrapper, site) in enumerate(zip(self.src_wrappers, self.src_sites, strict=True)):
            module = model.get_submodule(site.hook_module)
            wrapper.handles.append(module.register_forward_hook(self._src_hook(i)))
        for name in self.graph.probes:
            self._handles.append(
                model.get_submodule(name).register_forward_hook(self._probe_hook(name))
            )

    def remove(self) -> None:
        """Remove every hook from the wrapped model."""
        for handle in self._handles:
            handle.remove()
        for wrapper in self.src_wrappers + self.dest_wrappers:
            for handle in wrapper.handles:
                handle.remove()
            wrapper.handles.clear()
        self._handles.clear()

    def _src_hook(self, i: int) -> Callable[..., None]:
        state = self.state

        def hook(module: t.nn.Module, args: Any, output: Tensor) -> None:
            if state.patch_mode:
                state.outputs[i] = output
                state.src_deltas.pop(i, None)

        return hook

    def _probe_hook(self, name: str) -> Callable[..., None]:
        state = self.state

        def hook(module: t.nn.Module, args: Any, output: Tensor) -> None:
            if state.patch_mode:
                state.probes[name] = output

        return hook

    def _dest_output_hook(self, site: DestSite, apply) -> Callable[..., Tensor | None]:
        state = self.state

        def hook(module: t.nn.Module, args: Any, output: Tensor) -> Tensor | None:
            if not state.patch_mode:
                return None
            delta = self.dest_delta(site)
            if delta is None:
                return None
            return apply(output, delta, state.probes) if apply else output + delta

        return hook

    def _dest_input_hook(self, site: DestSite, apply) -> Callable[..., tuple | None]:
        state = self.state

        def hook(module: t.nn.Module, args: tuple) -> tuple | None:
            if not state.patch_mode:
                return None
            delta = self.dest_delta(site)
            if delta is None:
                return None
            patched = apply(args[0], delta, state.probes) if apply else args[0] + delta
            return (patched, *args[1:])

        return hook

    # ---- deltas ------------------------------------------------------------------

    def mask_values(self, site: DestSite, batch_size: int) -> Tensor | None:
        """The mask as used in this forward, or None when it changes nothing."""
        state = self.state
        mask = self.masks[site.module_name]
        if state.mask_fn is None and not mask.requires_grad and not bool(mask.any()):
            return None
        if state.mask_fn == "hard_concrete":
            batch_masks = mask.ndim > len(self.mask_shape(site))
            mask = sample_hard_concrete(mask, None if batch_masks else batch_size)
        elif state.mask_fn == "sigmoid":
            mask = t.sigmoid(mask)
        if state.dropout_p > 0 and state.training:
            mask = t.nn.functional.dropout(mask, p=state.dropout_p, training=True)
        return mask

    def dest_delta(self, site: DestSite) -> Tensor | None:
        """``sum_j mask[..., j] * (P[j] - C[j])`` for a destination, once per forward."""
        state = self.state
        if site.module_name in state.dest_deltas:
            return state.dest_deltas[site.module_name]
        patch = state.patch_src_outs
        if patch is None:
            raise CircuitError("patch mode is on but no patch_src_outs were given.")
        mask = self.mask_values(site, patch.shape[1])
        delta = None if mask is None else self._masked_sum(site, mask)
        state.dest_deltas[site.module_name] = delta
        return delta

    def _masked_sum(self, site: DestSite, mask: Tensor) -> Tensor | None:
        n_in = len(site.in_srcs)
        base_ndim = len(self.mask_shape(site))
        letters = ("b" if mask.ndim > base_ndim else "") + ("s" if self.seq_len else "")
        letters += "h" if site.n_heads is not None else ""
        equation = f"{letters}n,nbsd->bs{'h' if site.n_heads is not None else ''}d"
        active: list[bool] | None = None
        if not mask.requires_grad:
            active = (mask != 0).reshape(-1, n_in).any(0).tolist()
        delta: Tensor | None = None
        for i, src_site in enumerate(self.src_sites):
            lo = max(src_site.src_idxs.start, site.in_srcs.start)
            hi = min(src_site.src_idxs.stop, site.in_srcs.stop)
            if lo >= hi:
                continue
            cols = slice(lo - site.in_srcs.start, hi - site.in_srcs.start)
            if active is not None and not any(active[cols]):
                continue
            src_delta = self.src_delta(i)[
                lo - src_site.src_idxs.start : hi - src_site.src_idxs.start
            ]
            if self.seq_len is not None and src_delta.shape[2] != self.seq_len:
                raise CircuitError(
                    f"The model was made patchable with seq_len={self.seq_len}, but this input "
                    f"has {src_delta.shape[2]} token positions. Use prompts of exactly "
                    f"{self.seq_len} tokens (after any KV-cache prefix), or seq_len=None."
                )
            term = t.einsum(equation, mask[..., cols], src_delta)
            delta = term if delta is None else delta + term
        return delta

    def src_delta(self, i: int) -> Tensor:
        """``P - C`` for the i-th source site, ``[n, batch, seq, d_model]``."""
        state = self.state
        if i in state.src_deltas:
            return state.src_deltas[i]
        site = self.src_sites[i]
        assert state.patch_src_outs is not None
        patch = state.patch_src_outs[site.src_idxs.start : site.src_idxs.stop]
        if state.patch_is_delta:
            state.src_deltas[i] = patch
            return patch
        if i in state.outputs:
            current = site.read(state.outputs[i])
        elif state.curr_src_outs is not None:
            current = state.curr_src_outs[site.src_idxs.start : site.src_idxs.stop]
        else:
            raise CircuitError(
                f"Source {site.module_name} did not run in this forward pass (e.g. the model "
                "started at a later layer) and no curr_src_outs were given to patch_mode."
            )
        if not _broadcastable(patch.shape[1:], current.shape[1:]):
            raise CircuitError(
                f"patch_src_outs has [batch, seq, d_model] = {list(patch.shape[1:])} but "
                f"source {site.module_name} produced {list(current.shape[1:])} in this "
                "forward. Compute the ablations on a batch of the same shape as the input "
                "(batch and seq of size 1 broadcast)."
            )
        delta = patch.to(current.dtype) - current
        state.src_deltas[i] = delta
        return delta


def _broadcastable(patch_shape: t.Size, current_shape: t.Size) -> bool:
    """Patch [batch, seq, d] fits the current output (batch and seq may be 1)."""
    return len(patch_shape) == len(current_shape) and all(
        p == c or (p == 1 and i < len(patch_shape) - 1)
        for i, (p, c) in enumerate(zip(patch_shape, current_shape, strict=True))
    )
