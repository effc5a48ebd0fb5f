"""The graph of a TransformerLens ``HookedTransformer`` and where to patch it.

Factorized (edge-level) graph:

========================  ====  ==================================  ===============
node                      kind  mask key / source name              layer
========================  ====  ==================================  ===============
``Resid Start``           src   ``blocks.0.hook_resid_pre``         0
``A{l}.{h}``              src   ``blocks.{l}.attn.hook_result``     2l+1
``MLP {l}``               src   ``blocks.{l}.hook_mlp_out``         2l+2 (2l+1 parallel)
``A{l}.{h}.Q|K|V``        dest  ``blocks.{l}.hook_{q,k,v}_input``   2l+1
``A{l}.{h}`` (no split)   dest  ``blocks.{l}.hook_attn_in``         2l+1
``MLP {l}``               dest  ``blocks.{l}.hook_mlp_in``          2l+2 (2l+1 parallel)
``Resid End``             dest  ``blocks.{L-1}.hook_resid_post``    2L+1
========================  ====  ==================================  ===============

No TransformerLens hook flag is needed (``use_attn_result``, ``use_split_qkv_input``
stay off, so the model runs at full speed): head outputs are read as ``z`` at
``hook_z`` and projected through ``W_O`` only when a mask needs them; a head's patched
query/key/value input is rebuilt at ``hook_q``/``hook_k``/``hook_v`` from the block's
``resid_pre`` plus that head's delta, through the block's own ``ln1``, only when one
of its masks is non-zero (the block then skips its own projection of that q/k/v: an
interceptor wraps ``attn.calculate_qkv_matrices``). With every mask 0 and gradients
on (edge attribution), nothing is rebuilt: the block's q/k/v are kept and the deltas
get their gradient in closed form. MLP inputs are patched before ``ln2``; ``Resid End``
at the last ``hook_resid_post`` (before ``ln_final``).

The unfactorized (node-level) graph has the residual checkpoints as nodes: heads feed
``Resid Mid {l}`` and MLPs feed ``Resid Post {l}``; patching there replaces a node's
output for every later reader.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from itertools import count
from types import MethodType
from typing import Any

import torch as t
from jaxtyping import Float
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from auto_circuit.families.block_forward import BlockInput
from auto_circuit.families.contract import (
    AddDelta,
    DestHook,
    DestSite,
    FamilyGraph,
    SrcSite,
    contiguous_range,
    dest_in_srcs,
    dests_by_module,
)
from auto_circuit.families.fast_paths import (
    Delta,
    FastAdd,
    FastDest,
    FastPaths,
    GetDelta,
    HeadProjection,
    Interceptor,
)
from auto_circuit.families.registry import register_family
from auto_circuit.vocabulary.errors import CircuitError
from auto_circuit.vocabulary.types import DestNode, SrcNode

try:  # TransformerLens 3.x; 4.x removed HookedTransformer
    from transformer_lens import HookedTransformer
except ImportError:  # pragma: no cover - depends on the installed version
    HookedTransformer = None  # type: ignore[assignment,misc]

try:  # the projections TransformerLens' attention uses for q, k and v
    from transformer_lens.utilities.attention import complex_attn_linear, simple_attn_linear

    def attn_linear(x: Tensor, weight: Tensor, bias: Tensor, split: bool) -> Tensor:
        return (complex_attn_linear if split else simple_attn_linear)(x, weight, bias)
except ImportError:  # pragma: no cover - then the block's own q/k/v are always computed
    attn_linear = None  # type: ignore[assignment]


def _layers(model) -> tuple[int, bool, bool]:
    cfg = model.cfg
    return cfg.n_layers, bool(cfg.attn_only), bool(cfg.parallel_attn_mlp)


def factorized_src_nodes(model) -> set[SrcNode]:
    """Sources of the edge-level graph: embedding, every head, every MLP."""
    n_layers, attn_only, parallel = _layers(model)
    n_heads = model.cfg.n_heads
    idxs = count()
    nodes = {SrcNode("Resid Start", "blocks.0.hook_resid_pre", 0, src_idx=next(idxs))}
    for block in range(n_layers):
        for head in range(n_heads):
            nodes.add(
                SrcNode(
                    name=f"A{block}.{head}",
                    module_name=f"blocks.{block}.attn.hook_result",
                    layer=2 * block + 1,
                    head_idx=head,
                    head_dim=2,
                    weight=f"blocks.{block}.attn.W_O",
                    weight_head_dim=0,
                    src_idx=next(idxs),
                )
            )
        if not attn_only:
            layer = 2 * block + 1 if parallel else 2 * block + 2
            nodes.add(
                SrcNode(
                    name=f"MLP {block}",
                    module_name=f"blocks.{block}.hook_mlp_out",
                    layer=layer,
                    weight=f"blocks.{block}.mlp.W_out",
                    src_idx=next(idxs),
                )
            )
    return nodes


def factorized_dest_nodes(model, separate_qkv: bool) -> set[DestNode]:
    """Destinations of the edge-level graph: per-head Q/K/V (or attention) inputs, MLP
    inputs and the final residual stream."""
    n_layers, attn_only, parallel = _layers(model)
    nodes = set()
    for block in range(n_layers):
        for head in range(model.cfg.n_heads):
            if separate_qkv:
                for letter in "qkv":
                    nodes.add(
                        DestNode(
                            name=f"A{block}.{head}.{letter.upper()}",
                            module_name=f"blocks.{block}.hook_{letter}_input",
                            layer=2 * block + 1,
                            head_idx=head,
                            head_dim=2,
                            weight=f"blocks.{block}.attn.W_{letter.upper()}",
                            weight_head_dim=0,
                        )
                    )
            else:
                nodes.add(
                    DestNode(
                        name=f"A{block}.{head}",
                        module_name=f"blocks.{block}.hook_attn_in",
                        layer=2 * block + 1,
                        head_idx=head,
                        head_dim=2,
                    )
                )
        if not attn_only:
            nodes.add(
                DestNode(
                    name=f"MLP {block}",
                    module_name=f"blocks.{block}.hook_mlp_in",
                    layer=2 * block + 1 if parallel else 2 * block + 2,
                    weight=f"blocks.{block}.mlp.W_in",
                )
            )
    nodes.add(DestNode("Resid End", f"blocks.{n_layers - 1}.hook_resid_post", 2 * n_layers + 1))
    return nodes


def simple_graph_nodes(model) -> tuple[set[SrcNode], set[DestNode]]:
    """Nodes of the unfactorized (node-level) graph over residual checkpoints.

    Per block: ``Resid Pre`` (``Resid Start`` or the previous ``Resid Post``) and the
    heads feed ``Resid Mid``; ``Resid Mid`` and the MLP feed ``Resid Post`` (the last
    one is ``Resid End``). Attention-only blocks go straight to ``Resid Post``.
    """
    n_layers, attn_only, parallel = _layers(model)
    if parallel:
        raise CircuitError(
            "The unfactorized graph is not defined for parallel attention+MLP models "
            "(attention and MLP read the same residual, so there is no Resid Mid). "
            "Use factorized=True."
        )
    srcs: set[SrcNode] = set()
    dests: set[DestNode] = set()
    idxs, layers = count(), count()
    layer = next(layers)
    for block in range(n_layers):
        last = block == n_layers - 1
        post_name = "Resid End" if last else f"Resid Post {block}"
        min_idx = next(idxs)
        srcs.add(
            SrcNode(
                name="Resid Start" if block == 0 else f"Resid Post {block - 1}",
                module_name=f"blocks.{block}.hook_resid_pre"
                if block == 0
                else f"blocks.{block - 1}.hook_resid_post",
                layer=layer,
                src_idx=min_idx,
            )
        )
        for head in range(model.cfg.n_heads):
            srcs.add(
                SrcNode(
                    name=f"A{block}.{head}",
                    module_name=f"blocks.{block}.attn.hook_result",
                    layer=layer,
                    head_idx=head,
                    head_dim=2,
                    src_idx=next(idxs),
                )
            )
        layer = next(layers)
        if attn_only:
            dests.add(
                DestNode(post_name, f"blocks.{block}.hook_resid_post", layer, min_src_idx=min_idx)
            )
            continue
        dests.add(
            DestNode(
                f"Resid Mid {block}", f"blocks.{block}.hook_resid_mid", layer, min_src_idx=min_idx
            )
        )
        mid_idx = next(idxs)
        srcs.add(
            SrcNode(f"Resid Mid {block}", f"blocks.{block}.hook_resid_mid", layer, src_idx=mid_idx)
        )
        srcs.add(SrcNode(f"MLP {block}", f"blocks.{block}.hook_mlp_out", layer, src_idx=next(idxs)))
        layer = next(layers)
        dests.add(
            DestNode(post_name, f"blocks.{block}.hook_resid_post", layer, min_src_idx=mid_idx)
        )
    return srcs, dests


def _check_supported(model) -> None:
    cfg = model.cfg
    problems = []
    if getattr(cfg, "n_key_value_heads", None) is not None:
        problems.append("grouped-query attention (n_key_value_heads is set)")
    if cfg.positional_embedding_type == "shortformer":
        problems.append("shortformer positional embeddings")
    if getattr(cfg, "use_normalization_before_and_after", False):
        problems.append("normalization before and after each sublayer")
    if getattr(cfg, "load_in_4bit", False):
        problems.append("4-bit weights")
    if getattr(cfg, "use_qk_norm", False):
        problems.append("QK normalization")
    arch = getattr(cfg, "original_architecture", None) or ""
    if arch.lower().startswith("olmo2") or arch.lower().startswith("olmo3"):
        problems.append(f"post-norm architecture {arch}")
    if problems:
        raise CircuitError(
            f"This HookedTransformer ({cfg.model_name}) uses {', '.join(problems)}, which "
            "the TransformerLens family does not support: its edge patching assumes "
            "pre-LayerNorm blocks reading the residual stream through ln1/ln2. "
            "Supported: GPT-2 style, attention-only and parallel attention/MLP models."
        )


def _read_resid(x: Float[Tensor, "batch seq d"]) -> Float[Tensor, "1 batch seq d"]:
    return x.unsqueeze(0)


def _head_reader(attn: t.nn.Module):
    def read(z: Float[Tensor, "batch seq head d_head"]) -> Float[Tensor, "head batch seq d"]:
        return t.einsum("bshe,hed->hbsd", z, attn.W_O)

    return read


def _head_projection(attn: Any) -> HeadProjection:
    """Head outputs as ``z_h @ W_O_h``, for the engine to subtract in one product."""

    def operands(
        z: Float[Tensor, "batch seq head d_head"],
    ) -> tuple[Float[Tensor, "batch seq head d_head"], Float[Tensor, "head d_head d_model"]]:
        return z, attn.W_O

    return HeadProjection(operands)


def _project_heads(
    normed: Float[Tensor, "batch seq head d_model"],
    weight: Float[Tensor, "head d_model d_head"],
    bias: Float[Tensor, "head d_head"],
) -> Float[Tensor, "batch seq head d_head"]:
    """Each head's own input through its own projection: ``normed_h @ W_h + b_h``."""
    batch, seq, n_heads, d_model = normed.shape
    # Head-major view (batch and seq merge), so the projection is one bmm.
    per_head = normed.permute(2, 0, 1, 3).reshape(n_heads, batch * seq, d_model)
    out = t.bmm(per_head, weight).view(n_heads, batch, seq, -1).permute(1, 2, 0, 3)
    return out + bias


def _qkv_add(block: t.nn.Module, letter: str, block_idx: int) -> AddDelta:
    """The plain patch of a block's q/k/v: every head's input rebuilt as
    ``ln1(resid_pre + delta_h)`` and projected by that head's ``W_h``, replacing the
    block's own q/k/v (``hook_q/k/v`` output)."""
    attn: Any = block.attn
    ln1 = _fused_norm(block.ln1)
    probe = f"blocks.{block_idx}.hook_resid_pre"

    def add(
        hooked: Tensor, delta: Tensor, probes: Mapping[str, Tensor]
    ) -> Float[Tensor, "batch seq head d_head"]:
        normed = ln1(probes[probe].unsqueeze(2) + delta)
        return _project_heads(normed, getattr(attn, f"W_{letter}"), getattr(attn, f"b_{letter}"))

    return add


def _qkv_fast_add(block: t.nn.Module, letter: str, block_idx: int) -> FastAdd:
    """``_qkv_add``'s result with less memory and time.

    With gradients on, the rebuild runs under an activation checkpoint: the per-head
    ``[batch, seq, head, d_model]`` inputs and their normalised copies are recomputed in
    the backward pass instead of being kept, so memory stays near the bare model's.
    When every mask of the destination is 0 (mask-gradient attribution) nothing is
    rebuilt: the block's own q/k/v are kept and the delta gets its gradient in closed
    form (``_ZeroDeltaProjection``).
    """
    attn: Any = block.attn
    ln1 = _fused_norm(block.ln1)
    probe = f"blocks.{block_idx}.hook_resid_pre"

    def rebuild(resid: Tensor, delta: Delta) -> Tensor:
        summed = delta() if delta.includes_base else resid.unsqueeze(2) + delta()
        normed = ln1(summed)  # [batch, seq, head, d_model]
        return _project_heads(normed, getattr(attn, f"W_{letter}"), getattr(attn, f"b_{letter}"))

    folded = _FoldedProjection()

    def apply(
        hooked: Tensor, delta: Delta, probes: Mapping[str, Tensor]
    ) -> Float[Tensor, "batch seq head d_head"]:
        resid = probes[probe]
        norm = _norm_form(block.ln1)
        if delta.is_zero and norm is not None:
            weight, bias = getattr(attn, f"W_{letter}"), getattr(attn, f"b_{letter}")
            return hooked + _ZeroDeltaProjection.apply(delta(), resid, hooked, weight, bias, norm)
        if t.is_grad_enabled():
            return checkpoint(rebuild, resid, delta, use_reentrant=False)
        if norm is not None and resid.dtype in (t.float32, t.float64):
            weight, bias = getattr(attn, f"W_{letter}"), getattr(attn, f"b_{letter}")
            return _rebuild_in_place(
                resid, delta, *folded(weight, bias, norm), norm.centered, norm.eps
            )
        return rebuild(resid, delta)

    return apply


def _rebuild_in_place(
    resid: Float[Tensor, "batch seq d_model"],
    delta: Delta,
    weight: Float[Tensor, "head d_model d_head"],
    shift: Float[Tensor, "head d_head"],
    centered: bool,
    eps: float,
) -> Float[Tensor, "batch seq head d_head"]:
    """``norm(resid + delta_h) W_h + b_h`` without gradients and without a new per-head
    ``[batch, seq, head, d_model]`` tensor.

    The sum ``x`` is the delta itself when the engine folded ``resid`` into its matmul
    (``includes_base``), else it is formed in the delta's memory (when the engine hands
    it over, else in one copy). The normalisation is applied on the ``d_head`` side:
    its weight, bias and centring are folded into ``weight`` and ``shift``
    (``_FoldedProjection``), and its scale comes from ``mean(x^2) - mean(x)^2``: two
    reads of ``x`` and no write. Where that difference would lose precision (the mean
    is large against the spread: ``mean^2 > mean(x^2) / 2`` somewhere) and off the CPU
    (where the passes are cheap and a data-dependent branch would synchronise), the
    variance is computed from the centred sum instead.
    """
    x = delta()
    mine = delta.owned
    if not delta.includes_base:
        x = x if mine else x.clone()
        mine = True
        x.add_(resid.to(x.dtype).unsqueeze(2))
    batch, seq, n_heads, d_model = x.shape
    # (var_mean would do both in one pass, but its CPU kernel is ~10x slower)
    var = t.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(d_model)
    if centered:
        mean = x.mean(dim=-1, keepdim=True)
        mean_sq = mean.square()
        if x.device.type == "cpu" and not bool((mean_sq > var / 2).any()):
            var.sub_(mean_sq).clamp_(min=0)
        else:
            x = x.sub_(mean) if mine else x - mean
            var = t.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(d_model)
    scale = var.add_(eps).rsqrt_()  # [batch, seq, head, 1]
    # Head-major views for one bmm; the delta's layout lets batch and seq merge.
    per_head = x.permute(2, 0, 1, 3).view(n_heads, batch * seq, d_model)
    projected = t.bmm(per_head, weight).view(n_heads, batch, seq, -1).permute(1, 2, 0, 3)
    return projected.mul_(scale).add_(shift)


class _FoldedProjection:
    """``(C (w * W_h), b W_h + b_h)``: a normalisation's weight ``w``, bias ``b`` and,
    for a centring norm, its centring ``C = I - 1 1^T / d_model`` (``x C W = (x -
    mean(x)) W``) folded into a per-head projection; recomputed only when one of the
    four tensors is replaced or changed in place (their version counters), not in every
    forward."""

    def __init__(self) -> None:
        self._refs: tuple[Callable[[], Tensor | None], ...] = ()
        self._versions: tuple = ()
        self._value: tuple[Tensor, Tensor] | None = None

    def __call__(self, weight: Tensor, bias: Tensor, norm: _NormForm) -> tuple[Tensor, Tensor]:
        tensors = (weight, bias, norm.weight, norm.bias)
        versions = tuple(None if x is None else (x._version, x.dtype, x.device) for x in tensors)
        same = versions == self._versions and all(
            ref() is x for ref, x in zip(self._refs, tensors, strict=True)
        )
        if self._value is None or not same:
            shift = bias if norm.bias is None else bias + t.matmul(norm.bias, weight)
            scaled = weight if norm.weight is None else weight * norm.weight[None, :, None]
            if norm.centered:
                scaled = scaled - scaled.mean(dim=1, keepdim=True)
            self._value = (scaled, shift)
            self._versions = versions
            self._refs = tuple(_no_tensor if x is None else weakref.ref(x) for x in tensors)
        return self._value


def _no_tensor() -> None:
    return None


@dataclass(frozen=True)
class _NormForm:
    """A pre-norm ``(x - mean(x) if centered else x) / sqrt(mean(.^2) + eps) * w + b``."""

    centered: bool
    weight: Tensor | None
    bias: Tensor | None
    eps: float


def _norm_form(norm: Any) -> _NormForm | None:
    """The formula of a TransformerLens normalisation module (None: unknown kind)."""
    kind = type(norm).__name__
    eps = float(getattr(norm, "eps", 1e-5))
    if kind == "LayerNorm":
        return _NormForm(True, norm.w, norm.b, eps)
    if kind == "LayerNormPre":
        return _NormForm(True, None, None, eps)
    if kind == "RMSNorm":
        return _NormForm(False, norm.w, None, eps)
    if kind == "RMSNormPre":
        return _NormForm(False, None, None, eps)
    return None


class _ZeroDeltaProjection(t.autograd.Function):
    """``q(delta) - q(0)`` at ``delta = 0`` for ``q(delta) = norm(resid + delta_h) W_h + b_h``:
    the value 0 (``[batch, seq, head, d_head]``, not computed) and, in backward, the exact
    gradient for each head's delta ``[batch, seq, head, d_model]``, from the block's own
    ``q(0)`` (``hooked``) instead of a per-head rebuild. With ``x`` the (centred) residual,
    ``s = 1 / sqrt(mean(x^2) + eps)``, ``W'_h = w * W_h``, ``u_h = 1^T W'_h`` and
    ``k_h = b W_h + b_h``::

        d/d delta_h = s (W'_h g - [centred] (u_h . g) / d_model)
                      - x s^2 ((q_h(0) - k_h) . g) / d_model

    The residual's own gradient flows through ``hooked``; this adds none (the difference
    is 0 for every residual)."""

    @staticmethod
    def forward(ctx, delta, resid, hooked, weight, bias, norm):  # type: ignore[override]
        ctx.save_for_backward(resid, hooked)
        ctx.weight, ctx.bias, ctx.norm, ctx.delta_dtype = weight, bias, norm, delta.dtype
        return hooked.new_zeros(()).expand(hooked.shape)

    @staticmethod
    @t.autograd.function.once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        resid, hooked = ctx.saved_tensors
        norm: _NormForm = ctx.norm
        with t.no_grad():
            x = resid.float()
            batch, seq, d_model = x.shape
            if norm.centered:
                x = x - x.mean(-1, keepdim=True)
            scale = (x.pow(2).mean(-1, keepdim=True) + norm.eps).rsqrt().view(1, -1, 1)
            weight = ctx.weight.detach().float()  # [head, d_model, d_head]
            n_heads = weight.shape[0]
            scaled = weight
            if norm.weight is not None:
                scaled = weight * norm.weight.detach().float()[None, :, None]
            shift = ctx.bias.detach().float()  # [head, d_head]
            if norm.bias is not None:
                shift = shift + t.einsum("d,hde->he", norm.bias.detach().float(), weight)
            g = grad.float().permute(2, 0, 1, 3).reshape(n_heads, batch * seq, -1)
            out = t.bmm(g, scaled.transpose(1, 2))  # [head, batch*seq, d_model]
            out.mul_(scale)
            if norm.centered:
                mean_term = t.einsum("hne,he->hn", g, scaled.sum(1)).unsqueeze(-1)
                out.sub_(mean_term.mul_(scale / d_model))
            q0 = (hooked.float() - shift[None, None]).permute(2, 0, 1, 3).reshape_as(g)
            coef = (q0 * g).sum(-1, keepdim=True).mul_(scale.square() / d_model)
            out.addcmul_(x.view(1, batch * seq, d_model), coef, value=-1.0)
            out = out.view(n_heads, batch, seq, d_model).permute(1, 2, 0, 3)
        return out.to(ctx.delta_dtype), None, None, None, None, None


def _fused_norm(norm: Any) -> Callable[[Tensor], Tensor]:
    """The block's normalisation as one fused kernel (TransformerLens composes it from
    about ten elementwise ops, which dominates the per-head rebuild); same formula."""
    kind = type(norm).__name__
    eps = getattr(norm, "eps", 1e-5)

    def in_float(fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
        def run(x: Tensor) -> Tensor:
            if x.dtype in (t.float32, t.float64):
                return fn(x)
            return fn(x.float()).to(x.dtype)

        return run

    def param(name: str, x: Tensor) -> Tensor:  # in the computation's (float) dtype
        return getattr(norm, name).to(x.dtype)

    if kind == "LayerNorm":
        return in_float(
            lambda x: t.nn.functional.layer_norm(x, x.shape[-1:], param("w", x), param("b", x), eps)
        )
    if kind == "LayerNormPre":
        return in_float(lambda x: t.nn.functional.layer_norm(x, x.shape[-1:], None, None, eps))
    if kind == "RMSNorm":
        return in_float(lambda x: t.nn.functional.rms_norm(x, x.shape[-1:], param("w", x), eps))
    if kind == "RMSNormPre":
        return in_float(lambda x: t.nn.functional.rms_norm(x, x.shape[-1:], None, eps))
    return norm


class TransformerLensFamily:
    name = "transformer_lens"
    description = (
        "transformer_lens.HookedTransformer (TransformerLens 3.x): GPT-2 style, "
        "attention-only and parallel attention/MLP models, separate_qkv True or False"
    )

    def accepts(self, model: t.nn.Module) -> bool:
        return HookedTransformer is not None and isinstance(model, HookedTransformer)

    def build(self, model: t.nn.Module, factorized: bool, separate_qkv: bool | None) -> FamilyGraph:
        _check_supported(model)
        if factorized and separate_qkv is None:
            raise CircuitError(
                "separate_qkv must be True or False for a transformer: True gives separate "
                "Q, K and V destinations per head, False one attention input per head."
            )
        if factorized:
            srcs = factorized_src_nodes(model)
            dests = factorized_dest_nodes(model, bool(separate_qkv))
        else:
            srcs, dests = simple_graph_nodes(model)
        return FamilyGraph(
            srcs=srcs,
            dests=dests,
            src_sites=_src_sites(model, srcs),
            dest_sites=_dest_sites(model, srcs, dests, factorized),
            probes=[f"blocks.{b}.hook_resid_pre" for b in range(_layers(model)[0])],
            is_transformer=True,
            separate_qkv=separate_qkv if factorized else None,
            fast_paths=_fast_paths(model, srcs, dests, factorized, bool(separate_qkv)),
            block_forward=TransformerLensBlockForward(model),
        )


def _replaces_hooked(delta: Delta | None, block: t.nn.Module) -> bool:
    """Whether ``_qkv_rebuilder`` ignores the block's own q/k/v for this delta."""
    return delta is not None and not (delta.is_zero and _norm_form(block.ln1) is not None)


def _qkv_interceptors(model, factorized: bool, separate_qkv: bool) -> tuple[Interceptor, ...]:
    """Per block, skip the block's own projection of a q/k/v that the destination hook
    replaces by a per-head rebuild (it would be computed only to be thrown away: a sixth
    of the bare forward). Hooks on ``hook_q/k/v`` registered before patchable_model see
    zeros there; those registered later see the rebuilt value."""
    if not factorized or attn_linear is None:
        return ()

    def interceptor(block_idx: int) -> Interceptor:
        sites = {
            letter: f"blocks.{block_idx}.hook_{letter.lower()}_input"
            if separate_qkv
            else f"blocks.{block_idx}.hook_attn_in"
            for letter in "QKV"
        }

        def install(model: t.nn.Module, get_delta: GetDelta) -> Callable[[], None]:
            block: Any = model.blocks[block_idx]  # type: ignore[index]
            attn: Any = block.attn
            earlier = attn.__dict__.get("calculate_qkv_matrices")  # another wrapper's

            def calculate_qkv_matrices(self: Any, query_input, key_input, value_input):
                # Bound to the module (MethodType), so a deep copy of the model computes
                # with its own weights.
                skip = {k: _replaces_hooked(get_delta(site), block) for k, site in sites.items()}
                if not any(skip.values()):
                    if earlier is not None:
                        return earlier(query_input, key_input, value_input)
                    return type(self).calculate_qkv_matrices(
                        self, query_input, key_input, value_input
                    )
                split = self.cfg.use_split_qkv_input or self.cfg.use_attn_in
                outs = []
                for letter, x in zip("QKV", (query_input, key_input, value_input), strict=True):
                    weight, bias = getattr(self, f"W_{letter}"), getattr(self, f"b_{letter}")
                    if skip[letter]:
                        shape = (*x.shape[:2], weight.shape[0], weight.shape[-1])
                        value = x.new_zeros(()).expand(shape)
                    else:
                        value = attn_linear(x, weight, bias, split)
                    outs.append(getattr(self, f"hook_{letter.lower()}")(value))
                return tuple(outs)

            # Another wrapper of the same model may sit above or below this one; each
            # link says what it wraps and whether its wrapper was removed, so removal in
            # any order leaves only live wrappers' methods on the module.
            link = {"earlier": earlier, "removed": False}
            calculate_qkv_matrices.auto_circuit_link = link  # type: ignore[attr-defined]
            bound = MethodType(calculate_qkv_matrices, attn)
            attn.calculate_qkv_matrices = bound

            def uninstall() -> None:
                link["removed"] = True
                if attn.__dict__.get("calculate_qkv_matrices") is not bound:
                    return  # a later wrapper is on top; it skips this link when removed
                del attn.calculate_qkv_matrices
                restore = earlier
                while restore is not None:
                    below = getattr(restore.__func__, "auto_circuit_link", None)
                    if below is None or not below["removed"]:
                        break
                    restore = below["earlier"]
                if restore is not None:
                    attn.calculate_qkv_matrices = restore

            return uninstall

        return install

    return tuple(interceptor(b) for b in range(_layers(model)[0]))


def _src_sites(model, srcs: set[SrcNode]) -> list[SrcSite]:
    """Residual sources are read where they are; heads as ``z`` at ``hook_z``, projected
    through ``W_O`` when read (``use_attn_result`` may stay off)."""
    by_module: dict[str, list[int]] = {}
    for src in sorted(srcs, key=lambda s: s.src_idx):
        by_module.setdefault(src.module_name, []).append(src.src_idx)
    sites = []
    for name, idxs in by_module.items():
        if name.endswith("attn.hook_result"):
            attn_name = name.rsplit(".", 1)[0]
            hook, read = f"{attn_name}.hook_z", _head_reader(model.get_submodule(attn_name))
        else:
            hook, read = name, _read_resid
        sites.append(SrcSite(name, hook, contiguous_range(idxs, name), read))
    return sites


_QKV_KINDS = ("hook_q_input", "hook_k_input", "hook_v_input")


def _dest_sites(
    model, srcs: set[SrcNode], dests: set[DestNode], factorized: bool
) -> list[DestSite]:
    sites = []
    for name, nodes in dests_by_module(model, dests).items():
        block_idx = int(name.split(".")[1])
        block = model.blocks[block_idx]
        kind = name.rsplit(".", 1)[1]
        if kind in _QKV_KINDS or kind == "hook_attn_in":
            letters = kind[5].upper() if kind in _QKV_KINDS else "QKV"
            hooks = tuple(
                DestHook(
                    f"blocks.{block_idx}.attn.hook_{letter.lower()}",
                    "output",
                    _qkv_add(block, letter, block_idx),
                )
                for letter in letters
            )
        elif kind == "hook_mlp_in":
            hooks = (DestHook(f"blocks.{block_idx}.ln2", "input"),)
        else:  # residual checkpoints: hook_resid_post, hook_resid_mid
            hooks = (DestHook(name, "output"),)
        n_heads = len(nodes) if nodes[0].head_idx is not None else None
        sites.append(DestSite(name, hooks, n_heads, dest_in_srcs(srcs, nodes[0], factorized)))
    return sites


def _fast_paths(
    model, srcs: set[SrcNode], dests: set[DestNode], factorized: bool, separate_qkv: bool
) -> FastPaths:
    """Heads' differences in one product; a block's Q/K/V deltas from one product with
    its residual folded in; the q/k/v rebuild in place, under a checkpoint with
    gradients, or skipped with a closed-form gradient when every mask is 0; the block's
    own projection skipped where the rebuild replaces it."""
    projections = {
        src.module_name: _head_projection(model.get_submodule(src.module_name.rsplit(".", 1)[0]))
        for src in srcs
        if src.module_name.endswith("attn.hook_result")
    }
    fast_dests = {}
    for name in {d.module_name for d in dests}:
        block_idx = int(name.split(".")[1])
        block = model.blocks[block_idx]
        kind = name.rsplit(".", 1)[1]
        if kind in _QKV_KINDS or kind == "hook_attn_in":
            letters = kind[5].upper() if kind in _QKV_KINDS else "QKV"
            fast_dests[name] = FastDest(
                fuse_key=f"blocks.{block_idx}.qkv" if kind in _QKV_KINDS else None,
                base_probe=f"blocks.{block_idx}.hook_resid_pre",
                adds=tuple(_qkv_fast_add(block, letter, block_idx) for letter in letters),
            )
    return FastPaths(
        head_projections=projections,
        dests=fast_dests,
        interceptors=_qkv_interceptors(model, factorized, separate_qkv),
    )


class TransformerLensBlockForward:
    """``BlockForward`` (``auto_circuit.families.block_forward``) for a
    ``HookedTransformer``: ``start_at_layer`` / ``stop_at_layer``, ``ln_final`` and
    ``unembed``, the input residual at ``blocks.0.hook_resid_pre``."""

    input_hook = "blocks.0.hook_resid_pre"

    def __init__(self, model: Any):
        self._model = model

    @property
    def n_blocks(self) -> int:
        return len(self._model.blocks)

    @property
    def unembeds_per_position(self) -> bool:
        # Soft-capped logits are post-processed after the unembedding.
        return not (getattr(self._model.cfg, "output_logits_soft_cap", -1.0) or -1.0) > 0

    @cached_property
    def _owner(self) -> dict[int, int]:
        return {id(mod): i for i, block in enumerate(self._model.blocks) for mod in block.modules()}

    def block_of(self, module_name: str) -> int | None:
        return self._owner.get(id(self._model.get_submodule(module_name)))

    @contextmanager
    def recording_block_inputs(self) -> Iterator[dict[int, BlockInput]]:
        recorded: dict[int, BlockInput] = {}
        handles = []
        for i, block in enumerate(self._model.blocks):

            def hook(mod: t.nn.Module, args: tuple, kwargs: dict, i: int = i) -> None:
                recorded[i] = BlockInput(args[0].detach(), kwargs.get("attention_mask"))

            handles.append(block.register_forward_pre_hook(hook, with_kwargs=True))
        try:
            yield recorded
        finally:
            for handle in handles:
                handle.remove()

    def run_from_block(
        self,
        resid: Tensor,
        block: int,
        attention_mask: Tensor | None = None,
        stop_before_unembed: bool = False,
    ) -> Tensor:
        kwargs: dict[str, Any] = {"start_at_layer": block}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        if stop_before_unembed:
            kwargs["stop_at_layer"] = self.n_blocks
        return self._model(resid, **kwargs)

    def unembed(self, resid: Tensor) -> Tensor:
        if self._model.cfg.normalization_type is not None:
            resid = self._model.ln_final(resid)
        return self._model.unembed(resid)

    def embed(self, inputs: Tensor, **forward_kwargs: Any) -> tuple[Tensor, dict[str, Any]]:
        resid, tokens, _, attention_mask = self._model.input_to_embed(inputs, **forward_kwargs)
        return resid, {"start_at_layer": 0, "tokens": tokens, "attention_mask": attention_mask}


register_family(TransformerLensFamily())
