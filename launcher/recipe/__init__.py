"""Recipes: YAML files through OmegaConf into typed, validated dataclasses."""

from launcher.recipe.load import env_variables, from_dict, load_recipe, resolve, to_dict, to_yaml
from launcher.recipe.sections import (
    CheckpointConfig,
    DataConfig,
    LoggingConfig,
    ModelConfig,
    ParallelismConfig,
    Recipe,
    ResourcesConfig,
    SampleConfig,
    SyntheticDataConfig,
    TokenizerConfig,
    TrainConfig,
)

__all__ = [
    "CheckpointConfig",
    "DataConfig",
    "LoggingConfig",
    "ModelConfig",
    "ParallelismConfig",
    "Recipe",
    "ResourcesConfig",
    "SampleConfig",
    "SyntheticDataConfig",
    "TokenizerConfig",
    "TrainConfig",
    "env_variables",
    "from_dict",
    "load_recipe",
    "resolve",
    "to_dict",
    "to_yaml",
]
