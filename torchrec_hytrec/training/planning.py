"""Dry-run TorchRec sharding plans of the sequence tables, for a topology you do not have yet.

:func:`plan_tables` builds the tables the models build (:func:`sequence_table_configs`) in an
``EmbeddingCollection`` on the ``meta`` device, so a billion-row table costs no memory, registers
the fused table optimizer the way :func:`~torchrec_hytrec.training.optimizer.apply_sparse_optimizer`
does, and runs TorchRec's ``EmbeddingShardingPlanner.plan`` (not ``collective_plan``: no process
group) over a simulated topology. :func:`format_plan` prints the result; ``python -m
torchrec_hytrec.training.planning --help`` is the command line.

It plans a training job, not a model: the planner must see the table optimizer's state, which
the training set-up (:mod:`torchrec_hytrec.training.optimizer`) registers, so it sits in
``training/`` beside it; from ``models/`` it takes what ``shard_model`` would use (the tables,
the constraints), so the plan matches the one a real job gets.

Every number is the planner's *estimate* (its storage and perf models), not a measurement:

* memory: the shard's weights, the optimizer state (TorchRec 1.9.2 counts it only when the
  parameter carries ``_optimizer_classes``, which ``apply_optimizer_in_backward`` sets: one fp32
  per row for row-wise Adagrad, one per weight for Adagrad, two for Adam) and the shard's input
  and output buffers; per rank it adds the planner's dense and KJT reservations.
* perf: milliseconds per iteration of the shard's forward / backward compute and comms, from
  TorchRec's bandwidth constants (``torchrec.distributed.planner.constants``).

Sequence tables look up every event of a sample, so each feature's pooling factor (ids per
sample) is its mean length: the mean history length for ``"item_id"`` and the side features, not
TorchRec's default of 1. It scales the input, output and comms estimates, and with them the
placement the planner prefers.
"""

import argparse
import sys
from dataclasses import dataclass, fields, replace
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
from torchrec.distributed.planner.storage_reservations import HeuristicalStorageReservation
from torchrec.distributed.planner.types import (
    KernelConfig,
    Perf,
    PlannerError,
    ShardingOption,
    Storage,
    Topology,
    TopologyFactory,
    TrainerConfig,
)
from torchrec.distributed.types import ShardingType
from torchrec.modules.embedding_modules import EmbeddingCollection

from torchrec_hytrec.data.batch import CANDIDATE_KEY, TARGET_KEY
from torchrec_hytrec.models.embeddings import ITEM_TABLE, sequence_table_configs
from torchrec_hytrec.models.sharding import PLAN_KINDS, quiet_torchrec, sharding_constraints
from torchrec_hytrec.training.optimizer import OptimizerConfig, apply_sparse_optimizer

GIB = 1024**3
# TorchRec's own size constants (HBM_CAP, DDR_CAP) and its "GB" printouts are binary GiB.
DEFAULT_HBM_BYTES = 80 * GIB
DEFAULT_DDR_BYTES = 128 * GIB
OPTIMIZERS = ("rowwise_adagrad", "adagrad", "adam", "none")


@dataclass(frozen=True)
class PerfEstimate:
    """The planner's per-iteration time estimate, in milliseconds (TorchRec's ``Perf``).

    Args:
        fwd_compute: embedding forward kernel.
        fwd_comms: forward output distribution.
        bwd_compute: embedding backward kernel (with the fused optimizer update).
        bwd_comms: backward gradient distribution.
        prefetch_compute: cache prefetch (UVM caching kernels only).
        input_dist_comms: input (id) distribution; TorchRec reports it but leaves it out of the
            total.

    Example::

        >>> PerfEstimate(1.0, 2.0, 3.0, 4.0).total
        10.0
    """

    fwd_compute: float
    fwd_comms: float
    bwd_compute: float
    bwd_comms: float
    prefetch_compute: float = 0.0
    input_dist_comms: float = 0.0

    @property
    def total(self) -> float:
        """What the planner minimises: everything but ``input_dist_comms`` (TorchRec's ``Perf.total``)."""
        return self.fwd_compute + self.fwd_comms + self.bwd_compute + self.bwd_comms + self.prefetch_compute

    def __add__(self, other: "PerfEstimate") -> "PerfEstimate":
        return PerfEstimate(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})


_NO_PERF = PerfEstimate(0.0, 0.0, 0.0, 0.0)


@dataclass(frozen=True)
class ShardPlacement:
    """One shard of a table.

    Args:
        rank: the rank that holds it.
        offsets: ``(row, column)`` of its first element in the table.
        sizes: ``(rows, columns)``.
        hbm_bytes: estimated HBM of the shard (weights, optimizer state, I/O buffers).
        ddr_bytes: estimated host memory (UVM kernels; everything on CPU).
        perf: estimated time of the shard's work.
    """

    rank: int
    offsets: Tuple[int, int]
    sizes: Tuple[int, int]
    hbm_bytes: int
    ddr_bytes: int
    perf: PerfEstimate


@dataclass(frozen=True)
class TablePlan:
    """Where the planner puts one table.

    Args:
        name: table name (``"item"``, then the side features).
        rows: rows of the table.
        dim: embedding dimension.
        feature_names: features looked up in it.
        pooling_factors: ids per sample of each feature, as given to the planner.
        sharding_type: TorchRec ``ShardingType`` value (``"row_wise"``, ``"table_wise"``, ...).
        compute_kernel: TorchRec ``EmbeddingComputeKernel`` value (``"fused"``, ``"fused_uvm_caching"``, ...).
        shards: its shards; a ``"data_parallel"`` table has one full replica per rank.
    """

    name: str
    rows: int
    dim: int
    feature_names: Tuple[str, ...]
    pooling_factors: Tuple[float, ...]
    sharding_type: str
    compute_kernel: str
    shards: Tuple[ShardPlacement, ...]

    @property
    def replicated(self) -> bool:
        """Every rank holds the whole table (data parallel)."""
        return self.sharding_type == ShardingType.DATA_PARALLEL.value

    @property
    def ranks(self) -> List[int]:
        """Ranks holding a shard, ascending."""
        return sorted({s.rank for s in self.shards})

    @property
    def hbm_bytes(self) -> int:
        """Estimated HBM of all its shards together."""
        return sum(s.hbm_bytes for s in self.shards)

    @property
    def ddr_bytes(self) -> int:
        """Estimated host memory of all its shards together."""
        return sum(s.ddr_bytes for s in self.shards)

    @property
    def perf_ms(self) -> float:
        """Sum of its shards' total perf (TorchRec's ``ShardingOption.total_perf``)."""
        return sum(s.perf.total for s in self.shards)


@dataclass(frozen=True)
class RankEstimate:
    """The planner's estimate for one rank.

    Args:
        rank: the rank.
        hbm_bytes: its shards plus the planner's dense and KJT reservations (TorchRec's "HBM").
        ddr_bytes: the same for host memory.
        perf: sum of its shards' perf estimates.
    """

    rank: int
    hbm_bytes: int
    ddr_bytes: int
    perf: PerfEstimate


@dataclass(frozen=True)
class PlanResult:
    """A dry-run sharding plan and the planner's estimates.

    Args:
        tables: one per table, item table first.
        ranks: one per rank, in rank order.
        world_size: ranks of the simulated topology.
        local_world_size: ranks per host.
        compute_device: ``"cuda"`` or ``"cpu"``.
        hbm_cap_bytes: HBM per rank (0 on CPU).
        ddr_cap_bytes: host memory per rank.
        planning_hbm_bytes: HBM per rank the planner may fill: the cap less its reservation
            (15% of HBM, the dense parameters and the KJT buffers).
        planning_ddr_bytes: the same for host memory.
        batch_size: samples per rank per iteration.
        optimizer: the table optimizer whose state was counted (``"none"``: none).
        num_proposals: proposals the planner evaluated.
        num_plans: proposals that fitted.
        stats_table: TorchRec's ``EmbeddingStats`` printout of the plan, line by line.
    """

    tables: Tuple[TablePlan, ...]
    ranks: Tuple[RankEstimate, ...]
    world_size: int
    local_world_size: int
    compute_device: str
    hbm_cap_bytes: int
    ddr_cap_bytes: int
    planning_hbm_bytes: int
    planning_ddr_bytes: int
    batch_size: int
    optimizer: str
    num_proposals: int
    num_plans: int
    stats_table: Tuple[str, ...]

    def table(self, name: str) -> TablePlan:
        """The plan of table ``name``."""
        for t in self.tables:
            if t.name == name:
                return t
        raise KeyError(f"no table {name!r}; tables are {[t.name for t in self.tables]}")

    @property
    def max_rank_perf_ms(self) -> float:
        """Largest per-rank total perf: the planner's estimate of the iteration's embedding time."""
        return max(r.perf.total for r in self.ranks)

    @property
    def sum_of_maxima_ms(self) -> float:
        """Sum over perf components of their largest per-rank value (TorchRec's "Sum of Maxima")."""
        parts = ("fwd_compute", "fwd_comms", "bwd_compute", "bwd_comms", "prefetch_compute")
        return sum(max(getattr(r.perf, part) for r in self.ranks) for part in parts)

    @property
    def max_hbm_bytes(self) -> int:
        """Largest per-rank HBM estimate."""
        return max(r.hbm_bytes for r in self.ranks)

    @property
    def max_ddr_bytes(self) -> int:
        """Largest per-rank host-memory estimate."""
        return max(r.ddr_bytes for r in self.ranks)


class PlanDoesNotFit(ValueError):
    """The planner found no placement that fits the topology; the message is the planner's."""


def _item_pooling_factors(
    mean_history_length: float, candidates_per_batch: int, batch_size: int
) -> List[float]:
    # The item table's features are [item_id, target_item_id, candidate_item_id]: a user's events,
    # one held-out target per user (evaluation batches; empty in training, counted to stay on the
    # safe side), and the batch's shared candidates, all in one user's slot: per sample, a share.
    return [float(mean_history_length), 1.0, candidates_per_batch / batch_size]


def _topology(
    world_size: int, local_world_size: int, compute_device: str, hbm_cap_bytes: int, ddr_cap_bytes: int
) -> Topology:
    # The factory's dry-run caps are what the planner sees; constructing Topology directly logs a
    # warning that it must come from the factory.
    trainer = TrainerConfig(
        world_size=world_size,
        local_world_size=local_world_size,
        is_dry_run=True,
        dry_run_hbm_bytes=hbm_cap_bytes,
        dry_run_ddr_bytes=ddr_cap_bytes,
    )
    return TopologyFactory.create_topology(trainer, kernel_config=KernelConfig(compute_device=compute_device))


def _perf(perf: Optional[Perf]) -> PerfEstimate:
    if perf is None:
        return _NO_PERF
    return PerfEstimate(
        fwd_compute=perf.fwd_compute,
        fwd_comms=perf.fwd_comms,
        bwd_compute=perf.bwd_compute,
        bwd_comms=perf.bwd_comms,
        prefetch_compute=perf.prefetch_compute,
        input_dist_comms=perf.input_dist_comms,
    )


def _table_plan(
    option: ShardingOption, features: Sequence[str], constraints: Dict[str, ParameterConstraints]
) -> TablePlan:
    shards = tuple(
        ShardPlacement(
            rank=int(shard.rank),  # type: ignore[arg-type]
            offsets=(int(shard.offset[0]), int(shard.offset[1])),
            sizes=(int(shard.size[0]), int(shard.size[1])),
            hbm_bytes=int(shard.storage.hbm) if shard.storage else 0,
            ddr_bytes=int(shard.storage.ddr) if shard.storage else 0,
            perf=_perf(shard.perf),
        )
        for shard in option.shards
    )
    rows, dim = option.tensor.shape
    return TablePlan(
        name=option.name,
        rows=int(rows),
        dim=int(dim),
        feature_names=tuple(features),
        pooling_factors=tuple(float(p) for p in constraints[option.name].pooling_factors),
        sharding_type=option.sharding_type,
        compute_kernel=option.compute_kernel,
        shards=shards,
    )


def plan_tables(
    num_items: int,
    embedding_dim: int,
    *,
    mean_history_length: float,
    batch_size: int,
    world_size: int,
    local_world_size: Optional[int] = None,
    compute_device: str = "cuda",
    hbm_cap_bytes: int = DEFAULT_HBM_BYTES,
    ddr_cap_bytes: int = DEFAULT_DDR_BYTES,
    side_features: Optional[Mapping[str, int]] = None,
    candidates_per_batch: int = 256,
    optimizer: str = "rowwise_adagrad",
    plan_kind: str = "auto",
    compute_kernels: Optional[Sequence[str]] = None,
    dense_bytes: int = 0,
) -> PlanResult:
    """Plans the sequence tables over a simulated topology, without a process group.

    Args:
        num_items: catalogue size; the item table has ``num_items + 1`` rows (row 0 pads).
        embedding_dim: width of every table.
        mean_history_length: mean events per user in a batch: the pooling factor of ``"item_id"``
            and of every side feature.
        batch_size: users per rank per iteration.
        world_size: ranks (GPUs, or CPU processes).
        local_world_size: ranks per host; ``world_size`` (one host) when ``None``. Must divide
            ``world_size``: the planner prices comms inside a host and across hosts differently.
        compute_device: ``"cuda"`` or ``"cpu"``. On CPU the models use FUSED kernels only, and
            the planner has no HBM: everything is placed in host memory.
        hbm_cap_bytes: HBM per GPU (ignored on CPU); 80 GiB by default.
        ddr_cap_bytes: host memory per rank; 128 GiB by default (TorchRec's default).
        side_features: side-feature name -> rows, as the models take it.
        candidates_per_batch: softmax candidates a batch shares (the reader's uniform negatives;
            ``RetrievalConfig.num_uniform_negatives`` is 256). They ride in the item table's
            ``"candidate_item_id"`` feature, so they count ``candidates_per_batch / batch_size``
            ids per sample.
        optimizer: ``"rowwise_adagrad"`` (one fp32 of state per row), ``"adagrad"`` (one per
            weight), ``"adam"`` (two per weight; GPU only) or ``"none"`` (no state counted).
        plan_kind: ``"auto"`` (the planner chooses), ``"row_wise"`` or ``"table_wise"``, as for
            :func:`~torchrec_hytrec.models.sharding.shard_model`.
        compute_kernels: restrict every table to these ``EmbeddingComputeKernel`` values (e.g.
            ``["fused"]`` for HBM only; ``"dense"``, data parallel's kernel, is always added). On
            CPU it is ignored: the models' CPU restriction to ``"fused"`` applies.
        dense_bytes: memory per rank (HBM; DDR on CPU) to set aside for the model's dense part.
            ``shard_model``'s planner sees the whole model and reserves 6x its dense parameter
            bytes (weights, AdamW state, DDP buffers); these tables alone have none, so pass that
            figure to match it. 0 by default.

    Returns:
        :class:`PlanResult`.

    Raises:
        PlanDoesNotFit: no placement fits; the message is the planner's diagnosis.
        ValueError: an argument is out of range.

    Example::

        >>> from torchrec_hytrec.training.planning import plan_tables
        >>> result = plan_tables(1000, 16, mean_history_length=50, batch_size=32, world_size=2,
        ...                      plan_kind="row_wise", candidates_per_batch=0)
        >>> item = result.table("item")
        >>> item.sharding_type, item.compute_kernel, [s.sizes for s in item.shards]
        ('row_wise', 'fused', [(501, 16), (500, 16)])
        >>> result.max_hbm_bytes < result.hbm_cap_bytes
        True
    """
    if compute_device not in ("cuda", "cpu"):
        raise ValueError(f"compute_device must be 'cuda' or 'cpu', got {compute_device!r}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if optimizer == "adam" and compute_device == "cpu":
        raise ValueError("optimizer 'adam' needs a GPU: FBGEMM's CPU kernels have no Adam")
    if plan_kind not in PLAN_KINDS:
        raise ValueError(f"plan_kind must be one of {PLAN_KINDS}, got {plan_kind!r}")
    local = world_size if local_world_size is None else local_world_size
    if world_size < 1 or local < 1 or world_size % local:
        raise ValueError(f"local_world_size ({local}) must divide world_size ({world_size})")
    if batch_size < 1 or mean_history_length <= 0 or candidates_per_batch < 0 or dense_bytes < 0:
        raise ValueError(
            "batch_size must be >= 1, mean_history_length > 0, candidates_per_batch >= 0 and dense_bytes "
            f">= 0, got {batch_size}, {mean_history_length}, {candidates_per_batch}, {dense_bytes}"
        )
    side = dict(side_features or {})
    tables = sequence_table_configs(
        num_items=num_items,
        embedding_dim=embedding_dim,
        side_features=side,
        extra_item_features=[TARGET_KEY, CANDIDATE_KEY],
        init_std=0.02,  # meta tensors: the initialisation never runs
    )
    module = EmbeddingCollection(tables=tables, device=torch.device("meta"))
    if optimizer != "none":
        # The storage estimator reads the optimizer from the parameter's _optimizer_classes
        # (set here, as before sharding a real model); the sharder's fused params are not read.
        apply_sparse_optimizer(module, OptimizerConfig(sparse_optimizer=optimizer))

    # The constraints shard_model would use (CPU: FUSED kernels), plus the pooling factors.
    constraints = sharding_constraints(module, plan_kind, torch.device(compute_device))
    pooling = {ITEM_TABLE: _item_pooling_factors(mean_history_length, candidates_per_batch, batch_size)}
    for name in side:
        pooling[name] = [float(mean_history_length)]
    for name, constraint in constraints.items():
        kernels = constraint.compute_kernels
        if compute_kernels is not None and compute_device == "cuda":
            # "dense" is data parallel's only kernel (and never chosen for a sharded table next
            # to "fused"): keeping it keeps replicating small side tables possible.
            kernels = list(dict.fromkeys([*compute_kernels, EmbeddingComputeKernel.DENSE.value]))
        constraints[name] = replace(
            constraint, pooling_factors=pooling[name], is_weighted=False, compute_kernels=kernels
        )

    topology = _topology(world_size, local, compute_device, hbm_cap_bytes, ddr_cap_bytes)
    with quiet_torchrec():
        # The planner's default reservation (what shard_model gets): 15% of HBM, the dense part
        # and the KJT buffers. Its dense heuristic sees no dense module here, so it is given one.
        reservation = HeuristicalStorageReservation(
            percentage=0.15, dense_tensor_estimate=dense_bytes or None
        )
        planner = EmbeddingShardingPlanner(
            topology=topology, batch_size=batch_size, constraints=constraints, storage_reservation=reservation
        )
        try:
            planner.plan(module, [EmbeddingCollectionSharder()])
        except PlannerError as error:
            raise PlanDoesNotFit(str(error)) from error
    options = planner.get_selected_options()

    reserved = reservation.last_reserved_topology or topology
    # What the stats printout adds to every rank besides its shards.
    overhead = Storage(0, 0)
    for part in (getattr(reservation, "_dense_storage", None), getattr(reservation, "_kjt_storage", None)):
        if part is not None:
            overhead = overhead + part
    hbm = [overhead.hbm] * world_size
    ddr = [overhead.ddr] * world_size
    perf = [_NO_PERF] * world_size
    features = {t.name: t.feature_names for t in tables}
    table_plans = tuple(_table_plan(option, features[option.name], constraints) for option in options)
    for table in table_plans:
        for shard in table.shards:
            hbm[shard.rank] += shard.hbm_bytes
            ddr[shard.rank] += shard.ddr_bytes
            perf[shard.rank] = perf[shard.rank] + shard.perf
    order = [ITEM_TABLE, *side]
    stats = planner._stats[0]
    return PlanResult(
        tables=tuple(sorted(table_plans, key=lambda t: order.index(t.name))),
        ranks=tuple(RankEstimate(r, hbm[r], ddr[r], perf[r]) for r in range(world_size)),
        world_size=world_size,
        local_world_size=local,
        compute_device=compute_device,
        hbm_cap_bytes=topology.devices[0].storage.hbm,
        ddr_cap_bytes=topology.devices[0].storage.ddr,
        planning_hbm_bytes=reserved.devices[0].storage.hbm,
        planning_ddr_bytes=reserved.devices[0].storage.ddr,
        batch_size=batch_size,
        optimizer=optimizer,
        num_proposals=planner._num_proposals,
        num_plans=planner._num_plans,
        stats_table=tuple(getattr(stats, "_stats_table", ())),
    )


def _gib(n: int) -> str:
    return f"{n / GIB:.3f}"


def _ranks_text(ranks: Sequence[int]) -> str:
    spans: List[str] = []
    start = prev = ranks[0]
    for r in [*ranks[1:], None]:
        if r is not None and r == prev + 1:
            prev = r
            continue
        spans.append(str(start) if start == prev else f"{start}-{prev}")
        if r is not None:
            start = prev = r
    return ",".join(spans)


def _shards_text(table: TablePlan) -> str:
    counts: Dict[Tuple[int, int], int] = {}
    for shard in table.shards:
        counts[shard.sizes] = counts.get(shard.sizes, 0) + 1
    kinds = ", ".join(f"{n} x [{r:,} x {c}]" for (r, c), n in counts.items())
    return f"{len(table.shards)} shard{'s' if len(table.shards) > 1 else ''}: {kinds}"


def format_plan(result: PlanResult, *, with_stats: bool = False) -> str:
    """Human-readable summary of :func:`plan_tables`'s result.

    Consecutive ranks with the same estimates share one line.

    Args:
        result: from :func:`plan_tables`.
        with_stats: append TorchRec's ``EmbeddingStats`` table (about 300 columns wide).

    Returns:
        The text, without a trailing newline.

    Example::

        >>> from torchrec_hytrec.training.planning import format_plan, plan_tables
        >>> text = format_plan(plan_tables(1000, 16, mean_history_length=50, batch_size=32,
        ...                                world_size=2, plan_kind="row_wise"))
        >>> print(text.splitlines()[0])
        Sharding plan (TorchRec EmbeddingShardingPlanner estimates, not measurements)
    """
    hosts = result.world_size // result.local_world_size
    lines = ["Sharding plan (TorchRec EmbeddingShardingPlanner estimates, not measurements)"]
    if result.compute_device == "cuda":
        memory = (
            f"HBM {result.hbm_cap_bytes / GIB:.1f} GiB/rank ({result.planning_hbm_bytes / GIB:.1f} GiB "
            f"plannable), DDR {result.ddr_cap_bytes / GIB:.1f} GiB/rank"
        )
    else:
        memory = (
            f"DDR {result.ddr_cap_bytes / GIB:.1f} GiB/rank "
            f"({result.planning_ddr_bytes / GIB:.1f} GiB plannable)"
        )
    lines.append(
        f"topology: {result.world_size} {result.compute_device} ranks "
        f"({hosts} host{'s' if hosts > 1 else ''} x {result.local_world_size}), {memory}"
    )
    plural = "s" if result.num_proposals != 1 else ""
    lines.append(
        f"batch {result.batch_size}/rank, table optimizer {result.optimizer}, "
        f"{result.num_proposals} proposal{plural} ({result.num_plans} fitted)"
    )
    lines.append("")
    lines.append("tables:")
    for t in result.tables:
        features = ", ".join(f"{f} {p:g}" for f, p in zip(t.feature_names, t.pooling_factors))
        lines.append(f"  {t.name}: {t.rows:,} x {t.dim}, pooling factors (ids/sample): {features}")
        lines.append(
            f"    {t.sharding_type} / {t.compute_kernel} on ranks {_ranks_text(t.ranks)}; {_shards_text(t)}"
        )
        lines.append(
            f"    HBM {_gib(t.hbm_bytes)} GiB, DDR {_gib(t.ddr_bytes)} GiB (all shards); "
            f"perf {t.perf_ms:.3f} ms (sum over shards)"
        )
    lines.append("")
    lines.append("per rank (GiB; ms per iteration):")
    header = ("ranks", "HBM", "DDR", "fwd_comp", "fwd_comms", "bwd_comp", "bwd_comms", "prefetch", "total")
    rows: List[Tuple[List[int], Tuple[str, ...]]] = []
    for r in result.ranks:
        p = r.perf
        times = (p.fwd_compute, p.fwd_comms, p.bwd_compute, p.bwd_comms, p.prefetch_compute, p.total)
        cells = (_gib(r.hbm_bytes), _gib(r.ddr_bytes), *(f"{v:.3f}" for v in times))
        if rows and rows[-1][1] == cells and rows[-1][0][-1] == r.rank - 1:
            rows[-1][0].append(r.rank)
        else:
            rows.append(([r.rank], cells))
    table = [header] + [(_ranks_text(ranks), *cells) for ranks, cells in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        lines.append("  " + "  ".join(cell.rjust(w) for cell, w in zip(row, widths)))
    lines.append("")
    memory_caps = [("DDR", result.max_ddr_bytes, result.ddr_cap_bytes)]
    if result.compute_device == "cuda":
        memory_caps.insert(0, ("HBM", result.max_hbm_bytes, result.hbm_cap_bytes))
    lines.append(
        "; ".join(
            f"max {kind}/rank {_gib(used)} GiB of {cap / GIB:.1f} GiB ({100 * used / cap:.1f}%)"
            for kind, used, cap in memory_caps
        )
    )
    lines.append(
        f"max per-rank perf {result.max_rank_perf_ms:.3f} ms; sum of maxima {result.sum_of_maxima_ms:.3f} ms"
    )
    if with_stats and result.stats_table:
        lines.append("")
        lines.extend(line.rstrip() for line in result.stats_table)
    return "\n".join(lines)


def _side_feature(text: str) -> Tuple[str, int]:
    name, sep, rows = text.partition("=")
    if not sep or not name or not rows.isdigit():
        raise argparse.ArgumentTypeError(f"expected NAME=ROWS, got {text!r}")
    return name, int(rows)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m torchrec_hytrec.training.planning",
        description=(
            "Dry-run TorchRec sharding plan of HyTRec's sequence tables for a topology, without a process "
            "group. Every number is the planner's estimate, not a measurement."
        ),
    )
    parser.add_argument(
        "--num-items", type=int, required=True, help="catalogue size (the table has one more row)"
    )
    parser.add_argument("--dim", type=int, required=True, help="embedding dimension of every table")
    parser.add_argument(
        "--mean-history-length",
        type=float,
        required=True,
        help="mean events per user: the pooling factor (ids per sample) of item_id and the side features",
    )
    parser.add_argument("--batch-size", type=int, required=True, help="users per rank per iteration")
    parser.add_argument(
        "--world-size", type=int, required=True, help="number of ranks (GPUs or CPU processes)"
    )
    parser.add_argument(
        "--local-world-size", type=int, default=None, help="ranks per host (default: all ranks on one host)"
    )
    parser.add_argument("--compute-device", choices=("cuda", "cpu"), default="cuda", help="default: cuda")
    parser.add_argument(
        "--hbm-gib", type=float, default=DEFAULT_HBM_BYTES / GIB, help="HBM per GPU in GiB (default: 80)"
    )
    parser.add_argument(
        "--ddr-gib",
        type=float,
        default=DEFAULT_DDR_BYTES / GIB,
        help="host memory per rank in GiB (default: 128)",
    )
    parser.add_argument(
        "--dense-gib",
        type=float,
        default=0.0,
        help="memory per rank to reserve for the model's dense part, in GiB (default: 0; see plan_tables)",
    )
    parser.add_argument(
        "--side-feature",
        type=_side_feature,
        action="append",
        default=[],
        metavar="NAME=ROWS",
        help="a side-feature table (repeatable)",
    )
    parser.add_argument(
        "--candidates-per-batch",
        type=int,
        default=256,
        help="softmax candidates shared by a batch, looked up in the item table (default: 256)",
    )
    parser.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default="rowwise_adagrad",
        help="fused table optimizer whose state is counted (default: rowwise_adagrad)",
    )
    parser.add_argument(
        "--plan-kind", choices=PLAN_KINDS, default="auto", help="as for shard_model (default: auto)"
    )
    parser.add_argument(
        "--compute-kernels",
        default=None,
        help="comma-separated kernels to allow on GPU, e.g. fused (HBM only) or fused,fused_uvm_caching",
    )
    parser.add_argument("--stats", action="store_true", help="also print TorchRec's EmbeddingStats table")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line: prints the plan; returns 0, or 1 when it does not fit.

    Args:
        argv: arguments without the program name; ``sys.argv[1:]`` when ``None``.

    Example::

        >>> from torchrec_hytrec.training.planning import main
        >>> main(["--num-items", "1000", "--dim", "16", "--world-size", "2", "--batch-size", "8",
        ...       "--mean-history-length", "20"])  # doctest: +ELLIPSIS
        Sharding plan (TorchRec EmbeddingShardingPlanner estimates, not measurements)
        ...
        0
    """
    args = _parser().parse_args(argv)
    try:
        result = plan_tables(
            args.num_items,
            args.dim,
            mean_history_length=args.mean_history_length,
            batch_size=args.batch_size,
            world_size=args.world_size,
            local_world_size=args.local_world_size,
            compute_device=args.compute_device,
            hbm_cap_bytes=int(args.hbm_gib * GIB),
            ddr_cap_bytes=int(args.ddr_gib * GIB),
            side_features=dict(args.side_feature),
            candidates_per_batch=args.candidates_per_batch,
            optimizer=args.optimizer,
            plan_kind=args.plan_kind,
            compute_kernels=args.compute_kernels.split(",") if args.compute_kernels else None,
            dense_bytes=int(args.dense_gib * GIB),
        )
    except PlanDoesNotFit as error:
        print(f"No plan fits this topology. The planner says:\n{error}")
        return 1
    print(format_plan(result, with_stats=args.stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
