"""DLRM-style ranking with a HyTRec behaviour-sequence arch.

Split the way TorchRec's ``DLRM`` / ``DLRMTrain`` are:

- :class:`HyTRecRanker` ``(config, encoder, device=None)`` maps a
  :class:`~torchrec_hytrec.data.ranking.RankingBatch` to logits ``[B]``. It composes TorchRec's own
  DLRM archs: ``SparseArch`` over an ``EmbeddingBagCollection`` (pooled features, ``[B, F, d]``),
  ``DenseArch`` (``[B, d]``), the sequence ``EmbeddingCollection`` (history, timestamps and
  candidates in one KJT, looked up in one call) and :class:`SequenceArch`, which reads
  ``HyTRecEncoder`` at the request time and pairs each row's user state with its candidate's item
  row (``[B, 2, d]``). ``InteractionArch`` takes pairwise dot products of all ``F + 3`` vectors (so
  the user-candidate affinity is one of its features) and ``OverArch`` maps them to a logit.
- :class:`HyTRecRankerTrain` adds the weighted BCE loss:
  ``forward(batch) -> (loss, (loss, logits, labels, weights))``, all detached, as ``DLRMTrain``.
- :func:`ranking_metric_module`: AUC and NE through ``torchrec.metrics``.

Every table input is a batch field and everything after the lookups that needs Python runs in
:class:`SequenceArch`, a module without tables, so ``TrainPipelineSparseDist`` pipelines both
collections.
"""

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.metrics.auc import AUCMetric
from torchrec.metrics.metric_module import RecMetricModule
from torchrec.metrics.metrics_config import RecTaskInfo
from torchrec.metrics.ne import NEMetric
from torchrec.metrics.rec_metric import RecMetricList
from torchrec.models.dlrm import DenseArch, InteractionArch, OverArch, SparseArch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from torchrec_hytrec.data.batch import CANDIDATE_KEY, ITEM_KEY, TIMESTAMP_KEY
from torchrec_hytrec.data.ranking import RankingBatch
from torchrec_hytrec.models.embeddings import (
    check_sequence_collection,
    event_embeddings,
)
from torchrec_hytrec.models.embeddings import sequence_embedding_collection as build_sequence_collection
from torchrec_hytrec.models.losses import weighted_mean

TASK = RecTaskInfo(name="ctr", label_name="label", prediction_name="prediction", weight_name="weight")


@dataclass
class RankerConfig:
    """Settings of :class:`HyTRecRanker`.

    Args:
        num_items: item ids are ``1..num_items`` (0 is padding).
        embedding_dim: width of every table, of the dense arch output and of the encoder.
        dense_in_features: width of ``RankingBatch.dense_features``.
        sparse_features: pooled feature key -> table rows (at least one).
        side_features: sequence side-feature key -> table rows (added to item embeddings).
        dense_arch_layer_sizes: MLP widths of the dense arch; the last must be ``embedding_dim``
            (``None``: ``[2 * d, d]``).
        over_arch_layer_sizes: MLP widths of the over arch; the last must be 1.
        embedding_init_std: initial row standard deviation (``None``: ``embedding_dim ** -0.5``).

    Example::

        >>> from torchrec_hytrec import RankerConfig
        >>> config = RankerConfig(num_items=2000, embedding_dim=32, dense_in_features=2,
        ...                       sparse_features={"user_bucket": 1000})
        >>> config.dense_arch_layer_sizes
        [64, 32]
    """

    num_items: int
    embedding_dim: int
    dense_in_features: int
    sparse_features: Dict[str, int]
    side_features: Dict[str, int] = field(default_factory=dict)
    dense_arch_layer_sizes: Optional[List[int]] = None
    over_arch_layer_sizes: List[int] = field(default_factory=lambda: [64, 1])
    embedding_init_std: Optional[float] = None

    def __post_init__(self) -> None:
        if not self.sparse_features:
            raise ValueError("RankerConfig.sparse_features needs at least one pooled feature")
        if self.dense_arch_layer_sizes is None:
            self.dense_arch_layer_sizes = [2 * self.embedding_dim, self.embedding_dim]
        if self.dense_arch_layer_sizes[-1] != self.embedding_dim:
            raise ValueError(
                f"dense_arch_layer_sizes must end with embedding_dim {self.embedding_dim}, "
                f"got {self.dense_arch_layer_sizes}"
            )
        if self.over_arch_layer_sizes[-1] != 1:
            raise ValueError(f"over_arch_layer_sizes must end with 1, got {self.over_arch_layer_sizes}")

    @property
    def init_std(self) -> float:
        return self.embedding_init_std or self.embedding_dim**-0.5


class SequenceArch(nn.Module):
    """Reads each history with an encoder at its request time, against each row's candidate.

    It holds no table (the lookup happens before it), so TorchRec's pipeline tracer treats it as a
    leaf.

    Args:
        encoder: ``HyTRecEncoder`` (``forward_last(values, offsets, timestamps, request_time)``).
        side_features: side-feature keys of the history, added to the item rows.

    Example::

        >>> from torchrec_hytrec import HyTRecConfig, HyTRecEncoder
        >>> from torchrec_hytrec.models.ranking import SequenceArch
        >>> arch = SequenceArch(HyTRecEncoder(HyTRecConfig.hytrec(embedding_dim=8, num_heads=2)), [])
        >>> arch.encoder.config.embedding_dim
        8
    """

    def __init__(self, encoder: nn.Module, side_features: List[str]) -> None:
        super().__init__()
        self.encoder = encoder
        self._side_features = list(side_features)

    def forward(
        self, embeddings: Dict[str, JaggedTensor], sequence: KeyedJaggedTensor, request_time: torch.Tensor
    ) -> torch.Tensor:
        """
        Args:
            embeddings: the sequence collection's output for ``sequence``.
            sequence: the batch's history KJT (``U`` non-empty histories).
            request_time: ``[U]`` time each history is read at.

        Returns:
            ``[B, 2, d]``: the encoder's state of the row's history at its request time, and the
            candidate's item row.
        """
        events = event_embeddings(embeddings, self._side_features)
        user = self.encoder.forward_last(
            events, sequence[ITEM_KEY].offsets(), sequence[TIMESTAMP_KEY].values(), request_time=request_time
        )
        candidates = embeddings[CANDIDATE_KEY]
        rows_per_user = candidates.lengths()
        row_user = torch.repeat_interleave(
            torch.arange(rows_per_user.numel(), device=user.device),
            rows_per_user,
            output_size=candidates.values().shape[0],
        )
        return torch.stack([user[row_user], candidates.values()], dim=1)


class HyTRecRanker(nn.Module):
    """DLRM-style CTR model whose behaviour-sequence arch is a HyTRec encoder.

    Args:
        config: tables and arch sizes.
        encoder: ``HyTRecEncoder`` with ``config.embedding_dim``.
        sequence_embedding_collection: the history/candidate tables, injected (built from
            :func:`~torchrec_hytrec.models.embeddings.sequence_table_configs` when ``None``); it must
            look up ``"item_id"``, ``"candidate_item_id"`` and the side features.
        device: where tables and dense layers are built (``meta`` defers tables to sharding and
            builds dense layers on CPU).

    Example::

        >>> import torch
        >>> from torchrec_hytrec import HyTRecConfig, HyTRecEncoder, HyTRecRanker, RankerConfig
        >>> ranker = HyTRecRanker(
        ...     RankerConfig(num_items=2000, embedding_dim=16, dense_in_features=2,
        ...                  sparse_features={"user_bucket": 1000}),
        ...     HyTRecEncoder(HyTRecConfig.hytrec(embedding_dim=16, num_heads=2)),
        ...     device=torch.device("meta"),
        ... )
        >>> [name for name, _ in ranker.named_children()]  # doctest: +NORMALIZE_WHITESPACE
        ['sparse_arch', 'dense_arch', 'sequence_embedding_collection', 'sequence_arch',
         'inter_arch', 'over_arch']
    """

    def __init__(
        self,
        config: RankerConfig,
        encoder: nn.Module,
        sequence_embedding_collection: Optional[EmbeddingCollection] = None,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        encoder_dim = getattr(getattr(encoder, "config", None), "embedding_dim", config.embedding_dim)
        if encoder_dim != config.embedding_dim:
            raise ValueError(
                f"encoder embedding_dim {encoder_dim} != RankerConfig.embedding_dim {config.embedding_dim}"
            )
        self.config = config
        d = config.embedding_dim
        bound = 3**0.5 * config.init_std
        bags = [
            EmbeddingBagConfig(
                name=key,
                embedding_dim=d,
                num_embeddings=rows,
                feature_names=[key],
                weight_init_min=-bound,
                weight_init_max=bound,
            )
            for key, rows in config.sparse_features.items()
        ]
        self.sparse_arch = SparseArch(EmbeddingBagCollection(tables=bags, device=device))
        dense_device = None if device is None or device.type == "meta" else device
        self.dense_arch = DenseArch(
            config.dense_in_features, config.dense_arch_layer_sizes, device=dense_device
        )
        side = list(config.side_features)
        if sequence_embedding_collection is None:
            sequence_embedding_collection = build_sequence_collection(
                num_items=config.num_items,
                embedding_dim=d,
                side_features=config.side_features,
                extra_item_features=[CANDIDATE_KEY],
                init_std=config.init_std,
                device=device,
            )
        check_sequence_collection(sequence_embedding_collection, d, [ITEM_KEY, CANDIDATE_KEY, *side])
        self.sequence_embedding_collection = sequence_embedding_collection
        self.sequence_arch = SequenceArch(encoder, side)
        num_vectors = len(bags) + 2  # pooled features, user state, candidate
        self.inter_arch = InteractionArch(num_sparse_features=num_vectors)
        over_in = d + (num_vectors + 1) * num_vectors // 2
        self.over_arch = OverArch(over_in, config.over_arch_layer_sizes, device=dense_device)

    def forward(self, batch: RankingBatch) -> torch.Tensor:
        """
        Args:
            batch: the ranking rows.

        Returns:
            ``[B]`` logits.
        """
        dense = self.dense_arch(batch.dense_features)
        pooled = self.sparse_arch(batch.sparse_features)
        embeddings = self.sequence_embedding_collection(batch.sequence)
        sequence = self.sequence_arch(embeddings, batch.sequence, batch.request_timestamps)
        interactions = self.inter_arch(dense, torch.cat([pooled, sequence], dim=1))
        return self.over_arch(interactions).squeeze(-1)


class WeightedBCELoss(nn.Module):
    """Mean BCE with logits, weighted per row (zero-weight padding rows count for nothing).

    A module rather than a function: TorchRec's pipeline tracer treats it as a leaf, so the
    weighting runs as ordinary Python.

    Example::

        >>> import torch
        >>> from torchrec_hytrec.models.ranking import WeightedBCELoss
        >>> logits, labels = torch.tensor([0.0, 9.0]), torch.tensor([1.0, 0.0])
        >>> weights = torch.tensor([1.0, 0.0])
        >>> loss = WeightedBCELoss()(logits, labels, weights)
        >>> round(float(loss), 4)  # log 2: the second row has no weight
        0.6931
    """

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        per_row = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
        return weighted_mean(per_row, weights)


class HyTRecRankerTrain(nn.Module):
    """:class:`HyTRecRanker` plus the weighted BCE loss, as TorchRec's ``DLRMTrain``.

    Args:
        model: the core ranker.

    Example::

        >>> from torchrec_hytrec import HyTRecConfig, HyTRecEncoder, HyTRecRanker, RankerConfig
        >>> from torchrec_hytrec.models.ranking import HyTRecRankerTrain
        >>> config = RankerConfig(num_items=100, embedding_dim=8, dense_in_features=2,
        ...                       sparse_features={"user_bucket": 10})
        >>> train_model = HyTRecRankerTrain(
        ...     HyTRecRanker(config, HyTRecEncoder(HyTRecConfig.hytrec(embedding_dim=8, num_heads=2))))
        >>> type(train_model.model).__name__
        'HyTRecRanker'
    """

    def __init__(self, model: HyTRecRanker) -> None:
        super().__init__()
        self.model = model
        self.loss = WeightedBCELoss()

    def forward(
        self, batch: RankingBatch
    ) -> Tuple[torch.Tensor, Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """
        Args:
            batch: the ranking rows.

        Returns:
            ``(loss, (loss, logits, labels, weights))``: the weighted mean BCE, then detached
            copies; ``ranking_metric_inputs`` turns them into a ``RecMetricModule`` update.
        """
        logits = self.model(batch)
        loss = self.loss(logits, batch.labels, batch.weights)
        return loss, (loss.detach(), logits.detach(), batch.labels, batch.weights)


def ranking_metric_inputs(outputs: Tuple[torch.Tensor, ...]) -> Dict[str, torch.Tensor]:
    """``RecMetricModule.update`` input from :class:`HyTRecRankerTrain`'s outputs."""
    _, logits, labels, weights = outputs
    return {"prediction": torch.sigmoid(logits), "label": labels, "weight": weights}


def ranking_metric_module(
    *,
    batch_size: int,
    world_size: int = 1,
    rank: int = 0,
    window_size: int = 10_000_000,
    process_group: Optional[torch.distributed.ProcessGroup] = None,
) -> RecMetricModule:
    """AUC and NE of the ``"ctr"`` task over a window of ``window_size`` examples (all ranks).

    ``update(ranking_metric_inputs(outputs))`` takes :class:`HyTRecRankerTrain`'s outputs (zero-weight
    rows count for nothing); ``compute()`` is collective and returns ``"auc-ctr|window_auc"``,
    ``"ne-ctr|window_ne"`` and ``"ne-ctr|lifetime_ne"`` on rank 0 (TorchRec computes the reduced
    metrics there only; broadcast them if other ranks need them).

    Args:
        batch_size: rows per update.
        world_size: ranks that update.
        rank: this rank.
        window_size: examples the window metrics cover.
        process_group: group the metrics are reduced over.
    """
    common = dict(
        world_size=world_size,
        my_rank=rank,
        batch_size=batch_size,
        tasks=[TASK],
        window_size=window_size,
        process_group=process_group,
    )
    return RecMetricModule(
        batch_size=batch_size,
        world_size=world_size,
        rec_tasks=[TASK],
        rec_metrics=RecMetricList([AUCMetric(**common), NEMetric(**common)]),
    )
