"""What `kdistill report` shows, gathered from run folders (the rendering is :mod:`kdistill.report`).

:func:`load_run` reads one run folder: `kdistill_config.yaml` (resolved config), `kdistill_summary.json` (with a
`log_history`) and the other `*.json` results, flattened to dotted keys. :func:`comparison_tables` turns runs into
the comparison tables (teacher rows first), :func:`config_highlights` picks the config lines worth showing, and
:func:`format_number` is how every number appears in the report.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

from kdistill.errors import MissingFileError

__all__ = ["CONFIG_FILE", "NOT_RESULTS", "SUMMARY_FILE", "comparison_tables", "config_highlights", "format_number",
           "is_number", "is_teacher_name", "load_run", "loss_terms"]

CONFIG_FILE = "kdistill_config.yaml"
SUMMARY_FILE = "kdistill_summary.json"
# JSON files a saved model, tokenizer, adapter or trainer checkpoint writes next to the results: not results.
NOT_RESULTS = frozenset({
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "chat_template.json", "preprocessor_config.json", "adapter_config.json",
    "model.safetensors.index.json", "trainer_state.json", "modules.json", "sentence_bert_config.json",
    "config_sentence_transformers.json", "kdistill_embedding.json", "counts.json", SUMMARY_FILE,
})


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


def is_number(x) -> bool:
    """A real number (int or float), not a boolean."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _flatten(obj, prefix: str = "") -> dict[str, float]:
    """Nested dicts (and lists of numbers) -> {dotted.key: number}; strings and the rest are ignored."""
    out: dict[str, float] = {}
    if is_number(obj):
        out[prefix or "value"] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(obj, list) and obj and all(is_number(v) for v in obj) and len(obj) <= 8:
        for i, v in enumerate(obj):
            out[f"{prefix}[{i}]"] = v
    return out


def is_teacher_name(name: str) -> bool:
    """Whether a run or model name marks a teacher (its rows come first)."""
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


def config_highlights(config: dict | None) -> list[tuple[str, str]]:
    """[(section, text)]: the models, objectives, data, LoRA and training settings of a resolved config."""
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


def loss_terms(runs: list[dict]) -> list[str]:
    """The logged loss keys (`loss`, `loss/<term>`, `eval_loss`, ...) of all runs, in first-seen order."""
    terms: list[str] = []
    for run in runs:
        for entry in run["log_history"]:
            for k, v in entry.items():
                if is_number(v) and (k == "loss" or k.startswith("loss/") or k == "eval_loss"
                                      or k.startswith("eval_loss/")) and k not in terms:
                    terms.append(k)
    return terms


def _final_losses(run: dict, terms: list[str]) -> dict[str, float]:
    out = {}
    for entry in run["log_history"]:
        for k in terms:
            if is_number(entry.get(k)):
                out[k] = entry[k]
    return out


def comparison_tables(runs: list[dict]) -> list[dict]:
    """[{title, columns, rows: [(label, is_teacher, {col: number})]}]"""
    tables = []
    terms = loss_terms(runs)
    train_rows = []
    for run in runs:
        metrics = {}
        steps = [e["step"] for e in run["log_history"] if is_number(e.get("step"))]
        if steps:
            metrics["step"] = max(steps)
        metrics.update({f"final {k}": v for k, v in _final_losses(run, terms).items()})
        for k in ("global_step", "train_runtime", "train_samples_per_second"):
            if k in run["summary"] and k not in metrics:
                metrics[k] = run["summary"][k]
        if metrics:
            train_rows.append((run["name"], is_teacher_name(run["name"]), metrics))
    if train_rows:
        tables.append({"title": "Training", "rows": train_rows})

    by_stem: dict[str, list] = {}
    for run in runs:
        for stem, data in run["results"].items():
            rows = _result_rows(data)
            teacher_run = is_teacher_name(run["name"])
            if rows is None:
                rows = [(run["name"], teacher_run, _flatten(data))]
            else:
                rows = [(f"{run['name']} / {name}", teacher_run or is_teacher_name(name), m) for name, m in rows]
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
