"""A self-contained HTML page to explore circuits and compare two of them.

The page is one file with its data, styles and script inline: it needs no server, no
network and no plotly. It is plain SVG driven by a few hundred lines of vanilla
JavaScript: a plotly.js bundle would add about 4.8 MB to every page for a drawing
that is only paths and circles.

Layout: one column per layer (only layers that hold a drawn node), one horizontal band
per token position in graphs with positions (only positions with a drawn edge). A
head's query/key/value inputs are drawn as the head (the edge ends slightly above,
at, or below its centre for Q, K, V); the edge name keeps the input.

Controls (stable ids, so tests and users can script the page):

- ``#circuit-a`` / ``#circuit-b``: the circuit shown, and the one to compare it with
  (``""``: none). Comparing shows two panels side by side, ``#panel-a`` and
  ``#panel-b``, with edges classed ``only-a`` (in A's top k only), ``only-b`` or
  ``both``; ``#count-only-a``, ``#count-only-b`` and ``#count-both`` hold the counts.
- ``#edge-slider``: the number k of edges kept, the top k by ``|score|`` of each
  circuit; ``#edge-count`` shows it.
- Edges are ``<path class="edge pos|neg" data-name=... data-score=... data-seq=...
  data-rank=...>``; hidden ones have ``style="display: none"``. Hovering an edge fills
  ``#tooltip`` with its name, position and score.
"""

from __future__ import annotations

import html
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from auto_circuit.engine.patchable_model import PatchableModel
from auto_circuit.figures._edges import Components, DrawnEdge, select_edges
from auto_circuit.vocabulary.errors import CircuitError
from auto_circuit.vocabulary.types import PruneScores

_COL_W = 120  # pixels between layer columns
_ROW_H = 24  # pixels between nodes of one column
_BAND_LABEL_H = 26  # pixels above each position band for its label
_BAND_GAP = 14
_MARGIN_X = 60
_MARGIN_Y = 16
_QKV_OFFSET = {"Q": -4, "K": 0, "V": 4}


def circuit_browser_html(
    model: PatchableModel,
    circuits: Mapping[str, PruneScores],
    max_edges: int = 2000,
    title: str = "Circuit browser",
    seq_labels: Sequence[str] | None = None,
    initial_edges: int = 100,
) -> str:
    """The HTML of a page showing ``circuits`` (see the module docstring).

    Args:
        model: The patchable model the circuits' scores belong to.
        circuits: ``{name: prune scores}``; each circuit is its edges with a non-zero
            score (boolean scores from ``circuit_prune_scores(..., bool=True)`` work).
        max_edges: Keep at most this many edges of each circuit, the largest
            ``|score|`` (the slider's range).
        title: The page title.
        seq_labels: One label per token position (graphs with positions).
        initial_edges: The slider's starting value (capped at the largest circuit).

    Returns:
        A complete HTML document.
    """
    if not circuits:
        raise CircuitError("circuits is empty: pass at least one {name: prune scores}.")
    if max_edges < 1:
        raise CircuitError(f"max_edges must be >= 1, got {max_edges}.")
    if seq_labels is not None and len(seq_labels) != (model.seq_len or 0):
        raise CircuitError(
            f"seq_labels has {len(seq_labels)} labels but the graph has "
            f"{model.seq_len or 'no'} token positions."
        )
    selected = {
        name: select_edges(model, scores, top_k=max_edges) for name, scores in circuits.items()
    }
    data = _layout(model, selected, seq_labels)
    longest = max(len(c["edges"]) for c in data["circuits"])
    data["title"] = title
    data["initialEdges"] = max(0, min(initial_edges, longest))
    payload = json.dumps(data, separators=(",", ":"), allow_nan=False)
    # Inside <script>, "<" could close the element: escape it (valid in JSON strings).
    payload = payload.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    options = "".join(
        f'<option value="{i}">{html.escape(name)}</option>' for i, name in enumerate(circuits)
    )
    return (
        _PAGE.replace("__TITLE__", html.escape(title))
        .replace("__OPTIONS__", options)
        .replace("__STYLE__", _STYLE)
        .replace("__SCRIPT__", _SCRIPT)
        .replace("__DATA__", payload)
    )


def write_circuit_browser(
    path: str | os.PathLike[str],
    model: PatchableModel,
    circuits: Mapping[str, PruneScores],
    max_edges: int = 2000,
    title: str = "Circuit browser",
    seq_labels: Sequence[str] | None = None,
    initial_edges: int = 100,
) -> Path:
    """Write ``circuit_browser_html(...)`` to ``path`` (relative to the current
    directory) and return the absolute path."""
    target = Path(path).expanduser()
    if not target.is_absolute():
        target = Path.cwd() / target
    if not target.parent.is_dir():
        raise CircuitError(f"Cannot write {target}: the folder {target.parent} does not exist.")
    page = circuit_browser_html(model, circuits, max_edges, title, seq_labels, initial_edges)
    target.write_text(page, encoding="utf-8")
    return target


def _json_score(score: float) -> float | str:
    if math.isfinite(score):
        return score
    return "Infinity" if score > 0 else "-Infinity"


def _layout(
    model: PatchableModel,
    selected: Mapping[str, list[DrawnEdge]],
    seq_labels: Sequence[str] | None,
) -> dict[str, Any]:
    """Node coordinates (pixels) and each circuit's edges as node ids."""
    components = Components(model)
    keys = {
        (components.of(node), edge.seq_idx)
        for edges in selected.values()
        for edge in edges
        for node in edge.edge_nodes()
    }
    layers = sorted({components.layer[name] for name, _ in keys})
    column = {layer: i for i, layer in enumerate(layers)}
    positions = sorted({seq for _, seq in keys}, key=lambda s: -1 if s is None else s)

    nodes: list[dict[str, Any]] = []
    node_id: dict[tuple[str, int | None], int] = {}
    bands: list[dict[str, Any]] = []
    top = _MARGIN_Y
    for seq in positions:
        per_column: dict[int, list[str]] = {}
        for name, s in keys:
            if s == seq:
                per_column.setdefault(column[components.layer[name]], []).append(name)
        rows = max(len(v) for v in per_column.values())
        label_h = _BAND_LABEL_H  # also the headroom of arcs over the top row
        for col, names in per_column.items():
            for row, name in enumerate(sorted(names, key=components.order.__getitem__)):
                node_id[(name, seq)] = len(nodes)
                nodes.append(
                    {
                        "name": name,
                        "layer": components.layer[name],
                        "seq": seq,
                        "x": _MARGIN_X + col * _COL_W,
                        "y": top + label_h + row * _ROW_H + _ROW_H // 2,
                    }
                )
        height = label_h + rows * _ROW_H
        label = "" if seq is None else f"Position {seq}"
        if seq is not None and seq_labels is not None:
            label = f"{seq}: {seq_labels[seq]}"
        bands.append({"seq": seq, "label": label, "y": top, "height": height})
        top += height + _BAND_GAP

    circuits = []
    for name, edges in selected.items():
        rows_out = []
        for e in edges:
            dest = e.edge.dest
            suffix = dest.name.rpartition(".")[2]
            offset = _QKV_OFFSET.get(suffix, 0) if components.of(dest) != dest.name else 0
            rows_out.append(
                [
                    node_id[(components.of(e.edge.src), e.seq_idx)],
                    node_id[(components.of(dest), e.seq_idx)],
                    e.name,
                    _json_score(e.score),
                    offset,
                ]
            )
        finite = [abs(e.score) for e in edges if math.isfinite(e.score)]
        circuits.append({"name": name, "edges": rows_out, "maxAbs": max(finite, default=1.0)})
    return {
        "nodes": nodes,
        "bands": bands,
        "layers": layers,
        "columnX": [_MARGIN_X + i * _COL_W for i in range(len(layers))],
        "colWidth": _COL_W,
        "maxLift": _BAND_LABEL_H - 6,
        "width": 2 * _MARGIN_X + max(len(layers) - 1, 0) * _COL_W,
        "height": top - _BAND_GAP + _MARGIN_Y,
        "circuits": circuits,
    }


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>__TITLE__</title>
<style>__STYLE__</style>
</head>
<body>
<header>
<h1 id="title">__TITLE__</h1>
<div id="controls">
<label>Circuit <select id="circuit-a">__OPTIONS__</select></label>
<label>Compare with <select id="circuit-b"><option value="">(none)</option>__OPTIONS__</select>
</label>
<label>Edges <input type="range" id="edge-slider" min="0" max="0" step="1" value="0">
<span id="edge-count">0</span></label>
<span id="diff-counts">A only: <span id="count-only-a">0</span>, B only:
<span id="count-only-b">0</span>, both: <span id="count-both">0</span></span>
</div>
<div id="legend"></div>
</header>
<main id="panels">
<section class="panel" id="panel-a"><h2 class="panel-title"></h2></section>
<section class="panel" id="panel-b"><h2 class="panel-title"></h2></section>
</main>
<div id="tooltip" role="tooltip"></div>
<script id="circuit-data" type="application/json">__DATA__</script>
<script>__SCRIPT__</script>
</body>
</html>
"""

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 0; color: #222; background: #fff; }
header { padding: 8px 16px; border-bottom: 1px solid #ddd; }
h1 { font-size: 18px; margin: 0 0 6px 0; }
h2 { font-size: 14px; margin: 4px 8px; }
#controls { display: flex; flex-wrap: wrap; gap: 16px; align-items: center; font-size: 13px; }
#edge-slider { width: 220px; vertical-align: middle; }
#diff-counts { display: none; }
body.diff #diff-counts { display: inline; }
#legend { font-size: 12px; margin-top: 4px; }
#legend span.key { display: inline-block; width: 18px; height: 4px; margin: 0 4px 2px 10px;
  vertical-align: middle; }
#panels { display: flex; gap: 8px; padding: 8px; }
.panel { flex: 1 1 0; overflow: auto; border: 1px solid #eee; min-width: 0; }
#panel-b { display: none; }
body.diff #panel-b { display: block; }
.band-label { font-size: 12px; fill: #555; }
.band { fill: #f7f7f7; }
.node circle { fill: #555; }
.node text { font-size: 10px; fill: #222; }
.edge { fill: none; stroke-opacity: 0.65; }
.edge:hover { stroke-opacity: 1; }
.edge.pos { stroke: #1f4fd1; }
.edge.neg { stroke: #d12a1f; }
body.diff .edge.only-a { stroke: #e07000; }
body.diff .edge.only-b { stroke: #1a9641; }
body.diff .edge.both { stroke: #7b3294; }
#tooltip { position: fixed; display: none; pointer-events: none; background: #fffff0;
  border: 1px solid #999; padding: 3px 6px; font-size: 12px; white-space: nowrap; }
"""

_SCRIPT = r"""
"use strict";
const DATA = JSON.parse(document.getElementById("circuit-data").textContent);
const SVG_NS = "http://www.w3.org/2000/svg";
const selA = document.getElementById("circuit-a");
const selB = document.getElementById("circuit-b");
const slider = document.getElementById("edge-slider");
const tooltip = document.getElementById("tooltip");
const panels = { a: document.getElementById("panel-a"), b: document.getElementById("panel-b") };
const shown = { a: null, b: null };

function score(raw) { return typeof raw === "number" ? raw : Number(raw); }
function fmt(v) {
  if (Number.isFinite(v)) return String(Number(v.toPrecision(4)));
  return v > 0 ? "inf" : "-inf";
}
function edgeKey(e) { return e[2] + "@" + DATA.nodes[e[0]].seq; }
function el(tag, attrs, parent) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (parent) parent.appendChild(node);
  return node;
}

function buildPanel(panel) {
  const svg = el("svg", { width: DATA.width, height: DATA.height, class: "graph" });
  for (const band of DATA.bands) {
    el("rect", { class: "band", x: 0, y: band.y, width: DATA.width, height: band.height }, svg);
    if (band.label) {
      const t = el("text", { class: "band-label", x: 6, y: band.y + 16 }, svg);
      t.textContent = band.label;
    }
  }
  const edges = el("g", { class: "edges" }, svg);
  const nodes = el("g", { class: "nodes" }, svg);
  for (const n of DATA.nodes) {
    const g = el("g", { class: "node", "data-name": n.name, "data-layer": n.layer }, nodes);
    el("circle", { cx: n.x, cy: n.y, r: 5 }, g);
    const t = el("text", { x: n.x + 7, y: n.y - 6 }, g);
    t.textContent = n.name;
  }
  panel.appendChild(svg);
  panel.edgeLayer = edges;
  svg.addEventListener("mousemove", onHover);
  svg.addEventListener("mouseleave", () => { tooltip.style.display = "none"; });
}

function drawCircuit(side, index) {
  const layer = panels[side].edgeLayer;
  layer.replaceChildren();
  shown[side] = index;
  if (index === null) return;
  const circuit = DATA.circuits[index];
  panels[side].querySelector(".panel-title").textContent = circuit.name;
  circuit.edges.forEach((e, rank) => {
    const s = DATA.nodes[e[0]], d = DATA.nodes[e[1]];
    const v = score(e[3]);
    const mag = Number.isFinite(v) ? Math.abs(v) : circuit.maxAbs;
    const x1 = s.x + 5, y1 = s.y, x2 = d.x - 5, y2 = d.y + e[4];
    // Edges that skip columns arc upwards (more for longer ones) to pass over the
    // nodes in between rather than through them.
    const skipped = Math.round((d.x - s.x) / DATA.colWidth) - 1;
    const lift = Math.min(skipped * 6, DATA.maxLift);
    const c1 = x1 + (x2 - x1) / 3, c2 = x2 - (x2 - x1) / 3;
    const c1y = skipped > 0 ? y1 - lift : y1, c2y = skipped > 0 ? y2 - lift : y2;
    const xm = (x1 + x2) / 2;
    const shape = skipped > 0
      ? `M${x1},${y1} C${c1},${c1y} ${c2},${c2y} ${x2},${y2}`
      : `M${x1},${y1} C${xm},${y1} ${xm},${y2} ${x2},${y2}`;
    el("path", {
      class: "edge " + (v >= 0 ? "pos" : "neg"),
      d: shape,
      "stroke-width": (0.75 + 4.25 * mag / (circuit.maxAbs || 1)).toFixed(2),
      "data-name": e[2], "data-score": fmt(v), "data-seq": s.seq === null ? "" : s.seq,
      "data-rank": rank, "data-key": edgeKey(e),
    }, layer);
  });
}

function topKeys(index, k) {
  return new Set(DATA.circuits[index].edges.slice(0, k).map(edgeKey));
}

function applyK() {
  const k = Number(slider.value);
  document.getElementById("edge-count").textContent = String(k);
  const diff = shown.b !== null;
  const keys = { a: topKeys(shown.a, k), b: diff ? topKeys(shown.b, k) : new Set() };
  let onlyA = 0, onlyB = 0, both = 0;
  for (const side of diff ? ["a", "b"] : ["a"]) {
    const other = side === "a" ? keys.b : keys.a;
    for (const path of panels[side].edgeLayer.children) {
      const visible = Number(path.dataset.rank) < k;
      path.style.display = visible ? "" : "none";
      path.classList.remove("only-a", "only-b", "both");
      if (!visible || !diff) continue;
      const inOther = other.has(path.dataset.key);
      path.classList.add(inOther ? "both" : "only-" + side);
      if (inOther) {
        if (side === "a") both += 1;
      } else if (side === "a") {
        onlyA += 1;
      } else {
        onlyB += 1;
      }
    }
  }
  document.getElementById("count-only-a").textContent = String(onlyA);
  document.getElementById("count-only-b").textContent = String(onlyB);
  document.getElementById("count-both").textContent = String(both);
}

function onSelect() {
  const a = Number(selA.value);
  const b = selB.value === "" ? null : Number(selB.value);
  document.body.classList.toggle("diff", b !== null);
  drawCircuit("a", a);
  drawCircuit("b", b);
  const n = Math.max(DATA.circuits[a].edges.length, b === null ? 0 : DATA.circuits[b].edges.length);
  const k = Math.min(Number(slider.value), n);
  slider.max = String(n);
  slider.value = String(k);
  updateLegend(b !== null);
  applyK();
}

function updateLegend(diff) {
  const items = diff
    ? [["#e07000", "A only"], ["#1a9641", "B only"], ["#7b3294", "both"]]
    : [["#1f4fd1", "positive score"], ["#d12a1f", "negative score"]];
  const legend = document.getElementById("legend");
  legend.replaceChildren();
  for (const [color, text] of items) {
    const key = document.createElement("span");
    key.className = "key";
    key.style.background = color;
    legend.appendChild(key);
    legend.appendChild(document.createTextNode(text));
  }
  legend.appendChild(document.createTextNode("  (width: |score|; hover an edge for details)"));
}

function onHover(event) {
  const target = event.target;
  if (!(target instanceof SVGPathElement) || !target.classList.contains("edge")) {
    tooltip.style.display = "none";
    return;
  }
  const seq = target.dataset.seq;
  const band = DATA.bands.find((b) => String(b.seq) === seq);
  const where = seq === "" ? "" : " at " + (band && band.label ? band.label : "position " + seq);
  tooltip.textContent = target.dataset.name + where + ": score " + target.dataset.score;
  tooltip.style.left = event.clientX + 12 + "px";
  tooltip.style.top = event.clientY + 12 + "px";
  tooltip.style.display = "block";
}

buildPanel(panels.a);
buildPanel(panels.b);
slider.max = String(DATA.initialEdges);
slider.value = String(DATA.initialEdges);
selA.addEventListener("change", onSelect);
selB.addEventListener("change", onSelect);
slider.addEventListener("input", applyK);
onSelect();
"""
