"""Presets: typed config sections, YAML with inheritance, strict dotted overrides, all problems reported at once.

A preset is YAML in sections that mirror the data flow (model → lora → sampling → rewards → optim → memory →
train/data → output/logging). `inherit: other.yaml` pulls in a parent preset (path relative to the child), and
`key.sub=value` overrides on the command line go through the same strict checks as the file: an unknown key, a
wrong type, an out-of-range number or an impossible combination is never silently accepted.

The package: `schema` (the section dataclasses), `parse` (YAML, inheritance, overrides, typed conversion), `checks`
(combinations), `load` (`load_config`, `save_config`). Checks that need files or imports (reward arguments, prompt
files, model paths) run in `tc_lite.preflight`, still before any model loads.
"""

from __future__ import annotations

from .checks import CHECKS, _check_combinations, check_combinations
from .load import load_config, save_config
from .parse import (
    _build,
    _check_range,
    _convert,
    _fix_yaml_floats,
    _looks_numeric,
    _merge,
    _read_yaml,
    _suggest,
    _type_name,
    apply_override,
    load_raw,
    parse_override,
)
from .schema import (
    Config,
    DataConfig,
    EvalConfig,
    LoggingConfig,
    EncoderOverride,
    LoraConfig,
    UNetConfig,
    MemoryConfig,
    ModelConfig,
    OptimConfig,
    OutputConfig,
    RewardsConfig,
    RewardTerm,
    SamplingConfig,
    TrainConfig,
    _range,
)

__all__ = [
    "CHECKS",
    "Config",
    "DataConfig",
    "EvalConfig",
    "LoggingConfig",
    "EncoderOverride",
    "LoraConfig",
    "UNetConfig",
    "MemoryConfig",
    "ModelConfig",
    "OptimConfig",
    "OutputConfig",
    "RewardTerm",
    "RewardsConfig",
    "SamplingConfig",
    "TrainConfig",
    "apply_override",
    "check_combinations",
    "load_config",
    "load_raw",
    "parse_override",
    "save_config",
]
