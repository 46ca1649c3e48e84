"""DLRM-style ranking with a HyTRec behaviour-sequence arch.

Public API (stable):

- :class:`RankingBatch`: the pipelineable batch (sequence KJT, pooled sparse KJT, dense
  features, candidate item, request time, label).
- :class:`RankerConfig` and :class:`HyTRecRanker` ``(config, encoder, device=None)``;
  ``forward(batch) -> (loss, aux)`` with ``aux = {"prediction", "label", "weight", "logits"}``,
  the keys :func:`ranking_metric_module` reads, so ``metrics.update(aux)`` follows a step.
- :func:`ranking_metric_module`: AUC and NE through ``torchrec.metrics``.
- :func:`ranking_batch_from_sequences`: ranking rows derived from a :class:`SequenceBatch`
  (positive = the real next item, negatives = uniformly sampled items).

The model composes TorchRec's own DLRM archs: ``SparseArch`` over an ``EmbeddingBagCollection``
(pooled features, ``[B, F, d]``), ``DenseArch`` (``[B, d]``), and :class:`SequenceArch`, which
embeds the history through the item ``EmbeddingCollection``, reads ``HyTRecEncoder`` at the request
time, and looks the candidate up in the same item table (``[B, 2, d]``: user state, candidate).
``InteractionArch`` takes pairwise dot products of all ``F + 3`` vectors (so the user-candidate
affinity is one of its features) and ``OverArch`` maps them to a logit.
"""

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

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
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from torchrec_hytrec.data.batch import ITEM_KEY, SequenceBatch
from torchrec_hytrec.models.embeddings import ItemSequenceArch, sequence_table_configs

CANDIDATE_KEY = "candidate_item_id"
TASK = RecTaskInfo(name="ctr", label_name="label", prediction_name="prediction", weight_name="weight")

# Features made by ranking_batch_from_sequences.
USER_BUCKET_KEY = "user_bucket"
RECENT_ITEMS_KEY = "recent_items"
NUM_DERIVED_DENSE = 2


@dataclass
class RankingBatch(Pipelineable):
    """Candidate rows over request-level histories: a user's history is encoded once for all of
    its candidates.

    Args:
        sequence: keys ``"item_id"`` then side features: ``U`` histories, aligned per event.
        timestamps: ``[sum(n)]`` int64 event times (seconds) of ``sequence``.
        request_timestamps: ``[U]`` int64 time each history is read at (``>=`` its last event).
        row_sequence: ``[B]`` int64 history (``0..U-1``) of each candidate row.
        sparse_features: pooled features, one bag per row and key (stride ``B``).
        dense_features: ``[B, D]`` float.
        candidates: ``[B]`` int64 candidate item of each row.
        labels: ``[B]`` float 1 for an engaged candidate, 0 otherwise.

    Example::

        batch = ranking_batch_from_sequences(seq_batch, num_items=2000, num_negatives=4,
                                             user_buckets=1000)
        batch = batch.to(torch.device("cuda"), non_blocking=True)
    """

    sequence: KeyedJaggedTensor
    timestamps: torch.Tensor
    request_timestamps: torch.Tensor
    row_sequence: torch.Tensor
    sparse_features: KeyedJaggedTensor
    dense_features: torch.Tensor
    candidates: torch.Tensor
    labels: torch.Tensor

    def _map(
        self,
        kjt_fn: Callable[[KeyedJaggedTensor], KeyedJaggedTensor],
        fn: Callable[[torch.Tensor], torch.Tensor],
    ) -> "RankingBatch":
        return RankingBatch(
            sequence=kjt_fn(self.sequence),
            timestamps=fn(self.timestamps),
            request_timestamps=fn(self.request_timestamps),
            row_sequence=fn(self.row_sequence),
            sparse_features=kjt_fn(self.sparse_features),
            dense_features=fn(self.dense_features),
            candidates=fn(self.candidates),
            labels=fn(self.labels),
        )

    def to(self, device: torch.device, non_blocking: bool = False) -> "RankingBatch":
        return self._map(
            lambda k: k.to(device=device, non_blocking=non_blocking),
            lambda t: t.to(device=device, non_blocking=non_blocking),
        )

    def pin_memory(self) -> "RankingBatch":
        return self._map(lambda k: k.pin_memory(), lambda t: t.pin_memory())

    def record_stream(self, stream: torch.Stream) -> None:
        self.sequence.record_stream(stream)
        self.sparse_features.record_stream(stream)
        for t in (
            self.timestamps,
            self.request_timestamps,
            self.row_sequence,
            self.dense_features,
            self.candidates,
            self.labels,
        ):
            t.record_stream(stream)

    @property
    def batch_size(self) -> int:
        return self.candidates.numel()


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

        config = RankerConfig(num_items=2000, embedding_dim=32, dense_in_features=2,
                              sparse_features={"user_bucket": 1000})
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
    """Reads a behaviour sequence with an encoder against a candidate item.

    Args:
        item_arch: looks up events and candidates in one item table
            (extra feature ``"candidate_item_id"``).
        encoder: ``HyTRecEncoder`` (``forward_last(values, offsets, timestamps, request_time)``).

    Example::

        arch = SequenceArch(ItemSequenceArch(ec, num_items, {}, CANDIDATE_KEY), encoder)
        user_and_candidate = arch(sequence, timestamps, request_time, row_sequence, candidates)  # [B, 2, d]
    """

    def __init__(self, item_arch: ItemSequenceArch, encoder: nn.Module) -> None:
        super().__init__()
        self.item_arch = item_arch
        self.encoder = encoder

    def forward(
        self,
        sequence: KeyedJaggedTensor,
        timestamps: torch.Tensor,
        request_time: torch.Tensor,
        row_sequence: torch.Tensor,
        candidates: torch.Tensor,
    ) -> torch.Tensor:
        """
        Args:
            sequence: ``"item_id"`` then side features: ``U`` non-empty histories.
            timestamps: ``[sum(n)]`` event times.
            request_time: ``[U]`` time each history is read at.
            row_sequence: ``[B]`` history of each candidate row.
            candidates: ``[B]`` candidate items.

        Returns:
            ``[B, 2, d]``: the encoder's state of the row's history at its request time, and the
            candidate's item row.
        """
        # The candidates ride in the item table's second feature; a KJT needs one length per
        # history, so they all sit in the last history's slot.
        extra_lengths = torch.zeros_like(request_time)
        extra_lengths[-1] = candidates.numel()
        looked_up = self.item_arch(sequence, candidates, extra_lengths)
        offsets = sequence[ITEM_KEY].offsets()
        user = self.encoder.forward_last(looked_up.events, offsets, timestamps, request_time=request_time)
        return torch.stack([user[row_sequence], looked_up.extra], dim=1)


class HyTRecRanker(nn.Module):
    """DLRM-style CTR model whose behaviour-sequence arch is a HyTRec encoder.

    Args:
        config: tables and arch sizes.
        encoder: ``HyTRecEncoder`` with ``config.embedding_dim``.
        device: where tables and dense layers are built (``meta`` defers tables to sharding).

    Example::

        ranker = HyTRecRanker(
            RankerConfig(num_items=2000, embedding_dim=32, dense_in_features=2,
                         sparse_features={"user_bucket": 1000}),
            HyTRecEncoder(HyTRecConfig.hytrec(embedding_dim=32)),
        )
        loss, aux = ranker(batch)
    """

    def __init__(
        self, config: RankerConfig, encoder: nn.Module, device: Optional[torch.device] = None
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
        tables = sequence_table_configs(
            num_items=config.num_items,
            embedding_dim=d,
            side_features=config.side_features,
            extra_item_feature=CANDIDATE_KEY,
            init_std=config.init_std,
        )
        item_arch = ItemSequenceArch(
            EmbeddingCollection(tables=tables, device=device),
            config.num_items,
            config.side_features,
            CANDIDATE_KEY,
        )
        self.sequence_arch = SequenceArch(item_arch, encoder)
        num_vectors = len(bags) + 2  # pooled features, user state, candidate
        self.inter_arch = InteractionArch(num_sparse_features=num_vectors)
        over_in = d + (num_vectors + 1) * num_vectors // 2
        self.over_arch = OverArch(over_in, config.over_arch_layer_sizes, device=dense_device)

    def forward(self, batch: RankingBatch) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """
        Args:
            batch: the ranking rows.

        Returns:
            ``(loss, aux)``: mean BCE; ``aux`` holds ``prediction`` (probabilities), ``label``,
            ``weight`` (ones) and ``logits``, all ``[B]`` and detached.
        """
        dense = self.dense_arch(batch.dense_features)
        pooled = self.sparse_arch(batch.sparse_features)
        sequence = self.sequence_arch(
            batch.sequence, batch.timestamps, batch.request_timestamps, batch.row_sequence, batch.candidates
        )
        interactions = self.inter_arch(dense, torch.cat([pooled, sequence], dim=1))
        logits = self.over_arch(interactions).squeeze(-1)
        loss = F.binary_cross_entropy_with_logits(logits, batch.labels)
        logits = logits.detach()
        return loss, {
            "prediction": torch.sigmoid(logits),
            "label": batch.labels,
            "weight": torch.ones_like(batch.labels),
            "logits": logits,
        }


def ranking_metric_module(
    *,
    batch_size: int,
    world_size: int = 1,
    rank: int = 0,
    window_size: int = 10_000_000,
    process_group: Optional[torch.distributed.ProcessGroup] = None,
) -> RecMetricModule:
    """AUC and NE of the ``"ctr"`` task over a window of ``window_size`` examples (all ranks).

    ``update(aux)`` takes :meth:`HyTRecRanker.forward`'s ``aux``; ``compute()`` returns
    ``"auc-ctr|window_auc"``, ``"ne-ctr|window_ne"`` and ``"ne-ctr|lifetime_ne"``.

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


def _gather_jagged(values: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Concatenates ``values[starts[r] : starts[r] + lengths[r]]`` over rows ``r``."""
    new_offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
    within = torch.arange(int(new_offsets[-1]), device=values.device) - torch.repeat_interleave(
        new_offsets[:-1], lengths
    )
    return values[torch.repeat_interleave(starts, lengths) + within]


def ranking_batch_from_sequences(
    batch: SequenceBatch,
    *,
    num_items: int,
    num_negatives: int,
    user_buckets: int,
    num_recent: int = 5,
    generator: Optional[torch.Generator] = None,
) -> RankingBatch:
    """Ranking rows from behaviour sequences: each user's real next item and sampled negatives.

    The positive is the held-out target of an evaluation batch, or the last event of each user
    of a training batch (its history is then the events before it). Every user gives
    ``1 + num_negatives`` rows sharing its history, encoded once, read at the positive's time;
    negatives are uniform over the catalogue, resampled when they hit the positive.

    Derived features: pooled ``"user_bucket"`` (``user_id % user_buckets``) and
    ``"recent_items"`` (the last ``num_recent`` history items, a bag over ``num_items + 1``
    rows); dense ``[log1p(history length), log1p(seconds since the last event)]``. Configure the
    ranker with ``sparse_features={"user_bucket": user_buckets, "recent_items": num_items + 1}``
    and ``dense_in_features=2``.

    Args:
        batch: the sequences (CPU).
        num_items: catalogue size.
        num_negatives: negatives per positive.
        user_buckets: rows of the user-bucket table.
        num_recent: items in the ``"recent_items"`` bag.
        generator: RNG of the negatives.

    Returns:
        :class:`RankingBatch` with ``B`` histories and ``B * (1 + num_negatives)`` rows, a
        user's rows adjacent, its positive first.
    """
    offsets = batch.offsets()
    lengths = offsets[1:] - offsets[:-1]
    items = batch.features[ITEM_KEY].values()
    if num_items < 2:
        raise ValueError(f"negatives need a catalogue of 2 or more items, got num_items={num_items}")
    if bool((batch.targets >= 0).all()):
        history, positives, request = lengths, batch.targets, batch.target_timestamps
    else:
        last = offsets[1:] - 1
        history, positives, request = (
            lengths - 1,
            items[last.clamp(min=0)],
            batch.timestamps[last.clamp(min=0)],
        )
    empty = torch.nonzero(history < 1).flatten()
    if empty.numel():
        raise ValueError(
            "users need a history event before the positive (2 or more events in a training batch): "
            f"user_ids {batch.user_ids[empty].tolist()}"
        )

    per_user = 1 + num_negatives
    rows = torch.repeat_interleave(torch.arange(batch.batch_size), per_user)
    candidates = torch.randint(1, num_items + 1, (rows.numel(),), generator=generator)
    labels = torch.zeros(rows.numel())
    labels[::per_user] = 1.0
    candidates[::per_user] = positives
    hits = (labels == 0) & (candidates == positives[rows])
    while bool(hits.any()):
        candidates[hits] = torch.randint(1, num_items + 1, (int(hits.sum()),), generator=generator)
        hits = (labels == 0) & (candidates == positives[rows])

    starts = offsets[:-1]
    keys = batch.features.keys()
    sequence = KeyedJaggedTensor(
        keys=keys,
        values=torch.cat([_gather_jagged(batch.features[k].values(), starts, history) for k in keys]),
        lengths=history.repeat(len(keys)),
    )
    recent = torch.clamp(history, max=num_recent)[rows]
    recent_items = _gather_jagged(items, (starts + history)[rows] - recent, recent)
    sparse = KeyedJaggedTensor(
        keys=[USER_BUCKET_KEY, RECENT_ITEMS_KEY],
        values=torch.cat([batch.user_ids[rows] % user_buckets, recent_items]),
        lengths=torch.cat([torch.ones_like(rows), recent]),
    )
    since_last = (request - batch.timestamps[starts + history - 1]).clamp(min=0)
    dense = torch.stack([torch.log1p(history.float()), torch.log1p(since_last.float())], dim=1)[rows]
    return RankingBatch(
        sequence=sequence,
        timestamps=_gather_jagged(batch.timestamps, starts, history),
        request_timestamps=request,
        row_sequence=rows,
        sparse_features=sparse,
        dense_features=dense,
        candidates=candidates,
        labels=labels,
    )
