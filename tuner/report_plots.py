"""The report's three plots as PNG bytes (matplotlib, Agg canvas, no pyplot global state).

Each function takes plain series ``{label: [(M, value), ...]}`` (every label present, in the same
order in every call, so colours match across plots) and knows nothing of the results record.
"""

from __future__ import annotations

import io

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

Series = dict[str, list[tuple[int, float]]]

_SIZE = (7.0, 4.2)
_DPI = 110


def _png(figure: Figure) -> bytes:
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=_DPI, bbox_inches="tight")
    return buffer.getvalue()


def _lines(axes, series: Series, linestyle: str = "-", suffix: str = "") -> None:
    """One line per label; a label keeps its colour (by position) in every plot."""
    for index, (label, points) in enumerate(series.items()):
        if points:
            xs, ys = zip(*sorted(points))
            axes.plot(xs, ys, marker="o", linestyle=linestyle, color=f"C{index % 10}", label=label + suffix)


def _axes(title: str, ylabel: str, log_y: bool) -> tuple[Figure, object]:
    figure = Figure(figsize=_SIZE)
    axes = figure.add_subplot()
    axes.set_xscale("log", base=2)
    if log_y:
        axes.set_yscale("log")
    axes.set_xlabel("batch size M (tokens)")
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(True, which="both", alpha=0.3)
    return figure, axes


def latency_plot(latency_us: Series) -> bytes:
    figure, axes = _axes("Tuned latency per MoE call", "latency (µs)", log_y=True)
    _lines(axes, latency_us)
    axes.legend()
    return _png(figure)


def speedup_plot(speedup: Series) -> bytes:
    figure, axes = _axes("Speed-up over bf16 (same M)", "bf16 latency / latency", log_y=False)
    axes.axhline(1.0, color="grey", linewidth=1)
    _lines(axes, speedup)
    axes.legend()
    return _png(figure)


def roofline_plot(hbm: Series, compute: Series, note: str | None) -> bytes:
    """Fraction of the HBM floor (solid) and of the compute floor (dashed) reached; ``note``
    replaces the curves when the device's peaks are unknown."""
    figure, axes = _axes("Fraction of the roofline floors reached", "floor time / measured time", log_y=False)
    if note:
        axes.text(0.5, 0.5, note, transform=axes.transAxes, ha="center", va="center", wrap=True)
        axes.set_xlim(1, 2)
    else:
        _lines(axes, hbm, "-", " HBM")
        _lines(axes, compute, "--", " compute")
        axes.set_ylim(bottom=0)
        axes.legend(fontsize="small", ncol=2)
    return _png(figure)
