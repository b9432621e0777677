"""Typed experiment configs, presets and the YAML/override loader."""

from .loader import config_to_yaml, list_presets, load_config, preset_description
from .schema import (ConditioningConfig, ExperimentConfig, ModelConfig, OptimConfig,
                     SampleConfig, TrainerConfig)

__all__ = ["config_to_yaml", "list_presets", "load_config", "preset_description",
           "ConditioningConfig", "ExperimentConfig", "ModelConfig", "OptimConfig",
           "SampleConfig", "TrainerConfig"]
