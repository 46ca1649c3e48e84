"""Retrieval evaluation: the one loop that ranks every held-out target against the catalogue, next
to a popularity baseline on the same users."""

import math
from typing import Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

from torchrec_hytrec.data.batch import SequenceBatch
from torchrec_hytrec.data.reader import SequenceReader
from torchrec_hytrec.models.evaluation import RetrievalEvaluator, RetrievalMetrics
from torchrec_hytrec.models.retrieval import RetrievalTrainOutput
from torchrec_hytrec.training.loop import evaluation_outputs

PROTOCOLS = ("all", "unseen")


class RetrievalEvaluation(NamedTuple):
    """What :func:`evaluate_retrieval` measured.

    Attributes:
        overall: the overall figures (with the popularity baseline's, and ``"loss"``, the weighted
            mean loss of this rank's batches).
        detail: every figure of the model by history-length bucket too (``"hr@10/len<100"``; the
            baseline's as ``"pop_hr@10/..."``).
        per_user: with ``per_user=True``, every rank's evaluated users in evaluation order
            (rank 0's first): ``positive_ids``, ``history_lengths`` and the 0-based ``ranks``
            of each protocol (``unseen_ranks``); ``None`` otherwise.
    """

    overall: Dict[str, float]
    detail: Dict[str, float]
    per_user: Optional[Dict[str, np.ndarray]]


def item_popularity(reader: SequenceReader, num_items: int) -> torch.Tensor:
    """``[num_items + 1]`` event counts of every item in all ranks' inputs of ``reader``'s split."""
    counts = torch.zeros(num_items + 1, dtype=torch.int64)
    for batch in reader:
        if float(batch.weights.sum()) > 0:  # not a padding batch
            counts += torch.bincount(batch.item_ids, minlength=num_items + 1)
    if dist.is_initialized():
        dist.all_reduce(counts)
    return counts


def popularity_ranks(counts: torch.Tensor) -> torch.Tensor:
    """``[num_items + 1]`` 0-based rank of each item when recommending by popularity (id breaks ties)."""
    order = torch.argsort(-counts[1:], stable=True) + 1
    ranks = torch.empty_like(counts)
    ranks[order] = torch.arange(order.numel())
    return ranks


def _plain_outputs(model: nn.Module, batches: Iterable[SequenceBatch]) -> Iterator[RetrievalTrainOutput]:
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                yield model(batch)[1]
    finally:
        model.train()


def evaluate_retrieval(
    model: nn.Module,
    batches: Iterable[SequenceBatch],
    *,
    pipeline: Optional[TrainPipelineSparseDist] = None,
    ks: Sequence[int] = (10, 50),
    protocols: Sequence[str] = ("all",),
    popularity: Optional[torch.Tensor] = None,
    device: Optional[torch.device] = None,
    per_user: bool = False,
) -> RetrievalEvaluation:
    """HR@K / NDCG@K / MRR of ``model`` over evaluation ``batches``, every rank's users together.

    Args:
        model: ``HyTRecRetrievalTrain``, possibly inside ``DistributedModelParallel``.
        batches: evaluation batches (the same count on every rank under DMP).
        pipeline: run the batches through this ``TrainPipelineSparseDist`` (over ``model``);
            ``None`` calls the model directly.
        ks: cut-offs of HR and NDCG.
        protocols: ``"all"`` ranks the target among every item; ``"unseen"`` among the items the
            user has not interacted with (the protocol of eSASRec and most sampled-softmax papers).
            Both come from one pass; ``"unseen"`` figures are prefixed ``unseen_``.
        popularity: optional ``[num_items + 1]`` popularity ranks (:func:`popularity_ranks`); adds
            ``pop_hr@K`` of recommending by popularity to the same users.
        device: where the metric sums live (the process group's device).
        per_user: also return every user's rank (gathered from all ranks).
    """
    unknown = sorted(set(protocols) - set(PROTOCOLS))
    if unknown or not protocols:
        raise ValueError(
            f"evaluation protocols must be a non-empty subset of {list(PROTOCOLS)}, got {list(protocols)}"
        )
    evaluators = {
        protocol: RetrievalEvaluator(
            model,
            exclude_seen=protocol == "unseen",
            metrics=RetrievalMetrics(hr_ks=ks, ndcg_ks=ks, device=device),
        )
        for protocol in protocols
    }
    baseline = RetrievalMetrics(hr_ks=ks, ndcg_ks=ks, device=device)
    outputs = (
        _plain_outputs(model, batches) if pipeline is None else evaluation_outputs(pipeline, model, batches)
    )
    loss_sum = weight_sum = 0.0
    names = ["positive_ids", "history_lengths"] + [_prefix(p) + "ranks" for p in protocols]
    users: Dict[str, List[torch.Tensor]] = {name: [] for name in names}
    for out in outputs:
        real = out.weights > 0  # padding rows and batches are not users
        for protocol, evaluator in evaluators.items():
            ranks = evaluator.update(out)
            if per_user:
                users[_prefix(protocol) + "ranks"].append(ranks[real].cpu())
        if per_user:
            users["positive_ids"].append(out.positive_ids[real].cpu())
            users["history_lengths"].append(out.history_lengths[real].cpu())
        weight = float(out.weights.sum())
        loss_sum, weight_sum = loss_sum + float(out.loss) * weight, weight_sum + weight
        if popularity is not None:
            baseline.update(
                popularity.to(out.positive_ids.device)[out.positive_ids], out.history_lengths, out.weights
            )
    overall: Dict[str, float] = {}
    detail: Dict[str, float] = {}
    for protocol, evaluator in evaluators.items():
        prefix = _prefix(protocol)
        figures = evaluator.compute()
        detail.update({prefix + name: value for name, value in figures.items()})
        # A split without users (tiny datasets) reports NaN rather than failing the run.
        overall.update(
            {prefix + name: figures.get(name, math.nan) for name in evaluator.metrics.metric_names}
        )
    overall["loss"] = loss_sum / weight_sum if weight_sum else math.nan
    if popularity is not None:
        if dist.is_initialized():
            baseline.all_reduce()
        pop = baseline.compute()
        overall.update({f"pop_hr@{k}": pop.get(f"hr@{k}", math.nan) for k in ks})
        detail = {**detail, **{f"pop_{name}": value for name, value in pop.items() if name.startswith("hr@")}}
    return RetrievalEvaluation(overall, detail, _gathered(users) if per_user else None)


def _prefix(protocol: str) -> str:
    return "" if protocol == "all" else f"{protocol}_"


def _gathered(users: Dict[str, List[torch.Tensor]]) -> Dict[str, np.ndarray]:
    """This rank's per-user columns, concatenated, then every rank's in rank order."""
    mine = {
        name: torch.cat(parts).long().numpy() if parts else np.zeros(0, np.int64)
        for name, parts in users.items()
    }
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return mine
    every: List[Optional[Dict[str, np.ndarray]]] = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return {name: np.concatenate([part[name] for part in every]) for name in mine}
