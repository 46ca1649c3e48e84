"""Pieces of the training entry point: config, checkpoints, metrics logging."""

from torchrec_hytrec.training.checkpoint import CheckpointManager, rng_state, set_rng_state
from torchrec_hytrec.training.config import (
    CheckpointConfig,
    DataConfig,
    ModelConfig,
    TrainConfig,
    load_config,
)
from torchrec_hytrec.training.cpu_allocator import configure_cpu_allocator
from torchrec_hytrec.training.metrics_log import MetricsLogger, format_table

__all__ = [
    "CheckpointConfig",
    "CheckpointManager",
    "DataConfig",
    "MetricsLogger",
    "ModelConfig",
    "TrainConfig",
    "configure_cpu_allocator",
    "format_table",
    "load_config",
    "rng_state",
    "set_rng_state",
]
