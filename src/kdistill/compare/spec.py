"""A comparison, as data: one base training config, named method variants, seeds and held-out evaluation sets.

```yaml
base: base.yaml                  # a `kdistill train` config (relative paths: from beside this file)
out: runs/compare                # run folders OUT/<variant>-seed<seed>, the teacher's results in OUT/teacher
seeds: [0, 1]                    # every variant's seeds, unless the variant gives its own
baseline: ce                     # differences are reported against this variant
variants:                        # name -> config overrides (and optionally `seeds`)
  ce: {objectives: {ce: {weight: 1.0}}}             # `objectives` replaces the base's terms whole
  fkl: {objectives.kd.divergence: forward_kl}       # a dotted key sets one field, like `--set`
  cached: {cache.dir: runs/cache-top64, seeds: [0]}
eval:
  data: {alpaca: heldout.jsonl, gpt4: other.jsonl}  # or a list of files (named by their stems)
  max_length: null               # default: the base config's data.max_length
  generate: {limit: 64, max_new_tokens: 96}         # ROUGE-L of greedy answers; omit to skip
  judge: {base_url: http://127.0.0.1:8000/v1, model: NAME}   # optional LLM judge of those answers
```

Every variant trains with the base's budget (steps, batch, learning rate) unless it overrides them itself; the spec
is checked whole before anything trains, and every problem names its `file:line`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from kdistill.config import load_config, read_yaml, yaml_lines
from kdistill.data.records import looks_local
from kdistill.errors import ConfigError, MissingFileError

__all__ = ["CompareSpec", "EvalSpec", "GenerateSpec", "JudgeSpec", "Variant", "load_spec", "variant_overrides"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
# keys a variant may not set: the comparison owns them
_OWNED = ("seed", "training.output_dir", "training.seed")


@dataclass
class GenerateSpec:
    """Greedy answers of every model to the first `limit` rows of each eval set, scored with ROUGE against the
    references."""

    limit: int = 64
    max_new_tokens: int = 128
    batch_size: int = 8


@dataclass
class JudgeSpec:
    """An OpenAI-compatible endpoint that judges the generated answers 0-5 on four dimensions."""

    base_url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 4


@dataclass
class EvalSpec:
    data: dict[str, str]
    max_length: int | None = None
    limit: int | None = None
    batch_size: int = 8
    skip_invalid: bool = False
    generate: GenerateSpec | None = None
    judge: JudgeSpec | None = None


@dataclass
class Variant:
    name: str
    overrides: list[str]
    seeds: list[int]


@dataclass
class CompareSpec:
    source: str
    base: str
    out: str
    variants: dict[str, Variant]
    eval: EvalSpec
    baseline: str | None = None
    teacher: str | None = None  # the spec's `teacher:`, else the base config's (load_spec refuses neither)
    runs: list[tuple[str, int]] = field(default_factory=list)  # (variant, seed) in training order

    def run_dir(self, variant: str, seed: int) -> Path:
        return Path(self.out) / f"{variant}-seed{seed}"

    @property
    def teacher_dir(self) -> Path:
        return Path(self.out) / "teacher"


def variant_overrides(settings: dict, where) -> list[str]:
    """A variant's mapping -> `key=value` assignments for the config loader (values written as JSON, which the
    loader's YAML reads back unchanged). A mapping under a section is merged key by key; `objectives` is replaced
    whole, as an `objectives:` section in a config file replaces the default terms."""
    out: list[str] = []

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict) and value and prefix.rsplit(".", 1)[-1] != "objectives" \
                and not prefix.startswith("objectives."):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
            return
        if prefix in _OWNED:
            raise ConfigError(f"{where(prefix)}: set by the comparison itself (seeds come from `seeds:`, run "
                              f"folders from `out:`)")
        out.append(f"{prefix}={json.dumps(value)}")

    for key, value in settings.items():
        walk(str(key), value)
    return out


def _int_list(value, where: str) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, int) and not isinstance(v, bool)
                                                           for v in value):
        raise ConfigError(f"{where}: expected a non-empty list of integers, got {value!r}")
    if len(set(value)) != len(value):
        raise ConfigError(f"{where}: repeated seed in {value!r}")
    return list(value)


def _section(cls, raw, where: str, required: tuple[str, ...] = ()):
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping")
    known = cls.__dataclass_fields__
    for key in raw:
        if key not in known:
            raise ConfigError(f"{where}.{key}: unknown key (valid keys: {', '.join(known)})")
    for key in required:
        if not raw.get(key):
            raise ConfigError(f"{where}.{key}: required")
    for key, value in raw.items():
        want = known[key].type
        if "int" in str(want) and value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                                        or value < 1):
            raise ConfigError(f"{where}.{key}: expected a positive integer, got {value!r}")
    return cls(**raw)


def _eval_data(raw, where, base: Path) -> dict[str, str]:
    if isinstance(raw, str):
        raw = [raw]
    if isinstance(raw, list):
        named: dict[str, str] = {}
        for path in raw:
            if not isinstance(path, str):
                raise ConfigError(f"{where}: expected file paths, got {path!r}")
            stem, name, i = Path(path).stem, Path(path).stem, 2
            while name in named:
                name, i = f"{stem}-{i}", i + 1
            named[name] = path
        raw = named
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{where}: give held-out files, as a list or as name: path")
    out = {}
    for name, path in raw.items():
        if not isinstance(path, str):
            raise ConfigError(f"{where}.{name}: expected a file path, got {path!r}")
        p = Path(path)
        if not (p.is_absolute() or p.exists()) and (base / p).exists():
            p = base / p
        if looks_local(path) and not p.exists():
            raise MissingFileError(f"{where}.{name}: file not found: {path}")
        out[str(name)] = str(p) if p.exists() else path  # else a hub dataset id
    return out


def load_spec(path: str | Path) -> CompareSpec:
    """Read and check a comparison spec (see the module docstring); relative paths are read from the current
    folder, or from beside the spec when they are not there."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MissingFileError(f"{path}: comparison spec not found") from None
    raw = read_yaml(text) or {}
    lines = yaml_lines(text)

    def where(dotted: str) -> str:
        parts = tuple(dotted.split("."))
        for n in range(len(parts), 0, -1):
            if parts[:n] in lines:
                return f"{path}:{lines[parts[:n]]}: {dotted}"
        return f"{path}: {dotted}"

    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    known = ("base", "out", "seeds", "baseline", "variants", "eval", "teacher")
    for key in raw:
        if key not in known:
            raise ConfigError(f"{where(str(key))}: unknown key (valid keys: {', '.join(known)})")
    here = path.resolve().parent

    def local(value: str) -> str:
        p = Path(value)
        return str(p if p.is_absolute() or p.exists() or not (here / p).exists() else here / p)

    if not isinstance(raw.get("base"), str):
        raise ConfigError(f"{where('base')}: the base training config (a YAML path) is required")
    base = local(raw["base"])
    if not Path(base).is_file():
        raise MissingFileError(f"{where('base')}: file not found: {raw['base']}")
    out = raw.get("out")
    if not isinstance(out, str) or not out:
        raise ConfigError(f"{where('out')}: an output folder is required")
    seeds = _int_list(raw.get("seeds", [0]), where("seeds"))
    variants_raw = raw.get("variants")
    if not isinstance(variants_raw, dict) or not variants_raw:
        raise ConfigError(f"{where('variants')}: give at least one variant (name: overrides)")
    variants = {}
    for name, settings in variants_raw.items():
        name = str(name)
        if not _NAME.match(name) or name == "teacher":
            raise ConfigError(f"{where('variants.' + name)}: a variant name is a folder name of letters, digits, "
                              f"'_', '.', '+', '-' (and not 'teacher')")
        settings = dict(settings or {})
        own_seeds = _int_list(settings.pop("seeds"), where(f"variants.{name}.seeds")) if "seeds" in settings \
            else seeds
        overrides = variant_overrides(settings, lambda k, n=name: where(f"variants.{n}.{k}"))
        variants[name] = Variant(name, overrides, own_seeds)
    baseline = raw.get("baseline")
    if baseline is not None and baseline not in variants:
        raise ConfigError(f"{where('baseline')}: {baseline!r} is not a variant ({', '.join(variants)})")
    ev = raw.get("eval")
    if not isinstance(ev, dict):
        raise ConfigError(f"{where('eval')}: an eval section with `data:` (held-out files) is required")
    ev = dict(ev)
    data = _eval_data(ev.pop("data", None), where("eval.data"), here)
    generate = _section(GenerateSpec, ev.pop("generate", None), where("eval.generate"))
    judge = _section(JudgeSpec, ev.pop("judge", None), where("eval.judge"), ("base_url", "model"))
    if judge is not None and generate is None:
        raise ConfigError(f"{where('eval.judge')}: the judge scores generated answers; add eval.generate")
    rest = _section(EvalSpec, {"data": data, **ev}, where("eval"))
    rest.generate, rest.judge = generate, judge
    teacher = raw.get("teacher")
    if teacher is not None and not isinstance(teacher, str):
        raise ConfigError(f"{where('teacher')}: expected a model folder or hub id")
    base_cfg = load_config(base)  # the evaluation's defaults: known (and refused) before anything trains
    teacher = local(teacher) if teacher else base_cfg.teacher.name_or_path
    if not teacher:
        raise ConfigError(f"{where('teacher')}: the base config has no teacher; give `teacher:` (the model the "
                          f"students are compared with)")
    rest.max_length = rest.max_length or base_cfg.data.max_length
    spec = CompareSpec(source=str(path), base=base, out=out, variants=variants, eval=rest, baseline=baseline,
                       teacher=teacher)
    spec.runs = [(v.name, s) for v in variants.values() for s in v.seeds]
    return spec
