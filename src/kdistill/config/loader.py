"""Reading and writing run configurations: YAML -> nested dataclasses, `--set` overrides, `--help` text.

`load_config(path, overrides)` reads the YAML, applies `--set a.b=c` overrides, refuses unknown keys (naming the
key and, when it comes from the file, the line), type-checks values and range-checks them (each section's field
metadata; an objective's own config in its `__post_init__`). The resolved configuration is written next to the
trained student (`kdistill_config.yaml`) so a run can be reproduced from its output folder alone.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from kdistill.config.sections import CONFIG_FILENAME, RunConfig, default_objectives
from kdistill.config.validate import validate
from kdistill.data.records import looks_local
from kdistill.errors import ConfigError
from kdistill.fields import FieldError
from kdistill.objectives import OBJECTIVES, ObjectiveConfig

__all__ = ["config_from_dict", "describe", "load_config", "read_yaml", "save_config", "to_dict", "yaml_lines"]

logger = logging.getLogger(__name__)


class _Loader(yaml.SafeLoader):
    """YAML read the way a config author means it (YAML 1.2 scalars): only true/false are booleans, so
    `save_strategy: no` is the string "no" (YAML 1.1 makes no/off/yes/on booleans), and `1e-5` is a float
    (YAML 1.1 needs a dot, `1.0e-5`), as transformers' own argument parser reads it."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))
_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def read_yaml(text: str) -> Any:
    """Parse a config document (or a --set value) with kdistill's YAML rules (see `_Loader`)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader


def yaml_lines(text: str) -> dict[tuple[str, ...], int]:
    """Map each key path in a YAML document to its 1-based line number."""
    lines: dict[tuple[str, ...], int] = {}
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines

    def walk(node, path):
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = (*path, str(key_node.value))
                lines[key] = key_node.start_mark.line + 1
                walk(value_node, key)

    walk(root, ())
    return lines


def _strip_optional(tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = tuple(a for a in typing.get_args(tp) if a is not type(None))
        optional = len(args) < len(typing.get_args(tp))
        if len(args) == 1:
            return args[0], optional
        return typing.Union[args], optional
    return tp, False


def _coerce(value: Any, tp, where: str):
    tp, optional = _strip_optional(tp)
    if value is None:
        if optional or tp is Any:
            return None
        raise ConfigError(f"{where}: a value is required")
    if tp is Any:
        return value
    if typing.get_origin(tp) is typing.Union:  # e.g. int | str: the first member that takes the value
        errors = []
        for member in typing.get_args(tp):
            try:
                return _coerce(value, member, where)
            except ConfigError as exc:
                errors.append(str(exc).rsplit(": ", 1)[-1])
        raise ConfigError(f"{where}: {' or '.join(errors)}")
    if typing.get_origin(tp) is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise TypeError(f"unsupported config type {tp}")


def _places(lines: dict, source: str):
    """key path -> "file:line: dotted.key" (or "file: dotted.key" when the key is not in the file)."""
    def where(key_path):
        dotted = ".".join(key_path)
        line = lines.get(key_path)
        return f"{source}:{line}: {dotted}" if line else f"{source}: {dotted}"
    return where


def _build_objective(name: str, raw: Any, path: tuple[str, ...], lines: dict, source: str):
    """One `objectives` entry as its objective's own config class (`type`, default the entry's name)."""
    raw = raw if raw is not None else {}
    kind = raw.get("type") if isinstance(raw, dict) else None
    kind = kind or name
    if kind not in OBJECTIVES:
        raise ConfigError(f"{_places(lines, source)(path)}: unknown type {kind!r} (valid: {', '.join(OBJECTIVES)})")
    cfg = _build(OBJECTIVES[kind].Config, raw, path, lines, source)
    cfg.type = kind
    return cfg


def _build(cls, raw: Any, path: tuple[str, ...], lines: dict, source: str):
    where = _places(lines, source)
    if not isinstance(raw, dict):
        raise ConfigError(f"{where(path) if path else source}: expected a mapping, got {type(raw).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in known:
            raise ConfigError(f"{where((*path, str(key)))}: unknown key (valid keys: {', '.join(known)})")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, f in known.items():
        if name not in raw:
            continue
        key_path = (*path, name)
        tp, optional = _strip_optional(hints[name])
        value = raw[name]
        if dataclasses.is_dataclass(tp) and optional and value is None:
            kwargs[name] = None  # an optional section left out (`on_policy: null`)
        elif dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value if value is not None else {}, key_path, lines, source)
        elif typing.get_origin(tp) is dict:
            _, value_tp = typing.get_args(tp)
            if value is None:
                value = {}
            if not isinstance(value, dict):
                raise ConfigError(f"{where(key_path)}: expected a mapping")
            if value_tp is ObjectiveConfig:
                kwargs[name] = {str(k): _build_objective(str(k), v, (*key_path, str(k)), lines, source)
                                for k, v in value.items()}
            elif dataclasses.is_dataclass(value_tp):
                kwargs[name] = {k: _build(value_tp, v if v is not None else {}, (*key_path, str(k)), lines, source)
                                for k, v in value.items()}
            else:
                kwargs[name] = dict(value)
        else:
            kwargs[name] = _coerce(value, hints[name], where(key_path))
    try:
        return cls(**kwargs)  # a Checked dataclass: choices and bounds are checked here
    except FieldError as exc:
        raise ConfigError(f"{where((*path, exc.field))}: {exc.message}") from None


def _set_override(raw: dict, assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected key=value (e.g. training.max_steps=10)")
    key, _, text = assignment.partition("=")
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {assignment!r}: empty key part")
    value = read_yaml(text) if text.strip() else None
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {assignment!r}: {part} is not a mapping")
        node = child
    node[parts[-1]] = value


def config_from_dict(raw: dict, source: str = "config", lines: dict | None = None) -> RunConfig:
    """Build and validate a RunConfig; an explicit `objectives` mapping replaces the default one entirely."""
    cfg = _build(RunConfig, raw or {}, (), lines or {}, source)
    return validate(cfg, source, lines)


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML config, apply `key=value` overrides, validate. Errors name the file and line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    try:
        raw = read_yaml(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    if "objectives" not in raw and any(a.strip().startswith("objectives.") for a in overrides):
        # --set into the default objectives adjusts them; it must not replace them by the one term it names
        raw["objectives"] = {name: {"weight": obj.weight} for name, obj in default_objectives().items()}
    for assignment in overrides:
        _set_override(raw, assignment)
    cfg = config_from_dict(raw, str(path), yaml_lines(text))
    _resolve_input_paths(cfg, path)
    return cfg


INPUT_PATHS = (("data", "train"), ("data", "eval"), ("student", "name_or_path"), ("student", "tokenizer"),
               ("teacher", "name_or_path"), ("teacher", "tokenizer"), ("distributed", "deepspeed_config"))


def _resolve_input_paths(cfg: "RunConfig", path: Path) -> None:
    """Relative input paths (data files, model folders) are read from the current folder; one that is not there
    but exists next to the config file is taken from there, so a config can be run from any folder. Hub ids,
    outputs and paths that exist in neither place (written by an earlier step, or mistyped: reported when read)
    are left as they are."""
    base = path.resolve().parent
    for section, key in INPUT_PATHS:
        holder = getattr(cfg, section)
        value = getattr(holder, key)
        if not value or Path(value).expanduser().is_absolute() or Path(value).exists():
            continue
        if looks_local(value) and (base / value).exists():
            logger.info("%s: %s.%s %r read from beside the config: %s", path, section, key, value, base / value)
            setattr(holder, key, str(base / value))


def to_dict(cfg) -> dict:
    """Plain-data form of a config (for YAML)."""
    return dataclasses.asdict(cfg)


def save_config(cfg: RunConfig, folder: str | Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / CONFIG_FILENAME
    tmp = out.with_suffix(".yaml.tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
    tmp.replace(out)
    return out


def describe(cls=RunConfig, prefix: str = "") -> list[str]:
    """Help lines for every field: `key (type, default): help`."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = _strip_optional(hints[f.name])[0]
        help_text = f.metadata.get("help", "")
        if dataclasses.is_dataclass(tp):
            out.append(f"{key}: {help_text}")
            out.extend(describe(tp, key + "."))
            continue
        if typing.get_origin(tp) is dict and typing.get_args(tp)[1] is ObjectiveConfig:
            out.append(f"{key}.<name>: {help_text}")
            out.extend(describe(ObjectiveConfig, key + ".<name>."))
            common = {f.name for f in dataclasses.fields(ObjectiveConfig)}
            for kind, objective in OBJECTIVES.items():
                doc = (objective.Config.__doc__ or "").strip().splitlines()[0].removeprefix(f"{kind}: ")
                out.append(f"{key}.<name> with type: {kind}: {doc}")
                out.extend(f"  {line}" for line in describe(objective.Config, key + ".<name>.")
                           if line.split(" ", 1)[0].rsplit(".", 1)[-1] not in common)
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        choices = f.metadata.get("choices")
        extra = f" [{' | '.join(map(str, choices))}]" if choices else ""
        out.append(f"{key} (default {default!r}){extra}: {help_text}")
    return out
