"""Sharding with ``DistributedModelParallel``: the planner's constraints and ``shard_model``.

``shard_model`` plans with TorchRec's ``EmbeddingShardingPlanner`` over a ``Topology`` of the
process group. CPU facts it encodes (TorchRec 1.9, FBGEMM CPU): embedding kernels are FUSED only,
and ``EmbeddingBagCollection`` tables cannot be row-wise sharded (gloo has no reduce-scatter), so
under ``"row_wise"`` on CPU pooled tables are table-wise.

The tables' fused optimizer is registered before sharding and the dense one built after it, by
``torchrec_hytrec.training.optimizer`` (the order a training script follows is there); the
dry-run plans for a topology you do not have are ``torchrec_hytrec.training.planning``.
"""

import contextlib
import logging
import os
import warnings
from typing import Dict, Iterator, List, Optional

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, storage_reservations
from torchrec.distributed.planner.storage_reservations import HeuristicalStorageReservation
from torchrec.distributed.planner.types import KernelConfig, TopologyFactory, TrainerConfig
from torchrec.distributed.types import ModuleSharder, ShardingEnv, ShardingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

PLAN_KINDS = ("row_wise", "table_wise", "auto")


def table_modules(model: nn.Module) -> List[nn.Module]:
    """Every ``EmbeddingCollection`` / ``EmbeddingBagCollection`` of ``model``: what gets sharded."""
    return [m for m in model.modules() if isinstance(m, (EmbeddingCollection, EmbeddingBagCollection))]


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
    for module in table_modules(model):
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
        model: unsharded model (tables on ``meta`` or CPU), after
            :func:`~torchrec_hytrec.training.optimizer.apply_sparse_optimizer`.
        plan_kind: ``"row_wise"``, ``"table_wise"`` or ``"auto"``.
        device: compute device (chosen once, by ``torchrec_hytrec.training.init_distributed``).
        process_group: the group to shard over; the default group when ``None``.

    Returns:
        The DMP-wrapped model: sharded tables, DDP-wrapped dense parameters.

    Example (a process group of one; under torchrun every rank runs the same)::

        >>> import tempfile, torch, torch.distributed as dist
        >>> from torchrec_hytrec import (HyTRecConfig, HyTRecEncoder, HyTRecRetrieval, OptimizerConfig,
        ...                              RetrievalConfig, make_optimizer, shard_model)
        >>> from torchrec_hytrec.models import HyTRecRetrievalTrain
        >>> from torchrec_hytrec.training import apply_sparse_optimizer
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
        for module in table_modules(model):
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
