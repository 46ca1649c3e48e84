"""Leave-one-out splits, and that no evaluation target leaks into what the model sees."""

from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import pytest

from torchrec_hytrec.data.batch import ITEM_KEY
from torchrec_hytrec.data.parquet import write_sequences
from torchrec_hytrec.data.reader import ReaderConfig, SequenceReader
from torchrec_hytrec.data.schema import SequenceDatasetInfo, Sequences
from torchrec_hytrec.data.splits import Split, split_positions


def test_split_positions_follow_sasrec_protocol() -> None:
    lengths = np.array([1, 2, 3, 5])
    end, target = split_positions(lengths, Split.TRAIN)
    assert end.tolist() == [1, 2, 1, 3] and target.tolist() == [-1] * 4
    end, target = split_positions(lengths, Split.VALID)
    assert end.tolist() == [0, 0, 1, 3] and target.tolist() == [-1, -1, 1, 3]
    end, target = split_positions(lengths, Split.TEST)
    assert end.tolist() == [0, 0, 2, 4] and target.tolist() == [-1, -1, 2, 4]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Tuple[Path, Sequences]:
    """Users of lengths 1..40, with items that repeat so equal ids cannot hide a leak."""
    rng = np.random.default_rng(0)
    lengths = np.tile(np.arange(1, 41), 3)
    offsets = np.r_[0, np.cumsum(lengths)]
    n = int(offsets[-1])
    seqs = Sequences(
        user_ids=np.arange(lengths.size, dtype=np.int64) * 7,
        offsets=offsets,
        item_ids=rng.integers(1, 6, n),
        timestamps=np.cumsum(rng.integers(0, 3, n)),
        features={},
    )
    path = tmp_path_factory.mktemp("splits") / "s.parquet"
    write_sequences(path, seqs, SequenceDatasetInfo(num_items=5), row_group_size=16)
    return path, seqs


def _read(path: Path, split: Split, max_seq_len: int) -> Dict[int, Tuple[np.ndarray, np.ndarray, int, int]]:
    """user -> (input items, input timestamps, target item, target time)."""
    reader = SequenceReader([path], ReaderConfig(max_tokens=64, max_seq_len=max_seq_len), split=split)
    out = {}
    for batch in reader:
        items = batch.features[ITEM_KEY].to_dense()
        times = list(batch.timestamps.split(batch.features[ITEM_KEY].lengths().tolist()))
        # Training batches carry no target: report -1 like their target times.
        targets = batch.targets.tolist() if split is not Split.TRAIN else [-1] * batch.batch_size
        for b, uid in enumerate(batch.user_ids.tolist()):
            # A training user's windows come oldest first: the most recent one is kept (every
            # window ends by its end, test_data_reader checks).
            assert uid not in out or (split is Split.TRAIN and batch.context_lengths[b])
            out[uid] = (items[b].numpy(), times[b].numpy(), targets[b], int(batch.target_timestamps[b]))
    return out


@pytest.mark.parametrize("max_seq_len", [64, 4])
def test_no_evaluation_target_reaches_the_inputs(dataset: Tuple[Path, Sequences], max_seq_len: int) -> None:
    path, seqs = dataset
    train = _read(path, Split.TRAIN, max_seq_len)
    valid = _read(path, Split.VALID, max_seq_len)
    test = _read(path, Split.TEST, max_seq_len)
    for u, uid in enumerate(seqs.user_ids.tolist()):
        user = seqs.rows(u, u + 1)
        n = user.num_events
        if n < 3:
            # Too short to evaluate: the whole sequence trains (a single event has no pair).
            assert uid not in valid and uid not in test
            assert (uid in train) == (n == 2)
            continue
        # Each input is exactly a window ending before the held-out positions, so no target
        # (item, position) can be in it, whatever the item ids are.
        for split, held_out, expect_end in ((valid, n - 2, n - 2), (test, n - 1, n - 1)):
            items, times, target, target_time = split[uid]
            start = max(0, expect_end - max_seq_len)
            np.testing.assert_array_equal(items, user.item_ids[start:expect_end])
            np.testing.assert_array_equal(times, user.timestamps[start:expect_end])
            assert (target, target_time) == (user.item_ids[held_out], user.timestamps[held_out])
        if n - 2 >= 2:
            items, times, target, _ = train[uid]
            start = max(0, n - 2 - max_seq_len)
            np.testing.assert_array_equal(items, user.item_ids[start : n - 2])
            assert target == -1
        else:
            assert uid not in train
