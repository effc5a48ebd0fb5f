"""Tests of auto_circuit.data.loaders and load_tl_model against independent oracles.

Token ids are written by hand from the test tokenizer's vocabulary, KV-cached logits are
compared with full-prompt logits, and load_tl_model is compared with the Hugging Face model.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch as t
from tokenizers_for_tests import BOS, make_word_tokenizer, word_vocab
from transformer_lens import HookedTransformer, HookedTransformerConfig

from auto_circuit.app.experiment_utils import load_tl_model
from auto_circuit.data.loaders import (
    PromptDataLoader,
    PromptDataset,
    PromptPair,
    PromptPairBatch,
    batch_key,
    collate_fn,
    load_datasets_from_json,
)
from auto_circuit.vocabulary.errors import CircuitError

NAMES = ["Mary", "John", "Alice", "Bob", "Carol", "Dan"]
WORDS = ["When", "and", "went", "to", "the", "store", ",", "gave", "a", "drink", "."] + NAMES
VOCAB = word_vocab(WORDS)
BOS_ID = VOCAB[BOS]
REPO = Path(__file__).resolve().parents[1]


def ids(text: str) -> list[int]:
    """Token ids of ``text`` read off the vocabulary: a word keeps the space before it."""
    return [VOCAB[piece] for piece in re.findall(r" ?\w+| ?[^\s\w]+", text)]


def ioi(a: str, b: str, c: str) -> dict[str, Any]:
    return {
        "clean": f"When {a} and {b} went to the store, {b} gave a drink to",
        "corrupt": f"When {a} and {b} went to the store, {c} gave a drink to",
        "answers": [f" {a}"],
        "wrong_answers": [f" {b}"],
    }


IOI_PROMPTS = [
    ioi(a, b, c)
    for a, b, c in [
        ("Mary", "John", "Alice"),
        ("Alice", "Bob", "Carol"),
        ("Carol", "Dan", "Mary"),
        ("John", "Mary", "Bob"),
        ("Bob", "Alice", "Dan"),
        ("Dan", "Carol", "John"),
        ("Mary", "Bob", "Carol"),
        ("Alice", "Dan", "John"),
        ("John", "Carol", "Alice"),
        ("Bob", "Mary", "Dan"),
    ]
]
IOI_LEN = len(ids(IOI_PROMPTS[0]["clean"]))  # 14 tokens, without BOS


def write(tmp_path: Path, data: Any, name: str = "data.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def by_id(loader: PromptDataLoader) -> dict[int, tuple[list[Any], list[Any]]]:
    """Prompt id -> (clean, corrupt) of every prompt the loader holds."""
    ds = loader.dataset
    assert isinstance(ds, PromptDataset)
    return {
        pid: (ds.clean_prompts[i].tolist(), ds.corrupt_prompts[i].tolist())
        for i, pid in enumerate(ds.prompt_ids)
    }


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models run far faster on one thread (no contention on a busy machine)."""
    threads = t.get_num_threads()
    t.set_num_threads(1)
    yield
    t.set_num_threads(threads)


@pytest.fixture(scope="module")
def model() -> HookedTransformer:
    t.manual_seed(0)
    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=32,
        n_heads=4,
        d_head=8,
        d_mlp=64,
        act_fn="gelu",
        n_ctx=64,
        d_vocab=len(VOCAB),
    )
    model = HookedTransformer(cfg, tokenizer=make_word_tokenizer(WORDS))
    model.eval()
    return model


# ----------------------------------------------------------------------------------------
# Tokenisation


def test_tokenizer_works_with_transformer_lens(model: HookedTransformer) -> None:
    assert model.cfg.tokenizer_prepends_bos is True
    assert model.to_str_tokens(" Mary", prepend_bos=False) == [" Mary"]
    assert model.to_tokens("When Mary, John.").tolist() == [[BOS_ID] + ids("When Mary, John.")]


@pytest.mark.parametrize("tokenizer_adds_bos", [True, False])
def test_token_ids_have_exactly_one_bos(tmp_path: Path, tokenizer_adds_bos: bool) -> None:
    t.manual_seed(0)
    cfg = HookedTransformerConfig(
        n_layers=1, d_model=8, n_heads=2, d_head=4, d_mlp=16, n_ctx=32, d_vocab=len(VOCAB)
    )
    model = HookedTransformer(cfg, tokenizer=make_word_tokenizer(WORDS))
    if not tokenizer_adds_bos:
        # A tokenizer that does not add BOS: TransformerLens must add it itself.
        model.tokenizer = make_word_tokenizer(WORDS, add_bos_token=False)
        model.cfg.tokenizer_prepends_bos = False
    path = write(tmp_path, {"prompts": IOI_PROMPTS[:4]})
    train, test = load_datasets_from_json(
        model, path, "cpu", batch_size=2, train_test_size=(2, 2), shuffle=False
    )
    batch = next(iter(train))
    for row, prompt in zip(batch.clean.tolist(), IOI_PROMPTS[:2], strict=True):
        assert row == [BOS_ID] + ids(prompt["clean"])
        assert row.count(BOS_ID) == 1
    for row, prompt in zip(batch.corrupt.tolist(), IOI_PROMPTS[:2], strict=True):
        assert row == [BOS_ID] + ids(prompt["corrupt"])
    assert isinstance(batch.answers, t.Tensor)
    assert batch.answers.tolist() == [[VOCAB[" Mary"]], [VOCAB[" Alice"]]]
    assert isinstance(batch.wrong_answers, t.Tensor)
    assert batch.wrong_answers.tolist() == [[VOCAB[" John"]], [VOCAB[" Bob"]]]

    no_bos, _ = load_datasets_from_json(
        model, path, "cpu", prepend_bos=False, batch_size=2, train_test_size=(2, 2), shuffle=False
    )
    assert next(iter(no_bos)).clean[0].tolist() == ids(IOI_PROMPTS[0]["clean"])


def test_left_padding_matches_to_tokens(tmp_path: Path, model: HookedTransformer) -> None:
    prompts: list[dict[str, Any]] = [
        {"clean": "When Mary gave a drink to", "corrupt": "When John gave a drink to"},
        {"clean": "When Mary and John went to the store", "corrupt": "When Bob and Dan went to"},
        {"clean": "Mary gave", "corrupt": "John gave"},
    ]
    for p in prompts:
        p.update(answers=[" Mary"], wrong_answers=[" John", " Bob"])
    path = write(tmp_path, {"prompts": prompts})
    padding_side = model.tokenizer.padding_side if model.tokenizer else None
    train, _ = load_datasets_from_json(
        model, path, "cpu", batch_size=1, train_test_size=(2, 1), shuffle=False
    )
    assert (model.tokenizer.padding_side if model.tokenizer else None) == padding_side
    everything = [p["clean"] for p in prompts] + [p["corrupt"] for p in prompts]
    expected = model.to_tokens(everything, prepend_bos=True, padding_side="left").tolist()
    got = by_id(train)
    assert got[0] == (expected[0], expected[3])
    assert got[1] == (expected[1], expected[4])
    # By hand: the widest prompt is BOS + 8 words, so 2 pads (pad = BOS id) + BOS + 6 words.
    assert got[0][0] == [BOS_ID] * 3 + ids("When Mary gave a drink to")
    assert got[1][1] == [BOS_ID] * 3 + ids("When Bob and Dan went to")
    assert train.seq_len is None and train.kv_cache is None and train.diverge_idx == 0


def test_word_idxs_and_seq_labels_shift_with_bos(tmp_path: Path, model: HookedTransformer) -> None:
    labels = [f"L{i}" for i in range(IOI_LEN)]
    data = {"seq_labels": labels, "word_idxs": {"IO": 1, "end": 13}, "prompts": IOI_PROMPTS}
    path = write(tmp_path, data)
    train, test = load_datasets_from_json(
        model, path, "cpu", batch_size=2, train_test_size=(4, 4), return_seq_length=True
    )
    for loader in (train, test):
        assert loader.word_idxs == {"IO": 2, "end": 14}
        assert loader.seq_labels == ["<|BOS|>", *labels]
        assert loader.seq_len == IOI_LEN + 1
        assert loader.diverge_idx == 0

    no_bos, _ = load_datasets_from_json(
        model, path, "cpu", prepend_bos=False, batch_size=2, train_test_size=(4, 4)
    )
    assert no_bos.word_idxs == {"IO": 1, "end": 13} and no_bos.seq_labels == labels

    # With a KV cache, labels start at diverge_idx; word_idxs still index full prompts.
    cached, _ = load_datasets_from_json(
        model,
        path,
        "cpu",
        batch_size=2,
        train_test_size=(4, 4),
        return_seq_length=True,
        tail_divergence=True,
    )
    d = cached.diverge_idx
    assert d == 2  # BOS and "When": the names differ from the second word on.
    assert cached.seq_labels == ["<|BOS|>", *labels][d:]
    assert cached.word_idxs == {"IO": 2, "end": 14}
    assert cached.seq_len == IOI_LEN + 1 - d


def test_only_first_files_metadata_is_used(tmp_path: Path, model: HookedTransformer) -> None:
    first = write(tmp_path, {"word_idxs": {"IO": 1}, "prompts": IOI_PROMPTS[:5]}, "a.json")
    second = write(
        tmp_path,
        {"seq_labels": ["x"], "word_idxs": {"S": 3}, "prompts": IOI_PROMPTS[5:]},
        "b.json",
    )
    train, test = load_datasets_from_json(
        model, [first, str(second)], "cpu", batch_size=5, train_test_size=(5, 5)
    )
    assert train.word_idxs == {"IO": 2} and train.seq_labels is None
    held = set(by_id(train)) | set(by_id(test))
    assert held == set(range(10))


def test_answers_of_different_counts_are_a_list(tmp_path: Path, model: HookedTransformer) -> None:
    prompts = [dict(p) for p in IOI_PROMPTS[:3]]
    prompts[1]["answers"] = [" Alice", " Carol"]
    prompts[1]["wrong_answers"] = []
    path = write(tmp_path, {"prompts": prompts})
    train, _ = load_datasets_from_json(
        model, path, "cpu", batch_size=(2, 1), train_test_size=(2, 1), shuffle=False
    )
    batch = next(iter(train))
    assert isinstance(batch.answers, list) and isinstance(batch.wrong_answers, list)
    assert [a.tolist() for a in batch.answers] == [
        [VOCAB[" Mary"]],
        [VOCAB[" Alice"], VOCAB[" Carol"]],
    ]
    assert [w.tolist() for w in batch.wrong_answers] == [[VOCAB[" John"]], []]


# ----------------------------------------------------------------------------------------
# Splits and batch keys


def int_prompts(n: int) -> list[dict[str, Any]]:
    """Pre-tokenised prompts: prompt i is [i, i + 1, i + 2] vs [i, i + 1, 0]."""
    return [
        {"clean": [i, i + 1, i + 2], "corrupt": [i, i + 1, 0], "answers": [i], "wrong_answers": [0]}
        for i in range(n)
    ]


def test_batches_and_keys(tmp_path: Path) -> None:
    path = write(tmp_path, {"prompts": int_prompts(20)})
    train, test = load_datasets_from_json(None, path, "cpu", batch_size=4, train_test_size=(10, 6))
    assert len(train) == 3 and len(test) == 2  # drop_last is off: 4 + 4 + 2
    train_ids = list(by_id(train))
    assert len(set(train_ids) | set(by_id(test))) == 16

    # Keys and batch_diverge_idx come without reading a tensor's values: meta tensors
    # have none, so any read would raise.
    meta_train, meta_test = load_datasets_from_json(
        None, path, "meta", batch_size=4, train_test_size=(10, 6)
    )
    first = [(b.key, b.batch_diverge_idx) for b in meta_train]
    assert next(iter(meta_train)).clean.is_meta
    again = [(b.key, b.batch_diverge_idx) for b in meta_train]
    test_keys = [b.key for b in meta_test]
    assert first == [(b.key, b.batch_diverge_idx) for b in train]

    assert first == again
    assert [k for k, _ in first] == [
        batch_key(train_ids[0:4]),
        batch_key(train_ids[4:8]),
        batch_key(train_ids[8:10]),
    ]
    assert len({k for k, _ in first} | set(test_keys)) == 5
    assert all(d == 2 for _, d in first)  # clean and corrupt differ at position 2
    batch = next(iter(train))
    assert batch.clean[:, 0].tolist() == train_ids[:4]  # prompt i starts with token i


def test_collate_hand_built_pairs_keyed_by_content() -> None:
    def pair(a: int) -> PromptPair:
        return PromptPair(t.tensor([a, 1]), t.tensor([a, 2]), t.tensor([a]), t.tensor([0]))

    one, two = collate_fn([pair(1), pair(2)]), collate_fn([pair(1), pair(2)])
    assert isinstance(one, PromptPairBatch)
    assert one.key == two.key != collate_fn([pair(2), pair(1)]).key
    assert one.batch_diverge_idx == 1


SPLIT_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from auto_circuit.data.loaders import load_datasets_from_json
    out = {}
    for seed in (1, 2):
        loaders = load_datasets_from_json(
            None, sys.argv[1], "cpu", batch_size=3, train_test_size=(6, 6), random_seed=seed
        )
        out[seed] = [[(b.key, b.clean.tolist()) for b in loader] for loader in loaders]
    print(json.dumps(out))
    """
)


def test_split_is_deterministic_across_processes(tmp_path: Path) -> None:
    path = write(tmp_path, {"prompts": int_prompts(30)})
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SPLIT_SCRIPT, str(path)],
            stdout=subprocess.PIPE,
            cwd=REPO,
            env={**os.environ, "PYTHONHASHSEED": hash_seed, "OMP_NUM_THREADS": "1"},
        )
        for hash_seed in ("0", "1")
    ]
    outputs = []
    for proc in procs:
        stdout, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0
        outputs.append(json.loads(stdout))
    first, second = outputs
    assert first["1"] == second["1"] and first["2"] == second["2"]
    assert first["1"] != first["2"]
    assert {k for loader in first["1"] for k, _ in loader} != {
        k for loader in first["2"] for k, _ in loader
    }


def test_no_shuffle_keeps_file_order(tmp_path: Path) -> None:
    path = write(tmp_path, {"prompts": int_prompts(8)})
    train, test = load_datasets_from_json(
        None, path, "cpu", batch_size=2, train_test_size=(4, 4), shuffle=False
    )
    assert list(by_id(train)) == [0, 1, 2, 3] and list(by_id(test)) == [4, 5, 6, 7]


# ----------------------------------------------------------------------------------------
# KV cache of the shared prefix


def cached_vs_full(model: HookedTransformer, loader: PromptDataLoader) -> float:
    """Max |logits with the KV cache - full-prompt logits sliced| over the loader."""
    assert loader.kv_cache is not None and loader.dataset is not None
    prefix = t.tensor([BOS_ID] + ids(IOI_PROMPTS[0]["clean"])[: loader.diverge_idx - 1])
    worst = 0.0
    with t.no_grad():
        for batch in loader:
            for prompts in (batch.clean, batch.corrupt):
                assert len(prompts) == loader.batch_size
                tail = model(prompts, past_kv_cache=loader.kv_cache)
                full = model(t.cat([prefix.expand(len(prompts), -1), prompts], dim=1))
                worst = max(worst, (full[:, loader.diverge_idx :] - tail).abs().max().item())
    return worst


def test_kv_cache_reproduces_full_prompt_logits(tmp_path: Path, model: HookedTransformer) -> None:
    prompts = [
        {
            "clean": f"When Mary and John went to the store, {b} gave a drink to",
            "corrupt": f"When Mary and John went to the store, {c} gave a drink to",
            "answers": [" Mary"],
            "wrong_answers": [" John"],
        }
        for b, c in [("John", "Bob"), ("Mary", "Dan"), ("John", "Carol"), ("Mary", "Alice")] * 3
    ]
    path = write(tmp_path, {"prompts": prompts})
    train, test = load_datasets_from_json(
        model,
        path,
        "cpu",
        batch_size=(3, 2),
        train_test_size=(7, 5),
        return_seq_length=True,
        tail_divergence=True,
    )
    # BOS + "When Mary and John went to the store ," is shared by every prompt.
    shared = 1 + len(ids("When Mary and John went to the store,"))
    for loader, bs, n_batches in ((train, 3, 2), (test, 2, 2)):
        assert loader.diverge_idx == shared
        assert loader.seq_len == IOI_LEN + 1 - shared
        assert loader.kv_cache is not None and loader.kv_cache.frozen
        assert loader.kv_cache.previous_attention_mask.shape == (bs, shared)
        assert len(loader) == n_batches  # a frozen cache needs full batches: drop_last
        assert cached_vs_full(model, loader) < 1e-4
    assert cached_vs_full(model, train) < 1e-4  # frozen: reusable
    # The stripped prompts start at the first differing word.
    assert next(iter(train)).clean[0, 0].item() in (VOCAB[" John"], VOCAB[" Mary"])


def test_prefix_is_shared_across_rows_not_only_pairs(
    tmp_path: Path, model: HookedTransformer
) -> None:
    """Each pair shares 'When X and Y went ...' but X differs between rows."""
    path = write(tmp_path, {"prompts": IOI_PROMPTS})
    train, test = load_datasets_from_json(
        model, path, "cpu", batch_size=2, train_test_size=(4, 4), tail_divergence=True
    )
    assert train.diverge_idx == test.diverge_idx == 2  # only BOS and "When"
    assert cached_vs_full(model, train) < 1e-4
    assert cached_vs_full(model, test) < 1e-4


def test_no_shared_prefix_no_cache(tmp_path: Path, model: HookedTransformer) -> None:
    prompts = [dict(p) for p in IOI_PROMPTS[:5]]
    prompts[2]["clean"] = prompts[2]["clean"].replace("When", "Bob", 1)
    path = write(tmp_path, {"prompts": prompts})
    train, test = load_datasets_from_json(
        model,
        path,
        "cpu",
        prepend_bos=False,
        batch_size=2,
        train_test_size=(3, 2),
        tail_divergence=True,
    )
    for loader in (train, test):
        assert loader.kv_cache is None and loader.diverge_idx == 0
    assert len(train) == 2  # no cache, so no drop_last

    # Prompts that need padding get no cache either.
    padded = [dict(p) for p in IOI_PROMPTS[:5]]
    padded[0]["clean"] = "When Mary gave a drink to"
    train, _ = load_datasets_from_json(
        model,
        write(tmp_path, {"prompts": padded}, "padded.json"),
        "cpu",
        batch_size=2,
        train_test_size=(3, 2),
        tail_divergence=True,
    )
    assert train.kv_cache is None and train.diverge_idx == 0


def test_loader_rejects_cache_of_other_batch_size(tmp_path: Path, model: HookedTransformer) -> None:
    path = write(tmp_path, {"prompts": IOI_PROMPTS})
    train, _ = load_datasets_from_json(
        model, path, "cpu", batch_size=2, train_test_size=(4, 4), tail_divergence=True
    )
    dataset = train.dataset
    assert isinstance(dataset, PromptDataset)
    with pytest.raises(CircuitError, match="KV cache holds 2 rows but batch_size is 3"):
        PromptDataLoader(dataset, None, 2, kv_cache=train.kv_cache, batch_size=3)
    with pytest.raises(CircuitError, match="pass drop_last=True"):
        PromptDataLoader(
            PromptDataset(
                dataset.clean_prompts[:3],
                dataset.corrupt_prompts[:3],
                dataset.answers[:3],
                dataset.wrong_answers[:3],
            ),
            None,
            2,
            kv_cache=train.kv_cache,
            batch_size=2,
        )


# ----------------------------------------------------------------------------------------
# MicroModel float inputs


def test_micro_model_float_inputs(tmp_path: Path) -> None:
    prompts = [
        {"clean": [[1.0, 1.0]], "corrupt": [[-1.0, -1.0]], "answers": [1.0], "wrong_answers": []},
        {"clean": [[2.0, 1.0]], "corrupt": [[-1.0, 0.5]], "answers": [0.5], "wrong_answers": []},
    ]
    path = write(tmp_path, {"prompts": prompts * 2})
    train, _ = load_datasets_from_json(
        None, path, "cpu", batch_size=2, train_test_size=(2, 2), shuffle=False
    )
    batch = next(iter(train))
    assert batch.clean.shape == (2, 1, 2) and batch.clean.dtype == t.float32
    assert batch.clean.tolist() == [[[1.0, 1.0]], [[2.0, 1.0]]]
    assert batch.corrupt.tolist() == [[[-1.0, -1.0]], [[-1.0, 0.5]]]
    assert isinstance(batch.answers, t.Tensor) and batch.answers.tolist() == [[1.0], [0.5]]
    assert batch.batch_diverge_idx == 0


# ----------------------------------------------------------------------------------------
# Errors


def good_prompts() -> list[dict[str, Any]]:
    return [dict(p) for p in IOI_PROMPTS]


def with_prompt(index: int, **fields: Any) -> dict[str, Any]:
    prompts = good_prompts()
    prompts[index] = {**prompts[index], **fields}
    return {"prompts": prompts}


def without_field(index: int, field: str) -> dict[str, Any]:
    prompts = good_prompts()
    del prompts[index][field]
    return {"prompts": prompts}


BAD_DATA = [
    pytest.param([1, 2], {}, r"top level must be a JSON object", id="top-level-list"),
    pytest.param({"prompt": []}, {}, r"has no 'prompts' list", id="no-prompts"),
    pytest.param(
        without_field(3, "corrupt"), {}, r"Prompt 3 of .* has no field 'corrupt'", id="missing"
    ),
    pytest.param({"prompts": [1]}, {}, r"Prompt 0 of .* must be an object", id="not-object"),
    pytest.param(
        {"prompts": IOI_PROMPTS[:5]},
        {"train_test_size": (4, 4)},
        r"asks for 8 prompts but .* hold only 5",
        id="split-too-big",
    ),
    pytest.param(
        {"prompts": IOI_PROMPTS},
        {"batch_size": (2, 5)},
        r"test batch size 5 is larger than the test split \(4 prompts\)",
        id="batch-too-big",
    ),
    pytest.param(
        with_prompt(2, answers=[" Mary and"]),
        {},
        r"prompt 2 of .*data\.json: the answer ' Mary and' in 'answers' is 2 tokens",
        id="multi-token-answer",
    ),
    pytest.param(
        with_prompt(5, corrupt="When Mary went to the store, Bob gave a drink to"),
        {"return_seq_length": True},
        r"prompt 5 of .* has 15 \(clean\) and 13 \(corrupt\) positions but prompt 0 .* has 15"
        r".*return_seq_length=False",
        id="seq-length",
    ),
    pytest.param(
        with_prompt(1, clean="Mary gave"),
        {"pad": False},
        r"pad=False needs prompts of one length.*prompt 1 .*Use pad=True",
        id="no-pad",
    ),
    pytest.param(
        with_prompt(0, clean=[1, 2, 3]),
        {},
        r"prompt 0 of .*: 'clean' must be a string when a model is given",
        id="ids-with-model",
    ),
    pytest.param(
        with_prompt(4, clean=" ".join(["Mary"] * 70)),
        {},
        r"prompt 4 of .*'clean' has 71 tokens, more than .* n_ctx=64",
        id="too-long",
    ),
    pytest.param(with_prompt(0, answers=[]), {}, r"'answers' is empty", id="no-answers"),
    pytest.param(
        with_prompt(0, wrong_answers=" John"), {}, r"'wrong_answers' must be a list", id="str"
    ),
    pytest.param(
        {"word_idxs": {"IO": "1"}, "prompts": IOI_PROMPTS},
        {},
        r"'word_idxs' must map names to integer token indices",
        id="word-idxs",
    ),
    pytest.param(
        {"seq_labels": ["a"], "prompts": IOI_PROMPTS},
        {"return_seq_length": True},
        r"2 seq_labels \(with the BOS label\) but the prompts have 15 tokens",
        id="seq-labels",
    ),
]


@pytest.mark.parametrize(("data", "kwargs", "match"), BAD_DATA)
def test_bad_data_raises(
    tmp_path: Path, model: HookedTransformer, data: Any, kwargs: dict[str, Any], match: str
) -> None:
    path = write(tmp_path, data)
    kwargs = {"batch_size": 2, "train_test_size": (4, 4), **kwargs}
    with pytest.raises(CircuitError, match=match):
        load_datasets_from_json(model, path, "cpu", **kwargs)


def test_bad_files_raise(tmp_path: Path, model: HookedTransformer) -> None:
    with pytest.raises(CircuitError, match=r"Dataset file .*nope\.json does not exist"):
        load_datasets_from_json(model, tmp_path / "nope.json", "cpu")
    broken = tmp_path / "broken.json"
    broken.write_text('{"prompts": [\n  {"clean": "When",}\n]}')
    with pytest.raises(CircuitError, match=r"broken\.json is not valid JSON: .* line 2, column"):
        load_datasets_from_json(model, broken, "cpu")
    with pytest.raises(CircuitError, match="empty list of dataset paths"):
        load_datasets_from_json(model, [], "cpu")


def test_pretokenised_errors(tmp_path: Path) -> None:
    strings = write(tmp_path, {"prompts": IOI_PROMPTS}, "s.json")
    with pytest.raises(
        CircuitError, match=r"prompt 0 of .*'clean' is a string, which needs a model"
    ):
        load_datasets_from_json(None, strings, "cpu", batch_size=2, train_test_size=(4, 4))
    ints = write(tmp_path, {"prompts": int_prompts(8)}, "i.json")
    with pytest.raises(CircuitError, match="tail_divergence=True needs a model"):
        load_datasets_from_json(
            None, ints, "cpu", batch_size=2, train_test_size=(4, 4), tail_divergence=True
        )
    ragged = int_prompts(8)
    ragged[3]["clean"] = [1, 2]
    with pytest.raises(CircuitError, match=r"Pre-tokenised prompts must all have the same length"):
        load_datasets_from_json(
            None,
            write(tmp_path, {"prompts": ragged}, "r.json"),
            "cpu",
            batch_size=2,
            train_test_size=(4, 4),
        )


# ----------------------------------------------------------------------------------------
# load_tl_model


def test_load_tl_model_from_local_checkpoint(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    t.manual_seed(0)
    # TransformerLens reads n_ctx, which GPT-2's own config.json carries.
    sizes: dict[str, Any] = {"n_positions": 64, "n_ctx": 64}
    config = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=len(VOCAB), **sizes)
    hf = GPT2LMHeadModel(config).eval()
    with t.no_grad():  # non-trivial layer norms, so that folding them would show
        for name, param in hf.named_parameters():
            if "ln" in name:
                param.add_(0.3 * t.randn_like(param))
    hf.save_pretrained(tmp_path)
    make_word_tokenizer(WORDS).save_pretrained(tmp_path)

    model = load_tl_model(str(tmp_path), "cpu")
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert not (model.cfg.use_attn_result or model.cfg.use_split_qkv_input)
    assert not (model.cfg.use_attn_in or model.cfg.use_hook_mlp_in)
    assert model.cfg.normalization_type == "LN"
    saved = hf.state_dict()
    t.testing.assert_close(model.blocks[1].ln1.w, saved["transformer.h.1.ln_1.weight"])
    t.testing.assert_close(model.ln_final.w, saved["transformer.ln_f.weight"])
    t.testing.assert_close(model.W_U, saved["lm_head.weight"].T)  # not centred

    tokens = model.to_tokens(["When Mary and John went to the store", "Mary gave a drink"])
    assert tokens[0].tolist() == [BOS_ID] + ids("When Mary and John went to the store")
    with t.no_grad():
        t.testing.assert_close(model(tokens[:1]), hf(tokens[:1]).logits, atol=1e-4, rtol=0)


def test_load_tl_model_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(CircuitError, match=r"'gpt-77' is neither a local directory"):
        load_tl_model("gpt-77", "cpu")
    with pytest.raises(CircuitError, match="has no config.json"):
        load_tl_model(str(tmp_path), "cpu")

    def offline(*args: Any, **kwargs: Any) -> HookedTransformer:
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(HookedTransformer, "from_pretrained_no_processing", offline)
    with pytest.raises(CircuitError, match=r"not available offline.*Download them once"):
        load_tl_model("gpt2", "cpu")
