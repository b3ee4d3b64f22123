"""`kdistill report`: compare runs in one Markdown file and one self-contained HTML page.

Each run folder may hold `kdistill_config.yaml` (resolved config), `kdistill_summary.json` (with a
`log_history`: dicts with `step`, `loss`, `loss/<term>`, `eval_loss`, ...) and any other `*.json` results
(`kdistill eval lm` output, `quickstart.json`, classification/STS/judge results...). Results are read
generically: nested dicts of numbers are flattened to dotted keys; known shapes (a `teacher` + `students`
mapping, a list of dicts with a `name`) become one table row per model. Teacher rows come first.

The HTML page has inline CSS and its PNG charts embedded as base64 data URIs: it makes no external
request. Every number shown comes from the files, formatted by :func:`format_number`. Reading the run folders
and building the tables is :mod:`kdistill.report_data` (``load_run``, ``format_number`` are re-exported here);
this module draws the charts and writes the two pages.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from kdistill.report_data import (CONFIG_FILE, comparison_tables, config_highlights, format_number, is_number,
                                  is_teacher_name, load_run, loss_terms)

__all__ = ["build_report", "format_number", "load_run", "add_parser", "run_cli"]

_MAX_BAR_METRICS = 12


# --------------------------------------------------------------------------------------------- charts
def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def _loss_chart(runs: list[dict], terms: list[str]) -> bytes | None:
    if not terms:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(terms))
    nrows = -(-len(terms) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.5 * cols, 3.4 * nrows), squeeze=False)
    for ax, term in zip(axes.flat, terms):
        for run in runs:
            pts = [(e["step"], e[term]) for e in run["log_history"] if is_number(e.get(term))
                   and is_number(e.get("step"))]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o", markersize=3, label=run["name"])
        ax.set_title(term)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(terms):]:
        ax.axis("off")
    fig.suptitle("loss per term")
    fig.tight_layout()
    return _png(fig)


def _bar_chart(table: dict) -> bytes | None:
    columns = [c for c in table["columns"] if sum(c in m for _, _, m in table["rows"]) >= 1][:_MAX_BAR_METRICS]
    if not columns or not table["rows"]:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(columns))
    nrows = -(-len(columns) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.5 * cols, 3.2 * nrows), squeeze=False)
    palette = ["#4c72b0", "#c44e52", "#55a868", "#8172b2", "#ccb974", "#64b5cd"]
    for ax, col in zip(axes.flat, columns):
        labels = [label for label, _, m in table["rows"] if col in m]
        values = [float(m[col]) for _, _, m in table["rows"] if col in m]
        bars = ax.bar(range(len(values)), values, color=[palette[i % len(palette)] for i in range(len(values))])
        ax.set_xticks(range(len(values)), labels, rotation=20, ha="right", fontsize=7)
        ax.bar_label(bars, labels=[format_number(v) for v in values], fontsize=7)
        ax.set_title(col, fontsize=9)
    for ax in list(axes.flat)[len(columns):]:
        ax.axis("off")
    fig.suptitle(table["title"])
    fig.tight_layout()
    return _png(fig)


# --------------------------------------------------------------------------------------------- output
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1200px;
color:#222;padding:0 1em}
h1{border-bottom:2px solid #4c72b0;padding-bottom:.2em}
table{border-collapse:collapse;margin:1em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.3em .6em;text-align:right}
th:first-child,td:first-child{text-align:left}
th{background:#eef2f8}
tr.teacher td{background:#fff8e6;font-weight:600}
dl{display:grid;grid-template-columns:max-content auto;gap:.2em 1em}
dt{font-weight:600}
img{max-width:100%;border:1px solid #eee}
.muted{color:#777}
"""


def build_report(run_dirs, out_dir, title: str = "kdistill report") -> tuple[Path, Path]:
    """Write `report.md` (+ PNGs beside it) and a self-contained `report.html` to `out_dir`."""
    if not run_dirs:
        raise ValueError("pass at least one run folder")
    runs = [load_run(d) for d in run_dirs]
    names = [r["name"] for r in runs]
    for i, run in enumerate(runs):  # unique names
        if names.count(run["name"]) > 1:
            run["name"] = f"{run['name']} ({i + 1})"
    runs.sort(key=lambda r: not is_teacher_name(r["name"]))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tables = comparison_tables(runs)
    charts: list[tuple[str, str, bytes]] = []  # (caption, file name, png)
    loss_png = _loss_chart(runs, loss_terms(runs))
    if loss_png:
        charts.append(("Loss curves per term", "loss_curves.png", loss_png))
    for i, table in enumerate(tables):
        png = _bar_chart(table)
        if png:
            charts.append((table["title"], f"metrics_{i + 1}.png", png))
    for _, fname, png in charts:
        (out / fname).write_bytes(png)

    # Markdown
    md = [f"# {title}", "", "Runs: " + ", ".join(f"`{r['name']}` ({r['path']})" for r in runs), ""]
    md_html = [f"<h1>{html.escape(title)}</h1>",
               "<p>Runs: " + ", ".join(f"<code>{html.escape(r['name'])}</code> "
                                       f"<span class=muted>({html.escape(r['path'])})</span>" for r in runs) + "</p>"]
    md += ["## Comparison", ""]
    md_html.append("<h2>Comparison</h2>")
    if not tables:
        md += ["No numbers found in the run folders.", ""]
        md_html.append("<p>No numbers found in the run folders.</p>")
    for table in tables:
        cols = table["columns"]
        md += [f"### {table['title']}", "", "| model | " + " | ".join(cols) + " |",
               "|---|" + "---|" * len(cols)]
        md_html += [f"<h3>{html.escape(table['title'])}</h3>", "<table><thead><tr><th>model</th>"
                    + "".join(f"<th>{html.escape(c)}</th>" for c in cols) + "</tr></thead><tbody>"]
        for label, teacher, m in table["rows"]:
            cells = [format_number(m[c]) if c in m else "" for c in cols]
            md.append(f"| {'**' + label + '**' if teacher else label} | " + " | ".join(cells) + " |")
            md_html.append(f"<tr{' class=teacher' if teacher else ''}><td>{html.escape(label)}</td>"
                           + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
        md.append("")
        md_html.append("</tbody></table>")

    md += ["## Configuration", ""]
    md_html.append("<h2>Configuration</h2>")
    for run in runs:
        items = config_highlights(run["config"])
        md.append(f"### {run['name']}")
        md_html.append(f"<h3>{html.escape(run['name'])}</h3>")
        if not items:
            md += ["", f"no {CONFIG_FILE}", ""]
            md_html.append(f"<p class=muted>no {CONFIG_FILE}</p>")
            continue
        md += [""] + [f"- **{k}**: {v}" for k, v in items] + [""]
        md_html.append("<dl>" + "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>"
                                        for k, v in items) + "</dl>")

    if charts:
        md += ["## Charts", ""]
        md_html.append("<h2>Charts</h2>")
    for caption, fname, png in charts:
        md += [f"![{caption}]({fname})", ""]
        data = base64.b64encode(png).decode("ascii")
        md_html.append(f"<figure><img alt=\"{html.escape(caption)}\" src=\"data:image/png;base64,{data}\">"
                       f"<figcaption>{html.escape(caption)}</figcaption></figure>")

    md_path = out / "report.md"
    md_path.write_text("\n".join(md) + "\n", encoding="utf-8")
    page = ("<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>\n"
            + "\n".join(md_html) + "\n</body></html>\n")
    html_path = out / "report.html"
    html_path.write_text(page, encoding="utf-8")
    return md_path, html_path


def add_parser(subparsers) -> None:
    """Register the top-level `report` command."""
    p = subparsers.add_parser("report", help="Compare run folders in one Markdown file and one self-contained "
                                             "HTML page (tables, config highlights, charts)")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="Run output folders")
    p.add_argument("--out", default="report", help="Output folder (report.md, report.html, PNGs)")
    p.add_argument("--title", default="kdistill report")
    p.set_defaults(func=run_cli)


def run_cli(args) -> int:
    md_path, html_path = build_report(args.run_dirs, args.out, title=args.title)
    print(f"report: {md_path} and {html_path}")
    return 0
