"""What patching means: the reference engine.

In patch mode every source site records its output during the forward pass, and every
destination's input gets

    delta = sum over incoming edges (src -> dest) of mask[edge] * (P[src] - C[src])

added, where ``P`` are the patch values of the sources (``patch_src_outs``: corrupt,
zero or mean activations) and ``C`` their outputs in this very forward. Destinations
read the residual stream before any normalisation, and the residual stream is the sum
of the source outputs, so this replaces exactly the edge's contribution and nothing
else; a patched edge always carries ``P[src]`` whatever upstream patches did to
``C[src]``. A family says where sources and destinations are
(``auto_circuit.families.contract``); this engine installs the hooks, reads the sources,
adds the deltas and removes the hooks. It is exact for every family and every
algorithm; ``auto_circuit.engine.fast`` computes the same with less memory and time, and
the same tests check both.

All state lives in ``PatchState`` and is changed only by the context managers of
``auto_circuit.engine.graph_utils``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch as t
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from auto_circuit.engine.patch_wrapper import PatchState, PatchWrapperImpl
from auto_circuit.families.contract import DestSite, FamilyGraph, SrcSite
from auto_circuit.vocabulary.errors import CircuitError
from auto_circuit.vocabulary.tensor_ops import sample_hard_concrete


class ReferenceEngine:
    """Installs the hooks of a ``FamilyGraph`` on a model; computes each destination's
    delta from the definition."""

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
        self.state = self._new_state()
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
        self._deltas: dict[str, Tensor] = {}  # this forward's, per destination site
        self._install()

    def _new_state(self) -> PatchState:
        return PatchState()

    def mask_shape(self, site: DestSite) -> tuple[int, ...]:
        """``[(seq,) (head,) n_in]``: one mask element per edge into the site."""
        seq = (self.seq_len,) if self.seq_len is not None else ()
        heads = (site.n_heads,) if site.n_heads is not None else ()
        return seq + heads + (len(site.in_srcs),)

    # ---- hooks -------------------------------------------------------------------

    def _install(self) -> None:
        model = self.model

        def reset(*_: Any) -> None:
            self.clear_forward()

        self._handles.append(model.register_forward_pre_hook(reset))
        self._handles.append(model.register_forward_hook(reset))
        # Destinations first: where a module is both, the source records patched output.
        for wrapper, site in zip(self.dest_wrappers, self.graph.dest_sites, strict=True):
            for k, hook in enumerate(site.hooks):
                module = model.get_submodule(hook.hook_module)
                if hook.where == "output":
                    handle = module.register_forward_hook(self._dest_output_hook(site, k))
                else:
                    handle = module.register_forward_pre_hook(self._dest_input_hook(site, k))
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

    def clear_forward(self) -> None:
        """Forget this forward's outputs and deltas (before and after every forward)."""
        self.state.clear_forward()
        self._deltas.clear()

    def release(self) -> None:
        """Free buffers kept between forwards (when patch mode ends)."""
        self.clear_forward()

    def _src_hook(self, i: int) -> Callable[..., None]:
        state = self.state

        def hook(module: t.nn.Module, args: Any, output: Tensor) -> None:
            if state.patch_mode:
                state.outputs[i] = output

        return hook

    def _probe_hook(self, name: str) -> Callable[..., None]:
        state = self.state

        def hook(module: t.nn.Module, args: Any, output: Tensor) -> None:
            if state.patch_mode:
                state.probes[name] = output

        return hook

    def _dest_output_hook(self, site: DestSite, k: int) -> Callable[..., Tensor | None]:
        def hook(module: t.nn.Module, args: Any, output: Tensor) -> Tensor | None:
            return self.patched(site, k, output) if self.state.patch_mode else None

        return hook

    def _dest_input_hook(self, site: DestSite, k: int) -> Callable[..., tuple | None]:
        def hook(module: t.nn.Module, args: tuple) -> tuple | None:
            if not self.state.patch_mode:
                return None
            patched = self.patched(site, k, args[0])
            return None if patched is None else (patched, *args[1:])

        return hook

    # ---- the definition ------------------------------------------------------------

    def patched(self, site: DestSite, k: int, hooked: Tensor) -> Tensor | None:
        """The tensor at the site's ``k``-th hook with the delta added (None: unchanged,
        as when every mask of the site is 0 and needs no gradient: the delta is 0)."""
        mask = self.masks[site.module_name]
        if self.state.mask_fn is None and not mask.requires_grad and not bool(mask.any()):
            return None
        delta = self.delta(site, batch=hooked.shape[0], seq=hooked.shape[1])
        add = site.hooks[k].add
        return add(hooked, delta, self.state.probes) if add is not None else hooked + delta

    def delta(self, site: DestSite, batch: int, seq: int) -> Tensor:
        """``sum_j mask[..., j] (P[j] - C[j])`` over the site's sources: ``[batch, seq,
        (head,) d_model]``, once per forward."""
        if self.seq_len is not None and seq != self.seq_len:
            raise CircuitError(
                f"The model was made patchable with seq_len={self.seq_len}, but this input "
                f"has {seq} token positions. Use prompts of exactly {self.seq_len} tokens "
                "(after any KV-cache prefix), or seq_len=None."
            )
        if site.module_name not in self._deltas:
            diffs = self.differences(site.in_srcs, batch, seq)
            mask = self.mask_values(site, batch)
            self._deltas[site.module_name] = self._masked_sum(site, mask, diffs)
        return self._deltas[site.module_name]

    def differences(self, span: range, batch: int, seq: int) -> Tensor:
        """``P - C`` of the sources ``span``: ``[len(span), batch, seq, d_model]``."""
        state = self.state
        patch = state.patch_src_outs
        if patch is None:
            raise CircuitError("patch mode is on but no patch_src_outs were given.")
        parts = []
        for i, site in enumerate(self.src_sites):
            src = site.src_idxs
            lo, hi = max(src.start, span.start), min(src.stop, span.stop)
            if lo >= hi:
                continue
            if state.patch_is_delta:  # the patch is the difference itself
                diff = patch[lo:hi]
            else:
                current = self.current(i)
                self._check_shapes(site, patch.shape, tuple(current.shape))
                diff = patch[lo:hi].to(current.dtype) - current[lo - src.start : hi - src.start]
            parts.append(diff.expand(hi - lo, batch, seq, diff.shape[-1]))
        return t.cat(parts) if parts else patch[:0].expand(0, batch, seq, patch.shape[-1])

    def current(self, i: int) -> Tensor:
        """The i-th source site's outputs in this forward, ``[n, batch, seq, d_model]``."""
        state = self.state
        if i not in state.currents:
            site = self.src_sites[i]
            if i in state.outputs:
                state.currents[i] = site.read(state.outputs[i])
            elif state.curr_src_outs is not None:
                state.currents[i] = state.curr_src_outs[site.src_idxs.start : site.src_idxs.stop]
            else:
                raise CircuitError(
                    f"Source {site.module_name} did not run in this forward pass (e.g. the "
                    "model started at a later layer) and no curr_src_outs were given to "
                    "patch_mode."
                )
        current = state.currents[i]
        if current is None:  # pragma: no cover - only the fast engine stores None
            raise CircuitError(f"internal: source site {i} has no current value")
        return current

    def mask_values(self, site: DestSite, batch_size: int) -> Tensor:
        """The mask as used in this forward (sampled once per forward and site)."""
        state = self.state
        if site.module_name in state.mask_samples:
            return state.mask_samples[site.module_name]
        mask: Tensor = self.masks[site.module_name]
        if state.mask_fn == "hard_concrete":
            batch_masks = mask.ndim > len(self.mask_shape(site))
            mask = sample_hard_concrete(mask, None if batch_masks else batch_size)
        elif state.mask_fn == "sigmoid":
            mask = t.sigmoid(mask)
        if state.dropout_p > 0 and state.training:
            mask = t.nn.functional.dropout(mask, p=state.dropout_p, training=True)
        state.mask_samples[site.module_name] = mask
        return mask

    def _masked_sum(self, site: DestSite, mask: Tensor, diffs: Tensor) -> Tensor:
        """``mask [(batch,) (seq,) (head,) n] x diffs [n, batch, seq, d_model] ->
        [batch, seq, (head,) d_model]``, summed over the ``n`` sources."""
        n, batch, seq, _ = diffs.shape
        batch_masks = mask.ndim > len(self.mask_shape(site))
        if batch_masks and mask.shape[0] != batch:
            raise CircuitError(
                f"Per-example masks (set_mask_batch_size) have batch size {mask.shape[0]} but "
                f"the input has {batch} prompts; use the same batch size."
            )
        per_position = self.seq_len is not None
        m = mask.reshape(batch if batch_masks else 1, seq if per_position else 1, -1, n)
        delta = t.matmul(m.to(diffs.dtype), diffs.permute(1, 2, 0, 3))  # [batch, seq, head, d]
        return delta if site.n_heads is not None else delta.squeeze(2)

    def _check_shapes(self, site: SrcSite, patch: t.Size, current: tuple[int, ...]) -> None:
        """The patch values fit the source's output in this forward, and the input has
        the graph's number of token positions."""
        if not _broadcastable(patch[1:], t.Size(current[1:])):
            raise CircuitError(
                f"patch_src_outs has [batch, seq, d_model] = {list(patch[1:])} "
                f"but source {site.module_name} produced {list(current[1:])} in "
                "this forward. Compute the ablations on a batch of the same shape as "
                "the input (batch and seq of size 1 broadcast)."
            )
        if self.seq_len is not None and current[2] != self.seq_len:
            raise CircuitError(
                f"The model was made patchable with seq_len={self.seq_len}, but this input "
                f"has {current[2]} token positions. Use prompts of exactly "
                f"{self.seq_len} tokens (after any KV-cache prefix), or seq_len=None."
            )


def _broadcastable(patch_shape: t.Size, current_shape: t.Size) -> bool:
    """Patch [batch, seq, d] fits the current output (batch and seq may be 1)."""
    return len(patch_shape) == len(current_shape) and all(
        p == c or (p == 1 and i < len(patch_shape) - 1)
        for i, (p, c) in enumerate(zip(patch_shape, current_shape, strict=True))
    )
