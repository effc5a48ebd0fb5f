"""The HTML circuit browser: its embedded data against a brute-force walk over the
graph's edges, and the page itself driven in headless Chromium.

Chromium (Debian's ``chromium`` package) is driven over the Chrome DevTools Protocol
through ``--remote-debugging-pipe``: JSON messages separated by NUL bytes on file
descriptors 3 (commands) and 4 (replies). That needs only the standard library: no
websocket client, no network port, no webdriver.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import re
import select
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch as t
from conftest import make_tl_model

from auto_circuit.engine.graph_utils import patchable_model
from auto_circuit.engine.patchable_model import PatchableModel
from auto_circuit.figures import chromium_path, circuit_browser_html, write_circuit_browser
from auto_circuit.vocabulary.errors import CircuitError
from auto_circuit.vocabulary.types import PruneScores

LAYER = {"Resid Start": 0, "A0.0": 1, "A0.1": 1, "MLP 0": 2, "A1.0": 3, "A1.1": 3}
LAYER.update({"MLP 1": 4, "Resid End": 5})
LABELS = ["<bos>", "When", "Mary"]
VIEWPORT = (1000, 700)


@pytest.fixture(scope="module")
def model() -> PatchableModel:
    tl = make_tl_model(n_layers=2, n_heads=2, d_model=8, d_vocab=20)
    return patchable_model(
        tl, factorized=True, slice_output="last_seq", separate_qkv=True, seq_len=3
    )


def _scores(model: PatchableModel, seed: int, density: float) -> PruneScores:
    gen = t.Generator().manual_seed(seed)
    return {
        k: t.randn(v.shape, generator=gen) * (t.rand(v.shape, generator=gen) < density)
        for k, v in model.patch_masks.items()
    }


@pytest.fixture(scope="module")
def circuits(model: PatchableModel) -> dict[str, PruneScores]:
    eap = _scores(model, 0, 0.3)
    noise = _scores(model, 1, 0.3)
    # Overlapping but different: some edges shared, some only in one circuit.
    return {"EAP": eap, "ACDC": {k: v + noise[k] for k, v in eap.items()}}


def _ranked(model: PatchableModel, scores: PruneScores) -> list[tuple[str, float]]:
    """Oracle: every non-zero edge as ``"name@seq"`` by decreasing ``|score|``, from a walk
    over ``model.edges`` (the page selects edges on the score tensors instead)."""
    edges = [(f"{e.name}@{e.seq_idx}", float(e.prune_score(scores))) for e in model.edges]
    return sorted(((k, s) for k, s in edges if s != 0), key=lambda kv: -abs(kv[1]))


def _page_data(page: str) -> dict[str, Any]:
    match = re.search(r'<script id="circuit-data" type="application/json">(.*?)</script>', page)
    assert match
    return json.loads(match.group(1))


def test_embedded_data_matches_brute_force(
    model: PatchableModel, circuits: dict[str, PruneScores]
) -> None:
    page = circuit_browser_html(model, circuits, max_edges=25, seq_labels=LABELS)
    data = _page_data(page)
    nodes = data["nodes"]
    for circuit, name in zip(data["circuits"], circuits, strict=True):
        assert circuit["name"] == name
        drawn = [(f"{e[2]}@{nodes[e[0]]['seq']}", e[3]) for e in circuit["edges"]]
        expected = _ranked(model, circuits[name])[:25]
        assert [k for k, _ in drawn] == [k for k, _ in expected]
        assert [s for _, s in drawn] == pytest.approx([s for _, s in expected])
        for src, dest, edge_name, _, _ in circuit["edges"]:
            src_name, dest_name = edge_name.split("->")
            assert nodes[src]["name"] == src_name
            assert dest_name.startswith(nodes[dest]["name"])  # A1.0.Q is drawn as A1.0
            assert nodes[src]["seq"] == nodes[dest]["seq"]
    # Columns by layer, bands by position.
    for node in nodes:
        assert node["layer"] == LAYER[node["name"]]
        band = next(b for b in data["bands"] if b["seq"] == node["seq"])
        assert band["y"] < node["y"] < band["y"] + band["height"]
        assert band["label"] == f"{node['seq']}: {LABELS[node['seq']]}"
    x_of_layer = {}
    for node in nodes:
        assert x_of_layer.setdefault(node["layer"], node["x"]) == node["x"]
    layers = sorted(x_of_layer)
    assert [x_of_layer[layer] for layer in layers] == sorted(x_of_layer.values())


def test_page_is_self_contained_and_escaped(model: PatchableModel) -> None:
    scores = _scores(model, 2, 0.1)
    page = circuit_browser_html(model, {"</script><b>x": scores}, title="<i>t</i> & co")
    assert not re.search(r"<(script|link|img|iframe)[^>]+(src|href)=", page)
    assert "https://" not in page and "http://" not in page.replace("http://www.w3.org", "")
    assert page.count("</script>") == 2  # the data and the code; the name is escaped
    assert "<title>&lt;i&gt;t&lt;/i&gt; &amp; co</title>" in page
    assert _page_data(page)["circuits"][0]["name"] == "</script><b>x"


def test_bad_input(model: PatchableModel, circuits: dict[str, PruneScores]) -> None:
    with pytest.raises(CircuitError, match="circuits is empty"):
        circuit_browser_html(model, {})
    with pytest.raises(CircuitError, match="max_edges must be >= 1"):
        circuit_browser_html(model, circuits, max_edges=0)
    with pytest.raises(CircuitError, match="seq_labels has 1 labels but the graph has 3"):
        circuit_browser_html(model, circuits, seq_labels=["x"])
    with pytest.raises(CircuitError, match="folder .* does not exist"):
        write_circuit_browser("/nonexistent/dir/page.html", model, circuits)


# ---- the page in headless Chromium ---------------------------------------------------


class DevToolsPipe:
    """A minimal Chrome DevTools Protocol client over ``--remote-debugging-pipe``."""

    def __init__(self, executable: str, profile: str):
        cmd_read, self._cmd_write = os.pipe()
        self._reply_read, reply_write = os.pipe()

        def child_fds() -> None:  # Chromium reads commands on fd 3 and replies on fd 4
            a = fcntl.fcntl(cmd_read, fcntl.F_DUPFD, 10)
            b = fcntl.fcntl(reply_write, fcntl.F_DUPFD, 10)
            os.dup2(a, 3)
            os.dup2(b, 4)

        flags = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--remote-debugging-pipe",
            f"--user-data-dir={profile}",
        ]
        self.process = subprocess.Popen(
            [executable, *flags, "about:blank"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=child_fds,
            close_fds=False,  # the pipe ends are non-inheritable except fds 3 and 4
        )
        os.close(cmd_read)
        os.close(reply_write)
        self._buffer = b""
        self._next_id = 0

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> Any:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        os.write(self._cmd_write, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + 20
        while True:
            while b"\0" not in self._buffer:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"Chromium did not answer {method}")
                ready, _, _ = select.select([self._reply_read], [], [], left)
                if ready:
                    chunk = os.read(self._reply_read, 1 << 16)
                    if not chunk:
                        raise RuntimeError("Chromium closed the DevTools pipe")
                    self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._next_id:  # anything else is an event: skip it
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def close(self) -> None:
        try:
            self.send("Browser.close")
            self.process.wait(timeout=10)
        except Exception:
            self.process.kill()
            self.process.wait(timeout=10)
        finally:
            os.close(self._cmd_write)
            os.close(self._reply_read)


class Page:
    def __init__(self, browser: DevToolsPipe, url: str):
        self.browser = browser
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        width, height = VIEWPORT
        metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}
        self.send("Emulation.setDeviceMetricsOverride", metrics)
        self.send("Page.navigate", {"url": url})
        deadline = time.monotonic() + 20
        while self.js("document.readyState") != "complete" or not self.js(
            "document.querySelector('#panel-a svg') !== null"
        ):
            assert time.monotonic() < deadline, "the page did not load"
            time.sleep(0.05)

    def send(self, method: str, params: dict | None = None) -> Any:
        return self.browser.send(method, params, self.session)

    def js(self, expression: str) -> Any:
        """Evaluate ``expression`` (statements allowed: it runs as a block, so its
        ``const``s do not leak between calls) and return its last value."""
        block = "{" + expression + "}"
        result = self.send("Runtime.evaluate", {"expression": block, "returnByValue": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def set_k(self, k: int) -> None:
        self.js(
            f"const s = document.getElementById('edge-slider'); s.value = '{k}';"
            "s.dispatchEvent(new Event('input'));"
        )

    def select(self, element_id: str, value: str) -> None:
        self.js(
            f"const e = document.getElementById('{element_id}'); e.value = '{value}';"
            "e.dispatchEvent(new Event('change'));"
        )

    def visible(self, selector: str) -> list[str]:
        """``data-key`` of the matching edges that are displayed."""
        return self.js(
            f"Array.from(document.querySelectorAll('{selector}'))"
            ".filter(e => getComputedStyle(e).display !== 'none').map(e => e.dataset.key)"
        )


@pytest.fixture(scope="module")
def browser() -> Iterator[DevToolsPipe]:
    executable = chromium_path()
    if executable is None:
        pytest.skip("Chromium not found (apt-get install chromium, or set BROWSER_PATH)")
    with tempfile.TemporaryDirectory() as profile:
        pipe = DevToolsPipe(executable, profile)
        try:
            yield pipe
        finally:
            pipe.close()


@pytest.fixture(scope="module")
def page(
    browser: DevToolsPipe,
    model: PatchableModel,
    circuits: dict[str, PruneScores],
    tmp_path_factory: pytest.TempPathFactory,
) -> Page:
    path = tmp_path_factory.mktemp("browser") / "circuits.html"
    write_circuit_browser(path, model, circuits, seq_labels=LABELS, initial_edges=10)
    return Page(browser, path.as_uri())


def test_slider_keeps_the_top_k_edges(
    page: Page, model: PatchableModel, circuits: dict[str, PruneScores]
) -> None:
    page.select("circuit-b", "")
    page.select("circuit-a", "0")
    ranked = [k for k, _ in _ranked(model, circuits["EAP"])]
    assert page.js("document.getElementById('edge-slider').max") == str(len(ranked))
    assert len(page.visible("#panel-a path.edge")) == 10  # initial_edges
    for k in (0, 1, 7, len(ranked)):
        page.set_k(k)
        shown = page.visible("path.edge")
        assert len(shown) == k and set(shown) == set(ranked[:k])
        assert page.js("document.getElementById('edge-count').textContent") == str(k)
    # Blue for positive scores, red for negative ones.
    colors = page.js(
        "Array.from(document.querySelectorAll('#panel-a path.edge')).map(e => "
        "[Number(e.dataset.score), getComputedStyle(e).stroke])"
    )
    assert {c for s, c in colors if s > 0} == {"rgb(31, 79, 209)"}
    assert {c for s, c in colors if s < 0} == {"rgb(209, 42, 31)"}


def test_hover_shows_name_and_score(page: Page) -> None:
    page.select("circuit-b", "")
    page.set_k(5)
    tip = page.js(
        "const e = document.querySelector('#panel-a path.edge[data-rank=\"0\"]');"
        "const r = e.getBoundingClientRect();"
        "e.dispatchEvent(new MouseEvent('mousemove', {bubbles: true, clientX: r.x, clientY: r.y}));"
        "[e.dataset.name, e.dataset.score, e.dataset.seq,"
        " document.getElementById('tooltip').textContent,"
        " getComputedStyle(document.getElementById('tooltip')).display]"
    )
    name, score, seq, text, display = tip
    assert display == "block"
    assert text == f"{name} at {seq}: {LABELS[int(seq)]}: score {score}"


def test_diff_of_two_circuits(
    page: Page,
    model: PatchableModel,
    circuits: dict[str, PruneScores],
    tmp_path: Path,
) -> None:
    page.select("circuit-a", "0")
    page.select("circuit-b", "1")
    k = 12
    page.set_k(k)
    top_a = {n for n, _ in _ranked(model, circuits["EAP"])[:k]}
    top_b = {n for n, _ in _ranked(model, circuits["ACDC"])[:k]}
    assert top_a & top_b and top_a - top_b  # the example exercises every class
    assert set(page.visible("#panel-a path.edge.only-a")) == top_a - top_b
    assert set(page.visible("#panel-a path.edge.both")) == top_a & top_b
    assert set(page.visible("#panel-b path.edge.only-b")) == top_b - top_a
    assert set(page.visible("#panel-b path.edge.both")) == top_a & top_b
    counts = page.js(
        "['count-only-a', 'count-only-b', 'count-both']"
        ".map(i => Number(document.getElementById(i).textContent))"
    )
    assert counts == [len(top_a - top_b), len(top_b - top_a), len(top_a & top_b)]
    strokes = page.js(
        "['#panel-a path.edge.only-a', '#panel-b path.edge.only-b', '#panel-a path.edge.both']"
        ".map(s => getComputedStyle(document.querySelector(s)).stroke)"
    )
    assert len(set(strokes)) == 3
    assert page.js("getComputedStyle(document.getElementById('panel-b')).display") == "block"

    shot = tmp_path / "diff.png"
    shot.write_bytes(
        base64.b64decode(page.send("Page.captureScreenshot", {"format": "png"})["data"])
    )
    data = shot.read_bytes()
    assert len(data) > 5000 and data[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", data[16:24]) == VIEWPORT

    page.select("circuit-b", "")  # back to one circuit: one panel, no diff classes
    assert page.js("getComputedStyle(document.getElementById('panel-b')).display") == "none"
    assert page.visible("path.edge.only-a") == [] and len(page.visible("path.edge")) == k
