"""What `kdistill report` reads from run folders (grouping and tables: :mod:`kdistill.report_tables`).

:func:`find_runs` turns the folders given on the command line into run folders (a folder that holds no run files
of its own but whose subfolders do stands for those subfolders), :func:`load_run` reads one run folder
(`kdistill_config.yaml`, `kdistill_summary.json` with its `log_history`, the other `*.json` results) and
:func:`provenance` what a run was trained from: the top-k cache manifest under `cache.dir` and the
`<data.train>.stats.json` that `kdistill annotate --export` writes. :func:`format_number` is how every number
appears in the report.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import yaml

from kdistill.errors import ConfigError, MissingFileError

__all__ = ["CACHE_MANIFEST", "CONFIG_FILE", "NOT_RESULTS", "STATS_SUFFIX", "SUMMARY_FILE", "final_losses",
           "find_runs", "flatten_numbers", "format_number", "is_number", "is_teacher_name", "load_run", "loss_terms",
           "named_rows", "provenance"]

CONFIG_FILE = "kdistill_config.yaml"
SUMMARY_FILE = "kdistill_summary.json"
CACHE_MANIFEST = "manifest.json"  # kdistill.teachers.topk_store.MANIFEST_NAME (a test checks they agree)
STATS_SUFFIX = ".stats.json"  # `kdistill annotate --export FILE` writes FILE.stats.json
# JSON files a saved model, tokenizer, adapter or trainer checkpoint writes next to the results, and a report's own
# report.json (a report folder inside a comparison's folder is not a run): not results.
NOT_RESULTS = frozenset({
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "chat_template.json", "preprocessor_config.json", "adapter_config.json",
    "model.safetensors.index.json", "trainer_state.json", "modules.json", "sentence_bert_config.json",
    "config_sentence_transformers.json", "kdistill_embedding.json", "counts.json", SUMMARY_FILE, CACHE_MANIFEST,
    "report.json", "tiny.json",
})
_BARE_SEED = re.compile(r"^(?:seed|s)[-_=]?\d+$", re.IGNORECASE)
_MAX_DEPTH = 2  # OUT/method/seed0: how deep find_runs looks for run folders below a given folder


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


def flatten_numbers(obj, prefix: str = "") -> dict[str, float]:
    """Nested dicts (and short lists of numbers) -> {dotted.key: number}; strings and the rest are ignored."""
    out: dict[str, float] = {}
    if is_number(obj):
        out[prefix or "value"] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten_numbers(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(obj, list) and obj and all(is_number(v) for v in obj) and len(obj) <= 8:
        for i, v in enumerate(obj):
            out[f"{prefix}[{i}]"] = v
    return out


def is_teacher_name(name: str) -> bool:
    """Whether a run or model name marks a teacher (its rows come first)."""
    return "teacher" in str(name).lower()


def named_rows(data) -> list[tuple[str, dict[str, float]]] | None:
    """Result shapes without `datasets` -> [(model name, metrics)]: a top-level `teacher` + `students` mapping (the
    old `kdistill eval lm` file) or a list of dicts with a `name`; None for one flat/nested dict of numbers."""
    if isinstance(data, dict) and isinstance(data.get("students"), dict):
        rows = []
        if isinstance(data.get("teacher"), dict):
            rows.append(("teacher", flatten_numbers(data["teacher"])))
        rows += [(str(k), flatten_numbers(v)) for k, v in data["students"].items()]
        return rows
    lists = [data] if isinstance(data, list) else [v for v in data.values() if isinstance(v, list)] \
        if isinstance(data, dict) else []
    for value in lists:  # quickstart `reports` and any list of named records
        if value and all(isinstance(r, dict) and "name" in r for r in value):
            return [(str(r["name"]), flatten_numbers({k: v for k, v in r.items() if k != "name"})) for r in value]
    return None


# --------------------------------------------------------------------------------------------- run folders
def _result_files(folder: Path) -> list[Path]:
    return [p for p in sorted(folder.glob("*.json")) if p.name not in NOT_RESULTS and not p.name.endswith(STATS_SUFFIX)]


def _is_run(folder: Path) -> bool:
    return (folder / CONFIG_FILE).is_file() or (folder / SUMMARY_FILE).is_file() or bool(_result_files(folder))


def _runs_below(folder: Path, depth: int) -> list[Path]:
    if _is_run(folder):
        return [folder]
    if depth >= _MAX_DEPTH:
        return []
    return [run for d in sorted(folder.iterdir()) if d.is_dir() and not d.name.startswith(".")
            for run in _runs_below(d, depth + 1)]


def find_runs(folders) -> list[tuple[Path, str]]:
    """[(run folder, name)] for the folders given to `kdistill report`. A folder with a config, a summary or a
    result JSON of its own is one run, named after the folder (`parent/seed0` when the folder name is only a seed
    marker). A folder with none of these stands for the run folders below it (two levels down at most, e.g.
    `OUT/fkl-seed0` or `OUT/fkl/seed0`), each named by its path relative to the folder given."""
    out = []
    for given in map(Path, folders):
        if not given.is_dir():
            raise MissingFileError(f"run folder not found: {given}")
        below = [] if _is_run(given) else _runs_below(given, 0)
        if below:
            out += [(run, run.relative_to(given).as_posix()) for run in below]
            continue
        resolved = given.resolve()
        name = resolved.name
        if _BARE_SEED.match(name) and resolved.parent.name:
            name = f"{resolved.parent.name}/{name}"
        out.append((given, name))
    return out


def _read_config(path: Path) -> dict | None:
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{path}: not a readable YAML config ({reason})") from None
    return config if isinstance(config, dict) else None


def load_run(run_dir, name: str | None = None) -> dict:
    """Read one run folder: name, path, config, log_history, summary numbers and results (stem -> parsed JSON).
    A folder without a config or summary of its own takes the first one found one level down (a run folder
    whose student was saved in a subfolder)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MissingFileError(f"run folder not found: {run_dir}")
    config_path = next((p for p in (run_dir / CONFIG_FILE, *sorted(run_dir.glob(f"*/{CONFIG_FILE}")))
                        if p.is_file()), None)
    summary_path = next((p for p in (run_dir / SUMMARY_FILE, *sorted(run_dir.glob(f"*/{SUMMARY_FILE}")))
                         if p.is_file()), None)
    config = _read_config(config_path) if config_path else None
    try:
        summary = json.loads(summary_path.read_text()) if summary_path else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        summary = {}
    results = {}
    for path in _result_files(run_dir):
        try:
            results[path.stem] = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
    summary = summary if isinstance(summary, dict) else {}
    log_history = summary.get("log_history")
    return {
        "name": name or run_dir.resolve().name,
        "path": str(run_dir),
        "config": config,
        "log_history": [e for e in (log_history if isinstance(log_history, list) else []) if isinstance(e, dict)],
        "summary": flatten_numbers({k: v for k, v in summary.items() if k != "log_history"}),
        "results": results,
    }


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


def final_losses(run: dict, terms: list[str]) -> dict[str, float]:
    """The last logged value of each loss term of one run."""
    out = {}
    for entry in run["log_history"]:
        for k in terms:
            if is_number(entry.get(k)):
                out[k] = entry[k]
    return out


# --------------------------------------------------------------------------------------------- provenance
def _locate(value, run_dir: Path) -> Path | None:
    """A path from a resolved config: as written (relative to the current folder), else beside the run's config."""
    path = Path(str(value)).expanduser()
    for candidate in (path,) if path.is_absolute() else (path, run_dir / path):
        if candidate.exists():
            return candidate
    return None


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        return {"unreadable": f"{path}: {type(exc).__name__}"}


def _cache_entry(manifest_path: Path) -> dict:
    man = _read_json(manifest_path)
    if not isinstance(man, dict) or "unreadable" in man:
        return {"manifest": str(manifest_path), "unreadable": True}
    meta = man.get("meta") if isinstance(man.get("meta"), dict) else {}
    stats = man.get("stats") if isinstance(man.get("stats"), dict) else {}
    codec = man.get("codec") if isinstance(man.get("codec"), dict) else {}
    teacher = meta.get("teacher") if isinstance(meta.get("teacher"), dict) else {}
    entry = {"manifest": str(manifest_path), "split": meta.get("split", manifest_path.parent.name),
             "complete": man.get("complete"), "teacher": teacher.get("name_or_path"),
             "k": stats.get("k", codec.get("k")), "capture_temperature": meta.get("capture_temperature"),
             "bytes_per_token": stats.get("bytes_per_token", stats.get("record_bytes_per_token")),
             "kl_mean": stats.get("kl_mean"), "kl_sample_tokens": stats.get("kl_sample_tokens"),
             "examples": stats.get("examples", man.get("num_examples")), "tokens": stats.get("tokens")}
    return {k: v for k, v in entry.items() if v is not None}


def provenance(run: dict) -> dict:
    """What a run was trained from, when its config says and the files are there:
    `{"cache": {"dir", "found", "splits": [manifest entries]}, "annotation": {"file", ...stats.json}}`."""
    config = run.get("config") or {}
    run_dir = Path(run["path"])
    out: dict = {}
    cache = config.get("cache") if isinstance(config.get("cache"), dict) else {}
    if cache.get("dir"):
        root = _locate(cache["dir"], run_dir)
        manifests = [] if root is None else \
            [root / CACHE_MANIFEST] if (root / CACHE_MANIFEST).is_file() else sorted(root.glob(f"*/{CACHE_MANIFEST}"))
        out["cache"] = {"dir": str(cache["dir"]), "found": bool(manifests),
                        "splits": [_cache_entry(p) for p in manifests]}
    data = config.get("data") if isinstance(config.get("data"), dict) else {}
    if data.get("train"):
        stats_path = _locate(f"{data['train']}{STATS_SUFFIX}", run_dir)
        if stats_path is not None and stats_path.is_file():
            stats = _read_json(stats_path)
            if isinstance(stats, dict):
                out["annotation"] = {"file": str(stats_path), **stats}
    return out
