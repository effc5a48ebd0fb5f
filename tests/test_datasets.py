"""The packaged prompt datasets and their generators.

Oracles: the prompts are re-read with offline tokenizers (``make_word_tokenizer``) and
with regular expressions written here, and the tracr answers are recomputed by brute
force; the shipped files must be exactly what the generators write.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from importlib import resources
from itertools import product
from pathlib import Path
from typing import Any

import pytest
import torch as t
from tokenizers import Regex, pre_tokenizers
from tokenizers_for_tests import make_word_tokenizer
from transformer_lens import HookedTransformer, HookedTransformerConfig

from auto_circuit.data.generate import DATASETS, package_datasets_dir
from auto_circuit.data.generate.common import dumps
from auto_circuit.data.generate.docstring import docstring_dataset
from auto_circuit.data.generate.greaterthan import greaterthan_dataset
from auto_circuit.data.generate.ioi import ioi_template_dataset, ioi_vanilla_dataset
from auto_circuit.data.generate.tracr import tracr_reverse_dataset, tracr_xproportion_dataset
from auto_circuit.data.generate.words import NAMES
from auto_circuit.data.loaders import load_datasets_from_json
from auto_circuit.engine.graph_utils import patchable_model
from auto_circuit.evaluation.official_circuits.circuits import ioi_true_edges
from auto_circuit.vocabulary.misc import repo_path_to_abs_path

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO / "auto_circuit" / "datasets"
IOI_FILES = ["ioi/ioi_vanilla_template_prompts.json"] + [
    f"ioi/ioi_{order}_template_{i}_prompts.json" for order in ("ABBA", "BABA") for i in range(15)
]


def load(rel_path: str) -> dict[str, Any]:
    return json.loads((DATA_DIR / rel_path).read_text(encoding="utf-8"))


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    threads = t.get_num_threads()
    t.set_num_threads(1)
    yield
    t.set_num_threads(threads)


def words_of(texts: list[str]) -> list[str]:
    """Every word and punctuation run in ``texts`` (the vocabulary of a test tokenizer)."""
    return sorted({w for text in texts for w in re.findall(r"\w+|[^\s\w]+", text)})


def texts_of(data: dict[str, Any]) -> list[str]:
    return [
        text
        for p in data["prompts"]
        for text in [p["clean"], p["corrupt"], *p["answers"], *p["wrong_answers"]]
    ]


def code_tokenizer(words: list[str]):
    """A word-level tokenizer that also cuts code indentation as a code BPE does: the
    newlines, then the spaces except the one that starts the next token. Whitespace
    tokens are <unk> (one token each)."""
    tokenizer = make_word_tokenizer(words)
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Split(
        Regex(r"\n+| +(?= )| ?\w+| ?[^\s\w]+|\s+"), behavior="isolated"
    )
    return tokenizer


def tokens(tokenizer, text: str) -> list[str]:
    return tokenizer.convert_ids_to_tokens(tokenizer(text, add_special_tokens=False)["input_ids"])


def stacked(answers: t.Tensor | list[t.Tensor]) -> t.Tensor:
    """Answers of a batch whose prompts all have the same number of them."""
    assert isinstance(answers, t.Tensor)
    return answers


def tiny_model(tokenizer) -> HookedTransformer:
    cfg = HookedTransformerConfig(
        n_layers=1, d_model=8, n_heads=2, d_head=4, d_mlp=16, act_fn="gelu", n_ctx=64,
        d_vocab=len(tokenizer.get_vocab()), seed=0,
    )  # fmt: skip
    model = HookedTransformer(cfg, tokenizer=tokenizer)
    model.eval()
    return model


# ----------------------------------------------------------------------------------------
# Files, packaging and determinism


def test_shipped_files_are_the_generators_output() -> None:
    shipped = {p.relative_to(DATA_DIR).as_posix() for p in DATA_DIR.rglob("*.json")}
    assert shipped == set(DATASETS)
    for rel_path, build in DATASETS.items():
        assert (DATA_DIR / rel_path).read_text(encoding="utf-8") == dumps(build()), rel_path


def test_module_entry_point_regenerates_identical_files(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "auto_circuit.data.generate", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert f"wrote {len(DATASETS)} dataset files" in run.stdout
    for rel_path in DATASETS:
        assert (tmp_path / rel_path).read_bytes() == (DATA_DIR / rel_path).read_bytes()


def test_files_are_declared_package_data_and_small() -> None:
    # pyproject's [tool.setuptools.package-data] line (tomllib needs Python 3.11).
    pyproject = (REPO / "pyproject.toml").read_text()
    line = re.search(r"^auto_circuit = \[(.*)\]$", pyproject, re.MULTILINE)
    assert line is not None
    patterns = re.findall(r'"([^"]+)"', line.group(1))
    # setuptools expands the patterns like glob(recursive=True): "**" is 0+ folders.
    declared = {p for pattern in patterns for p in (REPO / "auto_circuit").glob(pattern)}
    files = list(DATA_DIR.rglob("*.json"))
    assert files and set(files) <= declared
    assert sum(p.stat().st_size for p in files) < 800_000


def test_files_resolve_inside_the_package() -> None:
    rel = "datasets/ioi/ioi_vanilla_template_prompts.json"
    path = repo_path_to_abs_path(rel)
    assert (
        path.is_file() and path == package_datasets_dir() / "ioi/ioi_vanilla_template_prompts.json"
    )
    packaged = resources.files("auto_circuit").joinpath(rel)
    assert json.loads(packaged.read_text(encoding="utf-8")) == load(
        "ioi/ioi_vanilla_template_prompts.json"
    )


@pytest.mark.parametrize(
    "build",
    [
        lambda seed: ioi_vanilla_dataset(20, seed),
        lambda seed: ioi_template_dataset("BABA", 3, 20, seed),
        lambda seed: greaterthan_dataset(20, seed),
        lambda seed: docstring_dataset(20, seed),
        tracr_reverse_dataset,
        tracr_xproportion_dataset,
    ],
)
def test_generators_are_deterministic_for_a_seed(build) -> None:
    assert dumps(build(1)) == dumps(build(1))
    assert dumps(build(1)) != dumps(build(2))


# ----------------------------------------------------------------------------------------
# IOI


@pytest.mark.parametrize("rel_path", IOI_FILES)
def test_ioi_prompts(rel_path: str) -> None:
    data = load(rel_path)
    tokenizer = make_word_tokenizer(words_of(texts_of(data)))
    idx = data["word_idxs"]
    # GPT-2 cuts "Afterwards" opening template 11 into two tokens; the word tokenizer
    # does not, so there every GPT-2 index is one more than the word index.
    shift = 1 if rel_path.endswith("_template_11_prompts.json") else 0
    assert len(data["seq_labels"]) == idx["end"] + 1
    assert set(idx) == {"IO", "IO-1", "IO+1", "S1", "S1-1", "S1+1", "S2", "end", "starts", "punct"}
    assert len({p["clean"] for p in data["prompts"]}) == len(data["prompts"])
    for prompt in data["prompts"]:
        clean, corrupt = tokens(tokenizer, prompt["clean"]), tokens(tokenizer, prompt["corrupt"])
        assert len(clean) == len(corrupt) == idx["end"] + 1 - shift
        assert "<unk>" not in clean + corrupt
        [io], [s] = prompt["answers"], prompt["wrong_answers"]
        assert clean[idx["IO"] - shift] == io and clean[idx["S1"] - shift] == s
        assert clean[idx["S2"] - shift] == s and clean[-1] == " to"
        assert clean[idx["punct"] - shift] in (",", ".")
        # ABC: three new names in the three name slots, everything else unchanged.
        slots = [idx[k] - shift for k in ("IO", "S1", "S2")]
        new = [corrupt[i] for i in slots]
        assert len(set(new)) == 3 and not {io, s} & set(new)
        assert all(name.strip() in NAMES for name in new + [io, s])
        assert [w for i, w in enumerate(clean) if i not in slots] == [
            w for i, w in enumerate(corrupt) if i not in slots
        ]


def test_ioi_orders() -> None:
    abba, baba = load(IOI_FILES[1]), load(IOI_FILES[16])
    assert abba["word_idxs"]["IO"] < abba["word_idxs"]["S1"]
    assert baba["word_idxs"]["S1"] < baba["word_idxs"]["IO"]
    prompt = abba["prompts"][0]
    assert re.fullmatch(
        rf"Then, {prompt['answers'][0].strip()} and {prompt['wrong_answers'][0].strip()} went "
        rf"to the \w+\. {prompt['wrong_answers'][0].strip()} gave a \w+ to",
        prompt["clean"],
    )


def test_ioi_vanilla_loads_and_matches_the_ioi_circuit() -> None:
    path = repo_path_to_abs_path("datasets/ioi/ioi_vanilla_template_prompts.json")
    data = load("ioi/ioi_vanilla_template_prompts.json")
    model = tiny_model(make_word_tokenizer(words_of(texts_of(data))))
    train, test = load_datasets_from_json(
        model, path, "cpu", batch_size=50, train_test_size=(200, 200),
        return_seq_length=True, tail_divergence=True,
    )  # fmt: skip
    # Clean and corrupt share BOS and "When" (the prefix in the KV cache).
    assert train.diverge_idx == 2 and train.seq_len == 13
    assert train.word_idxs == {k: v + 1 for k, v in data["word_idxs"].items()}
    batch = next(iter(test))
    assert batch.clean.shape == (50, 13) and stacked(batch.answers).shape == (50, 1)
    meta_cfg = HookedTransformerConfig(
        n_layers=12, n_heads=12, d_model=768, d_head=64, d_mlp=3072, d_vocab=50257,
        act_fn="gelu_new", n_ctx=1024,
    )  # fmt: skip
    with t.device("meta"):
        gpt2 = HookedTransformer(meta_cfg, move_to_device=False)
    pm = patchable_model(gpt2, True, seq_len=train.seq_len, separate_qkv=True, device="cpu")
    edges = ioi_true_edges(pm, True, train.word_idxs, train.diverge_idx)
    assert len(edges) == 869  # the reference's count for this template and prefix


# ----------------------------------------------------------------------------------------
# Greater-Than


GREATERTHAN = re.compile(r"The (\w+) lasted from the year (\d\d)(\d\d) to (\d\d)")


def test_greaterthan_prompts() -> None:
    data = load("greaterthan_gpt2-small_prompts.json")
    tokenizer = make_word_tokenizer(words_of(texts_of(data)))
    all_years = [f"{y:02d}" for y in range(100)]
    for prompt in data["prompts"]:
        noun, century, yy, end = GREATERTHAN.fullmatch(prompt["clean"]).groups()  # type: ignore[union-attr]
        assert end == century and 2 <= int(yy) <= 98
        assert prompt["corrupt"] == f"The {noun} lasted from the year {century}01 to {century}"
        assert prompt["answers"] == all_years[int(yy) + 1 :]
        assert prompt["wrong_answers"] == all_years[: int(yy) + 1]
        clean, corrupt = tokens(tokenizer, prompt["clean"]), tokens(tokenizer, prompt["corrupt"])
        assert len(clean) == len(corrupt) == 9
        # GPT-2 writes these years as one token (" 1200") or cuts them elsewhere (" 110"
        # + "5"); Hanna et al. leave such years out.
        assert f"{century}{yy}" not in {"1105", "1120", "1153", "1195", "1280", "1305", "1440"}


def test_greaterthan_loads() -> None:
    path = repo_path_to_abs_path("datasets/greaterthan_gpt2-small_prompts.json")
    data = load("greaterthan_gpt2-small_prompts.json")
    model = tiny_model(make_word_tokenizer(words_of(texts_of(data))))
    train, _ = load_datasets_from_json(
        model, path, "cpu", batch_size=20, train_test_size=(100, 100), return_seq_length=True
    )
    batch = next(iter(train))
    assert train.seq_len == 10  # BOS + 9 words
    # The answers of a prompt are the years above its YY: their number varies.
    assert isinstance(batch.answers, list)
    for answers, wrong in zip(batch.answers, batch.wrong_answers, strict=True):
        assert len(answers) + len(wrong) == 100


# ----------------------------------------------------------------------------------------
# Docstring


DEF_LINE = re.compile(r"def (\w+)\(self, (\w+), (\w+), (\w+), (\w+), (\w+), (\w+)\):")


def test_docstring_prompts() -> None:
    data = load("docstring_prompts.json")
    tokenizer = code_tokenizer(words_of(texts_of(data)))
    idx = data["word_idxs"]
    assert len(data["seq_labels"]) == idx["end"] + 1 == idx["param_3"] + 1
    for prompt in data["prompts"]:
        clean, corrupt = tokens(tokenizer, prompt["clean"]), tokens(tokenizer, prompt["corrupt"])
        assert len(clean) == len(corrupt) == idx["end"] + 1
        method, p1, p2, a, b, c, p3 = DEF_LINE.match(prompt["clean"]).groups()  # type: ignore[union-attr]
        assert prompt["answers"] == [f" {c}"]
        wrong = [w.strip() for w in prompt["wrong_answers"]]
        assert len(wrong) == len(set(wrong)) == 13 and c not in wrong
        assert {p1, p2, a, b, p3} <= set(wrong)
        assert [clean[idx[k]] for k in ("A_def", "B_def", ",_B", "C_def")] == [
            f" {a}", f" {b}", ",", f" {c}",
        ]  # fmt: skip
        assert [clean[idx[k]] for k in ("A_doc", "param_2", "B_doc", "param_3")] == [
            f" {a}", "param", f" {b}", "param",
        ]  # fmt: skip
        assert prompt["clean"].endswith("\n    :param")
        # Corrupt: new def names, other new doc names, the rest unchanged.
        corrupt_def = DEF_LINE.match(prompt["corrupt"]).groups()  # type: ignore[union-attr]
        assert corrupt_def[0] == method and not set(corrupt_def[1:]) & {p1, p2, a, b, c, p3}
        doc_names = {corrupt[idx["A_doc"]].strip(), corrupt[idx["B_doc"]].strip()}
        assert not doc_names & (set(corrupt_def) | {a, b, c})


def test_docstring_loads() -> None:
    path = repo_path_to_abs_path("datasets/docstring_prompts.json")
    data = load("docstring_prompts.json")
    model = tiny_model(code_tokenizer(words_of(texts_of(data))))
    train, _ = load_datasets_from_json(
        model, path, "cpu", batch_size=25, train_test_size=(100, 100),
        return_seq_length=True, tail_divergence=True,
    )  # fmt: skip
    # Every prompt starts with BOS and "def" (the method names differ): that is cached.
    n_tokens = 1 + data["word_idxs"]["end"] + 1
    assert train.diverge_idx == 2 and train.seq_len == n_tokens - 2 == 42
    batch = next(iter(train))
    assert stacked(batch.answers).shape == (25, 1) and stacked(batch.wrong_answers).shape == (
        25,
        13,
    )


# ----------------------------------------------------------------------------------------
# tracr and the MicroModel


def test_tracr_reverse_prompts() -> None:
    data = load("tracr/tracr_reverse_len_5_prompts.json")
    ids = {1: 0, 2: 1, 3: 2}  # tracr's input encoding of {1, 2, 3}; BOS is 3
    expected = {
        tuple([3, *(ids[x] for x in seq)]): [[ids[x]] for x in reversed(seq)]
        for seq in product((1, 2, 3), repeat=5)
    }
    assert len(data["prompts"]) == 243
    by_clean = {tuple(p["clean"]): p for p in data["prompts"]}
    assert set(by_clean) == set(expected)
    for clean, prompt in by_clean.items():
        assert prompt["answers"] == expected[clean]
        assert prompt["corrupt"] != prompt["clean"]
        assert prompt["wrong_answers"] == expected[tuple(prompt["corrupt"])]


def test_tracr_xproportion_prompts() -> None:
    data = load("tracr/tracr_xproportion_len_5_prompts.json")
    ids = {"w": 2, "x": 3, "y": 4, "z": 5}  # BOS is 0
    assert len(data["prompts"]) == 4**5
    seen = set()
    for prompt in data["prompts"]:
        assert prompt["clean"][0] == 0 and prompt["clean"] != prompt["corrupt"]
        x_count = 0
        for i, token in enumerate(prompt["clean"][1:], start=1):
            x_count += token == ids["x"]
            assert prompt["answers"][i - 1] == [pytest.approx(x_count / i)]
        seen.add(tuple(prompt["clean"]))
    assert len(seen) == 4**5


@pytest.mark.parametrize(
    "rel_path",
    ["tracr/tracr_reverse_len_5_prompts.json", "tracr/tracr_xproportion_len_5_prompts.json"],
)
def test_tracr_loads_pretokenised(rel_path: str) -> None:
    path = repo_path_to_abs_path(f"datasets/{rel_path}")
    train, test = load_datasets_from_json(
        None, path, "cpu", batch_size=11, train_test_size=(121, 121), return_seq_length=True
    )
    assert train.seq_len == 6 and len(train.seq_labels or []) == 6
    batch = next(iter(test))
    assert batch.clean.shape == (11, 6) and stacked(batch.answers).shape == (11, 5, 1)
    is_float = "xproportion" in rel_path
    assert stacked(batch.answers).is_floating_point() == is_float


def test_micro_model_inputs_load() -> None:
    path = repo_path_to_abs_path("datasets/micro_model_inputs.json")
    train, _ = load_datasets_from_json(
        None, path, "cpu", batch_size=4, train_test_size=(8, 8), shuffle=False
    )
    batch = next(iter(train))
    assert batch.clean.tolist() == [[[x, x]] for x in (1.0, 2.0, 3.0, 4.0)]
    assert batch.corrupt.tolist() == [[[-x, -x]] for x in (1.0, 2.0, 3.0, 4.0)]
    assert (
        stacked(batch.answers).tolist() == [[1]] * 4
        and stacked(batch.wrong_answers).tolist() == [[0]] * 4
    )
    multi = load("micro_model_inputs_multiple_answers.json")["prompts"][0]
    assert multi["answers"] == [0, 1] and multi["wrong_answers"] == []
