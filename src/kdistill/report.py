"""`kdistill report`: compare runs in one Markdown file and one self-contained HTML page.

Each run folder may hold `kdistill_config.yaml` (resolved config), `kdistill_summary.json` (with a
`log_history`: dicts with `step`, `loss`, `loss/<term>`, `eval_loss`, ...) and any other `*.json` results
(`kdistill eval lm` output, `quickstart.json`, classification/STS/judge results...). Results are read
generically: nested dicts of numbers are flattened to dotted keys; known shapes (a `teacher` + `students`
mapping, a list of dicts with a `name`) become one table row per model. Teacher rows come first.

The HTML page has inline CSS and its PNG charts embedded as base64 data URIs: it makes no external
request. Every number shown comes from the files, formatted by :func:`format_number`.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path

import yaml

from kdistill.errors import MissingFileError

__all__ = ["build_report", "format_number", "load_run", "add_parser", "run_cli"]

CONFIG_FILE = "kdistill_config.yaml"
SUMMARY_FILE = "kdistill_summary.json"
# JSON files a saved model, tokenizer, adapter or trainer checkpoint writes next to the results: not results.
NOT_RESULTS = frozenset({
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "chat_template.json", "preprocessor_config.json", "adapter_config.json",
    "model.safetensors.index.json", "trainer_state.json", "modules.json", "sentence_bert_config.json",
    "config_sentence_transformers.json", "kdistill_embedding.json", "counts.json", SUMMARY_FILE,
})
_MAX_BAR_METRICS = 12


def format_number(x) -> str:
    """How every number appears in the report."""
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return str(x)
    x = float(x)
    if math.isnan(x) or math.isinf(x):
        return str(x)
    if x != 0 and (abs(x) >= 1e6 or abs(x) < 1e-3):
        return f"{x:.4g}"
    return f"{x:.4f}"


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _flatten(obj, prefix: str = "") -> dict[str, float]:
    """Nested dicts (and lists of numbers) -> {dotted.key: number}; strings and the rest are ignored."""
    out: dict[str, float] = {}
    if _is_number(obj):
        out[prefix or "value"] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(obj, list) and obj and all(_is_number(v) for v in obj) and len(obj) <= 8:
        for i, v in enumerate(obj):
            out[f"{prefix}[{i}]"] = v
    return out


def _is_teacher_name(name: str) -> bool:
    return "teacher" in str(name).lower()


def _result_rows(data) -> list[tuple[str, dict[str, float]]] | None:
    """Known shapes -> [(model name, metrics)]; None when the result is one flat/nested dict of numbers."""
    if isinstance(data, dict) and isinstance(data.get("students"), dict):  # kdistill eval lm and alike
        rows = []
        if isinstance(data.get("teacher"), dict):
            rows.append(("teacher", _flatten(data["teacher"])))
        rows += [(str(k), _flatten(v)) for k, v in data["students"].items()]
        return rows
    lists = [data] if isinstance(data, list) else [v for v in data.values() if isinstance(v, list)] \
        if isinstance(data, dict) else []
    for value in lists:  # quickstart `reports` and any list of named records
        if value and all(isinstance(r, dict) and "name" in r for r in value):
            return [(str(r["name"]), _flatten({k: v for k, v in r.items() if k != "name"})) for r in value]
    return None


def load_run(run_dir) -> dict:
    """Read one run folder: name, config, log_history, summary numbers and results."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MissingFileError(f"run folder not found: {run_dir}")
    config_path = next((p for p in (run_dir / CONFIG_FILE, *sorted(run_dir.glob(f"*/{CONFIG_FILE}")))
                        if p.is_file()), None)
    summary_path = next((p for p in (run_dir / SUMMARY_FILE, *sorted(run_dir.glob(f"*/{SUMMARY_FILE}")))
                         if p.is_file()), None)
    config = yaml.safe_load(config_path.read_text()) if config_path else None
    summary = json.loads(summary_path.read_text()) if summary_path else {}
    results = {}
    for path in sorted(run_dir.glob("*.json")):
        if path.name in NOT_RESULTS:
            continue
        try:
            results[path.stem] = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
    log_history = summary.get("log_history") if isinstance(summary, dict) else None
    return {
        "name": run_dir.resolve().name,
        "path": str(run_dir),
        "config": config if isinstance(config, dict) else None,
        "log_history": [e for e in (log_history or []) if isinstance(e, dict)],
        "summary": _flatten({k: v for k, v in summary.items() if k != "log_history"})
        if isinstance(summary, dict) else {},
        "results": results,
    }


def _config_highlights(config: dict | None) -> list[tuple[str, str]]:
    if not config:
        return []
    out = []

    def model(section):
        m = config.get(section)
        if not isinstance(m, dict) or not m.get("name_or_path"):
            return None
        text = str(m["name_or_path"])
        if m.get("layers") is not None:
            text += f" (layers {m['layers']})"
        return text

    for section in ("student", "teacher"):
        text = model(section)
        if text:
            out.append((section, text))
    objectives = config.get("objectives")
    if isinstance(objectives, dict) and objectives:
        parts = []
        for name, obj in objectives.items():
            if isinstance(obj, dict):
                extras = ", ".join(f"{k}={v}" for k, v in obj.items()
                                   if k not in ("weight",) and isinstance(v, (str, int, float, bool)))
                weight = obj.get("weight", 1.0)
                parts.append(f"{name} x {weight}" + (f" ({extras})" if extras else ""))
            else:
                parts.append(str(name))
        out.append(("objectives", "; ".join(parts)))
    data = config.get("data")
    if isinstance(data, dict) and data.get("train"):
        out.append(("data", str(data["train"])))
    if isinstance(config.get("lora"), dict) and config["lora"].get("enabled", True) and config["lora"]:
        lora = config["lora"]
        out.append(("lora", ", ".join(f"{k}={v}" for k, v in lora.items() if isinstance(v, (int, float, str)))))
    training = config.get("training")
    if isinstance(training, dict):
        keys = ("learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
                "gradient_accumulation_steps")
        text = ", ".join(f"{k}={training[k]}" for k in keys if k in training)
        if text:
            out.append(("training", text))
    return out


def _loss_terms(runs: list[dict]) -> list[str]:
    terms: list[str] = []
    for run in runs:
        for entry in run["log_history"]:
            for k, v in entry.items():
                if _is_number(v) and (k == "loss" or k.startswith("loss/") or k == "eval_loss"
                                      or k.startswith("eval_loss/")) and k not in terms:
                    terms.append(k)
    return terms


def _final_losses(run: dict, terms: list[str]) -> dict[str, float]:
    out = {}
    for entry in run["log_history"]:
        for k in terms:
            if _is_number(entry.get(k)):
                out[k] = entry[k]
    return out


def _tables(runs: list[dict]) -> list[dict]:
    """[{title, columns, rows: [(label, is_teacher, {col: number})]}]"""
    tables = []
    terms = _loss_terms(runs)
    train_rows = []
    for run in runs:
        metrics = {}
        steps = [e["step"] for e in run["log_history"] if _is_number(e.get("step"))]
        if steps:
            metrics["step"] = max(steps)
        metrics.update({f"final {k}": v for k, v in _final_losses(run, terms).items()})
        for k in ("global_step", "train_runtime", "train_samples_per_second"):
            if k in run["summary"] and k not in metrics:
                metrics[k] = run["summary"][k]
        if metrics:
            train_rows.append((run["name"], _is_teacher_name(run["name"]), metrics))
    if train_rows:
        tables.append({"title": "Training", "rows": train_rows})

    by_stem: dict[str, list] = {}
    for run in runs:
        for stem, data in run["results"].items():
            rows = _result_rows(data)
            teacher_run = _is_teacher_name(run["name"])
            if rows is None:
                rows = [(run["name"], teacher_run, _flatten(data))]
            else:
                rows = [(f"{run['name']} / {name}", teacher_run or _is_teacher_name(name), m) for name, m in rows]
            by_stem.setdefault(stem, []).extend(r for r in rows if r[2])
    for stem, rows in by_stem.items():
        if rows:
            tables.append({"title": f"Results: {stem}", "rows": rows})
    for table in tables:
        table["rows"].sort(key=lambda r: not r[1])  # stable: teacher rows first, otherwise file order
        columns: list[str] = []
        for _, _, m in table["rows"]:
            columns += [k for k in m if k not in columns]
        table["columns"] = columns
    return tables


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
            pts = [(e["step"], e[term]) for e in run["log_history"] if _is_number(e.get(term))
                   and _is_number(e.get("step"))]
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
    runs.sort(key=lambda r: not _is_teacher_name(r["name"]))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tables = _tables(runs)
    charts: list[tuple[str, str, bytes]] = []  # (caption, file name, png)
    loss_png = _loss_chart(runs, _loss_terms(runs))
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
        items = _config_highlights(run["config"])
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
