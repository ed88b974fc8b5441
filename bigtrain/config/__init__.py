"""Run configuration: typed schema, YAML loading with includes, dotted overrides, validation.

A run is described by one YAML file. It may name other YAML files under ``defaults:``
(paths relative to itself); they are merged first, in order, and the file's own keys win.
Command-line overrides such as ``optim.lr=3e-4`` are applied last. The merged mapping is
validated into :class:`RunConfig`; any problem raises :class:`ConfigError` whose message is a
single line naming the key path and what was expected.

This package must stay importable without torch: the launcher uses it on login nodes.

Modules: ``base`` (ConfigError, the section base class), ``sections`` (run, model, data, train,
checkpoint, tracking), ``optim`` (optim, schedule), ``strategy`` (the engines' settings), ``resources``
(launch resources and the SLURM value checks), ``run`` (RunConfig and the cross-section checks),
``loading`` (YAML, overrides, validation), ``explain`` (what ``bigtrain config --explain KEY`` prints).
Import the public names from here.
"""

from bigtrain.config.base import ConfigError
from bigtrain.config.loading import (
    apply_overrides,
    deep_merge,
    load_config,
    load_yaml_tree,
    parse_override,
    validate,
)
from bigtrain.config.optim import OptimSection, ScheduleSection
from bigtrain.config.resources import ResourcesSection, slurm_time_seconds
from bigtrain.config.run import PACKED_TEXT_TASKS, TASK_MODELS, RunConfig
from bigtrain.config.sections import (
    CheckpointSection,
    DataSection,
    DataSourceSection,
    LoraSection,
    ModelSection,
    RunSection,
    TokenizerSection,
    TrackingSection,
    TrainSection,
    WandbSection,
)
from bigtrain.config.strategy import DeepSpeedSection, FSDPSection, StrategySection

__all__ = [
    "PACKED_TEXT_TASKS", "TASK_MODELS", "CheckpointSection", "ConfigError", "DataSection", "DataSourceSection",
    "DeepSpeedSection", "FSDPSection", "LoraSection", "ModelSection", "OptimSection", "ResourcesSection", "RunConfig",
    "RunSection", "ScheduleSection", "StrategySection", "TokenizerSection", "TrackingSection", "TrainSection",
    "WandbSection", "apply_overrides", "deep_merge", "load_config", "load_yaml_tree", "parse_override",
    "slurm_time_seconds", "validate",
]
