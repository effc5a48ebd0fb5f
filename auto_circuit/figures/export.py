"""Showing and saving figures: IPython display, self-contained HTML, static images.

Plotly is an optional dependency (``pip install "auto_circuit[plot]"``); it is imported
only when a figure is made. Static images (PNG, SVG, PDF, JPEG, WebP) are rendered by
kaleido (>= 1.0), which drives a Chrome or Chromium installed on the machine: it looks
for ``BROWSER_PATH``, then ``chromium``/``google-chrome`` on ``PATH`` and the usual
install locations (on Debian: ``apt-get install chromium``). The rendering page loads
plotly.js from the installed plotly package and no MathJax, so export works offline.

Nothing here changes plotly's global settings (templates, renderers, defaults).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from auto_circuit.vocabulary.errors import CircuitError

if TYPE_CHECKING:
    import plotly.graph_objects as go

STATIC_FORMATS = ("png", "svg", "pdf", "jpg", "jpeg", "webp")
"""File suffixes written through the static exporter (kaleido)."""

_BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
_DEFAULT_SIZE = (700, 500)  # plotly's default figure size in pixels

PLOT_INSTALL_HINT = 'pip install "auto_circuit[plot]" (or: pip install plotly kaleido)'


def require_plotly() -> ModuleType:
    """``plotly.graph_objects``, or an ImportError saying how to install it."""
    try:
        import plotly.graph_objects as go_module
    except ImportError as err:
        raise ImportError(f"Figures need plotly: {PLOT_INSTALL_HINT}.") from err
    return go_module


def chromium_path() -> str | None:
    """The Chrome/Chromium executable used for static export, or None.

    ``BROWSER_PATH`` (the variable kaleido's browser driver reads) wins when it names an
    executable file; otherwise the first of ``chromium``, ``chromium-browser``,
    ``google-chrome``, ``google-chrome-stable``, ``chrome`` on ``PATH``.
    """
    configured = os.environ.get("BROWSER_PATH")
    if configured and os.path.isfile(configured) and os.access(configured, os.X_OK):
        return configured
    for name in _BROWSER_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def in_ipython() -> bool:
    """Whether the code runs inside an IPython kernel or shell (never imports IPython)."""
    ipython = sys.modules.get("IPython")
    return ipython is not None and getattr(ipython, "get_ipython", lambda: None)() is not None


def show_in_ipython(fig: go.Figure) -> bool:
    """Show ``fig`` if running inside IPython; return whether it was shown."""
    if not in_ipython():
        return False
    fig.show()
    return True


def write_figure(
    fig: go.Figure,
    file_path: str | os.PathLike[str],
    width: int | None = None,
    height: int | None = None,
    scale: float = 1.0,
) -> Path:
    """Write ``fig`` to ``file_path`` by its suffix: ``.html`` (self-contained, plotly.js
    inlined, works offline) or a static image (``.png``, ``.svg``, ``.pdf``, ``.jpg``,
    ``.jpeg``, ``.webp``) rendered by kaleido.

    Args:
        fig: The figure.
        file_path: Where to write; a relative path is relative to the current directory.
        width: Image width in layout pixels (default: the figure's, else 700).
        height: Image height in layout pixels (default: the figure's, else 500).
        scale: Pixels per layout pixel of a raster image (a PNG is
            ``width * scale`` by ``height * scale`` pixels).

    Returns:
        The absolute path written.
    """
    path = Path(file_path).expanduser()
    if not path.is_absolute():
        path = Path.cwd() / path
    if not path.parent.is_dir():
        raise CircuitError(f"Cannot write {path}: the folder {path.parent} does not exist.")
    suffix = path.suffix.lower().lstrip(".")
    if suffix == "html":
        fig.write_html(str(path), include_plotlyjs=True, full_html=True)
        return path
    if suffix not in STATIC_FORMATS:
        raise CircuitError(
            f"Cannot write {path.name!r}: the suffix must be .html or one of "
            f"{', '.join('.' + s for s in STATIC_FORMATS)}."
        )
    if scale <= 0:
        raise CircuitError(f"scale must be positive, got {scale}.")
    path.write_bytes(_static_image(fig, suffix, width, height, scale))
    return path


def _static_image(
    fig: go.Figure, fmt: str, width: int | None, height: int | None, scale: float
) -> bytes:
    try:
        import kaleido
    except ImportError as err:
        raise ImportError(f"Static images need kaleido >= 1.0: {PLOT_INSTALL_HINT}.") from err
    browser = chromium_path()
    if browser is None:
        raise CircuitError(
            "Static export needs Chrome or Chromium and none was found: install it (Debian: "
            "apt-get install chromium) or set BROWSER_PATH to its executable. HTML export "
            "(a .html file_path) needs no browser."
        )
    layout = fig.layout
    opts: dict[str, Any] = {
        "format": "jpeg" if fmt == "jpg" else fmt,
        "width": width or layout.width or _DEFAULT_SIZE[0],  # type: ignore[attr-defined]
        "height": height or layout.height or _DEFAULT_SIZE[1],  # type: ignore[attr-defined]
        "scale": scale,
    }
    # mathjax=False: the default MathJax comes from a CDN, which an offline machine lacks.
    kopts: dict[str, Any] = {"mathjax": False, "path": browser}
    return kaleido.calc_fig_sync(fig.to_dict(), opts=opts, kopts=kopts)
