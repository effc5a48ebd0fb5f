"""Prompt datasets: clean/corrupt prompt pairs with their answers, and loaders over them.

A task compares a *clean* prompt with a *corrupt* one that differs in the tokens the
circuit should care about (for IOI, the names). Each pair carries the token ids of the
correct ``answers`` and of the ``wrong_answers`` to the clean prompt. Datasets are JSON
files (format in :func:`load_datasets_from_json`); the loaders give ``PromptPairBatch``es.

Every prompt gets an integer id (its position in the dataset files). A batch's ``key`` is a
hash of its prompts' ids: it is the same in every process and costs no device sync.

Axis names are those of :mod:`auto_circuit.vocabulary.axes`.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch as t
from jaxtyping import Float, Int
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from auto_circuit.vocabulary.errors import CircuitError
from auto_circuit.vocabulary.types import BatchKey

if TYPE_CHECKING:
    # Imported lazily: loading pre-tokenised data does not need TransformerLens.
    from transformer_lens import HookedTransformer, TransformerLensKeyValueCache

PathLike = str | Path

PromptTensor = Int[Tensor, "seq *d_input"] | Float[Tensor, "seq *d_input"]
BatchPromptTensor = Int[Tensor, "batch seq *d_input"] | Float[Tensor, "batch seq *d_input"]
Answers = Tensor | list[Tensor]
"""``[batch, answer]`` when every prompt has the same number of answers, else a list of
one ``[answer]`` tensor per prompt."""

BOS_LABEL = "<|BOS|>"
_PROMPT_FIELDS = ("clean", "corrupt", "answers", "wrong_answers")


@dataclass(frozen=True, eq=False)
class PromptPair:
    """One clean/corrupt prompt pair and the answers to the clean prompt.

    ``prompt_id`` identifies the prompt in its dataset (it makes batch keys) and
    ``diverge_idx`` is the first position where clean and corrupt differ (their length if
    they are equal). Both are filled in by :class:`PromptDataset`.
    """

    clean: PromptTensor
    corrupt: PromptTensor
    answers: Tensor
    wrong_answers: Tensor
    prompt_id: int | None = None
    diverge_idx: int | None = None


@dataclass(frozen=True, eq=False)
class PromptPairBatch:
    """A batch of prompt pairs.

    ``key`` identifies the batch (same prompts in the same order give the same key, in
    every process). ``batch_diverge_idx`` is the first position where any clean prompt of
    the batch differs from its corrupt prompt.
    """

    key: BatchKey
    batch_diverge_idx: int
    clean: BatchPromptTensor
    corrupt: BatchPromptTensor
    answers: Answers
    wrong_answers: Answers


def batch_key(prompt_ids: Sequence[int]) -> BatchKey:
    """A stable 63-bit key for a batch made of the prompts ``prompt_ids`` (in order)."""
    digest = hashlib.blake2b(",".join(str(i) for i in prompt_ids).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def diverge_idxs(clean: BatchPromptTensor, corrupt: BatchPromptTensor) -> Int[Tensor, " batch"]:
    """Per pair, the first position where clean and corrupt differ (``seq`` if nowhere)."""
    differs = clean != corrupt
    if differs.ndim > 2:
        differs = differs.flatten(2).any(-1)
    seq = differs.shape[1]
    positions = t.arange(seq, device=differs.device).expand_as(differs)
    return t.where(differs, positions, seq).min(dim=1).values


class PromptDataset(Dataset[PromptPair]):
    """Clean/corrupt prompt pairs, their answers and their ids.

    Args:
        clean_prompts: ``[n, seq]`` token ids or ``[n, seq, d_input]`` inputs (a stacked
            tensor or a sequence of per-prompt tensors of one shape).
        corrupt_prompts: Same shape as ``clean_prompts``.
        answers: Per prompt, the correct answers (usually ``[answer]`` token ids).
        wrong_answers: Per prompt, the wrong answers.
        prompt_ids: Per prompt, a stable id (default ``0..n-1``). Batch keys hash them.
        diverge_idxs: Per prompt, the first position where clean and corrupt differ
            (computed from the tensors when not given).
    """

    def __init__(
        self,
        clean_prompts: Tensor | Sequence[Tensor],
        corrupt_prompts: Tensor | Sequence[Tensor],
        answers: Tensor | Sequence[Tensor],
        wrong_answers: Tensor | Sequence[Tensor],
        prompt_ids: Sequence[int] | None = None,
        diverge_idxs: Sequence[int] | None = None,
    ):
        n = len(clean_prompts)
        lengths = {
            "corrupt_prompts": len(corrupt_prompts),
            "answers": len(answers),
            "wrong_answers": len(wrong_answers),
            "prompt_ids": n if prompt_ids is None else len(prompt_ids),
            "diverge_idxs": n if diverge_idxs is None else len(diverge_idxs),
        }
        wrong = {name: size for name, size in lengths.items() if size != n}
        if wrong:
            raise CircuitError(
                f"PromptDataset: clean_prompts has {n} prompts but {wrong} "
                "(every argument needs one entry per prompt)."
            )
        self.clean_prompts = _stack(clean_prompts, "clean_prompts")
        self.corrupt_prompts = _stack(corrupt_prompts, "corrupt_prompts")
        if self.clean_prompts.shape != self.corrupt_prompts.shape:
            raise CircuitError(
                f"PromptDataset: clean prompts have shape {tuple(self.clean_prompts.shape)} "
                f"but corrupt prompts {tuple(self.corrupt_prompts.shape)}; they must match."
            )
        self.answers = answers
        self.wrong_answers = wrong_answers
        self.prompt_ids: list[int] = list(range(n)) if prompt_ids is None else list(prompt_ids)
        if len(set(self.prompt_ids)) != n:
            raise CircuitError("PromptDataset: prompt_ids must be distinct.")
        if diverge_idxs is None:
            # One device sync at construction, never per batch.
            diverge_idxs = _diverge_idxs_list(self.clean_prompts, self.corrupt_prompts)
        self.diverge_idxs: list[int] = list(diverge_idxs)

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def __getitem__(self, idx: int) -> PromptPair:
        return PromptPair(
            clean=self.clean_prompts[idx],
            corrupt=self.corrupt_prompts[idx],
            answers=self.answers[idx],
            wrong_answers=self.wrong_answers[idx],
            prompt_id=self.prompt_ids[idx],
            diverge_idx=self.diverge_idxs[idx],
        )


def collate_fn(batch: list[PromptPair]) -> PromptPairBatch:
    """Stack prompt pairs into a :class:`PromptPairBatch`.

    Reads no tensor values for pairs that come from a :class:`PromptDataset`; pairs built
    by hand (no ``prompt_id`` or ``diverge_idx``) are keyed by their contents instead.
    """
    if not batch:
        raise CircuitError("collate_fn: got an empty batch.")
    clean = t.stack([pair.clean for pair in batch])
    corrupt = t.stack([pair.corrupt for pair in batch])
    ids = [pair.prompt_id for pair in batch]
    if all(i is not None for i in ids):
        key = batch_key([i for i in ids if i is not None])
    else:
        key = _content_key(clean, corrupt)
    divs = [pair.diverge_idx for pair in batch]
    if all(d is not None for d in divs):
        batch_diverge_idx = min(d for d in divs if d is not None)
    else:
        batch_diverge_idx = int(diverge_idxs(clean, corrupt).min().item())
    return PromptPairBatch(
        key=key,
        batch_diverge_idx=batch_diverge_idx,
        clean=clean,
        corrupt=corrupt,
        answers=_stack_if_same_shape([pair.answers for pair in batch]),
        wrong_answers=_stack_if_same_shape([pair.wrong_answers for pair in batch]),
    )


class PromptDataLoader(DataLoader[PromptPair]):
    """A DataLoader of :class:`PromptPairBatch` with the dataset's metadata.

    Args:
        prompt_dataset: The prompt pairs.
        seq_len: The prompt length (positions after ``diverge_idx``) when the circuit is
            position-specific, else None.
        diverge_idx: The number of leading tokens shared by every prompt that were removed
            from the prompts (they live in ``kv_cache``); 0 when there is no cache.
        kv_cache: A frozen TransformerLens key/value cache of the shared prefix, with one
            row per prompt of a batch. Pass it as ``past_kv_cache`` to run the model.
        seq_labels: Labels of the token positions (after ``diverge_idx``), for plots.
        word_idxs: Named token positions, indexing the full prompts (BOS included,
            ``diverge_idx`` not subtracted).
        drop_last: Drop a last incomplete batch. Required when ``kv_cache`` is given and the
            dataset size is not a multiple of the batch size (the cache has a fixed batch size).
        **dataloader_kwargs: Passed to ``torch.utils.data.DataLoader`` (``batch_size``,
            ``shuffle``...). ``collate_fn`` defaults to :func:`collate_fn`.
    """

    def __init__(
        self,
        prompt_dataset: PromptDataset,
        seq_len: int | None,
        diverge_idx: int,
        kv_cache: TransformerLensKeyValueCache | None = None,
        seq_labels: list[str] | None = None,
        word_idxs: Mapping[str, int] | None = None,
        *,
        drop_last: bool = False,
        **dataloader_kwargs: Any,
    ):
        dataloader_kwargs.setdefault("collate_fn", collate_fn)
        if kv_cache is not None:
            batch_size = dataloader_kwargs.get("batch_size", 1)
            cache_batch = kv_cache.previous_attention_mask.shape[0]
            if batch_size != cache_batch:
                raise CircuitError(
                    f"PromptDataLoader: the KV cache holds {cache_batch} rows but batch_size "
                    f"is {batch_size}; build the cache with the loader's batch size."
                )
            if not drop_last and len(prompt_dataset) % cache_batch != 0:
                raise CircuitError(
                    f"PromptDataLoader: {len(prompt_dataset)} prompts do not split into "
                    f"batches of {cache_batch}, the fixed batch size of the KV cache; pass "
                    "drop_last=True."
                )
        if seq_len is not None and seq_labels is not None and len(seq_labels) != seq_len:
            raise CircuitError(
                f"PromptDataLoader: {len(seq_labels)} seq_labels for seq_len={seq_len}; "
                "give one label per position."
            )
        super().__init__(prompt_dataset, drop_last=drop_last, **dataloader_kwargs)
        self.seq_len = seq_len
        self.diverge_idx = diverge_idx
        self.kv_cache = kv_cache
        self.seq_labels = seq_labels
        self.word_idxs: dict[str, int] = dict(word_idxs or {})

    def __iter__(self) -> Iterator[PromptPairBatch]:
        return super().__iter__()


def load_datasets_from_json(
    model: HookedTransformer | None,
    path: PathLike | Sequence[PathLike],
    device: t.device | str,
    prepend_bos: bool = True,
    batch_size: int | tuple[int, int] = 32,
    train_test_size: tuple[int, int] = (128, 128),
    return_seq_length: bool = False,
    tail_divergence: bool = False,
    shuffle: bool = True,
    random_seed: int = 42,
    pad: bool = True,
) -> tuple[PromptDataLoader, PromptDataLoader]:
    """Load prompt pairs from JSON files and split them into a train and a test loader.

    File format (several files are concatenated; only the first file's ``seq_labels`` and
    ``word_idxs`` are used)::

        {"seq_labels": [str, ...],          # optional: a label per token position
         "word_idxs": {str: int, ...},      # optional: token indices WITHOUT BOS
         "prompts": [{"clean": str | [int, ...] | [[float, ...], ...],
                      "corrupt": <same type as clean>,
                      "answers": [str | int | float, ...],
                      "wrong_answers": [str | int | float, ...]}, ...]}

    With a model, prompts are strings tokenised by ``model.to_tokens`` (the one place that
    decides BOS) and string answers must be exactly one token (tokenised without BOS);
    int answers are token ids. With ``model=None`` prompts are pre-tokenised token ids or
    float input vectors, used as they are (no BOS is added, ``prepend_bos`` is ignored).

    Args:
        model: The TransformerLens model whose tokenizer is used, or None.
        path: A dataset file or a list of them.
        device: Where the prompt tensors live.
        prepend_bos: Prepend BOS to prompts. Shifts ``word_idxs`` by +1 and prepends
            ``"<|BOS|>"`` to ``seq_labels``.
        batch_size: One batch size, or ``(train, test)``.
        train_test_size: The number of prompts in the train and test splits.
        return_seq_length: Position-specific circuits: every prompt must have the same
            length, stored as the loaders' ``seq_len``.
        tail_divergence: Move the longest token prefix shared by every clean and corrupt
            prompt into a frozen KV cache (one per loader, with its batch size), strip it
            from the prompts and set ``diverge_idx`` to its length. Only when no prompt
            needs padding; otherwise no cache is built. The loaders then drop a last
            incomplete batch.
        shuffle: Shuffle the prompts (with ``random.Random(random_seed)``) before the split.
        random_seed: The shuffle's seed.
        pad: Left-pad prompts of different lengths (with the tokenizer's pad token).

    Returns:
        ``(train_loader, test_loader)``. ``seq_len`` is the prompt length after removing
        the cached prefix when ``return_seq_length``, else None.
    """
    paths = _as_paths(path)
    files = [_read_dataset_file(p) for p in paths]
    first = files[0]
    raw = [
        (p, i, prompt)
        for p, data in zip(paths, files, strict=True)
        for i, prompt in enumerate(data)
    ]
    n_train, n_test = _split_sizes(train_test_size, len(raw), paths)
    bs_train, bs_test = _batch_sizes(batch_size, n_train, n_test)
    if tail_divergence and model is None:
        raise CircuitError(
            "tail_divergence=True needs a model to build the KV cache of the shared prefix; "
            "pass the model or tail_divergence=False."
        )
    seq_labels, word_idxs = _read_metadata(first.metadata, paths[0])
    if model is not None:
        _check_tokenizer(model)
    encoder = _Encoder(model, prepend_bos)

    clean, corrupt, answers, wrong = [], [], [], []
    for file_path, idx, prompt in raw:
        where = f"prompt {idx} of {file_path}"
        clean.append(encoder.prompt(prompt["clean"], where, "clean"))
        corrupt.append(encoder.prompt(prompt["corrupt"], where, "corrupt"))
        answers.append(encoder.answers(prompt["answers"], where, "answers"))
        wrong.append(encoder.answers(prompt["wrong_answers"], where, "wrong_answers"))
    _check_shapes(clean, corrupt, answers, wrong, raw)

    lengths = [(len(c), len(k)) for c, k in zip(clean, corrupt, strict=True)]
    same_length = len({n for pair in lengths for n in pair}) == 1
    if not same_length:
        _explain_length_mismatch(lengths, raw, return_seq_length, pad, model is None)

    prefix_len = 0
    if tail_divergence and same_length:
        prefix_len = min(_shared_prefix_len(clean + corrupt), lengths[0][0] - 1)
    # Clean and corrupt prompts are padded to one width: they run through the same graph.
    padded = _pad_left(clean + corrupt, encoder.pad_id)[:, prefix_len:]
    clean_t, corrupt_t = padded[: len(clean)], padded[len(clean) :]
    seq_len = clean_t.shape[1] if return_seq_length else None

    seq_labels, word_idxs = _position_metadata(
        seq_labels,
        word_idxs,
        bos_added=model is not None and prepend_bos,
        prefix_len=prefix_len,
        n_tokens=padded.shape[1] + prefix_len if return_seq_length else None,
        path=paths[0],
    )

    order = list(range(len(raw)))
    if shuffle:
        random.Random(random_seed).shuffle(order)
    splits = (order[:n_train], order[n_train : n_train + n_test])
    divs = diverge_idxs(clean_t, corrupt_t).tolist()

    loaders = []
    for ids, bs in zip(splits, (bs_train, bs_test), strict=True):
        kv_cache = None
        if prefix_len > 0:
            assert model is not None
            kv_cache = _prefix_kv_cache(model, clean[0][:prefix_len], bs)
        dataset = PromptDataset(
            clean_t[ids].to(device),
            corrupt_t[ids].to(device),
            _to_device([answers[i] for i in ids], device),
            _to_device([wrong[i] for i in ids], device),
            prompt_ids=ids,
            diverge_idxs=[divs[i] for i in ids],
        )
        loaders.append(
            PromptDataLoader(
                dataset,
                seq_len=seq_len,
                diverge_idx=prefix_len,
                kv_cache=kv_cache,
                seq_labels=seq_labels,
                word_idxs=word_idxs,
                batch_size=bs,
                shuffle=False,
                drop_last=kv_cache is not None,
            )
        )
    return loaders[0], loaders[1]


# ----------------------------------------------------------------------------------------
# Reading and checking files


@dataclass(frozen=True)
class _DatasetFile:
    prompts: list[dict[str, Any]]
    metadata: dict[str, Any]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.prompts)


def _as_paths(path: PathLike | Sequence[PathLike]) -> list[Path]:
    if isinstance(path, (str, Path)):
        return [Path(path)]
    paths = [Path(p) for p in path]
    if not paths:
        raise CircuitError("load_datasets_from_json: got an empty list of dataset paths.")
    return paths


def _read_dataset_file(path: Path) -> _DatasetFile:
    if not path.is_file():
        raise CircuitError(f"Dataset file {path} does not exist (or is not a file).")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise CircuitError(f"Cannot read dataset file {path}: {err}") from err
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise CircuitError(
            f"Dataset file {path} is not valid JSON: {err.msg} at line {err.lineno}, "
            f"column {err.colno}."
        ) from err
    if not isinstance(data, dict):
        raise CircuitError(
            f"Dataset file {path}: the top level must be a JSON object with a 'prompts' "
            f"list, got a {type(data).__name__}."
        )
    prompts = data.get("prompts")
    if not isinstance(prompts, list):
        raise CircuitError(
            f"Dataset file {path} has no 'prompts' list (keys: {sorted(data)}); write "
            '{"prompts": [{"clean": ..., "corrupt": ..., "answers": [...], '
            '"wrong_answers": [...]}, ...]}.'
        )
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, dict):
            raise CircuitError(
                f"Prompt {i} of {path} must be an object with fields {list(_PROMPT_FIELDS)}, "
                f"got a {type(prompt).__name__}."
            )
        missing = [name for name in _PROMPT_FIELDS if name not in prompt]
        if missing:
            raise CircuitError(
                f"Prompt {i} of {path} has no field {missing[0]!r} (every prompt needs "
                f"{list(_PROMPT_FIELDS)})."
            )
    return _DatasetFile(prompts, {k: v for k, v in data.items() if k != "prompts"})


def _read_metadata(metadata: dict[str, Any], path: Path) -> tuple[list[str] | None, dict[str, int]]:
    seq_labels = metadata.get("seq_labels")
    if seq_labels is not None and (
        not isinstance(seq_labels, list) or not all(isinstance(s, str) for s in seq_labels)
    ):
        raise CircuitError(f"{path}: 'seq_labels' must be a list of strings.")
    word_idxs = metadata.get("word_idxs", {})
    if not isinstance(word_idxs, dict) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in word_idxs.values()
    ):
        raise CircuitError(
            f"{path}: 'word_idxs' must map names to integer token indices, "
            f'e.g. {{"IO": 1, "end": 13}}.'
        )
    return seq_labels, dict(word_idxs)


def _split_sizes(
    train_test_size: tuple[int, int], n_prompts: int, paths: list[Path]
) -> tuple[int, int]:
    if (
        not isinstance(train_test_size, (tuple, list))
        or len(train_test_size) != 2
        or not all(isinstance(n, int) and n > 0 for n in train_test_size)
    ):
        raise CircuitError(
            f"train_test_size must be two positive ints (train, test), got {train_test_size!r}."
        )
    n_train, n_test = train_test_size
    if n_train + n_test > n_prompts:
        files = ", ".join(str(p) for p in paths)
        raise CircuitError(
            f"train_test_size={tuple(train_test_size)} asks for {n_train + n_test} prompts "
            f"but {files} hold only {n_prompts}; lower train_test_size."
        )
    return n_train, n_test


def _batch_sizes(batch_size: int | tuple[int, int], n_train: int, n_test: int) -> tuple[int, int]:
    sizes = (batch_size, batch_size) if isinstance(batch_size, int) else tuple(batch_size)
    if len(sizes) != 2 or not all(isinstance(b, int) and b > 0 for b in sizes):
        raise CircuitError(
            f"batch_size must be a positive int or two of them (train, test), got {batch_size!r}."
        )
    for name, bs, n in (("train", sizes[0], n_train), ("test", sizes[1], n_test)):
        if bs > n:
            raise CircuitError(
                f"The {name} batch size {bs} is larger than the {name} split ({n} prompts); "
                "lower batch_size or raise train_test_size."
            )
    return sizes[0], sizes[1]


def _check_tokenizer(model: HookedTransformer) -> None:
    if model.tokenizer is None:
        raise CircuitError(
            "The model has no tokenizer, so string prompts cannot be tokenised; set "
            "model.tokenizer, or pass model=None with pre-tokenised prompts."
        )
    if model.tokenizer.pad_token_id is None:
        raise CircuitError("The model's tokenizer has no pad token; set tokenizer.pad_token.")


def _position_metadata(
    seq_labels: list[str] | None,
    word_idxs: dict[str, int],
    *,
    bos_added: bool,
    prefix_len: int,
    n_tokens: int | None,
    path: Path,
) -> tuple[list[str] | None, dict[str, int]]:
    """Shift the file's labels and indices for BOS; cut the labels of the cached prefix.

    ``n_tokens`` is the prompts' token length (BOS and prefix included) when every prompt
    must have it, to check the labels against.
    """
    if bos_added:
        word_idxs = {name: i + 1 for name, i in word_idxs.items()}
        seq_labels = None if seq_labels is None else [BOS_LABEL, *seq_labels]
    if seq_labels is None:
        return None, word_idxs
    if n_tokens is not None and len(seq_labels) != n_tokens:
        raise CircuitError(
            f"{path}: {len(seq_labels)} seq_labels"
            f"{' (with the BOS label)' if bos_added else ''} but the prompts have "
            f"{n_tokens} tokens; give one label per token (BOS excluded)."
        )
    return seq_labels[prefix_len:], word_idxs


# ----------------------------------------------------------------------------------------
# Encoding prompts and answers


class _Encoder:
    """Turns JSON prompt and answer values into tensors (tokenising strings once each)."""

    def __init__(self, model: HookedTransformer | None, prepend_bos: bool):
        self.model = model
        self.prepend_bos = prepend_bos
        self.pad_id = 0
        if model is not None and model.tokenizer is not None:
            self.pad_id = int(model.tokenizer.pad_token_id)  # pyright: ignore[reportArgumentType]
        self._prompt_cache: dict[str, Tensor] = {}
        self._answer_cache: dict[str, int | None] = {}

    def prompt(self, value: Any, where: str, field: str) -> Tensor:
        if self.model is None:
            return self._pretokenised(value, where, field)
        if not isinstance(value, str):
            raise CircuitError(
                f"{where}: {field!r} must be a string when a model is given (got "
                f"{type(value).__name__}); pass model=None to load pre-tokenised prompts."
            )
        tokens = self._prompt_cache.get(value)
        if tokens is None:
            tokens = self.model.to_tokens(
                value, prepend_bos=self.prepend_bos, padding_side="left", truncate=False
            )[0].cpu()
            self._prompt_cache[value] = tokens
        if len(tokens) == 0:
            raise CircuitError(f"{where}: {field!r} is empty (no tokens).")
        if len(tokens) > self.model.cfg.n_ctx:
            raise CircuitError(
                f"{where}: {field!r} has {len(tokens)} tokens, more than the model's context "
                f"length n_ctx={self.model.cfg.n_ctx}; shorten the prompt."
            )
        return tokens

    def _pretokenised(self, value: Any, where: str, field: str) -> Tensor:
        if isinstance(value, str):
            raise CircuitError(
                f"{where}: {field!r} is a string, which needs a model to tokenise it; pass "
                "the model, or give token ids / input vectors."
            )
        tensor = _tensor_from_json(value, where, field)
        if tensor is None or tensor.ndim not in (1, 2) or len(tensor) == 0:
            raise CircuitError(
                f"{where}: {field!r} must be a non-empty list of token ids [int, ...] or of "
                "input vectors [[float, ...], ...]."
            )
        return tensor

    def answers(self, value: Any, where: str, field: str) -> Tensor:
        if not isinstance(value, list):
            raise CircuitError(f"{where}: {field!r} must be a list, got {value!r}.")
        if field == "answers" and not value:
            raise CircuitError(f"{where}: 'answers' is empty; give at least one answer.")
        if self.model is None or not any(isinstance(a, str) for a in value):
            tensor = _tensor_from_json(value, where, field)
            if tensor is None:
                raise CircuitError(
                    f"{where}: {field!r} must hold strings (with a model) or numbers, "
                    f"got {value!r}."
                )
            if self.model is not None:
                self._check_ids(tensor, where, field)
            return tensor
        return t.tensor([self._answer_id(a, where, field) for a in value], dtype=t.long)

    def _answer_id(self, answer: Any, where: str, field: str) -> int:
        assert self.model is not None
        if isinstance(answer, bool) or not isinstance(answer, (str, int)):
            raise CircuitError(
                f"{where}: {field!r} holds {answer!r}; with a model, answers are strings "
                "(or int token ids)."
            )
        if isinstance(answer, int):
            self._check_ids(t.tensor([answer]), where, field)
            return answer
        if answer not in self._answer_cache:
            tokens = self.model.to_tokens(answer, prepend_bos=False, truncate=False)[0]
            self._answer_cache[answer] = int(tokens[0]) if len(tokens) == 1 else None
        token = self._answer_cache[answer]
        if token is None:
            tokens = self.model.to_str_tokens(answer, prepend_bos=False)
            raise CircuitError(
                f"{where}: the answer {answer!r} in {field!r} is {len(tokens)} tokens "
                f"({tokens}), not exactly one; use single-token answers (mind the "
                "leading space, e.g. ' Mary')."
            )
        return token

    def _check_ids(self, ids: Tensor, where: str, field: str) -> None:
        assert self.model is not None
        d_vocab = self.model.cfg.d_vocab_out
        if ids.is_floating_point() or (ids.numel() and (ids.min() < 0 or ids.max() >= d_vocab)):
            raise CircuitError(
                f"{where}: {field!r} holds {ids.tolist()}, which are not token ids of the "
                f"model (integers in [0, {d_vocab}))."
            )


def _tensor_from_json(value: Any, where: str, field: str) -> Tensor | None:
    """Numbers (nested lists of them) as an int64 tensor, or float32 if any is a float."""
    flat = _flatten(value)
    if flat is None:
        return None
    dtype = t.float32 if any(isinstance(x, float) for x in flat) else t.long
    try:
        return t.tensor(value, dtype=dtype)
    except (ValueError, TypeError) as err:
        raise CircuitError(
            f"{where}: {field!r} is a ragged or malformed nested list ({err})."
        ) from err


def _flatten(value: Any) -> list[int | float] | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return [value]
    if isinstance(value, list):
        out: list[int | float] = []
        for item in value:
            flat = _flatten(item)
            if flat is None:
                return None
            out.extend(flat)
        return out
    return None


def _check_shapes(
    clean: list[Tensor],
    corrupt: list[Tensor],
    answers: list[Tensor],
    wrong: list[Tensor],
    raw: list[tuple[Path, int, dict[str, Any]]],
) -> None:
    """Prompts must share their dtype and per-position shape; answers their dtype."""
    ref = clean[0]
    for tensors, field in ((clean, "clean"), (corrupt, "corrupt")):
        for tensor, (path, idx, _) in zip(tensors, raw, strict=True):
            if tensor.shape[1:] != ref.shape[1:] or tensor.dtype != ref.dtype:
                raise CircuitError(
                    f"prompt {idx} of {path}: {field!r} has positions of shape "
                    f"{list(tensor.shape[1:])} ({tensor.dtype}) but prompt 0 has "
                    f"{list(ref.shape[1:])} ({ref.dtype}); every prompt needs the same kind "
                    "of input."
                )
    for tensors, field in ((answers, "answers"), (wrong, "wrong_answers")):
        kinds = {tensor.is_floating_point() for tensor in tensors if tensor.numel()}
        if len(kinds) > 1:
            raise CircuitError(
                f"{field!r}: some prompts have integer answers and others float answers; "
                "use one kind throughout."
            )


def _explain_length_mismatch(
    lengths: list[tuple[int, int]],
    raw: list[tuple[Path, int, dict[str, Any]]],
    return_seq_length: bool,
    pad: bool,
    pretokenised: bool,
) -> None:
    """Raise the error that fits prompts of different lengths, if they are not allowed."""
    if not (return_seq_length or not pad or pretokenised):
        return
    ref = lengths[0][0]
    i = next(i for i, (c, k) in enumerate(lengths) if c != ref or k != ref)
    path, idx, _ = raw[i]
    path0, idx0, _ = raw[0]
    what = (
        f"prompt {idx} of {path} has {lengths[i][0]} (clean) and {lengths[i][1]} (corrupt) "
        f"positions but prompt {idx0} of {path0} has {ref} (clean)"
    )
    if return_seq_length:
        raise CircuitError(
            f"return_seq_length=True needs prompts of one length, but {what}. Use prompts of "
            "equal token length, or return_seq_length=False."
        )
    if pretokenised:
        raise CircuitError(
            f"Pre-tokenised prompts must all have the same length (there is no pad token), "
            f"but {what}."
        )
    raise CircuitError(f"pad=False needs prompts of one length, but {what}. Use pad=True.")


def _shared_prefix_len(prompts: list[Tensor]) -> int:
    """The length of the longest prefix shared by every prompt."""
    lists = [p.tolist() for p in prompts]
    prefix = lists[0]
    for other in lists[1:]:
        n = 0
        for a, b in zip(prefix, other, strict=False):
            if a != b:
                break
            n += 1
        prefix = prefix[:n]
        if not prefix:
            break
    return len(prefix)


def _pad_left(prompts: list[Tensor], pad_id: int) -> Tensor:
    width = max(len(p) for p in prompts)
    out = t.full((len(prompts), width, *prompts[0].shape[1:]), pad_id, dtype=prompts[0].dtype)
    for row, prompt in zip(out, prompts, strict=True):
        row[width - len(prompt) :] = prompt
    return out


def _prefix_kv_cache(
    model: HookedTransformer, prefix: Int[Tensor, " prefix"], batch_size: int
) -> TransformerLensKeyValueCache:
    """A frozen cache of ``prefix`` repeated ``batch_size`` times."""
    from transformer_lens import TransformerLensKeyValueCache

    device = model.cfg.device
    cache = TransformerLensKeyValueCache.init_cache(model.cfg, device, batch_size)
    tokens = prefix.to(device).expand(batch_size, -1)
    # The prefix is never padded: an explicit all-ones mask keeps TransformerLens from
    # guessing padding from pad/BOS token ids.
    with t.no_grad():
        model(
            tokens,
            past_kv_cache=cache,
            attention_mask=t.ones_like(tokens),
            return_type=None,
        )
    cache.freeze()
    return cache


# ----------------------------------------------------------------------------------------
# Small tensor helpers


def _stack(prompts: Tensor | Sequence[Tensor], name: str) -> Tensor:
    if isinstance(prompts, Tensor):
        return prompts
    if not prompts:
        raise CircuitError(f"PromptDataset: {name} is empty.")
    try:
        return t.stack(list(prompts))
    except RuntimeError as err:
        raise CircuitError(
            f"PromptDataset: {name} have different shapes; pad them to one length ({err})."
        ) from err


def _stack_if_same_shape(tensors: list[Tensor]) -> Answers:
    if all(x.shape == tensors[0].shape for x in tensors):
        return t.stack(tensors)
    return tensors


def _to_device(tensors: list[Tensor], device: t.device | str) -> Answers:
    stacked = _stack_if_same_shape(tensors)
    if isinstance(stacked, Tensor):
        return stacked.to(device)
    return [x.to(device) for x in stacked]


def _diverge_idxs_list(clean: Tensor, corrupt: Tensor) -> list[int]:
    if len(clean) == 0:
        return []
    return [int(i) for i in diverge_idxs(clean, corrupt).tolist()]


def _content_key(clean: Tensor, corrupt: Tensor) -> BatchKey:
    digest = hashlib.blake2b(digest_size=8)
    for tensor in (clean, corrupt):
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return int.from_bytes(digest.digest(), "big") >> 1
