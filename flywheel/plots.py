"""Small plots for asset metadata and MLflow: PNG bytes, and Markdown that embeds them.

Dagster renders Markdown metadata, including images given as data URIs, so a plot travels inside
the materialization event and stays with it.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=90)
    return plt, fig, ax


def _png(plt, fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def line_plot_png(xs: Sequence[float], ys: Sequence[float] | Mapping[str, Sequence[float]], *, xlabel: str = "",
                  ylabel: str = "", title: str = "") -> bytes:
    plt, fig, ax = _figure()
    series = ys if isinstance(ys, Mapping) else {ylabel or "y": ys}
    for name, values in series.items():
        ax.plot(list(xs)[: len(values)], list(values), label=name)
    if isinstance(ys, Mapping):
        ax.legend()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return _png(plt, fig)


def histogram_png(values: Sequence[float], *, bins: int = 40, xlabel: str = "", title: str = "", log: bool = False) -> bytes:
    plt, fig, ax = _figure()
    ax.hist(list(values), bins=bins, log=log)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    ax.set_title(title)
    return _png(plt, fig)


def bar_png(labels: Sequence[str], values: Sequence[float], *, ylabel: str = "", title: str = "") -> bytes:
    plt, fig, ax = _figure()
    ax.bar(list(labels), list(values))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.tick_params(axis="x", rotation=30)
    return _png(plt, fig)


def markdown_image(png: bytes, alt: str = "plot") -> str:
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})"


def markdown_table(rows: Sequence[Mapping[str, object]], columns: Sequence[str] | None = None) -> str:
    if not rows:
        return "_(empty)_"
    columns = list(columns or rows[0].keys())
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        out.append("| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |")
    return "\n".join(out)


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v).replace("|", "\\|")
