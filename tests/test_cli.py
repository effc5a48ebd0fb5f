"""The command line end to end, in subprocesses, reading the files it writes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch as t

TASK = "Tracr Reverse"  # a shipped model: no download


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "auto_circuit.app.cli", *args],
        capture_output=True, text=True, cwd=cwd, env=env, timeout=600,
    )  # fmt: skip


def test_lists(tmp_path):
    assert TASK in cli("tasks", cwd=tmp_path).stdout
    algos = cli("algorithms", cwd=tmp_path).stdout
    assert "ACDC" in algos and "EAP-IG" in algos


def test_discover_evaluate_export(tmp_path):
    run = cli(
        "discover", TASK, "--algorithm", "Logit Diff Gradients", "--out", "s.safetensors",
        cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    from auto_circuit.engine.score_files import load_prune_scores

    saved = load_prune_scores(tmp_path / "s.safetensors")
    assert saved.algorithm == "Logit Diff Gradients" and saved.task == TASK
    assert saved.metadata["graph"]["seq_len"] == 6
    assert sum(v.numel() for v in saved.scores.values()) == 462  # 77 edges x 6 positions

    run = cli("evaluate", TASK, "--scores", "s.safetensors", "--out", "e.json", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    result = json.loads((tmp_path / "e.json").read_text())
    sizes = [x for x, _ in result["faithfulness"]]
    assert sizes[0] == 0 and sizes[-1] == 462
    assert result["metric"] == "Clean KL Div"  # the task's default
    # The full circuit under tree patching is the model itself: KL 0 to the clean model.
    assert result["faithfulness"][-1][1] == pytest.approx(0.0, abs=1e-6)
    assert result["roc_auc"] == pytest.approx(1.0)

    run = cli(
        "export", TASK, "--scores", "s.safetensors", "--edges", "10", "--out", "c.json",
        cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    circuit = json.loads((tmp_path / "c.json").read_text())
    assert sum(e["in_graph"] for e in circuit["edges"].values()) >= 2
    assert "a3.h0->logits" in circuit["edges"] and circuit["edges"]["a3.h0->logits"]["in_graph"]


def test_report_writes_one_html_file(tmp_path):
    run = cli(
        "report",
        TASK,
        "--algorithms",
        "Logit Diff Gradients,Random",
        "--out",
        "r.html",
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    page = (tmp_path / "r.html").read_text()
    assert 'id="algorithms"' in page and 'id="circuit-browser"' in page
    assert page.count("<tr>") == 3  # header + two algorithms
    assert "report written to" in run.stdout and str(tmp_path / "r.html") in run.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["discover", "Nope"], "No task 'Nope'"),
        (["discover", TASK, "--algorithm", "ACDc"], "Did you mean 'ACDC'"),
        (["evaluate", TASK, "--scores", "missing.pt"], "missing.pt does not exist"),
        (["evaluate", TASK, "--scores", "s.pt"], "s.pt is a pickle .torch.save. file"),
        (["evaluate", TASK, "--scores", "cut.safetensors"], "cut.safetensors is truncated"),
        (["evaluate", TASK, "--scores", "."], "is a directory"),
        (["export", TASK, "--scores", "other.safetensors"], "holds scores of task 'Micro Model'"),
        (["discover", TASK, "--out", "."], "is a directory; give a file name"),
        (["evaluate", TASK, "--scores", "ok.safetensors", "--ablation", "NO"], "Unknown ablation"),
        (["report", TASK, "--metric", "Logit Dif"], "Did you mean 'Logit Diff'"),
    ],
)
def test_bad_arguments_exit_2_without_traceback(tmp_path, monkeypatch, args, message):
    from typer.testing import CliRunner

    from auto_circuit.app.cli import app
    from auto_circuit.app.tasks import task_by_key
    from auto_circuit.engine.score_files import save_prune_scores

    monkeypatch.chdir(tmp_path)
    t.save({"scores": {}}, tmp_path / "s.pt")
    micro = task_by_key("Micro Model").init_task("cpu").model
    save_prune_scores("other.safetensors", micro, micro.new_prune_scores(), task="Micro Model")
    tracr = task_by_key(TASK).init_task("cpu").model
    save_prune_scores("ok.safetensors", tracr, tracr.new_prune_scores(), task=TASK)
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "ok.safetensors").read_bytes()[:50])
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    assert re.search(message, result.output), result.output


def test_a_pickled_scores_file_never_runs(tmp_path):
    """A scores file whose unpickling would run code: refused, and the code did not run."""
    import pickle

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"scores": Payload()}))
    for command in ("evaluate", "export"):
        run = cli(command, TASK, "--scores", "evil.pt", cwd=tmp_path)
        assert run.returncode == 2 and "never unpickles" in run.stderr, run.stderr
        assert "Traceback" not in run.stderr
    assert not marker.exists()
    # The conversion reads with weights_only=True, which refuses the payload too.
    run = cli("convert-scores", TASK, "evil.pt", "--out", "new.safetensors", cwd=tmp_path)
    assert run.returncode == 2 and "cannot be read safely" in run.stderr, run.stderr
    assert not marker.exists() and not (tmp_path / "new.safetensors").exists()
