"""The batch every reader yields and every model consumes."""

from dataclasses import dataclass

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

ITEM_KEY = "item_id"


@dataclass
class SequenceBatch(Pipelineable):
    """A jagged batch of user behaviour sequences.

    Every key of ``features`` holds one jagged list per user with the same lengths, so the
    values of all keys and ``timestamps`` are aligned event by event.

    Args:
        features: keys ``"item_id"`` then side features; ``features.lengths()`` per key is ``[B]``.
        timestamps: ``[sum(n)]`` int64 event times in seconds, non-decreasing within a user.
        user_ids: ``[B]`` int64.
        targets: ``[B]`` int64 held-out next item for evaluation batches; ``-1`` in training
            batches, whose targets are the next events inside each sequence.
        target_timestamps: ``[B]`` int64 time of the held-out event (request time); ``-1`` in
            training batches.

    Example::

        batch = batch.to(torch.device("cuda"), non_blocking=True)
    """

    features: KeyedJaggedTensor
    timestamps: torch.Tensor
    user_ids: torch.Tensor
    targets: torch.Tensor
    target_timestamps: torch.Tensor

    def to(self, device: torch.device, non_blocking: bool = False) -> "SequenceBatch":
        return SequenceBatch(
            features=self.features.to(device=device, non_blocking=non_blocking),
            timestamps=self.timestamps.to(device=device, non_blocking=non_blocking),
            user_ids=self.user_ids.to(device=device, non_blocking=non_blocking),
            targets=self.targets.to(device=device, non_blocking=non_blocking),
            target_timestamps=self.target_timestamps.to(device=device, non_blocking=non_blocking),
        )

    def record_stream(self, stream: torch.Stream) -> None:
        self.features.record_stream(stream)
        for t in (self.timestamps, self.user_ids, self.targets, self.target_timestamps):
            t.record_stream(stream)

    def pin_memory(self) -> "SequenceBatch":
        return SequenceBatch(
            features=self.features.pin_memory(),
            timestamps=self.timestamps.pin_memory(),
            user_ids=self.user_ids.pin_memory(),
            targets=self.targets.pin_memory(),
            target_timestamps=self.target_timestamps.pin_memory(),
        )

    @property
    def batch_size(self) -> int:
        return self.user_ids.numel()

    def offsets(self) -> torch.Tensor:
        """``[B + 1]`` start of each user's events in the aligned values."""
        return self.features[ITEM_KEY].offsets()
