"""Cross-field checks of a run configuration: what one field alone cannot express (a section's own ranges are
checked where its fields are declared: the section dataclasses and each objective's config)."""

from __future__ import annotations

import logging

from kdistill.config.sections import RunConfig
from kdistill.config.training import check_training, training_argument_names
from kdistill.errors import ConfigError
from kdistill.objectives import OBJECTIVES

__all__ = ["validate"]

logger = logging.getLogger(__name__)


def validate(cfg: RunConfig, source: str = "config", lines: dict | None = None) -> RunConfig:
    """Check the whole config (`source` and `lines` place the errors); returns it with `training` typed."""
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
        _check_objective(cfg, source, key, obj)
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
    if cfg.teacher.server is not None:
        _check_server(cfg, source, lines or {})
    if cfg.on_policy is not None:
        _check_on_policy(cfg, source, lines or {})
    if cfg.distributed.strategy in ("fsdp", "deepspeed"):
        _check_sharded(cfg, source, lines or {})
    if cfg.distributed.deepspeed_config is not None and cfg.distributed.strategy != "deepspeed":
        line = (lines or {}).get(("distributed", "deepspeed_config"))
        raise ConfigError((f"{source}:{line}: " if line else f"{source}: ") + "distributed.deepspeed_config is read "
                          "by strategy: deepspeed only")
    chunk = cfg.chunked_loss.chunk_size
    if chunk != "auto" and (isinstance(chunk, str) or chunk < 1):
        raise ConfigError(f"{source}: chunked_loss.chunk_size must be an integer >= 1 or 'auto', got {chunk!r}")
    unknown = sorted(set(cfg.training) - training_argument_names())
    if unknown:
        line = (lines or {}).get(("training", unknown[0]))
        place = f"{source}:{line}" if line else source
        raise ConfigError(f"{place}: training.{unknown[0]}: not a transformers.TrainingArguments field"
                          + (f" (also unknown: {', '.join(unknown[1:])})" if len(unknown) > 1 else ""))
    cfg.training = check_training(cfg.training, lines or {}, source)
    if not cfg.training.get("output_dir"):
        raise ConfigError(f"{source}: training.output_dir is required")
    return cfg


def _check_objective(cfg: RunConfig, source: str, key: str, obj) -> None:
    """An objective against the rest of the run: task, teacher, cache."""
    kind = OBJECTIVES[obj.type]
    if kind.task != cfg.task:
        raise ConfigError(f"{source}: objectives.{key} ({obj.type}) is an {kind.task!r} objective but task is "
                          f"{cfg.task!r}")
    cached = bool(cfg.cache.dir)
    served = cfg.teacher.server is not None
    served_by_cache = kind.teacher_needs <= {"tokens"}  # what a top-k cache (or a served teacher) gives
    if served and not cached and kind.needs_teacher() and not served_by_cache:
        raise ConfigError(f"{source}: objectives.{key} ({obj.type}) needs a live teacher model's "
                          f"{', '.join(sorted(kind.teacher_needs - {'tokens'}))}, but teacher.server gives top-k "
                          "log-probs only (kd)")
    if kind.needs_teacher() and not cfg.teacher.name_or_path and not ((cached or served) and served_by_cache):
        raise ConfigError(f"{source}: objectives.{key} ({obj.type}) needs a teacher; set teacher.name_or_path"
                          + (", teacher.server or cache.dir" if served_by_cache else "") + " or remove the objective")
    if cached and kind.needs_teacher() and not served_by_cache:
        raise ConfigError(f"{source}: objectives.{key} ({obj.type}) needs a live teacher model, but cache.dir is "
                          "set and a cached run loads none (the cache serves token distributions only: kd)")
    if kind.cross_tokenizer and cfg.stepbystep.dataset:
        raise ConfigError(f"{source}: objectives.{key} ({obj.type}): cross-tokenizer KD runs on LM rows, not on "
                          "step-by-step data")
    if kind.cross_tokenizer and (cached or served) and obj.method != "alm":
        raise ConfigError(f"{source}: objectives.{key} ({obj.type}, method {obj.method}) reads the teacher's "
                          "full distributions on its own tokens: it needs a loaded teacher (teacher.name_or_path), "
                          f"not {'cache.dir' if cached else 'teacher.server'} (method alm works with both: it reads "
                          "only the log-probs of the teacher's own tokens)")
    if kind.cross_tokenizer and cached and cfg.cache.temperature != 1.0:
        raise ConfigError(f"{source}: objectives.{key} ({obj.type}) matches the teacher's likelihoods, so its cache "
                          f"must hold log-probs at temperature 1; cache.temperature is {cfg.cache.temperature}")
    if served and not cached and kind.needs_teacher():
        if getattr(obj, "view", ""):
            raise ConfigError(f"{source}: objectives.{key}: a served teacher scores the main token view only, "
                              f"not view {obj.view!r}")
        if getattr(obj, "missing", None) == "bucket" and obj.temperature != 1.0:
            raise ConfigError(f"{source}: objectives.{key}: missing: bucket needs the loss temperature "
                              f"({obj.temperature}) to be 1: a served teacher's log-probs are requested at "
                              "temperature 1 (the mass outside its top k is known only there); use missing: "
                              "renormalize to train at another temperature")
    if cached and kind.needs_teacher() and not kind.cross_tokenizer:
        if obj.view:
            raise ConfigError(f"{source}: objectives.{key}: a top-k cache covers the main token view only, "
                              f"not view {obj.view!r}")
        if obj.missing == "bucket" and obj.temperature != cfg.cache.temperature:
            raise ConfigError(
                f"{source}: objectives.{key}: missing: bucket needs the loss temperature ({obj.temperature}) "
                f"to equal cache.temperature ({cfg.cache.temperature}): the teacher's mass outside the top k is "
                "only known at the capture temperature. Capture at the training temperature, or use "
                "missing: renormalize")


def _check_on_policy(cfg: RunConfig, source: str, lines: dict) -> None:
    """on_policy against the rest of the run: the objectives must score samples, the teacher must be live."""
    def place(*key):
        line = lines.get(key)
        return f"{source}:{line}" if line else source

    if cfg.task != "lm" or cfg.stepbystep.dataset:
        raise ConfigError(f"{place('on_policy')}: on_policy: on-policy distillation trains language models on "
                          "their own answers (task lm, not embedding or step-by-step runs)")
    if cfg.cache.dir:
        raise ConfigError(f"{place('cache', 'dir')}: cache.dir: a top-k cache holds the teacher's signal on the "
                          "dataset's text only, and on_policy trains on answers sampled during training: use a live "
                          "teacher (teacher.name_or_path) and drop cache.dir")
    for key, obj in cfg.objectives.items():
        kind = OBJECTIVES[obj.type]
        if not kind.scores_samples:
            why = ("it would train the student to repeat its own samples" if obj.type == "ce" else
                   "it compares the models on the dataset's text, not on sampled answers")
            raise ConfigError(f"{place('objectives', key)}: objectives.{key} ({obj.type}) cannot score sampled "
                              f"answers ({why}); with on_policy the objectives must be "
                              f"{', '.join(k for k, c in OBJECTIVES.items() if c.scores_samples)}")
        if getattr(obj, "view", ""):
            raise ConfigError(f"{place('objectives', key, 'view')}: objectives.{key}.view: on_policy samples "
                              f"answers for the main token view only, not {obj.view!r}")
        if kind.cross_tokenizer and (cfg.on_policy.seq_kd or cfg.on_policy.mode != "divergence"):
            bad = "seq_kd" if cfg.on_policy.seq_kd else "mode"
            raise ConfigError(f"{place('on_policy', bad)}: on_policy.{bad}: with a cross-tokenizer objective "
                              f"({key}) the student samples and the teacher scores its answers in its own tokens; "
                              "teacher-generated answers (seq_kd) and the sampled-token mode (a kd mode) are not "
                              "built for different tokenizers")
        if cfg.on_policy.mode == "sampled_token" and getattr(obj, "temperature", 1.0) != 1.0:
            raise ConfigError(f"{place('objectives', key, 'temperature')}: objectives.{key}.temperature is "
                              f"{obj.temperature}, but on_policy.mode: sampled_token scores the samples' own "
                              "log-probabilities (loss temperature 1); set the sampling temperature with "
                              "on_policy.temperature")
    op = cfg.on_policy
    if op.mode == "sampled_token" and (op.temperature != 1.0 or op.top_p != 1.0 or op.top_k is not None):
        logger.warning("%s: on_policy.mode is sampled_token with sampling temperature %s, top_p %s, top_k %s: the "
                       "answers are not drawn from the student's own distribution, so the advantage estimates the "
                       "reverse KL of the distribution they are drawn from, not the student's", place("on_policy"),
                       op.temperature, op.top_p, op.top_k)


def _check_server(cfg: RunConfig, source: str, lines: dict) -> None:
    """teacher.server: where it is, what it serves, and the runs it can serve."""
    server = cfg.teacher.server
    for key in ("url", "model"):
        if not getattr(server, key):
            line = lines.get(("teacher", "server"))
            raise ConfigError(f"{source}:{line}: teacher.server.{key} is required" if line else
                              f"{source}: teacher.server.{key} is required")
    if not server.url.startswith(("http://", "https://")):
        raise ConfigError(f"{source}: teacher.server.url: expected http(s)://HOST:PORT/v1, got {server.url!r}")
    if cfg.task != "lm" or cfg.stepbystep.dataset:
        raise ConfigError(f"{source}: teacher.server: a served teacher gives token log-probs for task lm (not "
                          "embedding or step-by-step runs)")
    if cfg.on_policy is not None and cfg.on_policy.seq_kd:
        raise ConfigError(f"{source}: on_policy.seq_kd: the teacher would generate the answers, but a served "
                          "teacher only scores them here; drop seq_kd or load the teacher (teacher.name_or_path)")


def _check_sharded(cfg: RunConfig, source: str, lines: dict) -> None:
    """distributed.strategy: fsdp or deepspeed against the rest of the run (what the sharded paths cover)."""
    strategy = cfg.distributed.strategy
    line = lines.get(("distributed", "strategy"))
    place = f"{source}:{line}" if line else source
    if cfg.task != "lm":
        raise ConfigError(f"{place}: distributed.strategy: {strategy} shards language-model runs (task lm); an "
                          "embedding run trains data parallel (strategy: ddp)")
    if cfg.lora.enabled:
        raise ConfigError(f"{place}: distributed.strategy: {strategy} with lora.enabled is not supported (the "
                          "adapter export is not written for sharded weights); use strategy: ddp for LoRA")
    taken = [k for k in ("fsdp", "fsdp_config", "deepspeed") if cfg.training.get(k)]
    if taken:
        what = "training.fsdp and training.fsdp_config" if strategy == "fsdp" else "training.deepspeed"
        raise ConfigError(f"{place}: distributed.strategy: {strategy} sets {what} itself; remove "
                          f"training.{taken[0]}")
