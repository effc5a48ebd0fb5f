"""Scores files: safetensors plus metadata, checked against the model's graph on load,
never unpickled."""

from __future__ import annotations

import json
import struct

import pytest
import torch as t
from conftest import make_tl_model

from auto_circuit.engine.graph_utils import patchable_model
from auto_circuit.engine.score_files import (
    FORMAT_VERSION,
    convert_legacy_scores,
    load_prune_scores,
    save_prune_scores,
)
from auto_circuit.families.micro import MicroModel
from auto_circuit.vocabulary.errors import CircuitError


def _scores(pm, seed: int = 0):
    gen = t.Generator().manual_seed(seed)
    return {k: t.randn(m.shape, generator=gen) for k, m in pm.patch_masks.items()}


def test_round_trip_keeps_scores_and_says_what_they_are(tmp_path):
    pm = patchable_model(make_tl_model(), True, separate_qkv=True, seq_len=5)
    scores = _scores(pm)
    path = save_prune_scores(
        tmp_path / "s.safetensors", pm, scores, algorithm="EAP", algorithm_args={"a": 1},
        task="T",
    )  # fmt: skip
    saved = load_prune_scores(path, pm)
    assert saved.scores.keys() == scores.keys()
    for name, value in scores.items():
        assert t.equal(saved.scores[name], value)
    meta = saved.metadata
    assert meta["format_version"] == FORMAT_VERSION and meta["algorithm_args"] == {"a": 1}
    assert meta["graph"]["seq_len"] == 5 and meta["graph"]["separate_qkv"] is True
    assert meta["model"]["family"] == "transformer_lens"
    assert saved.algorithm == "EAP" and saved.task == "T"


@pytest.mark.parametrize(
    "other, differs",
    [
        ({"separate_qkv": False}, "graph separate_qkv: file True, model False"),
        ({"seq_len": 4}, "graph seq_len: file 5, model 4"),
        ({"model": {"n_layers": 2}}, "model config_sha256"),
    ],
)
def test_a_file_for_another_graph_or_model_is_refused(tmp_path, other, differs):
    pm = patchable_model(make_tl_model(), True, separate_qkv=True, seq_len=5)
    path = save_prune_scores(tmp_path / "s.safetensors", pm, _scores(pm))
    settings = {"separate_qkv": True, "seq_len": 5}
    settings.update({k: v for k, v in other.items() if k != "model"})
    model = make_tl_model(**other.get("model", {}))
    pm2 = patchable_model(model, True, **settings)
    with pytest.raises(CircuitError, match=f"another model or graph: .*{differs}"):
        load_prune_scores(path, pm2)


def test_bad_scores_are_not_saved(tmp_path):
    pm = patchable_model(MicroModel(), True)
    scores = _scores(pm)
    name = next(iter(scores))
    scores[name][..., 0] = float("nan")
    with pytest.raises(CircuitError, match="holds NaN values"):
        save_prune_scores(tmp_path / "s.safetensors", pm, scores)
    scores[name][..., 0] = float("inf")  # ACDC's "kept at every threshold"
    save_prune_scores(tmp_path / "inf.safetensors", pm, scores)
    assert load_prune_scores(tmp_path / "inf.safetensors", pm).scores[name][..., 0].isinf().all()
    (tmp_path / "inf.safetensors").unlink()
    with pytest.raises(CircuitError, match="missing masks"):
        save_prune_scores(tmp_path / "s.safetensors", pm, {})
    assert not list(tmp_path.iterdir()), "nothing written"


def _rewrite_metadata(path, change) -> None:
    """Edit the JSON header of a safetensors file in place (a tampered file)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    meta = json.loads(header["__metadata__"]["auto_circuit"])
    change(meta)
    header["__metadata__"]["auto_circuit"] = json.dumps(meta)
    new = json.dumps(header).encode()
    new += b" " * ((8 - len(new) % 8) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


def test_tampered_and_truncated_files_give_clear_errors(tmp_path):
    pm = patchable_model(MicroModel(), True)
    path = save_prune_scores(tmp_path / "s.safetensors", pm, _scores(pm))
    good = path.read_bytes()
    _rewrite_metadata(path, lambda m: m.update(format_version=99))
    with pytest.raises(CircuitError, match="format version 99.*Upgrade"):
        load_prune_scores(path, pm)
    _rewrite_metadata(path, lambda m: m.update(format="something else"))
    with pytest.raises(CircuitError, match="not a scores file"):
        load_prune_scores(path)
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(CircuitError, match="truncated, corrupt or not a safetensors file"):
        load_prune_scores(path, pm)
    path.write_bytes(b"garbage" * 10)
    with pytest.raises(CircuitError, match="truncated, corrupt"):
        load_prune_scores(path, pm)


def test_legacy_pt_files_convert_without_running_code(tmp_path):
    pm = patchable_model(MicroModel(), True)
    scores = _scores(pm, 3)
    legacy = tmp_path / "old.pt"
    t.save({"task": "Micro Model", "algorithm": "ACDC", "seconds": 1.0, "scores": scores}, legacy)
    with pytest.raises(CircuitError, match="pickle .torch.save. file.*convert-scores"):
        load_prune_scores(legacy, pm)
    out = convert_legacy_scores(legacy, tmp_path / "new.safetensors", pm)
    saved = load_prune_scores(out, pm)
    assert saved.task == "Micro Model" and saved.algorithm == "ACDC"
    assert all(t.equal(saved.scores[k], v) for k, v in scores.items())
