"""The batch every reader yields and every model consumes.

Everything TorchRec's input distribution must see rides in one ``KeyedJaggedTensor``
(``features``), so ``TrainPipelineSparseDist`` can run the sharded lookup of batch ``i + 1``
while batch ``i`` computes, and timestamps travel with the ids:

* ``"timestamp"``: event times (int64 seconds) per user. It is no table's feature, so the
  sharded ``EmbeddingCollection`` drops it from its input distribution (it is the first key, so
  the collection always permutes its input down to its own features); the encoder reads it.
* ``"item_id"`` then the side features: per-user event lists, aligned with the timestamps.
* ``"target_item_id"``: the held-out item of each user in evaluation batches (one per user),
  empty in training batches.
* ``"candidate_item_id"``: softmax candidates shared by the whole batch (uniform negatives or the
  whole catalogue), all in the last user's slot; empty when the reader draws none.

A batch is either a training batch (every event but a user's last predicts the next, see
:func:`training_queries`) or an evaluation batch (each user's last event predicts its target);
the reader that made it knows which, and the model is told by ``train()`` / ``eval()``, never by
looking at the values.

A batch row is a window of one user's history: a training history longer than the reader's
``max_seq_len`` comes as several rows (windows) of the same user, each later window starting with
``context_lengths`` events of the one before it, which it reads but does not predict again; an
evaluation row holds the last events before its target. ``history_starts`` places each row in
its user's whole history, and an evaluation row cut to its last events carries the items of the
events it does not hold in ``prior_item_ids``, so a ranking that removes the user's seen items
removes all of them.
"""

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

TIMESTAMP_KEY = "timestamp"
ITEM_KEY = "item_id"
TARGET_KEY = "target_item_id"
CANDIDATE_KEY = "candidate_item_id"


def sequence_keys(side_features: List[str]) -> List[str]:
    """KJT keys of a :class:`SequenceBatch` with these side features, in order."""
    return [TIMESTAMP_KEY, ITEM_KEY, *side_features, TARGET_KEY, CANDIDATE_KEY]


@dataclass
class SequenceBatch(Pipelineable):
    """A jagged batch of user behaviour sequences (keys and their meaning: module docstring).

    Args:
        features: keys :func:`sequence_keys`; stride ``B`` (one length per user and key).
        user_ids: ``[B]`` int64.
        target_timestamps: ``[B]`` int64 time of the held-out event (the request time) in
            evaluation batches; ``-1`` in training batches.
        weights: ``[B]`` float32 weight of each user: ``1`` for real users, ``0`` for the users of
            a padding batch (made by the reader so every rank takes the same number of steps).
        context_lengths: optional ``[B]`` int64 leading events of each row that an earlier window
            of the same user already predicted: read as context, never predicted again. ``None``
            (no row has any) is the same as zeros.
        history_starts: optional ``[B]`` int64 position of each row's first event in its user's
            whole history (``> 0`` when older events are in another window or were not read).
            ``None`` is the same as zeros.
        prior_item_ids: optional ``[sum(history_starts)]`` int64 items of each row's user before
            the row's first event (``history_starts`` of them per row): what
            :meth:`seen_items` adds to the row's own items. The reader fills it in evaluation
            batches; ``None`` (training batches) carries none.

    Example::

        >>> import torch
        >>> from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
        >>> from torchrec_hytrec import SequenceBatch
        >>> from torchrec_hytrec.data.batch import sequence_keys
        >>> lengths = torch.tensor([3, 2, 3, 2, 0, 0, 0, 0])  # timestamp, item_id, target, candidate
        >>> values = torch.tensor([10, 20, 30, 5, 9, 4, 7, 1, 2, 3])
        >>> features = KeyedJaggedTensor(sequence_keys([]), values, lengths=lengths)
        >>> batch = SequenceBatch(features, user_ids=torch.tensor([7, 8]),
        ...                       target_timestamps=torch.tensor([-1, -1]), weights=torch.ones(2))
        >>> batch.offsets().tolist(), batch.timestamps.tolist()
        ([0, 3, 5], [10, 20, 30, 5, 9])
    """

    features: KeyedJaggedTensor
    user_ids: torch.Tensor
    target_timestamps: torch.Tensor
    weights: torch.Tensor
    context_lengths: Optional[torch.Tensor] = None
    history_starts: Optional[torch.Tensor] = None
    prior_item_ids: Optional[torch.Tensor] = None

    def _tensors(self) -> List[Optional[torch.Tensor]]:
        return [
            self.user_ids,
            self.target_timestamps,
            self.weights,
            self.context_lengths,
            self.history_starts,
            self.prior_item_ids,
        ]

    def _with(self, features: KeyedJaggedTensor, tensors: List[Optional[torch.Tensor]]) -> "SequenceBatch":
        user_ids, target_timestamps, weights, context_lengths, history_starts, prior_item_ids = tensors
        return SequenceBatch(
            features=features,
            user_ids=user_ids,
            target_timestamps=target_timestamps,
            weights=weights,
            context_lengths=context_lengths,
            history_starts=history_starts,
            prior_item_ids=prior_item_ids,
        )

    def to(self, device: torch.device, non_blocking: bool = False) -> "SequenceBatch":
        return self._with(
            self.features.to(device=device, non_blocking=non_blocking),
            [None if t is None else t.to(device=device, non_blocking=non_blocking) for t in self._tensors()],
        )

    def record_stream(self, stream: torch.Stream) -> None:
        self.features.record_stream(stream)
        for t in self._tensors():
            if t is not None:
                t.record_stream(stream)

    def pin_memory(self) -> "SequenceBatch":
        return self._with(
            self.features.pin_memory(), [None if t is None else t.pin_memory() for t in self._tensors()]
        )

    @property
    def batch_size(self) -> int:
        return self.user_ids.numel()

    def offsets(self) -> torch.Tensor:
        """``[B + 1]`` start of each user's events in the aligned values."""
        return self.features[ITEM_KEY].offsets()

    @property
    def timestamps(self) -> torch.Tensor:
        """``[sum(n)]`` int64 event times, aligned with the item ids."""
        return self.features[TIMESTAMP_KEY].values()

    @property
    def item_ids(self) -> torch.Tensor:
        """``[sum(n)]`` int64 item of every event."""
        return self.features[ITEM_KEY].values()

    @property
    def targets(self) -> torch.Tensor:
        """``[B]`` held-out items of an evaluation batch (``[0]`` for a training batch)."""
        return self.features[TARGET_KEY].values()

    @property
    def candidates(self) -> torch.Tensor:
        """``[M]`` softmax candidates shared by the batch."""
        return self.features[CANDIDATE_KEY].values()

    def history_lengths(self) -> torch.Tensor:
        """``[B]`` events of each row's user up to the row's end (its own plus the older ones)."""
        offsets = self.offsets()
        lengths = offsets[1:] - offsets[:-1]
        return lengths if self.history_starts is None else lengths + self.history_starts

    def seen_items(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(ids, lengths)``: the jagged items each row's user has interacted with, grouped by
        row: its ``prior_item_ids`` (when carried), then the row's own items."""
        offsets = self.offsets()
        lengths = offsets[1:] - offsets[:-1]
        if self.prior_item_ids is None:
            return self.item_ids, lengths
        if self.history_starts is None:
            raise ValueError("SequenceBatch.prior_item_ids needs history_starts (its lengths per row)")
        rows = torch.arange(lengths.numel(), device=lengths.device)
        owner = torch.cat(
            [torch.repeat_interleave(rows, self.history_starts), torch.repeat_interleave(rows, lengths)]
        )
        order = torch.sort(owner, stable=True).indices
        return torch.cat([self.prior_item_ids, self.item_ids])[order], lengths + self.history_starts


def training_queries(
    offsets: torch.Tensor, context_lengths: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The queries of a training batch: every event whose next event in the row is a target.

    A row's events predict their successors, except its last event (no successor in the row) and
    the events before its last context event (their successors are context, predicted by an
    earlier window). Over all windows of a user, every event but the user's first is a target
    exactly once.

    Args:
        offsets: ``[B + 1]`` start of each row's events.
        context_lengths: optional ``[B]`` context events of each row.

    Returns:
        ``(rows, users)``: ``[Q]`` event rows of the queries (each predicts ``rows + 1``) and the
        batch row of each.

    Example::

        >>> import torch
        >>> rows, users = training_queries(torch.tensor([0, 3, 7]), torch.tensor([0, 2]))
        >>> rows.tolist(), users.tolist()  # row 1's events 3, 4 are context: 4 predicts 5
        ([0, 1, 4, 5], [0, 0, 1, 1])
    """
    lengths = offsets[1:] - offsets[:-1]
    users = torch.repeat_interleave(torch.arange(lengths.numel(), device=offsets.device), lengths)
    position = torch.arange(users.numel(), device=offsets.device) - offsets[:-1][users]
    first = torch.zeros_like(lengths) if context_lengths is None else (context_lengths - 1).clamp(min=0)
    is_query = (position >= first[users]) & (position < lengths[users] - 1)
    rows = torch.nonzero(is_query).flatten()
    return rows, users[rows]
