"""Which runs are repeats of one another, and how their configurations differ (for `kdistill report`).

A resolved config (`kdistill_config.yaml`) is flattened to dotted keys (:func:`flatten_config`). Runs whose
configs are equal once the seed and output keys (:data:`SEED_KEYS`, :data:`OUTPUT_KEYS`) are removed are
repeats of one method (:func:`grouping_key`). The report shows what all groups share as today's highlights
(:func:`common_settings`) and, per group, only the keys whose values differ between runs
(:func:`config_differences`).
"""

from __future__ import annotations

import json

__all__ = ["OUTPUT_KEYS", "SEED_KEYS", "common_settings", "config_differences", "config_highlights",
           "flatten_config", "grouping_key"]

# Keys that differ between repeats of one method without making it another method.
SEED_KEYS = frozenset({"seed", "training.seed", "training.data_seed"})
# Where a run wrote its outputs and logs: differ for every run, say nothing about the method; never shown.
OUTPUT_KEYS = frozenset({"training.output_dir", "training.run_name", "training.logging_dir",
                         "training.hub_model_id", "training.resume_from_checkpoint", "training.push_to_hub"})
ABSENT = "(not set)"


def flatten_config(config: dict | None, prefix: str = "") -> dict[str, str]:
    """{dotted.key: value as text} of a nested config; lists are written as compact JSON, None as `null`."""
    out: dict[str, str] = {}
    for key, value in (config or {}).items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(flatten_config(value, path))
        elif isinstance(value, str):
            out[path] = value
        else:
            out[path] = json.dumps(value, sort_keys=True, default=str)
    return out


def grouping_key(config: dict | None) -> str | None:
    """Equal for runs that repeat one method (configs equal but for seeds and output paths); None: no config."""
    if not config:
        return None
    flat = flatten_config(config)
    return json.dumps({k: v for k, v in flat.items() if k not in SEED_KEYS and k not in OUTPUT_KEYS},
                      sort_keys=True)


def _absent_prefix(key: str, flat: dict[str, str]) -> str:
    """The shortest prefix of `key` that a config lacks entirely (`objectives.kd` for a run without kd)."""
    parts = key.split(".")
    for i in range(1, len(parts) + 1):
        prefix = ".".join(parts[:i])
        if not any(k == prefix or k.startswith(prefix + ".") for k in flat):
            return prefix
    return key


def config_differences(groups: list[dict]) -> dict[str, list[tuple[str, str]]]:
    """{group name: [(dotted key, value)]} with only the keys whose values differ between the runs (output paths
    left out). A group whose runs disagree on a key (the seeds) shows their values in run order, joined by
    ", ". A section that some runs lack entirely is one line: `(not set)` where it is missing, its differing keys
    as `key=value, ...` where it is set (`objectives.kd: divergence=reverse_kl, ...`). Groups without a config: []."""
    flats = [(g["name"], [flatten_config(r["config"]) for r in g["runs"] if r["config"]]) for g in groups]
    every = [flat for _, members in flats for flat in members]
    keys = sorted({k for flat in every for k in flat if k not in OUTPUT_KEYS})
    differing = [k for k in keys if len({flat.get(k, ABSENT) for flat in every}) > 1]
    sections = {k: min((_absent_prefix(k, f) for f in every if k not in f), key=len)
                for k in differing if any(k not in f for f in every)}
    out: dict[str, list[tuple[str, str]]] = {}
    for name, members in flats:
        lines: list[tuple[str, str]] = []
        merged: dict[str, list[str]] = {}  # section -> ["key=value"], shown as one line
        for key in differing if members else []:
            values = [flat.get(key, ABSENT) for flat in members]
            distinct = list(dict.fromkeys(values))
            section = sections.get(key)
            if section and len(distinct) == 1:
                if section not in merged:
                    merged[section] = []
                    lines.append((section, ""))
                if distinct[0] != ABSENT:
                    merged[section].append(f"{key[len(section) + 1:] or key}={distinct[0]}")
                continue
            lines.append((key, distinct[0] if len(distinct) == 1 else ", ".join(values)))
        out[name] = [(k, ", ".join(merged[k]) or ABSENT) if k in merged else (k, v) for k, v in lines]
    return out


def config_highlights(config: dict | None) -> list[tuple[str, str]]:
    """[(section, text)]: the models, objectives, data, LoRA and training settings of a resolved config."""
    if not config:
        return []
    out = []
    for section in ("student", "teacher"):
        m = config.get(section)
        if isinstance(m, dict) and m.get("name_or_path"):
            out.append((section, str(m["name_or_path"]) + (f" (layers {m['layers']})"
                                                            if m.get("layers") is not None else "")))
    objectives = config.get("objectives")
    if isinstance(objectives, dict) and objectives:
        parts = []
        for name, obj in objectives.items():
            if isinstance(obj, dict):
                extras = ", ".join(f"{k}={v}" for k, v in obj.items()
                                   if k not in ("weight",) and isinstance(v, (str, int, float, bool)))
                parts.append(f"{name} x {obj.get('weight', 1.0)}" + (f" ({extras})" if extras else ""))
            else:
                parts.append(str(name))
        out.append(("objectives", "; ".join(parts)))
    data = config.get("data")
    if isinstance(data, dict) and data.get("train"):
        out.append(("data", str(data["train"]) + (f" (max_length {data['max_length']})"
                                                  if data.get("max_length") is not None else "")))
    cache = config.get("cache")
    if isinstance(cache, dict) and cache.get("dir"):
        out.append(("cache", f"{cache['dir']} (k {cache.get('k')}, temperature {cache.get('temperature')})"))
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


def common_settings(groups: list[dict]) -> list[tuple[str, str]]:
    """The highlights (:func:`config_highlights`) that every run with a config shares, in their usual order."""
    highlights = [config_highlights(r["config"]) for g in groups for r in g["runs"] if r["config"]]
    if not highlights:
        return []
    return [item for item in highlights[0] if all(item in h for h in highlights[1:])]
