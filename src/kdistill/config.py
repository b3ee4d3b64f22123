"""Run configuration: one YAML file <-> nested dataclasses.

Every field carries its help text and default here, and nowhere else. `load_config(path, overrides)` reads
the YAML, applies `--set a.b=c` overrides, refuses unknown keys (naming the key and, when it comes from the
file, the line), and type-checks values. The resolved configuration is written next to the trained student
(`kdistill_config.yaml`) so a run can be reproduced from its output folder alone.

Sections:
    teacher     the model that provides the signal (omit for plain fine-tuning)
    student     the model that is trained
    data        where examples come from and how they become tokens
    objectives  name -> settings; the total loss is sum(weight * objective)
    lora        optional LoRA adapters on the student (peft)
    training    any `transformers.TrainingArguments` field (output_dir, learning_rate, ...)
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import logging
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kdistill.errors import UserError

CONFIG_FILENAME = "kdistill_config.yaml"
logger = logging.getLogger(__name__)


class ConfigError(UserError, ValueError):
    """A configuration problem, with the place (file:line or key) named."""


def _f(default: Any = dataclasses.MISSING, help: str = "", choices: tuple | None = None, factory=None,
       ge: float | None = None):
    """A config field: default, help text, allowed `choices` and a lower bound `ge` (checked on load)."""
    metadata = {"help": help}
    if choices is not None:
        metadata["choices"] = choices
    if ge is not None:
        metadata["ge"] = ge
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class ModelConfig:
    """A model to load with `from_pretrained` (hub id or local folder)."""

    name_or_path: str | None = _f(None, "Hub id (e.g. Qwen/Qwen2.5-0.5B-Instruct) or local folder.")
    tokenizer: str | None = _f(None, "Tokenizer hub id or folder; default: name_or_path.")
    dtype: str = _f("auto", "Weights dtype.", ("auto", "float32", "bfloat16", "float16"))
    device_map: str | None = _f(
        None, "Teacher only: 'auto' spreads a large teacher over the visible GPUs (accelerate device map); "
              "default: the student's device.")
    revision: str | None = _f(None, "Hub revision (branch, tag or commit).")
    trust_remote_code: bool = _f(False, "Allow model code from the hub repository.")
    attn_implementation: str | None = _f(None, "e.g. sdpa, eager, flash_attention_2; default: transformers' choice.")
    layers: list[int] | None = _f(None, "Keep only these layer indices after loading (shrink a teacher into a "
                                  "student), e.g. [0, 2, 4] of 6. T5: encoder and decoder blocks.")


@dataclass
class DataConfig:
    """Where the examples come from and how they are tokenised."""

    train: str | None = _f(None, "Training data: a .jsonl/.json file or a datasets hub id.")
    eval: str | None = _f(None, "Optional held-out data (same formats).")
    format: str = _f("auto", "Row format; auto detects per row.",
                     ("auto", "alpaca", "prompt_completion", "messages", "triplet", "pair_score", "sentence"))
    subset: str | None = _f(None, "Hub dataset configuration (subset) when train/eval is a hub id, e.g. triplet "
                                  "for sentence-transformers/all-nli.")
    split: str = _f("train", "Split to load when `train` is a hub id.")
    eval_split: str = _f("validation", "Split to load when `eval` is a hub id.")
    template: str = _f("auto", "Prompt rendering: auto = chat template if the tokenizer has one, else the Alpaca "
                       "prompt (prompt/completion rows are raw text).", ("auto", "chat", "alpaca", "plain"))
    max_length: int = _f(512, "Maximum tokens per example (causal: prompt+response; seq2seq: source).", ge=1)
    max_target_length: int | None = _f(None, "Seq2seq only: maximum target tokens (default: max_length).", ge=1)
    skip_invalid: bool = _f(False, "Skip invalid rows (reported and counted) instead of refusing to start.")
    limit: int | None = _f(None, "Use only the first N valid training examples.", ge=1)
    eval_limit: int | None = _f(None, "Use only the first N valid eval examples.", ge=1)


@dataclass
class ObjectiveConfig:
    """One term of the loss. `type` defaults to the objective's key in the `objectives` mapping."""

    type: str | None = _f(None, "Objective type: ce | kd | hidden | contrastive | embedding_kd (default: the key).")
    weight: float = _f(1.0, "Weight of this term in the total loss.", ge=0)
    divergence: str = _f("forward_kl", "kd: divergence between teacher and student next-token distributions.",
                         ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"))
    temperature: float | None = _f(
        None, "kd: loss temperature, both distributions softened, loss scaled by T^2 (default 1.0; not the "
              "sampling temperature). contrastive and embedding_kd/similarity: cosine-similarity temperature "
              "(default 0.05). The resolved value is saved with the run.")
    view: str = _f("", "ce/kd: which token view of the batch: '' (the main one) or 'rationale' (distilling "
                   "step-by-step: the rationale view built from data.stepbystep).")
    loss: str = _f("mse", "embedding_kd: mse | cosine (through a learned projection when widths differ) | "
                   "similarity (KL between in-batch similarity distributions).", ("mse", "cosine", "similarity"))
    beta: float = _f(0.5, "kd with jsd: mixture weight of the teacher in M (0.5 = Jensen-Shannon).")
    alpha: float = _f(0.1, "kd with skew_*: skew mixture weight.")
    layer_map: Any = _f("uniform", "hidden: student -> teacher layer pairs, 'uniform' (student layer i <-> teacher "
                        "layer round((i+1) * L_t / L_s) - 1, last meets last) or a list of [student, teacher] pairs "
                        "of 0-based layer indices (negative counts from the end). T5: used for encoder and decoder.")
    encoder_layer_map: Any = _f(None, "hidden, T5: layer map of the encoder stack (default: layer_map).")
    decoder_layer_map: Any = _f(None, "hidden: layer map of the decoder stack (T5 decoder, or a causal LM's layers; "
                                "default: layer_map).")
    missing: str = _f("bucket", "kd from a top-k cache: the teacher mass outside its stored k ids is one extra "
                      "'bucket' outcome on both sides (needs the loss temperature = cache.temperature), or the "
                      "k ids are 'renormalize'd on both sides (any loss temperature).", ("bucket", "renormalize"))
    hidden_loss: str = _f("mse", "hidden: per-position distance between (projected) student and teacher hidden "
                          "states: mse (mean over the width) or cosine (1 - cos).", ("mse", "cosine"))


@dataclass
class LoraConfig:
    """LoRA adapters on the student, through peft."""

    enabled: bool = _f(False, "Train LoRA adapters instead of all student weights.")
    r: int = _f(16, "LoRA rank.", ge=1)
    alpha: int = _f(32, "LoRA scaling numerator (lora_alpha).")
    dropout: float = _f(0.05, "Dropout on the LoRA path.", ge=0)
    target_modules: Any = _f("all-linear", "Module names (list) or 'all-linear'.")
    merge: bool = _f(False, "Save the student with adapters merged into the weights (also saves the adapter "
                     "under adapter/).")


@dataclass
class EmbeddingConfig:
    """task: embedding. How a model turns text into one vector."""

    pooling: str = _f("auto", "auto: the saved sentence-transformers setting, else eos for decoder LMs and mean "
                      "for encoders.", ("auto", "mean", "cls", "eos"))
    normalize: bool = _f(True, "L2-normalise embeddings.")
    append_eos: bool | None = _f(None, "Append EOS to every text (default: when pooling is eos).")
    max_length: int = _f(256, "Maximum tokens per text.", ge=1)
    encode_batch_size: int = _f(128, "Batch size for encoding (teacher signals, evaluation).", ge=1)


@dataclass
class StepByStepConfig:
    """Distilling step-by-step (Hsieh et al., 2023): train on the label and on the LLM's rationale."""

    dataset: str | None = _f(None, "Converter for data.train/data.eval: esnli | anli | cqa | svamp | generic "
                             "({input, label, rationale}); empty = not a step-by-step run.",
                             (None, "esnli", "anli", "cqa", "svamp", "generic"))
    label_type: str = _f("gt", "Train the label view on ground-truth labels (gt) or the LLM's labels (llm).",
                         ("gt", "llm"))
    model_type: str = _f("task_prefix", "task_prefix: label and rationale views with prefixes; standard: the "
                         "label view only, no prefix (plain fine-tuning).", ("task_prefix", "standard"))
    label_prefix: str = _f("[label] ", "Prefix of the label view's input.")
    rationale_prefix: str = _f("[rationale] ", "Prefix of the rationale view's input.")
    prompt_suffix: str | None = _f(None, "Text between a view's input and its target: default a newline for causal "
                                   "LMs (the answer starts on its own line), nothing for encoder-decoder models.")
    max_new_tokens: int = _f(32, "Evaluation: tokens generated for a label.", ge=1)
    eval_batch_size: int = _f(32, "Evaluation: generation batch size.", ge=1)


@dataclass
class ChunkedLossConfig:
    """Token losses (ce, kd) computed from hidden states a chunk of positions at a time, never holding the
    (tokens x vocabulary) logits of student or teacher."""

    mode: str = _f("auto", "auto: chunked when the vocabulary has >= min_vocab entries and the models' logits are "
                   "plain hidden @ lm_head (checked on a probe input; soft-capped logits or LoRA on lm_head fall "
                   "back to dense); on: chunked or an error; off: dense logits.", ("auto", "on", "off"))
    chunk_size: int | str = _f("auto", "Positions projected to the vocabulary at a time; auto: as many as keep one "
                               "chunk's working set within 1 GiB, from the vocabulary size, hidden sizes and dtype "
                               "(kdistill.losses.chunked.auto_chunk_size).")
    min_vocab: int = _f(32768, "auto: the smallest vocabulary that is chunked.", ge=1)


@dataclass
class CacheConfig:
    """A top-k teacher cache: `kdistill cache` runs the teacher once and stores its k most likely tokens per
    trained token; `kdistill train` then reads them and loads no teacher model."""

    dir: str | None = _f(None, "Cache folder (train/ and eval/ inside). Set it to train from the cache.")
    k: int = _f(64, "Token ids kept per position.")
    temperature: float = _f(1.0, "Capture temperature: stored log-probs are log_softmax(teacher logits / T). A kd "
                            "objective with missing: bucket must train at this temperature.")
    logprob_bits: int = _f(12, "Bits per stored log-prob (4..16); ids take ceil(log2 V) bits.")
    batch_size: int = _f(8, "Examples per teacher forward pass while caching.", ge=1)
    kl_sample_tokens: int = _f(4096, "Tokens on which KL(full teacher || reconstructed top-k) is measured.", ge=0)
    shard_mb: int = _f(256, "Shard file size.", ge=1)


def _default_objectives() -> dict[str, ObjectiveConfig]:
    return {"ce": ObjectiveConfig(weight=0.5), "kd": ObjectiveConfig(weight=0.5)}


def _default_training() -> dict[str, Any]:
    return {"output_dir": "outputs/kdistill"}


@dataclass
class RunConfig:
    """A whole training run."""

    task: str = _f("lm", "lm: language modelling objectives on token labels (ce, kd); embedding: one vector per "
                   "text (contrastive, embedding_kd).", ("lm", "embedding"))
    student: ModelConfig = _f(help="The model that is trained.", factory=ModelConfig)
    teacher: ModelConfig = _f(help="The model that provides the signal; leave name_or_path empty for no teacher.",
                              factory=ModelConfig)
    data: DataConfig = _f(help="Training (and eval) data.", factory=DataConfig)
    objectives: dict[str, ObjectiveConfig] = _f(
        help="Loss terms, name -> settings; total = sum(weight * term). Default: ce 0.5 + kd (forward_kl) 0.5.",
        factory=_default_objectives)
    lora: LoraConfig = _f(help="LoRA on the student.", factory=LoraConfig)
    embedding: EmbeddingConfig = _f(help="task: embedding: pooling and text length.", factory=EmbeddingConfig)
    stepbystep: StepByStepConfig = _f(help="Distilling step-by-step data and evaluation.",
                                      factory=StepByStepConfig)
    chunked_loss: ChunkedLossConfig = _f(help="Memory-efficient ce/kd for large vocabularies.",
                                         factory=ChunkedLossConfig)
    cache: CacheConfig = _f(help="Top-k teacher cache (kdistill cache).", factory=CacheConfig)
    training: dict[str, Any] = _f(
        help="transformers.TrainingArguments fields (output_dir, learning_rate, max_steps, ...).",
        factory=_default_training)
    seed: int = _f(42, "Random seed (also passed to TrainingArguments unless set there).")


# --------------------------------------------------------------------------------------------------------------
# YAML <-> dataclasses


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


def _yaml_lines(text: str) -> dict[tuple[str, ...], int]:
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


def _training_argument_names() -> set[str]:
    return set(_training_argument_types())


@functools.lru_cache(maxsize=1)
def _training_argument_types() -> dict[str, Any]:
    from transformers import TrainingArguments

    hints = typing.get_type_hints(TrainingArguments)
    return {f.name: hints[f.name] for f in dataclasses.fields(TrainingArguments) if f.init}


# Ranges of common TrainingArguments fields, checked before anything loads (transformers checks few of them, and
# only once the models are loaded): name -> (minimum, whether the minimum itself is allowed).
TRAINING_RANGES = {
    "learning_rate": (0, True), "weight_decay": (0, True), "max_grad_norm": (0, True), "adam_epsilon": (0, False),
    "per_device_train_batch_size": (1, True), "per_device_eval_batch_size": (1, True),
    "gradient_accumulation_steps": (1, True), "num_train_epochs": (0, False), "warmup_steps": (0, True),
    "logging_steps": (0, False), "save_steps": (0, False), "eval_steps": (0, False), "save_total_limit": (0, True),
    "dataloader_num_workers": (0, True),
}


def _check_training_value(name: str, value: Any, where: str) -> Any:
    """`value` for TrainingArguments field `name` read as its declared type (numbers as numbers, enum fields as one
    of their values), or a ConfigError naming what is allowed."""
    tp = _training_argument_types()[name]
    members = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    if value is None:
        if type(None) in members:
            return None
        raise ConfigError(f"{where}: a value is required")
    enums = [m for m in members if isinstance(m, type) and issubclass(m, enum.Enum)]
    if enums:
        allowed = [e.value for e in enums[0]]
        if isinstance(value, str) and value in allowed:
            return value
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, allowed))}")
    for member in members:
        origin = typing.get_origin(member) or member
        if member is bool and isinstance(value, bool):
            return value
        if member is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if member is int and isinstance(value, float) and value.is_integer() and float not in members:
            return int(value)
        if member is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if member is float and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if member is str and isinstance(value, str):
            return value
        if origin in (dict, list) and isinstance(value, origin):
            return value
        if typing.get_origin(member) is typing.Literal and value in typing.get_args(member):
            return value
        if isinstance(member, type) and not (member in (bool, int, float, str) or origin in (dict, list)) \
                and isinstance(value, member):
            return value
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string", dict: "a mapping",
             list: "a list"}
    wanted = " or ".join(sorted({names.get(typing.get_origin(m) or m, getattr(m, "__name__", str(m)))
                                 for m in members if m is not type(None)}))
    raise ConfigError(f"{where}: expected {wanted}, got {value!r}")


def _check_training(training: dict, lines: dict, source: str) -> dict:
    """Every `training` entry read as its TrainingArguments type and range-checked: `file:line: key: reason`."""
    checked = {}
    for name, value in training.items():
        line = lines.get(("training", name))
        where = f"{source}:{line}: training.{name}" if line else f"{source}: training.{name}"
        value = _check_training_value(name, value, where)
        if name in TRAINING_RANGES and isinstance(value, (int, float)) and not isinstance(value, bool):
            low, inclusive = TRAINING_RANGES[name]
            if value < low or (value == low and not inclusive):
                raise ConfigError(f"{where}: must be {'>=' if inclusive else '>'} {low}, got {value!r}")
        if name == "max_steps" and (value == 0 or value < -1):
            raise ConfigError(f"{where}: must be >= 1, or -1 to train num_train_epochs, got {value!r}")
        checked[name] = value
    return checked


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


def _build(cls, raw: Any, path: tuple[str, ...], lines: dict, source: str):
    def where(key_path):
        dotted = ".".join(key_path)
        line = lines.get(key_path)
        return f"{source}:{line}: {dotted}" if line else f"{source}: {dotted}"

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
        tp = hints[name]
        value = raw[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value if value is not None else {}, key_path, lines, source)
        elif typing.get_origin(tp) is dict:
            _, value_tp = typing.get_args(tp)
            if value is None:
                value = {}
            if not isinstance(value, dict):
                raise ConfigError(f"{where(key_path)}: expected a mapping")
            if dataclasses.is_dataclass(value_tp):
                kwargs[name] = {k: _build(value_tp, v if v is not None else {}, (*key_path, str(k)), lines, source)
                                for k, v in value.items()}
            else:
                kwargs[name] = dict(value)
        else:
            kwargs[name] = _coerce(value, tp, where(key_path))
        choices = f.metadata.get("choices")
        if choices and kwargs[name] not in choices:
            raise ConfigError(f"{where(key_path)}: {kwargs[name]!r} is not one of {', '.join(map(str, choices))}")
        value = kwargs[name]
        if "ge" in f.metadata and isinstance(value, (int, float)) and not isinstance(value, bool) \
                and value < f.metadata["ge"]:
            raise ConfigError(f"{where(key_path)}: must be >= {f.metadata['ge']}, got {value!r}")
    return cls(**kwargs)


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


def _layer_map_problem(spec, optional: bool) -> str | None:
    """What is wrong with a layer map's form (ranges are checked when the models are known), or None."""
    if spec is None and optional:
        return None
    if spec == "uniform":
        return None
    if isinstance(spec, str) or not isinstance(spec, (list, tuple)) or not spec:
        return f"expected 'uniform' or a non-empty list of [student, teacher] pairs, got {spec!r}"
    for pair in spec:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or \
                not all(isinstance(i, int) and not isinstance(i, bool) for i in pair):
            return f"{pair!r} is not a [student, teacher] pair of integers"
    return None


def validate(cfg: RunConfig, source: str = "config", lines: dict | None = None) -> RunConfig:
    """Cross-field checks that a dataclass field alone cannot express."""
    from kdistill.objectives import OBJECTIVES

    if not cfg.student.name_or_path:
        raise ConfigError(f"{source}: student.name_or_path is required")
    for role in ("student", "teacher"):
        model = getattr(cfg, role)
        if model.trust_remote_code and not model.revision:
            logger.warning("%s: %s.trust_remote_code is true without %s.revision: the model repository's code runs "
                           "as it is today; pin the commit you reviewed (revision: <sha>)", source, role, role)
    if not cfg.data.train:
        raise ConfigError(f"{source}: data.train is required")
    if not cfg.objectives:
        raise ConfigError(f"{source}: objectives is empty; give at least one (e.g. ce)")
    for key, obj in cfg.objectives.items():
        obj.type = obj.type or key
        if obj.type not in OBJECTIVES:
            raise ConfigError(f"{source}: objectives.{key}: unknown type {obj.type!r} "
                              f"(valid: {', '.join(OBJECTIVES)})")
        if obj.weight < 0:
            raise ConfigError(f"{source}: objectives.{key}.weight must be >= 0, got {obj.weight}")
        kind = OBJECTIVES[obj.type]
        if kind.task != cfg.task:
            raise ConfigError(f"{source}: objectives.{key} ({obj.type}) is an {kind.task!r} objective but task is "
                              f"{cfg.task!r}")
        if obj.temperature is None:
            obj.temperature = kind.default_temperature
        if obj.temperature <= 0:
            raise ConfigError(f"{source}: objectives.{key}.temperature must be > 0")
        for name in ("beta", "alpha"):
            if not 0.0 <= getattr(obj, name) <= 1.0:
                raise ConfigError(f"{source}: objectives.{key}.{name} must be in [0, 1]")
        if obj.divergence == "jsd" and obj.beta in (0.0, 1.0):
            raise ConfigError(f"{source}: objectives.{key}.beta: {obj.beta} makes jsd identically zero here (M equals "
                              f"one of the two distributions); TRL's GKD means beta 0 = forward KL and beta 1 = "
                              f"reverse KL: write divergence: {'forward_kl' if obj.beta == 0 else 'reverse_kl'}")
        for name in ("layer_map", "encoder_layer_map", "decoder_layer_map"):
            problem = _layer_map_problem(getattr(obj, name), optional=name != "layer_map")
            if problem:
                raise ConfigError(f"{source}: objectives.{key}.{name}: {problem}")
        if OBJECTIVES[obj.type].needs_teacher and not cfg.teacher.name_or_path:
            if not (cfg.cache.dir and obj.type == "kd"):
                raise ConfigError(f"{source}: objectives.{key} ({obj.type}) needs a teacher; set "
                                  "teacher.name_or_path" + (" or cache.dir" if obj.type == "kd" else "") +
                                  " or remove the objective")
        if cfg.cache.dir and OBJECTIVES[obj.type].needs_teacher and obj.type != "kd":
            raise ConfigError(f"{source}: objectives.{key} ({obj.type}) needs a live teacher model, but cache.dir is "
                              "set and a cached run loads none (the cache serves kd only)")
        if cfg.cache.dir and obj.type == "kd":
            if obj.view:
                raise ConfigError(f"{source}: objectives.{key}: a top-k cache covers the main token view only, "
                                  f"not view {obj.view!r}")
            if obj.missing == "bucket" and obj.temperature != cfg.cache.temperature:
                raise ConfigError(
                    f"{source}: objectives.{key}: missing: bucket needs the loss temperature ({obj.temperature}) "
                    f"to equal cache.temperature ({cfg.cache.temperature}): the teacher's mass outside the top k is "
                    "only known at the capture temperature. Capture at the training temperature, or use "
                    "missing: renormalize")
    if cfg.cache.dir:
        if cfg.task != "lm" or cfg.stepbystep.dataset:
            raise ConfigError(f"{source}: cache.dir: a top-k teacher cache serves token KD of task lm (not "
                              "embedding or step-by-step runs)")
        if not 1 <= cfg.cache.k:
            raise ConfigError(f"{source}: cache.k must be >= 1")
        if not 4 <= cfg.cache.logprob_bits <= 16:
            raise ConfigError(f"{source}: cache.logprob_bits must be in 4..16")
        if cfg.cache.temperature <= 0:
            raise ConfigError(f"{source}: cache.temperature must be > 0")
    chunk = cfg.chunked_loss.chunk_size
    if chunk != "auto" and (isinstance(chunk, str) or chunk < 1):
        raise ConfigError(f"{source}: chunked_loss.chunk_size must be an integer >= 1 or 'auto', got {chunk!r}")
    unknown = sorted(set(cfg.training) - _training_argument_names())
    if unknown:
        line = (lines or {}).get(("training", unknown[0]))
        place = f"{source}:{line}" if line else source
        raise ConfigError(f"{place}: training.{unknown[0]}: not a transformers.TrainingArguments field"
                          + (f" (also unknown: {', '.join(unknown[1:])})" if len(unknown) > 1 else ""))
    cfg.training = _check_training(cfg.training, lines or {}, source)
    if not cfg.training.get("output_dir"):
        raise ConfigError(f"{source}: training.output_dir is required")
    return cfg


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
        raw["objectives"] = {name: {"weight": obj.weight} for name, obj in _default_objectives().items()}
    for assignment in overrides:
        _set_override(raw, assignment)
    cfg = config_from_dict(raw, str(path), _yaml_lines(text))
    _resolve_input_paths(cfg, path)
    return cfg


INPUT_PATHS = (("data", "train"), ("data", "eval"), ("student", "name_or_path"), ("student", "tokenizer"),
               ("teacher", "name_or_path"), ("teacher", "tokenizer"))


def _resolve_input_paths(cfg: "RunConfig", path: Path) -> None:
    """Relative input paths (data files, model folders) are read from the current folder; one that is not there
    but exists next to the config file is taken from there, so a config can be run from any folder. Hub ids,
    outputs and paths that exist in neither place (written by an earlier step, or mistyped: reported when read)
    are left as they are."""
    from kdistill.data.records import looks_local

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
        tp = hints[f.name]
        help_text = f.metadata.get("help", "")
        if dataclasses.is_dataclass(tp):
            out.append(f"{key}: {help_text}")
            out.extend(describe(tp, key + "."))
            continue
        if typing.get_origin(tp) is dict and dataclasses.is_dataclass(typing.get_args(tp)[1]):
            out.append(f"{key}.<name>: {help_text}")
            out.extend(describe(typing.get_args(tp)[1], key + ".<name>."))
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
