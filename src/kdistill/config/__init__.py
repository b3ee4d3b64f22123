"""Run configuration: one YAML file <-> nested dataclasses (`sections`), read and written by `loader`, checked
across fields by `validate`; objective settings come from each objective's own config (`kdistill.objectives`).

Sections:
    teacher     the model that provides the signal (omit for plain fine-tuning)
    student     the model that is trained
    data        where examples come from and how they become tokens
    objectives  name -> settings; the total loss is sum(weight * objective)
    lora        optional LoRA adapters on the student (peft)
    training    any `transformers.TrainingArguments` field (output_dir, learning_rate, ...)
"""

from kdistill.config.loader import config_from_dict, describe, load_config, read_yaml, save_config, to_dict
from kdistill.config.sections import (CONFIG_FILENAME, CacheConfig, ChunkedLossConfig, DataConfig, EmbeddingConfig,
                                      LoraConfig, ModelConfig, RunConfig, StepByStepConfig, default_objectives)
from kdistill.errors import ConfigError

__all__ = ["CONFIG_FILENAME", "CacheConfig", "ChunkedLossConfig", "ConfigError", "DataConfig", "EmbeddingConfig",
           "LoraConfig", "ModelConfig", "RunConfig", "StepByStepConfig", "config_from_dict", "default_objectives",
           "describe", "load_config", "read_yaml", "save_config", "to_dict"]
