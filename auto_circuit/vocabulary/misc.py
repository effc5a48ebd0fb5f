"""Small helpers shared across the package."""

from __future__ import annotations

import difflib
import hashlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any

import torch as t
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from auto_circuit.vocabulary.errors import CircuitError
from auto_circuit.vocabulary.safe_files import read_safe, write_safe


def module_by_name(model: t.nn.Module, module_name: str) -> t.nn.Module:
    """The submodule at dotted path ``module_name`` (e.g. ``blocks.3.attn.hook_z``)."""
    try:
        return model.get_submodule(module_name)
    except AttributeError as err:
        names = [name for name, _ in model.named_modules()]
        raise CircuitError(
            f"The model has no module {module_name!r}.{did_you_mean(module_name, names)}"
        ) from err


def did_you_mean(name: str, candidates: Iterable[str], n: int = 3) -> str:
    """A ' Did you mean ...?' suffix naming the closest candidates, or ''."""
    close: list[str] = difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.5)
    return f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""


def repo_path_to_abs_path(path: str | Path) -> Path:
    """Resolve a path of packaged data (e.g. ``datasets/ioi/ioi_prompts.json``).

    Data ships inside the package, so this works after ``pip install``: the path is
    looked up in the installed package first, then taken as given.
    """
    packaged = Path(str(resources.files("auto_circuit"))) / path
    if packaged.exists():
        return packaged
    return Path(path).resolve()


def set_module_by_name(model: t.nn.Module, module_name: str, new_module: t.nn.Module) -> None:
    """Replace the submodule at dotted path ``module_name`` with ``new_module`` (in place).

    As in AutoCircuit, a model with a ``wrapped_model`` (a ``PatchableModel``) is
    addressed inside its wrapped model. Unlike AutoCircuit, a path that does not exist
    is an error naming close matches instead of silently adding a new attribute.
    """
    root = getattr(model, "wrapped_model", model)
    *parent_path, leaf = module_name.split(".")
    parent = module_by_name(root, ".".join(parent_path)) if parent_path else root
    if not hasattr(parent, leaf):
        names = [name for name, _ in root.named_modules()]
        raise CircuitError(
            f"The model has no module {module_name!r}.{did_you_mean(module_name, names)}"
        )
    setattr(parent, leaf, new_module)


@contextmanager
def remove_hooks() -> Iterator[set[RemovableHandle]]:
    """Temporary PyTorch hooks: add the handles of hooks you register to the yielded set,
    and they are all removed when the block exits, also on an exception."""
    handles: set[RemovableHandle] = set()
    try:
        yield handles
    finally:
        for handle in handles:
            handle.remove()


def percent_gpu_mem_used(total_gpu_mib: int | None = None) -> str:
    """``"Memory used 12.3%"``: the share of GPU memory PyTorch has allocated.

    ``total_gpu_mib`` defaults to the current GPU's real size (AutoCircuit hard-coded
    49000 MiB). Without a GPU this is ``"Memory used 0.0%"`` rather than an error.
    """
    if not t.cuda.is_available():
        return "Memory used 0.0%"
    total_mib = (
        t.cuda.get_device_properties(t.cuda.current_device()).total_memory / 2**20
        if total_gpu_mib is None
        else float(total_gpu_mib)
    )
    used_mib = t.cuda.memory_allocated() / 2**20
    return f"Memory used {used_mib / total_mib * 100:.1f}%"


_CACHE_KIND = "auto_circuit.cache"
_CACHE_VERSION = 1


def _encode(obj: Any, tensors: dict[str, Tensor], where: str) -> Any:
    """A JSON tree for ``obj``; tensors go to ``tensors`` under a fresh name."""
    if isinstance(obj, Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = obj
        return {"tensor": name}
    if obj is None or isinstance(obj, bool | str):
        return obj
    if isinstance(obj, int | float):
        return {"float": repr(obj)} if isinstance(obj, float) else obj
    if isinstance(obj, list | tuple):
        items = [_encode(x, tensors, f"{where}[{i}]") for i, x in enumerate(obj)]
        return {"tuple" if isinstance(obj, tuple) else "list": items}
    if isinstance(obj, dict):
        return {
            "dict": [
                [_encode(k, tensors, f"{where} key"), _encode(v, tensors, f"{where}[{k!r}]")]
                for k, v in obj.items()
            ]
        }
    raise CircuitError(
        f"save_cache can store tensors, numbers, strings, None and lists, tuples and dicts "
        f"of them; {where} is a {type(obj).__name__}. Convert it first (e.g. an Enum to its "
        ".value)."
    )


def _decode(node: Any, tensors: dict[str, Tensor]) -> Any:
    if node is None or isinstance(node, bool | str | int):
        return node
    if isinstance(node, dict) and len(node) == 1:
        ((kind, val),) = node.items()
        if kind == "tensor" and val in tensors:
            return tensors[val]
        if kind == "float" and isinstance(val, str):
            return float(val)
        if kind in ("list", "tuple") and isinstance(val, list):
            items = [_decode(x, tensors) for x in val]
            return tuple(items) if kind == "tuple" else items
        if kind == "dict" and isinstance(val, list):
            return {_decode(k, tensors): _decode(v, tensors) for k, v in val}
    raise CircuitError(f"The cache's structure is corrupt near {str(node)[:80]!r}.")


def _tensors_digest(tensors: dict[str, Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        x = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}:{x.dtype}:{list(x.shape)};".encode())
        digest.update(x.reshape(-1).view(t.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_cache(data_dict: dict[Any, Any], folder_name: str | Path, base_filename: str) -> Path:
    """Save a (nested) dict of results to ``folder_name/base_filename-<time>.safetensors``
    and return that path.

    ``data_dict`` may nest dicts, lists and tuples of tensors, numbers, strings and None
    (prune scores, measurements). Unlike AutoCircuit (``torch.save``, a pickle, into a
    folder relative to its source tree) the file is safetensors with the structure in
    JSON metadata, so loading it can never run code, and ``folder_name`` is relative to
    the working directory. The time suffix is AutoCircuit's ``%d-%m-%Y_%H-%M-%S``.
    """
    tensors: dict[str, Tensor] = {}
    tree = _encode(data_dict, tensors, "data_dict")
    stamp = datetime.now().strftime("%d-%m-%Y_%H-%M-%S")
    path = Path(folder_name) / f"{base_filename}-{stamp}.safetensors"
    meta = {
        "kind": _CACHE_KIND,
        "version": _CACHE_VERSION,
        "tree": tree,
        "sha256": _tensors_digest(tensors),
    }
    return write_safe(path, tensors, meta)


def load_cache(folder_name: str | Path, filename: str) -> dict[Any, Any]:
    """The dict saved by ``save_cache`` in ``folder_name/filename``.

    Nothing is unpickled: a pickle or ``torch.save`` file, a truncated or tampered file
    (its tensors no longer match their recorded SHA-256) or a file not written by
    ``save_cache`` is refused with a ``CircuitError`` naming the file.
    """
    path = Path(folder_name) / filename
    tensors, meta = read_safe(path)
    if meta.get("kind") != _CACHE_KIND or meta.get("version") != _CACHE_VERSION:
        raise CircuitError(
            f"{path} is not a cache written by save_cache (kind {meta.get('kind')!r}, "
            f"version {meta.get('version')!r})."
        )
    if meta.get("sha256") != _tensors_digest(tensors):
        raise CircuitError(
            f"{path} was modified after it was written: its tensors do not match their "
            "recorded checksum. Recompute the results and save them again."
        )
    try:
        data = _decode(meta.get("tree"), tensors)
    except (TypeError, ValueError) as err:
        raise CircuitError(f"{path}: the cache's structure is corrupt ({err}).") from None
    if not isinstance(data, dict):
        raise CircuitError(f"{path}: the cache does not hold a dict.")
    return data


def _print_top_tokens(model: Any, logits: Tensor, answer: str | None, top_k: int) -> None:
    probs = logits.softmax(dim=-1)
    top_probs, top_ids = probs.topk(min(top_k, probs.shape[-1]))
    if answer is not None:
        answer_ids = model.to_tokens(answer, prepend_bos=False).reshape(-1)
        if answer_ids.numel() != 1:
            raise CircuitError(f"answer {answer!r} is {answer_ids.numel()} tokens; give one.")
        answer_id = int(answer_ids[0])
        rank = int((logits > logits[answer_id]).sum())
        print(
            f'\n"{model.to_string(answer_ids)}" token rank: {rank: <8}',
            f"\nLogit: {logits[answer_id].item():5.2f}",
            f"Prob: {probs[answer_id].item():6.2%}",
        )
    for i, (p, tok) in enumerate(zip(top_probs.tolist(), top_ids.tolist(), strict=True)):
        print(
            f"Top {i}th token. Logit: {logits[tok].item():5.2f}",
            f"Prob: {p:6.2%}",
            f'Token: "{model.to_string(tok)}"',
        )


def get_most_similar_embeddings(
    model: Any,
    out: Tensor,
    answer: str | None = None,
    top_k: int = 10,
    apply_ln_final: bool = False,
    apply_unembed: bool = False,
    apply_embed: bool = False,
) -> tuple[Tensor, Tensor]:
    """Print the ``top_k`` tokens most similar to the vector ``out`` (``[vocab]`` logits
    by default; a ``[d_model]`` residual with ``apply_unembed`` or ``apply_embed``).

    A debugging helper for TransformerLens models. ``apply_ln_final`` applies the final
    layer norm first; ``apply_unembed`` scores against the unembedding, ``apply_embed``
    against the embedding (``out @ W_E.T``). With ``answer`` (one token) its rank (0 =
    top), logit and probability are printed too. Returns ``(top probabilities, top token
    ids)``, which AutoCircuit did not.
    """
    if apply_embed and apply_unembed:
        raise CircuitError("Give at most one of apply_embed and apply_unembed.")
    x = out.reshape(1, 1, -1)
    if apply_ln_final:
        x = model.ln_final(x)
    if apply_embed:
        x = x @ model.embed.W_E.T
    elif apply_unembed:
        x = model.unembed(x)
    logits = x.reshape(-1).detach()
    _print_top_tokens(model, logits, answer, top_k)
    return logits.softmax(-1).topk(min(top_k, logits.shape[-1]))


def run_prompt(
    model: Any,
    prompt: str,
    answer: str | None = None,
    top_k: int = 10,
    prepend_bos: bool = False,
) -> tuple[Tensor, Tensor]:
    """Run ``prompt`` through a TransformerLens model and print the ``top_k`` next tokens
    (and ``answer``'s rank if given); returns ``get_most_similar_embeddings``'s result.

    AutoCircuit printed the prompt's tokens with the model's default BOS while running
    it with ``prepend_bos``; here both use ``prepend_bos``.
    """
    print(" ")
    print("Testing prompt", model.to_str_tokens(prompt, prepend_bos=prepend_bos))
    toks = model.to_tokens(prompt, prepend_bos=prepend_bos)
    with t.no_grad():
        logits = model(toks)
    return get_most_similar_embeddings(model, logits[0, -1], answer, top_k=top_k)
