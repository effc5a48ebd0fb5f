"""Stage: data. Prompt datasets and their loaders (``loaders``), and the generators of
the shipped prompt files (``generate``). ``auto_circuit.data`` is also AutoCircuit's
module path for the loaders, so their public names are importable from here."""

from auto_circuit.data.loaders import (
    Answers,
    BatchPromptTensor,
    PathLike,
    PromptDataLoader,
    PromptDataset,
    PromptPair,
    PromptPairBatch,
    PromptTensor,
    batch_key,
    collate_fn,
    diverge_idxs,
    load_datasets_from_json,
)

__all__ = [
    "Answers",
    "BatchPromptTensor",
    "PathLike",
    "PromptDataLoader",
    "PromptDataset",
    "PromptPair",
    "PromptPairBatch",
    "PromptTensor",
    "batch_key",
    "collate_fn",
    "diverge_idxs",
    "load_datasets_from_json",
]
