"""Full-catalogue evaluation of retrieval models (leave-one-out): HR@K, NDCG@K, MRR.

A user's *rank* is the number of catalogue items (padding id 0, the target itself and, with
``exclude_seen``, the items of the user's history excluded) that score strictly higher than the
held-out target; from it HR@K = [rank < K], NDCG@K = [rank < K] / log2(rank + 2) and
MRR = 1 / (rank + 1). Metrics are reported overall and by history-length bucket.

With the item table row-wise (or table-wise) sharded by ``DistributedModelParallel``, no rank
holds the catalogue: every rank gathers all ranks' queries, scores them against its own rows and
counts the items above each target; the counts are summed across ranks, so the ranks (and every
metric) equal those of the unsharded table. Walking the table is ``models/item_table.py``, shared
with top-K serving (``models/serving.py``).

Public API:

- :class:`RetrievalMetrics`: the all-reducible accumulator.
- :class:`RetrievalEvaluator` ``(model, exclude_seen=False)``: ``update(outputs)`` with the
  outputs of ``HyTRecRetrievalTrain`` in evaluation mode (from a plain loop or from
  ``TrainPipelineSparseDist.progress``), then ``compute()``.
- the loop over an evaluation set is :func:`torchrec_hytrec.training.evaluation.evaluate_retrieval`.
- :func:`catalogue_ranks`: the ranks themselves, for any query and item rows.

Under ``DistributedModelParallel`` every rank must call ``update`` (and ``compute``) the same
number of times: they are collective.
"""

import copy
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel

from torchrec_hytrec.models.item_table import all_gather_rows, item_collection, item_table_shards, row_blocks
from torchrec_hytrec.models.retrieval import RetrievalTrainOutput

HR_KS: Tuple[int, ...] = (1, 10, 50)
NDCG_KS: Tuple[int, ...] = (10, 50)
LENGTH_BOUNDS: Tuple[int, ...] = (100, 1000, 5000)


def _short(n: int) -> str:
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


class RetrievalMetrics:
    """Sums of per-user ranking metrics by history-length bucket.

    The state is one float64 tensor of sums, so merging ranks is one ``all_reduce``.

    Args:
        hr_ks: cut-offs of HR@K.
        ndcg_ks: cut-offs of NDCG@K.
        length_bounds: history-length bucket bounds; ``(100, 1000, 5000)`` gives
            ``<100``, ``100-1k``, ``1k-5k``, ``>=5k``.
        device: where the sums live (the process group's device).

    Example::

        metrics = RetrievalMetrics()
        metrics.update(ranks=torch.tensor([0, 12]), history_lengths=torch.tensor([30, 2000]))
        metrics.compute()["hr@10"]  # 0.5
    """

    def __init__(
        self,
        hr_ks: Sequence[int] = HR_KS,
        ndcg_ks: Sequence[int] = NDCG_KS,
        length_bounds: Sequence[int] = LENGTH_BOUNDS,
        device: Optional[torch.device] = None,
    ) -> None:
        self.hr_ks = tuple(hr_ks)
        self.ndcg_ks = tuple(ndcg_ks)
        self.length_bounds = torch.tensor(length_bounds, dtype=torch.long, device=device)
        edges = [0, *length_bounds]
        self.bucket_names = [
            f"len{_short(lo)}-{_short(hi)}" if lo else f"len<{_short(hi)}" for lo, hi in zip(edges, edges[1:])
        ] + [f"len>={_short(edges[-1])}"]
        self.metric_names = [f"hr@{k}" for k in self.hr_ks] + [f"ndcg@{k}" for k in self.ndcg_ks] + ["mrr"]
        # Column 0 counts users; the others sum the metrics.
        self.sums = torch.zeros(
            len(self.bucket_names), 1 + len(self.metric_names), dtype=torch.float64, device=device
        )

    def update(
        self, ranks: torch.Tensor, history_lengths: torch.Tensor, weights: Optional[torch.Tensor] = None
    ) -> None:
        """Adds users.

        Args:
            ranks: ``[B]`` 0-based rank of each user's target.
            history_lengths: ``[B]`` events in each user's history.
            weights: optional ``[B]`` weight of each user (0 for the users of padding batches).
        """
        ranks = ranks.to(self.sums.device, torch.float64)
        columns = [torch.ones_like(ranks)]
        columns += [(ranks < k).double() for k in self.hr_ks]
        columns += [(ranks < k).double() / torch.log2(ranks + 2) for k in self.ndcg_ks]
        columns.append(1.0 / (ranks + 1))
        rows = torch.stack(columns, dim=1)
        if weights is not None:
            rows = rows * weights.to(rows)[:, None]
        bucket = torch.bucketize(history_lengths.to(self.sums.device), self.length_bounds, right=True)
        self.sums.index_add_(0, bucket, rows)

    def all_reduce(self, process_group: Optional[dist.ProcessGroup] = None) -> None:
        """Sums the state over the ranks of ``process_group``, in place."""
        dist.all_reduce(self.sums, group=process_group)

    def reset(self) -> None:
        self.sums.zero_()

    def clone(self) -> "RetrievalMetrics":
        """An independent copy (e.g. to reduce across ranks while this one keeps accumulating)."""
        out = copy.copy(self)
        out.sums = self.sums.clone()
        return out

    def compute(self) -> Dict[str, float]:
        """Means overall (``"hr@10"``) and per non-empty bucket (``"hr@10/len<100"``), and counts."""
        out: Dict[str, float] = {}

        def add(row: torch.Tensor, suffix: str) -> None:
            count = float(row[0])
            out["count" + suffix] = count
            if count > 0:
                for name, total in zip(self.metric_names, row[1:].tolist()):
                    out[name + suffix] = total / count

        add(self.sums.sum(0), "")
        for name, row in zip(self.bucket_names, self.sums):
            add(row, "/" + name)
        return out


def catalogue_ranks(
    *,
    query: torch.Tensor,
    target_ids: torch.Tensor,
    target_score: torch.Tensor,
    shards: List[Tuple[int, torch.Tensor]],
    seen_ids: Optional[torch.Tensor] = None,
    seen_offsets: Optional[torch.Tensor] = None,
    process_group: Optional[dist.ProcessGroup] = None,
) -> torch.Tensor:
    """0-based rank of each target among all catalogue items.

    Args:
        query: ``[B, d]`` user states of this rank.
        target_ids: ``[B]`` held-out items.
        target_score: ``[B]`` ``query . target``.
        shards: this rank's item rows, from
            :func:`~torchrec_hytrec.models.item_table.item_table_shards`.
        seen_ids: ``[S]`` jagged history items to exclude (``None``: exclude nothing).
        seen_offsets: ``[B + 1]`` offsets of ``seen_ids``.
        process_group: the group the table is split over; ``None`` when ``shards`` is the
            whole table. Collective when given.

    Returns:
        ``[B]`` int64 ranks of this rank's users.
    """
    batch = query.shape[0]
    seen_lengths = (
        seen_offsets[1:] - seen_offsets[:-1] if seen_offsets is not None else torch.zeros_like(target_ids)
    )
    # One float64 row per user: exact for fp32 states and for ids below 2**53.
    rows = torch.cat(
        [
            query.double(),
            target_score.double()[:, None],
            target_ids.double()[:, None],
            seen_lengths.double()[:, None],
        ],
        dim=1,
    )
    seen = seen_ids if seen_ids is not None else target_ids.new_zeros(0)
    first = 0
    if process_group is not None:
        rows, counts = all_gather_rows(rows, process_group)
        seen, _ = all_gather_rows(seen, process_group)
        first = sum(counts[: dist.get_rank(process_group)])
    queries = rows[:, :-3].to(query.dtype)
    scores_at_target, targets = rows[:, -3].to(query.dtype), rows[:, -2].long()
    seen_user = torch.repeat_interleave(torch.arange(rows.shape[0], device=rows.device), rows[:, -1].long())
    keep = seen != targets[seen_user]
    seen, seen_user = seen[keep], seen_user[keep]

    above = torch.zeros(rows.shape[0], dtype=torch.long, device=rows.device)
    for row0, weight in row_blocks(shards):
        item = torch.arange(row0, row0 + weight.shape[0], device=rows.device)
        greater = (queries @ weight.t().to(queries.dtype)) > scores_at_target[:, None]
        greater &= (item[None, :] != targets[:, None]) & (item[None, :] != 0)
        inside = (seen >= row0) & (seen < row0 + weight.shape[0])
        greater[seen_user[inside], seen[inside] - row0] = False
        above += greater.sum(1)
    if process_group is not None:
        dist.all_reduce(above, group=process_group)
    return above[first : first + batch]


class RetrievalEvaluator:
    """Ranks held-out targets against the full catalogue and accumulates :class:`RetrievalMetrics`.

    Args:
        model: ``HyTRecRetrieval`` or ``HyTRecRetrievalTrain``, possibly inside
            ``DistributedModelParallel``, or the item collection itself.
        exclude_seen: do not rank items of the user's history (the target itself always counts).
        metrics: the accumulator (default cut-offs and buckets when ``None``).
        process_group: group of the data-parallel ranks; defaults to the world under
            ``DistributedModelParallel`` and to none (single process) otherwise.

    Example::

        evaluator = RetrievalEvaluator(model, exclude_seen=True)
        model.eval()
        with torch.no_grad():
            for batch in eval_batches:
                _, outputs = model(batch)
                evaluator.update(outputs)
        print(evaluator.compute()["ndcg@10"])
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        exclude_seen: bool = False,
        metrics: Optional[RetrievalMetrics] = None,
        process_group: Optional[dist.ProcessGroup] = None,
    ) -> None:
        self._collection = item_collection(model)
        self._exclude_seen = exclude_seen
        if process_group is None and isinstance(model, DistributedModelParallel):
            process_group = dist.GroupMember.WORLD
        self._group = process_group
        self.metrics = metrics if metrics is not None else RetrievalMetrics()

    def update(self, outputs: RetrievalTrainOutput) -> torch.Tensor:
        """Ranks one evaluation batch; returns the ``[B]`` ranks of its users.

        Args:
            outputs: ``HyTRecRetrievalTrain``'s outputs on an evaluation batch (evaluation mode).
        """
        shards, sharded = item_table_shards(self._collection)
        seen_offsets = torch.cat([outputs.seen_lengths.new_zeros(1), outputs.seen_lengths.cumsum(0)])
        ranks = catalogue_ranks(
            query=outputs.query,
            target_ids=outputs.positive_ids,
            target_score=outputs.positive_scores,
            shards=shards,
            seen_ids=outputs.seen_ids if self._exclude_seen else None,
            seen_offsets=seen_offsets if self._exclude_seen else None,
            process_group=self._group if sharded else None,
        )
        self.metrics.update(ranks, outputs.history_lengths, outputs.weights)
        return ranks

    def compute(self) -> Dict[str, float]:
        """Metrics over every rank's users so far (collective under a process group)."""
        if self._group is None:
            return self.metrics.compute()
        total = self.metrics.clone()
        total.all_reduce(self._group)
        return total.compute()
