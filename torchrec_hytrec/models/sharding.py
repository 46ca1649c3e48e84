"""Sharding with ``DistributedModelParallel`` and the optimizers, in one place.

The order a training script follows::

    env = init_distributed()                         # torchrec_hytrec.training: picks the device
    model = HyTRecRetrieval(config, encoder, device=torch.device("meta"))  # tables: no memory yet
    apply_sparse_optimizer(model, opt_config)        # fused, in-backward table optimizer
    model = shard_model(model, "row_wise", device=env.device)
    optimizer = make_optimizer(model, opt_config)    # fused tables + AdamW dense, checkpointable

``shard_model`` plans with TorchRec's ``EmbeddingShardingPlanner`` over a ``Topology`` of the
process group. CPU facts it encodes (TorchRec 1.9, FBGEMM CPU): embedding kernels are FUSED only,
and ``EmbeddingBagCollection`` tables cannot be row-wise sharded (gloo has no reduce-scatter), so
under ``"row_wise"`` on CPU pooled tables are table-wise.

Gradient scale: TorchRec sums a table's gradient over ranks while DDP averages dense gradients.
Adagrad, row-wise Adagrad and Adam(W) updates are invariant to a constant gradient scale (up to
``eps``), so a sharded step matches the single-process step on the whole batch.
"""

import contextlib
import logging
import os
import warnings
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple, Type

import torch
import torch.distributed as dist
from torch import nn
from torchrec import optim as trec_optim
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, storage_reservations
from torchrec.distributed.planner.storage_reservations import HeuristicalStorageReservation
from torchrec.distributed.planner.types import KernelConfig, TopologyFactory, TrainerConfig
from torchrec.distributed.types import ModuleSharder, ShardingEnv, ShardingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

PLAN_KINDS = ("row_wise", "table_wise", "auto")

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

    def __post_init__(self) -> None:
        if self.sparse_optimizer not in _SPARSE_OPTIMIZERS:
            raise ValueError(
                f"sparse_optimizer must be one of {sorted(_SPARSE_OPTIMIZERS)}, got {self.sparse_optimizer!r}"
            )


def _table_modules(model: nn.Module) -> List[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (EmbeddingCollection, EmbeddingBagCollection))]


def apply_sparse_optimizer(model: nn.Module, config: OptimizerConfig) -> None:
    """Registers the fused table optimizer on every embedding table of ``model``.

    Call it on the unsharded model, before :func:`shard_model`; the sharders then build FBGEMM
    kernels that update the rows in the backward. On an unsharded model the same optimizer runs
    in the backward hooks, which is the single-process reference of the fused update.

    Args:
        model: holds ``EmbeddingCollection`` / ``EmbeddingBagCollection`` modules.
        config: ``sparse_*`` fields are used.
    """
    params = [p for m in _table_modules(model) for p in m.parameters()]
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
        model: returned by :func:`shard_model` after :func:`apply_sparse_optimizer`.
        config: ``dense_*`` fields are used (the sparse ones were applied before sharding).

    Example (a process group of one)::

        >>> import tempfile, torch, torch.distributed as dist
        >>> from torchrec_hytrec import HyTRecConfig, HyTRecEncoder, HyTRecRanker, RankerConfig
        >>> from torchrec_hytrec import OptimizerConfig, make_optimizer, shard_model
        >>> from torchrec_hytrec.models import HyTRecRankerTrain, apply_sparse_optimizer
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
    return CombinedOptimizer([model.fused_optimizer, make_dense_optimizer(model, config)])


def sharders() -> List[ModuleSharder[nn.Module]]:
    """The sharders of the models' table modules."""
    return [EmbeddingCollectionSharder(), EmbeddingBagCollectionSharder()]


def sharding_constraints(
    model: nn.Module, plan_kind: str, device: torch.device
) -> Dict[str, ParameterConstraints]:
    """Per-table planner constraints for ``plan_kind`` on ``device`` (see the module docstring).

    Args:
        model: the unsharded model.
        plan_kind: ``"row_wise"``, ``"table_wise"`` or ``"auto"`` (the planner chooses).
        device: the compute device.
    """
    if plan_kind not in PLAN_KINDS:
        raise ValueError(f"plan_kind must be one of {PLAN_KINDS}, got {plan_kind!r}")
    tw, rw, cw = (ShardingType.TABLE_WISE.value, ShardingType.ROW_WISE.value, ShardingType.COLUMN_WISE.value)
    on_cpu = device.type == "cpu"
    # CPU: FUSED kernels only (so no data-parallel tables) and no row-wise pooled tables.
    kernels = [EmbeddingComputeKernel.FUSED.value] if on_cpu else None
    wanted = {"row_wise": rw, "table_wise": tw}.get(plan_kind)
    constraints = {}
    for module in _table_modules(model):
        pooled = isinstance(module, EmbeddingBagCollection)
        configs = module.embedding_bag_configs() if pooled else module.embedding_configs()
        allowed: Optional[List[str]] = ([tw, cw] if pooled else [tw, rw, cw]) if on_cpu else None
        if wanted is None:
            types = allowed
        else:
            types = [wanted if allowed is None or wanted in allowed else tw]
        for table in configs:
            constraints[table.name] = ParameterConstraints(sharding_types=types, compute_kernels=kernels)
    return constraints


def shard_model(
    model: nn.Module,
    plan_kind: str = "auto",
    *,
    device: torch.device,
    process_group: Optional[dist.ProcessGroup] = None,
) -> DistributedModelParallel:
    """Plans and shards ``model``'s tables over the process group with ``DistributedModelParallel``.

    Args:
        model: unsharded model (tables on ``meta`` or CPU), after :func:`apply_sparse_optimizer`.
        plan_kind: ``"row_wise"``, ``"table_wise"`` or ``"auto"``.
        device: compute device (chosen once, by ``torchrec_hytrec.training.init_distributed``).
        process_group: the group to shard over; the default group when ``None``.

    Returns:
        The DMP-wrapped model: sharded tables, DDP-wrapped dense parameters.

    Example (a process group of one; under torchrun every rank runs the same)::

        >>> import tempfile, torch, torch.distributed as dist
        >>> from torchrec_hytrec import (HyTRecConfig, HyTRecEncoder, HyTRecRetrieval, OptimizerConfig,
        ...                              RetrievalConfig, make_optimizer, shard_model)
        >>> from torchrec_hytrec.models import HyTRecRetrievalTrain, apply_sparse_optimizer
        >>> dist.init_process_group("gloo", init_method=f"file://{tempfile.mktemp()}", rank=0, world_size=1)
        >>> model = HyTRecRetrievalTrain(HyTRecRetrieval(
        ...     RetrievalConfig(), HyTRecEncoder(HyTRecConfig.hytrec(embedding_dim=16, num_heads=2)),
        ...     num_items=100, device=torch.device("meta")))
        >>> config = OptimizerConfig(sparse_lr=0.05, dense_lr=1e-3)
        >>> apply_sparse_optimizer(model, config)
        >>> sharded = shard_model(model, "row_wise", device=torch.device("cpu"))
        >>> optimizer = make_optimizer(sharded, config)
        >>> sorted(sharded.plan.plan)
        ['model.embedding_collection']
        >>> dist.destroy_process_group()
    """
    if device.type == "cpu":
        for module in _table_modules(model):
            for param in module.parameters():
                if torch.optim.Adam in getattr(param, "_optimizer_classes", []):
                    raise ValueError("sparse_optimizer 'adam' needs a GPU: FBGEMM's CPU kernels have no Adam")
    group = process_group if process_group is not None else dist.GroupMember.WORLD
    world_size = dist.get_world_size(group)
    topology = TopologyFactory.create_topology(
        TrainerConfig(
            world_size=world_size, local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        ),
        kernel_config=KernelConfig(compute_device=device.type),
    )
    with quiet_torchrec():
        planner = EmbeddingShardingPlanner(
            topology=topology,
            constraints=sharding_constraints(model, plan_kind, device),
            storage_reservation=HeuristicalStorageReservation(percentage=0.15),
        )
        plan = planner.collective_plan(model, sharders(), group)
        return DistributedModelParallel(
            module=model,
            device=device,
            plan=plan,
            sharders=sharders(),
            env=ShardingEnv.from_process_group(group),
        )


@contextlib.contextmanager
def quiet_torchrec() -> Iterator[None]:
    """Silences TorchRec 1.9's notices about its own internals that a user of ours cannot act on:
    the planner's storage reservation (a ``FutureWarning`` on construction, and a log line that
    dry runs mis-size dense tensors, which does not apply to our planning) and DMP's
    ``broadcast_buffers`` deprecation (DMP passes it to DDP itself)."""
    reservation_logger = logging.getLogger(storage_reservations.__name__)
    level = reservation_logger.level
    reservation_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", category=FutureWarning, message=".*(StorageReservation|broadcast_buffers)"
            )
            yield
    finally:
        reservation_logger.setLevel(level)
