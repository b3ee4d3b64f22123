"""`kdistill report`: compare runs in one Markdown file, one self-contained HTML page and a `report.json`.

Each run folder may hold `kdistill_config.yaml` (resolved config), `kdistill_summary.json` (`log_history`,
`train_runtime`) and other `*.json` results; a folder that holds run folders stands for them
(:func:`kdistill.report_data.find_runs`). Runs that repeat one method with other seeds are one group
(:mod:`kdistill.report_tables`): every number is the group's mean, with "± sd (n=N)" for several runs.
The page shows: per metric of the per-dataset results (`eval lm`, `eval rouge`) a models x datasets table (and,
with a baseline, the difference to it); the training table; the other result files as before; the settings all
groups share and, per group, only the config keys that differ (:mod:`kdistill.report_config`); what each group
was trained from (top-k cache manifest, annotation stats); charts (:mod:`kdistill.report_charts`).

The HTML page has inline CSS and its PNG charts embedded as base64 data URIs: it makes no external request.
`report.json` holds the same tables with each cell's mean, sd, n, min, max and values.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from kdistill.paths import check_output_dir
from kdistill.report_charts import loss_figure, metric_figure, png, results_figure
from kdistill.report_config import common_settings, config_differences
from kdistill.report_data import CONFIG_FILE, find_runs, format_number, is_number, load_run, loss_terms, provenance
from kdistill.report_tables import (dataset_notes, format_cell, group_runs, metric_tables, results_tables,
                                    training_table, with_baseline)

__all__ = ["add_parser", "build_report", "format_number", "load_run", "provenance_lines", "run_cli"]

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


def _fmt(value) -> str:
    return format_number(value) if is_number(value) else str(value)


def provenance_lines(prov: dict) -> list[tuple[str, str]]:
    """[(label, text)] for one run's :func:`~kdistill.report_data.provenance`."""
    lines = []
    cache = prov.get("cache")
    if cache and not cache["found"]:
        lines.append(("cache", f"{cache['dir']}: no cache manifest found"))
    for s in (cache or {}).get("splits", []):
        if s.get("unreadable"):
            lines.append(("cache", f"{s['manifest']}: unreadable manifest"))
            continue
        parts = [f"k {_fmt(s['k'])}" if "k" in s else None,
                 f"captured at temperature {_fmt(s['capture_temperature'])}" if "capture_temperature" in s else None,
                 f"{_fmt(s['bytes_per_token'])} bytes/token" if "bytes_per_token" in s else None,
                 f"mean reconstruction KL {_fmt(s['kl_mean'])}"
                 + (f" ({s['kl_sample_tokens']} tokens)" if "kl_sample_tokens" in s else "")
                 if "kl_mean" in s else None,
                 f"{_fmt(s['examples'])} examples" if "examples" in s else None,
                 f"{_fmt(s['tokens'])} tokens" if "tokens" in s else None,
                 f"teacher {s['teacher']}" if "teacher" in s else None,
                 None if s.get("complete", True) else "INCOMPLETE"]
        lines.append((f"cache {s.get('split', '')}".strip(), ", ".join(p for p in parts if p)))
    notes = prov.get("annotation")
    if notes:
        counts = ", ".join(f"{k} {_fmt(notes[k])}" for k in ("rows", "ok", "failed", "unparsable") if k in notes)
        lines.append(("annotation", f"{notes['file']}: teacher {notes.get('teacher', '?')}, task "
                                    f"{notes.get('task', '?')}" + (f"; {counts}" if counts else "")))
        if isinstance(notes.get("params"), dict) and notes["params"]:
            lines.append(("annotation params", ", ".join(f"{k}={v}" for k, v in notes["params"].items())))
        answers = notes.get("answers") if isinstance(notes.get("answers"), dict) else {}
        numbers = ", ".join(f"{k} {_fmt(v)}" for k, v in answers.items() if is_number(v))
        if numbers:
            lines.append(("answers", numbers))
        if "degenerate" in answers:
            reasons = answers.get("reasons") or []
            lines.append(("degenerate", ("YES: " + "; ".join(map(str, reasons))) if answers["degenerate"]
                          else "no"))
    return lines


class _Page:
    """The Markdown and HTML text of the report, written side by side."""

    def __init__(self, title: str):
        self.md = [f"# {title}", ""]
        self.html = [f"<h1>{html.escape(title)}</h1>"]

    def heading(self, level: int, text: str) -> None:
        self.md += [f"{'#' * level} {text}", ""]
        self.html.append(f"<h{level}>{html.escape(text)}</h{level}>")

    def text(self, text: str, muted: bool = False) -> None:
        self.md += [text, ""]
        self.html.append(f"<p{' class=muted' if muted else ''}>{html.escape(text)}</p>")

    def items(self, items: list[tuple[str, str]]) -> None:
        self.md += [f"- **{k}**: {v}" for k, v in items] + [""]
        self.html.append("<dl>" + "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>"
                                          for k, v in items) + "</dl>")

    def table(self, first: str, columns: list[str], rows: list[tuple[str, bool, list[str]]]) -> None:
        self.md += ["| " + " | ".join([first, *columns]) + " |", "|---|" + "---|" * len(columns)]
        self.html.append("<table><thead><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in [first, *columns])
                         + "</tr></thead><tbody>")
        for label, bold, cells in rows:
            self.md.append(f"| {'**' + label + '**' if bold else label} | " + " | ".join(cells) + " |")
            self.html.append(f"<tr{' class=teacher' if bold else ''}><td>{html.escape(label)}</td>"
                             + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
        self.md.append("")
        self.html.append("</tbody></table>")

    def result_table(self, table: dict) -> None:
        self.heading(3, table["title"])
        self.table("model", table["columns"], [(r["label"], r["teacher"], [format_cell(r["cells"].get(c))
                                                                           for c in table["columns"]])
                                               for r in table["rows"]])

    def image(self, caption: str, fname: str, data: bytes) -> None:
        self.md += [f"![{caption}]({fname})", ""]
        b64 = base64.b64encode(data).decode("ascii")
        self.html.append(f"<figure><img alt=\"{html.escape(caption)}\" src=\"data:image/png;base64,{b64}\">"
                         f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _provenance(group: dict) -> list[dict]:
    seen, out = set(), []
    for run in group["runs"]:
        prov = provenance(run)
        key = json.dumps(prov, sort_keys=True, default=str)
        if prov and key not in seen:
            seen.add(key)
            out.append(prov)
    return out


def build_report(run_dirs, out_dir, title: str = "kdistill report", baseline: str | None = None) -> tuple[Path, Path]:
    """Write `report.md` (+ PNGs beside it), a self-contained `report.html` and `report.json` to `out_dir`."""
    if not run_dirs:
        raise ValueError("pass at least one run folder")
    out = check_output_dir(out_dir, "--out")
    runs = [load_run(path, name) for path, name in find_runs(run_dirs)]
    names = [r["name"] for r in runs]
    for i, run in enumerate(runs):  # unique names
        if names.count(run["name"]) > 1:
            run["name"] = f"{run['name']} ({i + 1})"
    groups = group_runs(runs)
    metrics = with_baseline(metric_tables(groups), baseline, groups)
    training = training_table(groups)
    others = results_tables(groups)
    notes = dataset_notes(groups)
    differences = config_differences(groups)
    common = common_settings(groups)
    out.mkdir(parents=True, exist_ok=True)

    page = _Page(title)
    page.heading(2, "Runs")
    page.items([(g["name"], ", ".join(f"{r['name']} ({r['path']})" for r in g["runs"])
                 + (f" (n={len(g['runs'])})" if len(g["runs"]) > 1 else "")) for g in groups])
    if not (metrics or training or others):
        page.text("No numbers found in the run folders.")
    if metrics:
        page.heading(2, "Metrics per dataset")
        page.text("Mean over the runs of each group; with several runs: ± sample standard deviation (n=runs).",
                  muted=True)
        for table in metrics:
            page.result_table(table)
    if notes:
        fields = [f for f in ("data", "examples", "tokens", "skipped_invalid", "dropped_no_target", "truncated",
                              "max_length") if any(f in n for n in notes)]
        page.heading(3, "Datasets")
        page.table("dataset", fields, [(f"{n['kind']}: {n['dataset']}", False, [n.get(f, "") for f in fields])
                                       for n in notes])
    if training or others:
        page.heading(2, "Training and other results")
        for table in ([training] if training else []) + others:
            page.result_table(table)

    page.heading(2, "Configuration")
    if common:
        page.heading(3, "Common settings")
        page.items(common)
    for group in groups:
        page.heading(3, group["name"])
        if not any(r["config"] for r in group["runs"]):
            page.text(f"no {CONFIG_FILE}", muted=True)
        elif differences[group["name"]]:
            page.items(differences[group["name"]])
        else:
            page.text("no setting differs from the other runs", muted=True)
    provenances = {g["name"]: _provenance(g) for g in groups}
    if any(provenances.values()):
        page.heading(2, "Provenance")
        for name, provs in provenances.items():
            lines = [line for prov in provs for line in provenance_lines(prov)]
            if lines:
                page.heading(3, name)
                page.items(lines)

    figures = [("Loss curves per term", "loss_curves.png", loss_figure(runs, loss_terms(runs)))]
    figures += [(t["title"], f"metric_{i + 1}.png", metric_figure(t))
                for i, t in enumerate(t for t in metrics if t["kind"] != "difference")]
    figures += [(t["title"], f"results_{i + 1}.png", results_figure(t))
                for i, t in enumerate(([training] if training else []) + others)]
    figures = [(caption, fname, png(fig)) for caption, fname, fig in figures if fig is not None]
    if figures:
        page.heading(2, "Charts")
    for caption, fname, data in figures:
        (out / fname).write_bytes(data)
        page.image(caption, fname, data)

    md_path = out / "report.md"
    md_path.write_text("\n".join(page.md) + "\n", encoding="utf-8")
    html_path = out / "report.html"
    html_path.write_text("<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
                         f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>\n"
                         + "\n".join(page.html) + "\n</body></html>\n", encoding="utf-8")
    summary = {"title": title, "baseline": baseline, "common_settings": dict(common), "datasets": notes,
               "groups": [{"name": g["name"], "runs": [{"name": r["name"], "path": r["path"]} for r in g["runs"]],
                           "config_differences": dict(differences[g["name"]]),
                           "provenance": provenances[g["name"]]} for g in groups],
               "tables": metrics + ([training] if training else []) + others}
    (out / "report.json").write_text(json.dumps(summary, indent=1, default=str) + "\n", encoding="utf-8")
    return md_path, html_path


def add_parser(subparsers) -> None:
    """Register the top-level `report` command."""
    p = subparsers.add_parser(
        "report", help="Compare runs in report.md, a self-contained report.html and report.json: seeds of one "
                       "method aggregated, models x datasets per metric, config differences, provenance, charts")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="Run output folders, or a folder holding run folders (e.g. a comparison's OUT/)")
    p.add_argument("--out", default="report", help="Output folder (report.md, report.html, report.json, PNGs)")
    p.add_argument("--title", default="kdistill report")
    p.add_argument("--baseline", metavar="NAME", default=None,
                   help="A group name: add per metric the difference mean(model) - mean(NAME) per dataset")
    p.set_defaults(func=run_cli)


def run_cli(args) -> int:
    md_path, html_path = build_report(args.run_dirs, args.out, title=args.title,
                                      baseline=getattr(args, "baseline", None))
    print(f"report: {md_path}, {html_path} and {md_path.parent / 'report.json'}")
    return 0
