"""Builders shared by the tests: hand-made batches and free ports for process groups."""

import socket
from typing import Dict, Optional, Sequence

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_hytrec.data.batch import SequenceBatch, sequence_keys

NUM_ITEMS = 40
SIDE = {"category": 5}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_batch(
    lengths: Sequence[int],
    *,
    seed: int,
    num_items: int = NUM_ITEMS,
    side_features: Optional[Dict[str, int]] = None,
    evaluation: bool = False,
    candidates: str = "catalogue",
    num_negatives: int = 8,
) -> SequenceBatch:
    """A hand-built batch: items follow ``item + 1`` chains (learnable), gaps of minutes to days.

    ``candidates`` is ``"catalogue"`` (every item), ``"uniform"`` (``num_negatives`` random items)
    or ``"none"``, as ``ReaderConfig.negatives``; an evaluation batch's target is the successor of
    each user's last item, an hour after it.
    """
    side_features = SIDE if side_features is None else side_features
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    starts = torch.randint(1, num_items + 1, (len(lengths),), generator=g)
    items = torch.cat([(s - 1 + torch.arange(n)) % num_items + 1 for s, n in zip(starts.tolist(), lengths)])
    gaps = torch.randint(60, 3 * 86400, (total,), generator=g)
    times = torch.cat([torch.cumsum(t, 0) for t in torch.split(gaps, list(lengths))]) + 1_600_000_000
    lengths_t = torch.tensor(lengths, dtype=torch.long)
    side_values = [torch.randint(0, rows, (total,), generator=g) for rows in side_features.values()]
    batch_size = len(lengths)
    ends = torch.cumsum(lengths_t, 0) - 1
    if evaluation:
        targets, target_lengths = items[ends] % num_items + 1, torch.ones(batch_size, dtype=torch.long)
        target_times = times[ends] + 3600
    else:
        targets, target_lengths = torch.zeros(0, dtype=torch.long), torch.zeros(batch_size, dtype=torch.long)
        target_times = torch.full((batch_size,), -1)
    pool = {
        "catalogue": torch.arange(1, num_items + 1),
        "uniform": torch.randint(1, num_items + 1, (num_negatives,), generator=g),
        "none": torch.zeros(0, dtype=torch.long),
    }[candidates]
    pool_lengths = torch.zeros(batch_size, dtype=torch.long)
    pool_lengths[-1] = pool.numel()
    features = KeyedJaggedTensor(
        keys=sequence_keys(list(side_features)),
        values=torch.cat([times, items, *side_values, targets, pool]),
        lengths=torch.cat([lengths_t.repeat(2 + len(side_features)), target_lengths, pool_lengths]),
    )
    return SequenceBatch(
        features=features,
        user_ids=torch.arange(batch_size) + 1000 * seed,
        target_timestamps=target_times,
        weights=torch.ones(batch_size),
    )
