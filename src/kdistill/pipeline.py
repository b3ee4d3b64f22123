"""A training run, start to end: config -> recipe (data, models, teacher source, objectives) -> DistillTrainer ->
saved student -> the recipe's evaluation. Read top to bottom; a kind of run is a recipe (`kdistill.recipes`),
never a branch here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import TrainingArguments, set_seed

from kdistill.config import RunConfig, save_config, to_dict
from kdistill.errors import ConfigError, UserError
from kdistill.models.sharding import unsharded_copy
from kdistill.models.zero import cpu_process_state, import_problem, stage3_config, unpartitioned_copy
from kdistill.paths import check_output_dir
from kdistill.provenance import (FingerprintCallback, check_resume, clear_checkpoints, config_fingerprint,
                                 data_fingerprint, last_checkpoint)
from kdistill.recipes import DataReport, Parts, Recipe, select_recipe
from kdistill.trainer import OBJECTIVE_PARTS, DistillTrainer

__all__ = ["Prepared", "deepspeed_arguments", "fsdp_arguments", "prepare", "run_training", "training_arguments"]

logger = logging.getLogger(__name__)


def training_arguments(cfg: RunConfig):
    kwargs: dict[str, Any] = {"report_to": "none", "seed": cfg.seed, "remove_unused_columns": False,
                              "label_names": ["labels"],
                              # pinned host memory only helps when batches are copied to a GPU
                              "dataloader_pin_memory": torch.cuda.is_available()}
    deepspeed = deepspeed_arguments(cfg)
    if not _has_accelerator() and int(os.environ.get("WORLD_SIZE", "1")) > 1 and not deepspeed:
        # A multi-process launch (torchrun, `accelerate launch --multi_gpu`) on a machine with no accelerator:
        # without use_cpu, transformers would quietly run every process as an independent single-process job.
        kwargs["use_cpu"] = True
    kwargs.update(cfg.training)
    kwargs.update(fsdp_arguments(cfg))
    kwargs.update(deepspeed)
    if deepspeed and not _has_accelerator():
        # DeepSpeed on CPU processes (gloo): the process state is set up here, where every process is counted
        cpu_process_state()
        given = kwargs.get("accelerator_config")
        kwargs["accelerator_config"] = {**(given if isinstance(given, dict) else {}), "use_configured_state": True}
    return TrainingArguments(**kwargs)


def fsdp_arguments(cfg: RunConfig) -> dict[str, Any]:
    """TrainingArguments' fsdp / fsdp_config for `distributed.strategy: fsdp` (FSDP2 through accelerate's plugin);
    nothing for ddp or a one-process run (nothing to shard)."""
    dist_cfg = cfg.distributed
    if dist_cfg.strategy != "fsdp" or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return {}
    fsdp_config: dict[str, Any] = {
        "version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "reshard_after_forward": dist_cfg.reshard_after_forward,
        "state_dict_type": "SHARDED_STATE_DICT" if dist_cfg.checkpoint == "sharded" else "FULL_STATE_DICT"}
    if dist_cfg.layer_classes:  # default: accelerate wraps the model's _no_split_modules
        fsdp_config["transformer_layer_cls_to_wrap"] = list(dist_cfg.layer_classes)
    return {"fsdp": True, "fsdp_config": fsdp_config}


def deepspeed_arguments(cfg: RunConfig) -> dict[str, Any]:
    """TrainingArguments' deepspeed (a ZeRO-3 config dict) for `distributed.strategy: deepspeed`: the user's
    `distributed.deepspeed_config` file or the generated stage-3 config (`kdistill.models.zero.stage3_config`);
    nothing for another strategy or a one-process run."""
    dist_cfg = cfg.distributed
    if dist_cfg.strategy != "deepspeed" or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return {}
    missing = import_problem()
    if missing:
        raise UserError(f"distributed.strategy: deepspeed needs the deepspeed package ({missing}); "
                        "pip install deepspeed, or use strategy: fsdp")
    try:
        config = stage3_config(dist_cfg.deepspeed_config)
    except (OSError, ValueError) as error:
        raise ConfigError(f"distributed.deepspeed_config: cannot read {dist_cfg.deepspeed_config} as JSON "
                          f"({error})") from None
    stage = config.get("zero_optimization", {}).get("stage") if isinstance(config, dict) else None
    if stage != 3:
        raise ConfigError(f"distributed.deepspeed_config: {dist_cfg.deepspeed_config} sets zero_optimization.stage "
                          f"{stage}; the teacher engine and the export are written for stage 3")
    return {"deepspeed": config}


def _has_accelerator() -> bool:
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return bool(accelerator.is_available())
    return torch.cuda.is_available()


@dataclass
class Prepared:
    cfg: RunConfig
    recipe: Recipe
    parts: Parts
    trainer: DistillTrainer

    @property
    def tokenizer(self) -> Any:
        return self.parts.tokenizer

    @property
    def student(self) -> Any:
        return self.parts.student

    @property
    def teacher(self) -> Any:
        """The teacher model, when one was loaded (None for a cached or teacher-less run)."""
        return self.parts.teacher_model

    @property
    def data(self) -> list[DataReport]:
        return self.parts.reports


def prepare(cfg: RunConfig, callbacks: list | None = None) -> Prepared:
    """Everything up to (not including) `trainer.train()`."""
    set_seed(cfg.seed)
    recipe = select_recipe(cfg)
    parts = recipe.build(cfg)
    shard_teacher = ({"layer_classes": cfg.distributed.layer_classes}
                     if cfg.distributed.strategy in ("fsdp", "deepspeed") and cfg.distributed.shard_teacher else None)
    trainer = DistillTrainer(model=parts.student, teacher=parts.teacher, objectives=parts.objectives,
                             kd_vocab=parts.kd_vocab, chunking=parts.chunking, on_policy=parts.on_policy,
                             shard_teacher=shard_teacher,
                             args=training_arguments(cfg),
                             train_dataset=parts.train_dataset, eval_dataset=parts.eval_dataset,
                             data_collator=parts.collator, processing_class=parts.tokenizer, callbacks=callbacks)
    return Prepared(cfg=cfg, recipe=recipe, parts=parts, trainer=trainer)


def run_training(cfg: RunConfig, callbacks: list | None = None, resume: bool = True) -> dict:
    """Train, save student + tokenizer + resolved config in `training.output_dir`, return a summary.

    With `resume` (default), a run whose output_dir holds a `checkpoint-*` folder continues from the newest one,
    if that checkpoint was written by a run with the same settings and data (`kdistill.provenance`); otherwise it is
    refused with the differences named. Without `resume`, old checkpoints are deleted first.
    """
    check_output_dir(cfg.training["output_dir"], "training.output_dir")
    fingerprint = {"config": config_fingerprint(to_dict(cfg))}
    checkpoint = None
    if not resume:
        if int(os.environ.get("RANK", "0")) == 0:
            clear_checkpoints(cfg.training["output_dir"])
    else:
        checkpoint = last_checkpoint(cfg.training["output_dir"])
        if checkpoint:
            check_resume(checkpoint, fingerprint)  # settings first: before any model loads
    prepared = prepare(cfg, callbacks)
    trainer = prepared.trainer
    output_dir = trainer.args.output_dir
    fingerprint["data"] = data_fingerprint(prepared.parts.rows)
    if checkpoint:
        check_resume(checkpoint, fingerprint)
        logger.info("resuming from %s", checkpoint)
    trainer.add_callback(FingerprintCallback(fingerprint))
    result = trainer.train(resume_from_checkpoint=checkpoint)
    evaluation = None
    student = trainer.model
    if trainer.is_fsdp_enabled:  # every process sends its shards; process 0 saves and evaluates an ordinary model
        student = unsharded_copy(trainer.model, skip_prefixes=(f"{OBJECTIVE_PARTS}.",))
        student = student.to(trainer.args.device) if student is not None else None
    elif trainer.is_deepspeed_enabled:  # ZeRO-3: every process sends its partitions, one parameter at a time
        student = unpartitioned_copy(trainer.accelerator.unwrap_model(trainer.model),
                                     skip_prefixes=(f"{OBJECTIVE_PARTS}.",))
        student = student.to(trainer.args.device) if student is not None else None
    if trainer.is_world_process_zero():
        prepared.recipe.save(cfg, prepared.parts, student, output_dir)
        save_config(cfg, output_dir)
        evaluation = prepared.recipe.evaluate(cfg, prepared.parts, student)
    summary = {
        "output_dir": output_dir,
        "global_step": result.global_step,
        "train_loss": result.training_loss,
        "resumed_from": checkpoint,
        "data": [dataclasses.asdict(r) | {"skipped_invalid": len(r.skipped_invalid)} for r in prepared.data],
        "log_history": trainer.state.log_history,
    }
    if evaluation:
        summary.update(evaluation)
    if trainer.is_world_process_zero():
        (Path(output_dir) / "kdistill_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
