"""Run configuration: one YAML file <-> nested dataclasses (`sections`), read and written by `loader`, checked
across fields by `validate`; objective settings come from each objective's own config (`kdistill.objectives`).
The sections are listed in `sections`' docstring.
"""

from kdistill.config.loader import (config_from_dict, describe, load_config, read_yaml, save_config, to_dict,
                                    yaml_lines)
from kdistill.config.sections import (CONFIG_FILENAME, CacheConfig, ChunkedLossConfig, DataConfig, DistributedConfig,
                                      EmbeddingConfig, LoraConfig, ModelConfig, OnPolicyConfig, RunConfig, ServerConfig, StepByStepConfig,
                                      TeacherConfig, default_objectives)
from kdistill.errors import ConfigError

__all__ = ["CONFIG_FILENAME", "CacheConfig", "ChunkedLossConfig", "ConfigError", "DataConfig", "DistributedConfig",
           "EmbeddingConfig",
           "LoraConfig", "ModelConfig", "OnPolicyConfig", "RunConfig", "ServerConfig", "StepByStepConfig",
           "TeacherConfig", "config_from_dict", "default_objectives",
           "describe", "load_config", "read_yaml", "save_config", "to_dict", "yaml_lines"]
