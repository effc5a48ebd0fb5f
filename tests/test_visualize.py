"""Figures checked as data: which edges are drawn, with which widths, colours and node
positions, against hand-written circuits and a brute-force walk over ``model.edges``
(the figures select edges on the score tensors instead); evaluation plots against
hand-computed curves, areas and overlaps; a static PNG export's pixel size.
"""

from __future__ import annotations

import math
import re
import struct
import subprocess
import sys
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch as t
from conftest import make_tl_model

from auto_circuit.engine.graph_utils import (
    masks_saved,
    patchable_model,
    set_masks_from_prune_scores,
)
from auto_circuit.engine.patchable_model import PatchableModel
from auto_circuit.evaluation.prune_metrics.prune_metrics import (
    CLEAN_KL_DIV_METRIC,
    LOGIT_DIFF_METRIC,
    LOGIT_DIFF_PERCENT_METRIC,
)
from auto_circuit.families.micro import MicroModel
from auto_circuit.figures import (
    average_auc_plot,
    chromium_path,
    draw_seq_graph,
    edge_patching_plot,
    prune_score_similarities_plot,
    roc_plot,
    task_roc_plot,
    write_figure,
)
from auto_circuit.vocabulary.errors import CircuitError
from auto_circuit.vocabulary.types import PruneScores

# Layers of the components of a 2-layer TransformerLens graph, written out by hand.
LAYER = {"Resid Start": 0, "A0.0": 1, "A0.1": 1, "MLP 0": 2, "A1.0": 3, "A1.1": 3}
LAYER.update({"MLP 1": 4, "Resid End": 5})


def _tl(seq_len: int | None) -> PatchableModel:
    model = make_tl_model(n_layers=2, n_heads=2, d_model=8, d_vocab=20)
    return patchable_model(
        model, factorized=True, slice_output="last_seq", separate_qkv=True, seq_len=seq_len
    )


@pytest.fixture(scope="module")
def seq_model() -> PatchableModel:
    return _tl(seq_len=3)


@pytest.fixture(scope="module")
def flat_model() -> PatchableModel:
    return _tl(seq_len=None)


def _set(model: PatchableModel, circuit: Mapping[tuple[str, int | None], float]) -> PruneScores:
    scores = model.new_prune_scores()
    for (name, seq), value in circuit.items():
        edge = model.edge(name, seq)
        scores[edge.dest.module_name][edge.patch_idx] = value
    return scores


def _traces(fig: Any) -> list[Any]:
    return list(fig.data)


def _rgb(color: str) -> tuple[int, int, int]:
    r, g, b = (int(v) for v in re.findall(r"\d+", color)[:3])
    return r, g, b


def _links(trace: Any) -> dict[str, tuple[str, str, float, tuple[int, int, int]]]:
    """``{edge name: (source label, target label, width, rgb)}`` of a Sankey trace."""
    labels = list(trace.node.label)
    link = trace.link
    return {
        data[0]: (labels[s], labels[d], v, _rgb(c))
        for data, s, d, v, c in zip(
            link.customdata, link.source, link.target, link.value, link.color, strict=True
        )
    }


def _drawn(fig: Any, seq_labels: list[str] | None = None) -> set[tuple[str, int | None, float]]:
    """Every drawn ``(edge name, position, width)``; the position is read from the
    trace's label."""
    drawn = set()
    for trace in fig.data:
        pos = int(trace.name.split(":")[0].split()[-1]) if trace.name else None
        for name, (_, _, width, _) in _links(trace).items():
            drawn.add((name, pos, round(width, 6)))
    return drawn


def _brute_force(
    model: PatchableModel, scores: PruneScores, threshold: float
) -> set[tuple[str, int | None, float]]:
    expected = set()
    for edge in model.edges:
        value = float(edge.prune_score(scores))
        if value != 0 and abs(value) >= threshold:
            expected.add((edge.name, edge.seq_idx, round(abs(value), 6)))
    return expected


BLUE, RED = (0, 0, 255), (255, 0, 0)


def test_hand_circuit_per_position(seq_model: PatchableModel) -> None:
    circuit: dict[tuple[str, int | None], float] = {
        ("Resid Start->A0.0.V", 0): -0.5,
        ("A0.1->A1.0.Q", 0): 2.0,
        ("MLP 0->Resid End", 2): 1.5,
        ("A1.1->MLP 1", 2): -3.0,
        ("A0.0->MLP 0", 2): 0.005,  # below the threshold
    }
    fig: Any = draw_seq_graph(
        seq_model,
        _set(seq_model, circuit),
        score_threshold=0.01,
        seq_labels=["a", "b", "c"],
        display_ipython=False,
    )
    assert [tr.type for tr in fig.data] == ["sankey", "sankey"]  # position 1 has no edge
    assert [tr.name for tr in fig.data] == ["0: a", "2: c"]
    assert {a.text for a in fig.layout.annotations} == {"0: a", "2: c"}
    assert _links(fig.data[0]) == {
        "Resid Start->A0.0.V": ("Resid Start", "A0.0", 0.5, RED),
        "A0.1->A1.0.Q": ("A0.1", "A1.0", 2.0, BLUE),
    }
    assert _links(fig.data[1]) == {
        "MLP 0->Resid End": ("MLP 0", "Resid End", 1.5, BLUE),
        "A1.1->MLP 1": ("A1.1", "MLP 1", 3.0, RED),
    }
    # Stacked top to bottom, heights proportional to the summed |score|: 2.5 vs 4.5.
    (lo0, hi0), (lo1, hi1) = (tuple(tr.domain.y) for tr in fig.data)
    assert hi0 == pytest.approx(1.0) and hi1 < lo0
    assert (hi0 - lo0) / (hi1 - lo1) == pytest.approx(2.5 / 4.5)


def _node_x(trace: Any) -> dict[str, float]:
    return dict(zip(trace.node.label, trace.node.x, strict=True))


def test_node_positions_by_layer(seq_model: PatchableModel) -> None:
    scores = _set(
        seq_model,
        {("Resid Start->A0.0.Q", 1): 1.0, ("A0.1->A1.0.K", 1): 1.0, ("A0.0->A1.1.V", 1): -1.0},
    )
    compact = _node_x(draw_seq_graph(seq_model, scores, display_ipython=False).data[0])
    spaced = _node_x(
        draw_seq_graph(seq_model, scores, layer_spacing=True, display_ipython=False).data[0]
    )
    for xs in (compact, spaced):
        assert set(xs) == {"Resid Start", "A0.0", "A0.1", "A1.0", "A1.1"}
        assert all(0 < x < 1 for x in xs.values())
        assert xs["A0.0"] == xs["A0.1"] and xs["A1.0"] == xs["A1.1"]
        assert xs["Resid Start"] < xs["A0.0"] < xs["A1.0"]
    # Without layer_spacing the drawn layers (0, 1, 3) are evenly spaced columns ...
    gaps = (compact["A0.0"] - compact["Resid Start"], compact["A1.0"] - compact["A0.0"])
    assert gaps[0] == pytest.approx(gaps[1])
    # ... with it x is affine in the layer over all layers 0..5: layer 3 is 3x layer 1.
    first = spaced["A0.0"] - spaced["Resid Start"]
    assert spaced["A1.0"] - spaced["Resid Start"] == pytest.approx(3 * first)
    last_layer_x = spaced["Resid Start"] + 5 * first
    assert last_layer_x < 1


def test_vertical_orientation_places_layers_down_the_flow(seq_model: PatchableModel) -> None:
    scores = _set(seq_model, {("Resid Start->A0.1.Q", 2): 1.0, ("A0.1->MLP 1", 2): 0.5})
    fig: Any = draw_seq_graph(seq_model, scores, orientation="v", display_ipython=False)
    (trace,) = _traces(fig)
    assert trace.orientation == "v"
    xs = _node_x(trace)
    assert xs["Resid Start"] < xs["A0.1"] < xs["MLP 1"]
    ys = dict(zip(trace.node.label, trace.node.y, strict=True))
    assert len(set(ys.values())) == 1  # one node per layer: all centred across the flow


@pytest.mark.parametrize("threshold", [0.0, 0.5, 1.5])
def test_threshold_matches_brute_force(seq_model: PatchableModel, threshold: float) -> None:
    gen = t.Generator().manual_seed(1)
    scores = {
        k: t.randn(v.shape, generator=gen) * (t.rand(v.shape, generator=gen) < 0.4)
        for k, v in seq_model.patch_masks.items()
    }
    fig: Any = draw_seq_graph(seq_model, scores, score_threshold=threshold, display_ipython=False)
    expected = _brute_force(seq_model, scores, threshold)
    assert expected and _drawn(fig) == expected
    for trace in fig.data:  # colour by sign, checked edge by edge
        for name, (_, _, _, rgb) in _links(trace).items():
            pos = int(trace.name.split()[-1])
            sign = float(seq_model.edge(name, pos).prune_score(scores)) > 0
            assert rgb == (BLUE if sign else RED)


@pytest.mark.parametrize("factorized", [True, False])
def test_micro_model_and_no_positions(flat_model: PatchableModel, factorized: bool) -> None:
    micro = patchable_model(MicroModel(n_layers=2), factorized=factorized, slice_output=None)
    for model in (micro, flat_model):
        gen = t.Generator().manual_seed(2)
        scores = {k: t.randn(v.shape, generator=gen) for k, v in model.patch_masks.items()}
        fig: Any = draw_seq_graph(model, scores, score_threshold=0.3, display_ipython=False)
        assert len(fig.data) == 1 and not fig.layout.annotations
        assert _drawn(fig) == _brute_force(model, scores, 0.3)


def test_show_all_positions_and_empty_figure(seq_model: PatchableModel) -> None:
    scores = _set(seq_model, {("A0.0->MLP 0", 1): 0.2})
    fig: Any = draw_seq_graph(seq_model, scores, show_all_seq_pos=True, display_ipython=False)
    assert [tr.name for tr in fig.data] == ["Position 0", "Position 1", "Position 2"]
    assert [len(tr.link.value) for tr in fig.data] == [0, 1, 0]
    empty: Any = draw_seq_graph(seq_model, scores, score_threshold=0.5, display_ipython=False)
    assert len(empty.data) == 0
    assert "No edge has |score| >= 0.5" in empty.layout.annotations[0].text


def test_current_masks_and_infinite_scores(seq_model: PatchableModel) -> None:
    scores = _set(seq_model, {("A0.0->MLP 0", 1): 1.0, ("A1.0->Resid End", 2): 1.0})
    with masks_saved(seq_model):
        set_masks_from_prune_scores(seq_model, scores)
        from_masks: Any = draw_seq_graph(seq_model, display_ipython=False)
    assert _drawn(from_masks) == {("A0.0->MLP 0", 1, 1.0), ("A1.0->Resid End", 2, 1.0)}
    # ACDC scores always-kept edges +inf: drawn as wide as the widest finite edge.
    scores = _set(seq_model, {("A0.0->MLP 0", 1): math.inf, ("A0.1->MLP 0", 1): -0.25})
    (trace,) = _traces(draw_seq_graph(seq_model, scores, display_ipython=False))
    assert _links(trace)["A0.0->MLP 0"][2] == 0.25
    assert list(trace.link.customdata[0]) == ["A0.0->MLP 0", "inf"]


def test_does_not_enumerate_the_graph(seq_model: PatchableModel) -> None:
    model = _tl(seq_len=4)
    scores = {k: t.ones(v.shape) for k, v in model.patch_masks.items()}
    draw_seq_graph(model, scores, score_threshold=0.5, display_ipython=False)
    assert "edges" not in model.__dict__ and "edge_dict" not in model.__dict__


def test_bad_input(seq_model: PatchableModel, flat_model: PatchableModel) -> None:
    scores = seq_model.new_prune_scores()
    with pytest.raises(CircuitError, match="seq_labels has 2 labels but the graph has 3"):
        draw_seq_graph(seq_model, scores, seq_labels=["a", "b"], display_ipython=False)
    with pytest.raises(CircuitError, match="graph has no token positions"):
        draw_seq_graph(flat_model, flat_model.new_prune_scores(), seq_labels=["a"])
    with pytest.raises(CircuitError, match='orientation must be "h" or "v"'):
        draw_seq_graph(seq_model, scores, orientation="x", display_ipython=False)  # type: ignore[arg-type]
    with pytest.raises(CircuitError, match="threshold must be finite and >= 0"):
        draw_seq_graph(seq_model, scores, score_threshold=-1, display_ipython=False)
    shape_error = (
        r"\['blocks.0.hook_k_input'\] has shape \[2, 1\] but the mask has shape \[3, 2, 1\]"
    )
    with pytest.raises(CircuitError, match=shape_error):
        draw_seq_graph(seq_model, flat_model.new_prune_scores(), display_ipython=False)
    partial = dict(list(scores.items())[1:])
    with pytest.raises(CircuitError, match="do not match the model's masks .missing modules"):
        draw_seq_graph(seq_model, partial, display_ipython=False)
    bad = {k: v.clone() for k, v in scores.items()}
    next(iter(bad.values())).view(-1)[0] = math.nan
    with pytest.raises(CircuitError, match="NaN"):
        draw_seq_graph(seq_model, bad, display_ipython=False)
    with pytest.raises(CircuitError, match="suffix must be .html or one of"):
        draw_seq_graph(seq_model, scores, display_ipython=False, file_path="figure.gif")


def test_display_only_inside_ipython(
    seq_model: PatchableModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    import plotly.graph_objects as go

    shown: list[Any] = []
    monkeypatch.setattr(go.Figure, "show", lambda self, *a, **k: shown.append(self))
    scores = _set(seq_model, {("A0.0->MLP 0", 1): 1.0})
    monkeypatch.delitem(sys.modules, "IPython", raising=False)
    draw_seq_graph(seq_model, scores)
    assert shown == []
    fake = types.ModuleType("IPython")
    fake.get_ipython = lambda: object()  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "IPython", fake)
    fig: Any = draw_seq_graph(seq_model, scores)
    assert shown == [fig]
    draw_seq_graph(seq_model, scores, display_ipython=False)
    assert len(shown) == 1


def test_html_file_is_relative_to_cwd_and_offline(
    seq_model: PatchableModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    scores = _set(seq_model, {("A0.0->MLP 0", 1): 1.0})
    draw_seq_graph(seq_model, scores, display_ipython=False, file_path="circuit.html")
    page = (tmp_path / "circuit.html").read_text()
    assert "A0.0-\\u003eMLP 0" in page and "Plotly.newPlot" in page  # JSON-escaped ">"
    assert not re.search(r"<script[^>]+src=", page)  # plotly.js is inlined


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@pytest.mark.skipif(chromium_path() is None, reason="static export needs Chromium (not found)")
def test_static_png_export(
    seq_model: PatchableModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    scores = _set(seq_model, {("A0.0->MLP 0", 1): 1.0, ("A0.1->A1.0.Q", 1): -0.5})
    fig: Any = draw_seq_graph(seq_model, scores, display_ipython=False, file_path="circuit.png")
    path = tmp_path / "circuit.png"
    assert path.stat().st_size > 1000
    assert _png_size(path) == (fig.layout.width, fig.layout.height)
    small = write_figure(fig, "small.png", width=400, height=300, scale=0.5)
    assert small == tmp_path / "small.png" and _png_size(small) == (200, 150)


def test_plotting_is_optional_and_changes_no_global_state() -> None:
    code = """
import sys
sys.modules["plotly"] = None  # as if the plot extra were not installed
import auto_circuit.algorithms.registry, auto_circuit.evaluation.prune_metrics.prune_metrics
import auto_circuit.evaluation.area_under_curve
import auto_circuit.evaluation.official_circuits.measure_roc
import auto_circuit.evaluation.prune_scores_similarity, auto_circuit.algorithms.prune
assert "auto_circuit.figures" not in sys.modules, "an algorithm or metric imports plotting"
import auto_circuit.figures as viz
import auto_circuit.metrics.official_circuits.roc_plot  # AutoCircuit's paths
import auto_circuit.metrics.prune_metrics.prune_metrics_plot
from auto_circuit.families.micro import MicroModel
from auto_circuit.engine.graph_utils import patchable_model
pm = patchable_model(MicroModel(n_layers=2), factorized=True, slice_output=None)
scores = pm.new_prune_scores(1.0)
page = viz.circuit_browser_html(pm, {"all": scores})  # needs no plotly
assert "B1.1" in page and "edge-slider" in page
try:
    viz.draw_seq_graph(pm, scores)
    raise AssertionError("expected ImportError")
except ImportError as err:
    assert "pip install" in str(err), err
del sys.modules["plotly"]
import plotly.io as pio
before = (pio.templates.default, pio.renderers.default)
viz.draw_seq_graph(pm, scores)
viz.roc_plot({"t": {"a": [(0, 0), (1, 1)]}})
assert (pio.templates.default, pio.renderers.default) == before
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_shims_reexport() -> None:
    import importlib

    roc_module = importlib.import_module("auto_circuit.metrics.official_circuits.roc_plot")
    prune_metrics_plot = importlib.import_module(
        "auto_circuit.metrics.prune_metrics.prune_metrics_plot"
    )

    assert roc_module.roc_plot is roc_plot and roc_module.task_roc_plot is task_roc_plot
    assert prune_metrics_plot.edge_patching_plot is edge_patching_plot


# ---- evaluation plots --------------------------------------------------------------


def _trace(fig: Any, name: str, xaxis: str = "x") -> Any:
    (found,) = [tr for tr in fig.data if tr.name == name and tr.xaxis == xaxis]
    return found


def test_roc_plot() -> None:
    points = {
        "ioi": {"EAP": [(1.0, 1.0), (0.0, 0.0), (0.25, 0.75)], "Random": [(0, 0), (1, 1)]},
        "docstring": {"EAP": [(0.0, 0.0), (0.5, 1.0), (1.0, 1.0)]},
    }
    fig: Any = roc_plot(points)
    assert [a.text for a in fig.layout.annotations] == ["ioi", "docstring"]
    eap = _trace(fig, "EAP")
    assert list(eap.x) == [0.0, 0.25, 1.0] and list(eap.y) == [0.0, 0.75, 1.0]
    assert "AUC 0.750" in eap.hovertemplate  # 0.25*0.75/2 + 0.75*(0.75+1)/2 = 0.75
    eap2 = _trace(fig, "EAP", "x2")
    assert list(eap2.x) == [0.0, 0.5, 1.0] and eap2.line.color == eap.line.color
    assert eap.showlegend and not eap2.showlegend
    chance = _trace(fig, "Chance")
    assert list(chance.x) == [0, 1] and list(chance.y) == [0, 1]
    assert tuple(fig.layout.xaxis.range) == (0, 1) and tuple(fig.layout.yaxis.range) == (0, 1)
    wide: Any = roc_plot(points, variable_width=True)
    assert _trace(wide, "EAP").line.width > _trace(wide, "Random").line.width
    with pytest.raises(CircuitError, match=r"must lie in \[0, 1\]"):
        roc_plot({"t": {"A": [(0, 0), (1.5, 1)]}})


def test_task_roc_plot_against_brute_force() -> None:
    model = patchable_model(MicroModel(n_layers=2), factorized=True, slice_output=None)
    official = ["Resid Start->B0.0", "B0.0->B1.1", "B1.1->Resid End"]
    gen = t.Generator().manual_seed(3)
    scores = {k: t.randn(v.shape, generator=gen) for k, v in model.patch_masks.items()}
    fig: Any = task_roc_plot(model, official, {"Noise": scores}, task_name="micro")
    # Oracle: walk every edge; at each distinct |score| count the kept official edges.
    edges = [(abs(float(e.prune_score(scores))), e.name in official) for e in model.edges]
    n_pos = sum(o for _, o in edges)
    n_neg = len(edges) - n_pos
    expected = [(0.0, 0.0)]
    for threshold in sorted({s for s, _ in edges}, reverse=True):
        kept = [o for s, o in edges if s >= threshold]
        expected.append(((len(kept) - sum(kept)) / n_neg, sum(kept) / n_pos))
    trace = _trace(fig, "Noise")
    expected.sort()
    assert list(trace.x) == pytest.approx([x for x, _ in expected])
    assert list(trace.y) == pytest.approx([y for _, y in expected])
    assert fig.layout.annotations[0].text == "micro"


def test_edge_patching_plot_log_axes_and_markers() -> None:
    data = {
        "ioi": {
            "EAP": [(0, 3.0), (10, 1.0), (100, 0.0), (1000, 0.5)],
            "Official": [(40, 0.2)],
        },
        "docstring": {"EAP": [(1, 2.0), (10, 1.0)]},
    }
    fig: Any = edge_patching_plot(data, CLEAN_KL_DIV_METRIC)
    assert fig.layout.xaxis.type == "log" and fig.layout.yaxis.type == "log"
    eap = _trace(fig, "EAP")
    assert list(eap.x) == [10.0, 1000.0] and list(eap.y) == [1.0, 0.5]  # x=0, y=0 left out
    official = _trace(fig, "Official")
    assert official.mode == "markers" and official.marker.symbol == "x"
    assert eap.mode == "lines+markers"
    assert _trace(fig, "EAP", "x2").line.color == eap.line.color
    assert [a.text for a in fig.layout.annotations] == ["ioi", "docstring"]
    assert "lower is better" in fig.layout.yaxis.title.text
    assert fig.layout.yaxis2.matches is None  # KL divergences keep their own scale
    linear: Any = edge_patching_plot(data, LOGIT_DIFF_PERCENT_METRIC)
    assert linear.layout.yaxis.type == "linear" and linear.layout.xaxis.type == "log"
    assert linear.layout.yaxis2.matches == "y"  # percentages share one scale
    assert list(_trace(linear, "EAP").y) == [1.0, 0.0, 0.5]  # y=0 kept on a linear y axis


def test_average_auc_plot_against_hand_areas() -> None:
    # Linear axes. t1: Random area 1, A area 2 (ratio 2); t2: Random 2, A 2 (ratio 1).
    data = {
        "t1": {"Random": [(1, 1), (2, 1)], "A": [(1, 2), (2, 2)]},
        "t2": {"Random": [(0, 0), (2, 2)], "A": [(0, 1), (2, 1)]},
    }
    (bar,) = _traces(average_auc_plot(data))
    assert bar.orientation == "h"
    assert list(bar.y) == ["Random", "A"] and list(bar.x) == pytest.approx([1.0, 1.5])
    # Log x (the metric's): x=0 dropped; over log10 x in [0, 1] Random has area 1 and A
    # a trapezoid (1 + 3) / 2 = 2.
    logged = {"t": {"Random": [(0, 5), (1, 1), (10, 1)], "A": [(0, 5), (1, 1), (10, 3)]}}
    (bar,) = _traces(average_auc_plot(logged, LOGIT_DIFF_METRIC))
    assert dict(zip(bar.y, bar.x, strict=True)) == pytest.approx({"Random": 1.0, "A": 2.0})
    with pytest.raises(CircuitError, match="no measurements of the baseline algorithm"):
        average_auc_plot({"t": {"A": [(1, 1), (2, 2)]}})


def test_prune_score_similarities_plot() -> None:
    algos = {
        "A": {"m": t.tensor([4.0, 3.0, 2.0, 1.0])},
        "B": {"m": t.tensor([-4.0, 1.0, 3.0, 2.0])},
        "Tied": {"m": t.tensor([1.0, 1.0, 0.0, 0.0])},
    }
    fig: Any = prune_score_similarities_plot({"task": algos}, [1, 2])
    top1, top2 = _traces(fig)
    assert list(top1.x) == ["A", "B", "Tied"] and list(top1.y) == ["A", "B", "Tied"]
    # top-1: A and B both pick edge 0; Tied's top-1 is ambiguous (two equal scores).
    assert [row[:2] for row in top1.z[:2]] == [[1.0, 1.0], [1.0, 1.0]]
    assert math.isnan(top1.z[0][2]) and top1.text[0][2] == ""
    # top-2: A keeps {0, 1}, B keeps {0, 2}, Tied keeps {0, 1}.
    assert top2.z[0][1] == 0.5 and top2.z[0][2] == 1.0 and top2.z[1][2] == 0.5
    assert top2.text[0][1] == "0.50"
    assert [a.text for a in fig.layout.annotations] == ["task, top 1", "task, top 2"]
    with pytest.raises(CircuitError, match="edge_counts is empty"):
        prune_score_similarities_plot({"task": algos}, [])
