"""Ranking rows derived from behaviour sequences: the batch :class:`HyTRecRanker` consumes.

Each user's real next item is the positive and uniformly sampled items are the negatives. A
user's history is encoded once for all of its candidate rows: the candidates ride in the history
KJT's ``"candidate_item_id"`` key (one entry per row, a user's rows adjacent, positive first), so
the sequence table's whole input — history, timestamps and candidates — is one batch field.
"""

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from torchrec_hytrec.data.batch import CANDIDATE_KEY, TARGET_KEY, SequenceBatch

# Features made by ranking_batch_from_sequences.
USER_BUCKET_KEY = "user_bucket"
RECENT_ITEMS_KEY = "recent_items"
NUM_DERIVED_DENSE = 2


@dataclass
class RankingBatch(Pipelineable):
    """Candidate rows over request-level histories.

    Args:
        sequence: ``U`` histories, stride ``U``: keys ``"timestamp"``, ``"item_id"``, the side
            features (aligned per event), then ``"candidate_item_id"``: the candidate item of each
            of the history's rows.
        request_timestamps: ``[U]`` int64 time each history is read at (``>=`` its last event).
        sparse_features: pooled features, one bag per row and key (stride ``B``).
        dense_features: ``[B, D]`` float.
        labels: ``[B]`` float 1 for an engaged candidate, 0 otherwise.
        weights: ``[B]`` float weight of each row (0 in padding batches).

    Example::

        >>> import torch
        >>> from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
        >>> from torchrec_hytrec import SequenceBatch
        >>> from torchrec_hytrec.data.batch import sequence_keys
        >>> from torchrec_hytrec.data.ranking import ranking_batch_from_sequences
        >>> features = KeyedJaggedTensor(sequence_keys([]), torch.tensor([10, 20, 30, 5, 9, 4, 7, 1, 2, 3]),
        ...                              lengths=torch.tensor([3, 2, 3, 2, 0, 0, 0, 0]))
        >>> history = SequenceBatch(features, user_ids=torch.tensor([7, 8]),
        ...                         target_timestamps=torch.tensor([-1, -1]), weights=torch.ones(2))
        >>> rows = ranking_batch_from_sequences(history, num_items=50, num_negatives=2, user_buckets=10,
        ...                                     generator=torch.Generator().manual_seed(0))
        >>> rows.batch_size, rows.labels.tolist()  # each user's real last item, then 2 negatives
        (6, [1.0, 0.0, 0.0, 1.0, 0.0, 0.0])
        >>> rows.sequence["candidate_item_id"].values()[[0, 3]].tolist()
        [1, 3]
    """

    sequence: KeyedJaggedTensor
    request_timestamps: torch.Tensor
    sparse_features: KeyedJaggedTensor
    dense_features: torch.Tensor
    labels: torch.Tensor
    weights: torch.Tensor

    def _map(
        self,
        kjt_fn: Callable[[KeyedJaggedTensor], KeyedJaggedTensor],
        fn: Callable[[torch.Tensor], torch.Tensor],
    ) -> "RankingBatch":
        return RankingBatch(
            sequence=kjt_fn(self.sequence),
            request_timestamps=fn(self.request_timestamps),
            sparse_features=kjt_fn(self.sparse_features),
            dense_features=fn(self.dense_features),
            labels=fn(self.labels),
            weights=fn(self.weights),
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
        for t in (self.request_timestamps, self.dense_features, self.labels, self.weights):
            t.record_stream(stream)

    @property
    def batch_size(self) -> int:
        return self.labels.numel()


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

    The positive is the held-out target of an evaluation batch (one target per user),
    or the last event of each user of a training batch (its history is then the events before
    it). Every user gives ``1 + num_negatives`` rows sharing its history, read at the positive's
    time; negatives are uniform over the catalogue, resampled when they hit the positive. Rows
    inherit their user's weight, so a padding batch stays a padding batch.

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
        :class:`RankingBatch` with ``B`` histories and ``B * (1 + num_negatives)`` rows.
    """
    offsets = batch.offsets()
    lengths = offsets[1:] - offsets[:-1]
    items = batch.item_ids
    if num_items < 2:
        raise ValueError(f"negatives need a catalogue of 2 or more items, got num_items={num_items}")
    if batch.targets.numel() == batch.batch_size:
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
    # "timestamp", "item_id", side features: the batch's order, the timestamp key first.
    event_keys = [k for k in batch.features.keys() if k not in (TARGET_KEY, CANDIDATE_KEY)]
    sequence = KeyedJaggedTensor(
        keys=[*event_keys, CANDIDATE_KEY],
        values=torch.cat(
            [*(_gather_jagged(batch.features[k].values(), starts, history) for k in event_keys), candidates]
        ),
        lengths=torch.cat([history.repeat(len(event_keys)), torch.full_like(history, per_user)]),
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
        request_timestamps=request,
        sparse_features=sparse,
        dense_features=dense,
        labels=labels,
        weights=batch.weights[rows].float(),
    )
