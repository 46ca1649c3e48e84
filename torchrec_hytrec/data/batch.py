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

A batch is either a training batch (every event but a user's last predicts the next) or an
evaluation batch (each user's last event predicts its target); the reader that made it knows
which, and the model is told by ``train()`` / ``eval()``, never by looking at the values.
"""

from dataclasses import dataclass
from typing import List

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

    def to(self, device: torch.device, non_blocking: bool = False) -> "SequenceBatch":
        return SequenceBatch(
            features=self.features.to(device=device, non_blocking=non_blocking),
            user_ids=self.user_ids.to(device=device, non_blocking=non_blocking),
            target_timestamps=self.target_timestamps.to(device=device, non_blocking=non_blocking),
            weights=self.weights.to(device=device, non_blocking=non_blocking),
        )

    def record_stream(self, stream: torch.Stream) -> None:
        self.features.record_stream(stream)
        for t in (self.user_ids, self.target_timestamps, self.weights):
            t.record_stream(stream)

    def pin_memory(self) -> "SequenceBatch":
        return SequenceBatch(
            features=self.features.pin_memory(),
            user_ids=self.user_ids.pin_memory(),
            target_timestamps=self.target_timestamps.pin_memory(),
            weights=self.weights.pin_memory(),
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
