"""The optimizers of a training job: fused, in-backward table optimizers and AdamW for the rest.

The order a training script follows::

    env = init_distributed()                         # torchrec_hytrec.training: picks the device
    model = HyTRecRetrieval(config, encoder, device=torch.device("meta"))  # tables: no memory yet
    apply_sparse_optimizer(model, opt_config)        # fused, in-backward table optimizer
    model = shard_model(model, "row_wise", device=env.device)  # torchrec_hytrec.models.sharding
    optimizer = make_optimizer(model, opt_config)    # fused tables + AdamW dense, checkpointable

The table optimizer is registered on the unsharded model because the sharders build it into the
FBGEMM kernels (and the planner counts its state); the dense optimizer is built after sharding,
over the parameters DMP left to DDP.

Gradient scale: TorchRec sums a table's gradient over ranks while DDP averages dense gradients.
Adagrad, row-wise Adagrad and Adam(W) updates are invariant to a constant gradient scale (up to
``eps``), so a sharded step matches the single-process step on the whole batch.
"""

import math
from dataclasses import dataclass
from typing import Dict, Tuple, Type

import torch
from torch import nn
from torchrec import optim as trec_optim
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from torchrec_hytrec.models.sharding import table_modules

_SPARSE_OPTIMIZERS: Dict[str, Type[torch.optim.Optimizer]] = {
    "rowwise_adagrad": trec_optim.RowWiseAdagrad,
    # torchrec.optim's Adagrad/Adam are placeholders that cannot step an unsharded table.
    "adagrad": torch.optim.Adagrad,
    "adam": torch.optim.Adam,
}


@dataclass
class OptimizerConfig:
    """Optimizers of a sharded model.

    Args:
        sparse_optimizer: ``"rowwise_adagrad"``, ``"adagrad"`` or ``"adam"`` (GPU only: FBGEMM's
            CPU kernels have no Adam); FBGEMM applies it inside the backward of every table.
        sparse_lr: its learning rate.
        sparse_eps: its epsilon.
        dense_lr: AdamW learning rate of every other parameter.
        dense_weight_decay: AdamW weight decay.
        betas: AdamW betas.
        dense_lr_warmup_epochs: epochs over which the dense learning rate rises linearly from 0
            to ``dense_lr`` (0: none).
        dense_lr_decay_epochs: 0 keeps ``dense_lr`` after the warm-up; otherwise it falls along
            a half cosine to 0 at this epoch (and stays 0 after it). Its own key rather than the
            run's ``epochs``, so a run resumed with more epochs continues the same schedule. The
            table optimizers keep ``sparse_lr``: Adagrad's accumulated squares already shrink
            each row's steps.

    Example::

        >>> from torchrec_hytrec import OptimizerConfig
        >>> OptimizerConfig(sparse_optimizer="rowwise_adagrad", sparse_lr=0.05, dense_lr=1e-3).betas
        (0.9, 0.999)
    """

    sparse_optimizer: str = "rowwise_adagrad"
    sparse_lr: float = 0.05
    sparse_eps: float = 1e-8
    dense_lr: float = 1e-3
    dense_weight_decay: float = 0.01
    betas: Tuple[float, float] = (0.9, 0.999)
    dense_lr_warmup_epochs: float = 0.0
    dense_lr_decay_epochs: float = 0.0

    def __post_init__(self) -> None:
        if self.sparse_optimizer not in _SPARSE_OPTIMIZERS:
            raise ValueError(
                f"sparse_optimizer must be one of {sorted(_SPARSE_OPTIMIZERS)}, got {self.sparse_optimizer!r}"
            )
        if not self.dense_lr_warmup_epochs >= 0:
            raise ValueError(
                f"config key 'optim.dense_lr_warmup_epochs' must be >= 0, got {self.dense_lr_warmup_epochs!r}"
            )
        decay = self.dense_lr_decay_epochs
        if decay and not decay > self.dense_lr_warmup_epochs:
            raise ValueError(
                f"config key 'optim.dense_lr_decay_epochs' ({decay!r}) must be 0 (no decay) or "
                f"above optim.dense_lr_warmup_epochs ({self.dense_lr_warmup_epochs!r})"
            )


def dense_lr_at(config: OptimizerConfig, epochs_done: float) -> float:
    """The dense learning rate of the step taken after ``epochs_done`` epochs.

    A pure function of the training position, so a resumed run continues the schedule from its
    checkpointed epoch and step with no scheduler state of its own.

    Args:
        config: ``dense_lr`` and the ``dense_lr_*`` schedule fields are used.
        epochs_done: epochs trained before the step (fractional: the epoch plus its steps done
            over its step count).

    Example::

        >>> from torchrec_hytrec.training.optimizer import OptimizerConfig, dense_lr_at
        >>> config = OptimizerConfig(dense_lr=1e-3, dense_lr_warmup_epochs=1, dense_lr_decay_epochs=5)
        >>> [round(dense_lr_at(config, e), 6) for e in (0.5, 1, 3, 5, 6)]
        [0.0005, 0.001, 0.0005, 0.0, 0.0]
    """
    warmup, decay = config.dense_lr_warmup_epochs, config.dense_lr_decay_epochs
    if epochs_done < warmup:
        return config.dense_lr * epochs_done / warmup
    if not decay:
        return config.dense_lr
    done = min((epochs_done - warmup) / (decay - warmup), 1.0)
    return config.dense_lr * 0.5 * (1.0 + math.cos(math.pi * done))


def set_dense_lr(optimizer: CombinedOptimizer, lr: float) -> None:
    """Sets the learning rate of the dense AdamW part of a :func:`make_optimizer` optimizer."""
    _, dense = optimizer.optimizers[-1]
    for group in dense.param_groups:
        group["lr"] = lr


def apply_sparse_optimizer(model: nn.Module, config: OptimizerConfig) -> None:
    """Registers the fused table optimizer on every embedding table of ``model``.

    Call it on the unsharded model, before
    :func:`~torchrec_hytrec.models.sharding.shard_model`; the sharders then build FBGEMM kernels
    that update the rows in the backward. On an unsharded model the same optimizer runs in the
    backward hooks, which is the single-process reference of the fused update.

    Args:
        model: holds ``EmbeddingCollection`` / ``EmbeddingBagCollection`` modules.
        config: ``sparse_*`` fields are used.
    """
    params = [p for m in table_modules(model) for p in m.parameters()]
    if not params:
        raise ValueError("model has no EmbeddingCollection or EmbeddingBagCollection tables")
    # Only arguments that torch's optimizers and FBGEMM's kernels name alike (sparse Adam keeps
    # the betas (0.9, 0.999) both default to).
    kwargs = {"lr": config.sparse_lr, "eps": config.sparse_eps}
    apply_optimizer_in_backward(_SPARSE_OPTIMIZERS[config.sparse_optimizer], params, kwargs)


def make_dense_optimizer(model: nn.Module, config: OptimizerConfig) -> KeyedOptimizerWrapper:
    """AdamW over every parameter that has no in-backward optimizer."""
    return KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(model.named_parameters())),
        lambda params: torch.optim.AdamW(
            params, lr=config.dense_lr, betas=config.betas, weight_decay=config.dense_weight_decay
        ),
    )


def make_optimizer(model: DistributedModelParallel, config: OptimizerConfig) -> CombinedOptimizer:
    """One optimizer object for a sharded model: the fused table optimizers plus AdamW.

    ``step()`` steps the dense part (the tables were updated in the backward); ``state_dict()``
    and ``load_state_dict()`` cover both, sharded table state included, so
    ``torch.distributed.checkpoint`` saves and restores it. AdamW's state is created by its first
    step: before loading into a fresh optimizer call ``optimizer.init_state()`` (a zero-gradient
    step, which applies weight decay once), then load the model weights and the optimizer state.

    Args:
        model: returned by :func:`~torchrec_hytrec.models.sharding.shard_model` after
            :func:`apply_sparse_optimizer`.
        config: ``dense_*`` fields are used (the sparse ones were applied before sharding).

    Example (a process group of one)::

        >>> import tempfile, torch, torch.distributed as dist
        >>> from torchrec_hytrec import HyTRecConfig, HyTRecEncoder, HyTRecRanker, RankerConfig
        >>> from torchrec_hytrec import OptimizerConfig, make_optimizer, shard_model
        >>> from torchrec_hytrec.models import HyTRecRankerTrain
        >>> from torchrec_hytrec.training import apply_sparse_optimizer
        >>> dist.init_process_group("gloo", init_method=f"file://{tempfile.mktemp()}", rank=0, world_size=1)
        >>> model = HyTRecRankerTrain(HyTRecRanker(
        ...     RankerConfig(num_items=50, embedding_dim=8, dense_in_features=2,
        ...                  sparse_features={"user_bucket": 10}),
        ...     HyTRecEncoder(HyTRecConfig.hytrec(embedding_dim=8, num_heads=2)),
        ...     device=torch.device("meta")))
        >>> config = OptimizerConfig(sparse_lr=0.05, dense_lr=1e-3)
        >>> apply_sparse_optimizer(model, config)
        >>> optimizer = make_optimizer(shard_model(model, "row_wise", device=torch.device("cpu")), config)
        >>> # The fused table optimizer's state is in it.
        >>> any("embeddings.item.weight" in key for key in optimizer.state_dict()["state"])
        True
        >>> dist.destroy_process_group()
    """
    if not isinstance(model, DistributedModelParallel):
        raise TypeError(
            "make_optimizer needs the DistributedModelParallel from shard_model() (a world of 1 works); "
            f"got {type(model).__name__}"
        )
    # The dense part last: set_dense_lr finds it there.
    return CombinedOptimizer([model.fused_optimizer, make_dense_optimizer(model, config)])
