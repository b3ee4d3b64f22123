"""Runs -> groups of seeds -> the tables of `kdistill report` (reading: :mod:`kdistill.report_data`).

:func:`group_runs` puts runs that repeat one method (equal configs but for seeds and output paths,
:func:`kdistill.report_config.grouping_key`) in one group named after its runs without their seed marker.
Every number shown for a group is :func:`summarize`'d over its runs: mean, sample standard deviation, n, min,
max. A table is ``{"title", "kind", "metric", "columns", "rows": [{"label", "teacher", "cells": {column:
cell}}]}``; a cell is a summary, or ``{"difference", "model", "baseline"}`` in a difference-to-baseline table.

- :func:`metric_tables`: results with `datasets` (`eval lm`, `eval rouge`): one table per metric, models x
  datasets, teacher rows first; the same teacher (path) on the same dataset is one row whichever folders hold it.
- :func:`training_table`: steps, train wall time and the final loss terms per group.
- :func:`results_tables`: every other result file (old `eval lm`, quickstart, classify, sts, judge), one table
  per file name as before, rows per group.
- :func:`with_baseline`: after each metric table, mean(model) - mean(baseline) per dataset.
"""

from __future__ import annotations

import math
import re
import statistics

from kdistill.errors import ConfigError
from kdistill.report_config import grouping_key
from kdistill.report_data import (final_losses, flatten_numbers, format_number, is_number, is_teacher_name,
                                  loss_terms, named_rows)

__all__ = ["METRICS_BY_KIND", "dataset_notes", "format_cell", "group_runs", "is_dataset_result", "metric_tables",
           "results_tables", "strip_seed", "summarize", "training_table", "with_baseline"]

# A trailing seed marker of a run name: ce-seed0, ce_seed1, ce-s2, ce/seed0, ce-seed=3.
_SEED_MARKER = re.compile(r"[-_/.](?:seed|s)[-_=]?\d+$", re.IGNORECASE)
METRICS_BY_KIND = {"lm": ("perplexity", "kl", "reverse_kl", "top1_agreement", "entropy_gap"),
                   "rouge": ("rouge1", "rouge2", "rougeL")}
_DATASET_FIELDS = ("data", "examples", "tokens", "skipped_invalid", "dropped_no_target", "truncated")


def strip_seed(name: str) -> str:
    """A run name without its trailing seed marker (`fkl-seed1` -> `fkl`); the name itself when nothing is left."""
    return _SEED_MARKER.sub("", name) or name


def group_runs(runs: list[dict]) -> list[dict]:
    """[{"name", "teacher", "runs"}]: runs with equal configs but for seeds and output paths form one group (in
    the order first seen, teacher groups first); a run without a config is a group of its own. The name is the
    runs' common name without the seed marker, else the first run's name."""
    groups: list[dict] = []
    by_key: dict[str, dict] = {}
    for run in runs:
        key = grouping_key(run["config"])
        if key is not None and key in by_key:
            by_key[key]["runs"].append(run)
            continue
        group = {"runs": [run]}
        groups.append(group)
        if key is not None:
            by_key[key] = group
    for group in groups:
        stripped = {strip_seed(r["name"]) for r in group["runs"]}
        group["name"] = stripped.pop() if len(stripped) == 1 else group["runs"][0]["name"]
    names = [g["name"] for g in groups]
    for group in groups:  # two methods that strip to one name keep their run names
        if names.count(group["name"]) > 1:
            group["name"] = group["runs"][0]["name"]
    seen: dict[str, int] = {}
    for group in groups:
        seen[group["name"]] = seen.get(group["name"], 0) + 1
        if seen[group["name"]] > 1:
            group["name"] = f"{group['name']} ({seen[group['name']]})"
        group["teacher"] = is_teacher_name(group["name"])
    groups.sort(key=lambda g: not g["teacher"])
    return groups


def summarize(values) -> dict:
    """{"mean", "sd" (sample standard deviation; None for n = 1), "n", "min", "max", "values"}."""
    vals = list(values)
    mean = math.fsum(float(v) for v in vals) / len(vals)
    if all(isinstance(v, int) for v in vals) and mean.is_integer():
        mean = int(mean)
    return {"mean": mean, "sd": statistics.stdev(float(v) for v in vals) if len(vals) > 1 else None,
            "n": len(vals), "min": min(vals), "max": max(vals), "values": vals}


def format_cell(cell: dict | None) -> str:
    """"mean", or "mean ± sd (n=N)" for more than one run; a difference is signed."""
    if not cell:
        return ""
    if "difference" in cell:
        d = cell["difference"]
        return ("+" if d > 0 else "") + format_number(d)
    text = format_number(cell["mean"])
    return text if cell["n"] < 2 else f"{text} ± {format_number(cell['sd'])} (n={cell['n']})"


def is_dataset_result(data) -> bool:
    """A result in the per-dataset shape (`{"kind", "datasets": {name: {...}}}`)."""
    return isinstance(data, dict) and isinstance(data.get("datasets"), dict) and bool(data["datasets"])


def _finish(title: str, kind: str, metric: str | None, columns: list[str], rows: dict) -> dict:
    out_rows = [{"label": r["label"], "teacher": r["teacher"],
                 "cells": {c: summarize(v) for c, v in r["values"].items() if v}}
                for r in rows.values() if any(r["values"].values())]
    out_rows.sort(key=lambda r: not r["teacher"])  # stable: teacher rows first, otherwise first-seen order
    used = [c for c in columns if any(c in r["cells"] for r in out_rows)]
    return {"title": title, "kind": kind, "metric": metric, "columns": used, "rows": out_rows}


def _models(group: dict, data: dict, entry: dict) -> list[tuple[tuple, str, bool, dict]]:
    """[(row key, label, is teacher, metrics)] of one dataset entry of one result file."""
    out = []
    if isinstance(entry.get("teacher"), dict):
        teacher = data.get("teacher") if isinstance(data.get("teacher"), dict) else {}
        path = str(teacher.get("path", ""))
        out.append((("teacher", path), path, True, entry["teacher"]))
    named = entry.get("students") if isinstance(entry.get("students"), dict) else entry.get("models")
    named = {str(k): v for k, v in named.items() if isinstance(v, dict)} if isinstance(named, dict) else {}
    for name, metrics in named.items():
        label = group["name"] if len(named) == 1 else f"{group['name']} / {name}"
        out.append(((label,), label, group["teacher"] or (len(named) > 1 and is_teacher_name(name)), metrics))
    return out


def metric_tables(groups: list[dict]) -> list[dict]:
    """One table per (result kind, metric): rows = models (teacher first), columns = datasets, cells summarized
    over the group's runs. The teacher's values are its distinct measurements (the same teacher evaluated on
    the same data in several run folders counts once)."""
    tables: dict[tuple[str, str], dict] = {}  # (kind, metric) -> {"columns": [...], "rows": {key: row}}
    for group in groups:
        for run in group["runs"]:
            for stem, data in run["results"].items():
                if not is_dataset_result(data):
                    continue
                kind = str(data.get("kind") or stem)
                for dataset, entry in data["datasets"].items():
                    if not isinstance(entry, dict):
                        continue
                    for key, label, teacher, metrics in _models(group, data, entry):
                        names = METRICS_BY_KIND.get(kind) or [k for k, v in metrics.items() if is_number(v)]
                        for metric in names:
                            if not is_number(metrics.get(metric)):
                                continue
                            table = tables.setdefault((kind, metric), {"columns": [], "rows": {}})
                            if dataset not in table["columns"]:
                                table["columns"].append(dataset)
                            row = table["rows"].setdefault(key, {"label": label, "teacher": teacher, "values": {}})
                            values = row["values"].setdefault(str(dataset), [])
                            if not (key[0] == "teacher" and len(key) == 2 and metrics[metric] in values):
                                values.append(metrics[metric])
    out = []
    def order(item):  # known kinds and their metrics in the listed order, then the rest as first seen
        (kind, metric), kinds = item[0], list(METRICS_BY_KIND)
        known = METRICS_BY_KIND.get(kind, ())
        return (kinds.index(kind) if kind in kinds else len(kinds),
                known.index(metric) if metric in known else len(known))

    for (kind, metric), table in sorted(tables.items(), key=order):
        teachers = [r for k, r in table["rows"].items() if len(k) == 2]
        for row in teachers:  # one teacher: "teacher"; several: named by their paths
            row["label"] = "teacher" if len(teachers) == 1 else f"teacher ({row['label'] or '?'})"
        out.append(_finish(f"{kind}: {metric}", kind, metric, table["columns"], table["rows"]))
    return out


def dataset_notes(groups: list[dict]) -> list[dict]:
    """[{"kind", "dataset", field: text}]: what each dataset of the per-dataset results was (file, examples,
    tokens, skipped/dropped/truncated rows, the evaluation's max_length); distinct values joined by ", "."""
    notes: dict[tuple[str, str], dict[str, list]] = {}
    for group in groups:
        for run in group["runs"]:
            for stem, data in run["results"].items():
                if not is_dataset_result(data):
                    continue
                for dataset, entry in data["datasets"].items():
                    if not isinstance(entry, dict):
                        continue
                    note = notes.setdefault((str(data.get("kind") or stem), str(dataset)), {})
                    fields = {f: entry.get(f) for f in _DATASET_FIELDS}
                    fields["max_length"] = data.get("max_length")
                    for field, value in fields.items():
                        if value is not None and value not in note.setdefault(field, []):
                            note[field].append(value)
    return [{"kind": kind, "dataset": dataset,
             **{f: ", ".join(format_number(v) if is_number(v) else str(v) for v in vs) for f, vs in note.items()}}
            for (kind, dataset), note in notes.items() if note]


def training_table(groups: list[dict]) -> dict | None:
    """Per group: steps, train wall time (`train_runtime`, s) and the last value of each logged loss term."""
    terms = loss_terms([r for g in groups for r in g["runs"]])
    rows: dict[str, dict] = {}
    columns: list[str] = []
    for group in groups:
        for run in group["runs"]:
            metrics = {}
            steps = [e["step"] for e in run["log_history"] if is_number(e.get("step"))]
            if steps or "global_step" in run["summary"]:
                metrics["steps"] = max(steps) if steps else run["summary"]["global_step"]
            runtime = run["summary"].get("train_runtime")
            for entry in run["log_history"]:  # where `kdistill train` has it: the Trainer's last log entry
                if is_number(entry.get("train_runtime")):
                    runtime = entry["train_runtime"]
            if is_number(runtime):
                metrics["train time (s)"] = runtime
            metrics.update({f"final {k}": v for k, v in final_losses(run, terms).items()})
            if not metrics:
                continue
            row = rows.setdefault(group["name"], {"label": group["name"], "teacher": group["teacher"], "values": {}})
            for k, v in metrics.items():
                row["values"].setdefault(k, []).append(v)
                if k not in columns:
                    columns.append(k)
    return _finish("Training", "training", None, columns, rows) if rows else None


def results_tables(groups: list[dict]) -> list[dict]:
    """The result files without `datasets`, one table per file name (`Results: <stem>`), as before: a file of
    named models gives rows `group / model`, any other dict of numbers one row named after the group."""
    by_stem: dict[str, dict] = {}
    for group in groups:
        for run in group["runs"]:
            for stem, data in run["results"].items():
                if is_dataset_result(data):
                    continue
                rows = named_rows(data)
                if rows is None:
                    rows = [(group["name"], group["teacher"], flatten_numbers(data))]
                else:
                    rows = [(f"{group['name']} / {name}", group["teacher"] or is_teacher_name(name), m)
                            for name, m in rows]
                table = by_stem.setdefault(stem, {"columns": [], "rows": {}})
                for label, teacher, metrics in rows:
                    row = table["rows"].setdefault(label, {"label": label, "teacher": teacher, "values": {}})
                    for k, v in metrics.items():
                        row["values"].setdefault(k, []).append(v)
                        if k not in table["columns"]:
                            table["columns"].append(k)
    tables = [_finish(f"Results: {stem}", "results", None, t["columns"], t["rows"]) for stem, t in by_stem.items()]
    return [t for t in tables if t["rows"]]


def with_baseline(tables: list[dict], baseline: str | None, groups: list[dict]) -> list[dict]:
    """`tables` with, after each metric table that has a row labelled `baseline`, a table of
    mean(model) - mean(baseline) per dataset. A `baseline` that names no group and no row is an error."""
    if baseline is None:
        return tables
    labels = {g["name"] for g in groups} | {r["label"] for t in tables for r in t["rows"]}
    if baseline not in labels:
        raise ConfigError(f"--baseline {baseline!r}: no group or model of that name; the groups are: "
                          + ", ".join(g["name"] for g in groups))
    out = []
    for table in tables:
        out.append(table)
        base = next((r for r in table["rows"] if r["label"] == baseline), None)
        if table["kind"] in ("training", "results", "difference") or base is None:
            continue
        rows = []
        for row in table["rows"]:
            cells = {c: {"difference": row["cells"][c]["mean"] - base["cells"][c]["mean"],
                         "model": row["cells"][c]["mean"], "baseline": base["cells"][c]["mean"]}
                     for c in table["columns"] if row is not base and c in row["cells"] and c in base["cells"]}
            if cells:
                rows.append({"label": row["label"], "teacher": row["teacher"], "cells": cells})
        out.append({"title": f"{table['title']}: difference to {baseline}", "kind": "difference",
                    "metric": table["metric"], "columns": table["columns"], "rows": rows})
    return out
