"""The charts of `kdistill report`, as matplotlib figures (:func:`png` turns one into PNG bytes).

:func:`metric_figure` draws one metric table (models x datasets) as grouped bars with the standard deviation
over seeds as error bars; a metric whose name contains "perplexity" is drawn on a log y axis, so one diverged
run does not flatten all the others. :func:`results_figure` draws the other result tables, one panel per
column; :func:`loss_figure` the logged loss terms, one line per run. Figures are built without pyplot (no
global state, no display needed).
"""

from __future__ import annotations

import io

from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter, LogFormatter

from kdistill.report_data import format_number, is_number
from kdistill.report_tables import format_cell

__all__ = ["is_log_metric", "loss_figure", "metric_figure", "png", "results_figure"]

_PALETTE = ["#4c72b0", "#c44e52", "#55a868", "#8172b2", "#ccb974", "#64b5cd", "#dd8452", "#937860"]
_MAX_PANELS = 12
_MAX_BAR_LABELS = 16


def is_log_metric(name: str) -> bool:
    """Metrics drawn on a log axis: perplexities (exp of a loss; one bad run is orders of magnitude off)."""
    return "perplexity" in str(name).lower()


def png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _log_axis(ax) -> None:
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.4)))


def metric_figure(table: dict) -> Figure | None:
    """Grouped bars: one group per dataset (column), one bar per model (row), error bars = sd over seeds."""
    rows, columns = table["rows"], table["columns"]
    if not rows or not columns:
        return None
    fig = Figure(figsize=(max(5.0, 1.0 + 0.5 * len(rows) * len(columns)), 3.8))
    ax = fig.subplots()
    width = 0.8 / len(rows)
    n_bars = sum(c in r["cells"] for r in rows for c in columns)
    for i, row in enumerate(rows):
        xs = [j + (i - (len(rows) - 1) / 2) * width for j, c in enumerate(columns) if c in row["cells"]]
        cells = [row["cells"][c] for c in columns if c in row["cells"]]
        means = [float(cell["mean"]) for cell in cells]
        errs = [float(cell["sd"] or 0.0) for cell in cells]
        bars = ax.bar(xs, means, width=width * 0.95, yerr=errs if any(errs) else None, capsize=3,
                      color=_PALETTE[i % len(_PALETTE)], label=row["label"])
        if n_bars <= _MAX_BAR_LABELS:
            ax.bar_label(bars, labels=[format_number(m) for m in means], fontsize=6)
    if is_log_metric(table["metric"] or table["title"]):
        _log_axis(ax)
    ax.set_xticks(range(len(columns)), columns, rotation=15 if len(columns) > 3 else 0, fontsize=8)
    ax.set_ylabel(table["metric"] or "")
    ax.set_title(table["title"], fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _panels(n: int, height: float) -> tuple[Figure, list]:
    """A figure with `n` panels, three to a row (`height` inches per row); the panels past `n` are hidden."""
    cols = min(3, n)
    nrows = -(-n // cols)
    fig = Figure(figsize=(4.5 * cols, height * nrows))
    axes = list(fig.subplots(nrows, cols, squeeze=False).flat)
    for ax in axes[n:]:
        ax.axis("off")
    return fig, axes[:n]


def results_figure(table: dict) -> Figure | None:
    """One panel per column (at most 12) with one bar per row, error bars = sd over seeds."""
    columns = [c for c in table["columns"] if any(c in r["cells"] and is_number(r["cells"][c].get("mean"))
                                                  for r in table["rows"])][:_MAX_PANELS]
    if not columns or not table["rows"]:
        return None
    fig, axes = _panels(len(columns), 3.2)
    for ax, col in zip(axes, columns):
        present = [r for r in table["rows"] if col in r["cells"]]
        means = [float(r["cells"][col]["mean"]) for r in present]
        errs = [float(r["cells"][col]["sd"] or 0.0) for r in present]
        bars = ax.bar(range(len(means)), means, yerr=errs if any(errs) else None, capsize=3,
                      color=[_PALETTE[i % len(_PALETTE)] for i in range(len(means))])
        ax.set_xticks(range(len(means)), [r["label"] for r in present], rotation=20, ha="right", fontsize=7)
        ax.bar_label(bars, labels=[format_cell(r["cells"][col]).split(" ")[0] for r in present], fontsize=7)
        if is_log_metric(col):
            _log_axis(ax)
        ax.set_title(col, fontsize=9)
    fig.suptitle(table["title"])
    fig.tight_layout()
    return fig


def loss_figure(runs: list[dict], terms: list[str]) -> Figure | None:
    """One panel per loss term, one line per run (x: step)."""
    if not terms:
        return None
    fig, axes = _panels(len(terms), 3.4)
    for ax, term in zip(axes, terms):
        for run in runs:
            pts = [(e["step"], e[term]) for e in run["log_history"] if is_number(e.get(term))
                   and is_number(e.get("step"))]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o", markersize=3, label=run["name"])
        ax.set_title(term)
        ax.set_xlabel("step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle("loss per term")
    fig.tight_layout()
    return fig
