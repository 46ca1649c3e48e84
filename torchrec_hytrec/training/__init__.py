"""Pieces of the training entry point: config, optimizers, checkpoints, metrics logging."""

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
from torchrec_hytrec.training.optimizer import OptimizerConfig, apply_sparse_optimizer, make_optimizer

__all__ = [
    "CheckpointConfig",
    "CheckpointManager",
    "DataConfig",
    "MetricsLogger",
    "ModelConfig",
    "OptimizerConfig",
    "TrainConfig",
    "apply_sparse_optimizer",
    "configure_cpu_allocator",
    "format_table",
    "load_config",
    "make_optimizer",
    "rng_state",
    "set_rng_state",
]
