"""SequenceReader: batches against the source, token budget, sharding, equal steps on every rank
(padding batches), softmax candidates, shuffling, resumption, DataLoader workers, 2 real gloo
ranks, and the Pipelineable contract."""

import collections
import dataclasses
import functools
import logging
import os
import socket
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader
from torchrec.streamable import Pipelineable

from torchrec_hytrec.data.batch import (
    CANDIDATE_KEY,
    ITEM_KEY,
    TARGET_KEY,
    SequenceBatch,
    sequence_keys,
    training_queries,
)
from torchrec_hytrec.data.parquet import write_sequences
from torchrec_hytrec.data.reader import (
    ReaderConfig,
    SequenceReader,
    _count_packed,
    _pack,
    _stream_index,
    _worker_skip,
)
from torchrec_hytrec.data.schema import DataValidationError, SequenceDatasetInfo, Sequences
from torchrec_hytrec.data.splits import Split, split_positions
from torchrec_hytrec.data.synthetic import SyntheticConfig, generate


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Tuple[Path, Sequences]:
    config = SyntheticConfig(num_users=300, median_length=30, max_length=700, seed=3)
    data = generate(config)
    path = tmp_path_factory.mktemp("reader") / "syn.parquet"
    write_sequences(path, data.sequences, data.info, row_group_size=20)
    return path, data.sequences


_BATCHING = {f.name for f in dataclasses.fields(ReaderConfig)}


def _reading(path: Path, **kwargs: Any) -> Callable[..., SequenceReader]:
    """A ``SequenceReader`` of ``path`` with these settings (batching ones or the reader's own),
    still to be given its rank and world size."""
    batching = {"max_tokens": 512, "max_seq_len": 128, **{k: v for k, v in kwargs.items() if k in _BATCHING}}
    rest = {k: v for k, v in kwargs.items() if k not in _BATCHING}
    return functools.partial(SequenceReader, [path], ReaderConfig(**batching), **rest)


def _users(batches: List[SequenceBatch]) -> List[int]:
    """Real (weight 1) users of the batches, in order; a training user once, at its oldest
    window (the one without context)."""
    return [
        u
        for b in batches
        for u, w, c in zip(b.user_ids.tolist(), b.weights.tolist(), b.context_lengths.tolist())
        if w and not c
    ]


def test_batches_match_the_source_within_the_token_budget(synthetic) -> None:
    path, seqs = synthetic
    reader = _reading(path)()
    assert reader.keys == [ITEM_KEY, "category"]
    end, _ = split_positions(seqs.lengths, Split.TRAIN)
    targets: Dict[int, List[int]] = collections.defaultdict(list)
    ends: Dict[int, List[int]] = collections.defaultdict(list)
    for batch in reader:
        kjt = batch.features
        lengths = kjt[ITEM_KEY].lengths()
        assert kjt.keys() == sequence_keys(["category"]) and kjt.lengths().dtype == torch.int32
        assert kjt.values().dtype == torch.int64 and batch.timestamps.dtype == torch.int64
        assert torch.equal(kjt["category"].lengths(), lengths)
        assert int(lengths.sum()) <= 512 and batch.timestamps.numel() == int(lengths.sum())
        # Training batches hold no target and, with negatives="none", no candidate.
        assert (kjt[TARGET_KEY].lengths() == 0).all() and (kjt[CANDIDATE_KEY].lengths() == 0).all()
        assert (batch.target_timestamps == -1).all()
        assert batch.weights.dtype == torch.float32 and (batch.weights == 1).all()
        items = kjt[ITEM_KEY].to_dense()
        cats = kjt["category"].to_dense()
        times = batch.timestamps.split(lengths.tolist())
        query_rows, query_users = training_queries(batch.offsets(), batch.context_lengths)
        for b, uid in enumerate(batch.user_ids.tolist()):
            user = seqs.rows(uid, uid + 1)  # synthetic user ids are row numbers
            start, n, context = (int(t[b]) for t in (batch.history_starts, lengths, batch.context_lengths))
            window = slice(start, start + n)
            np.testing.assert_array_equal(items[b].numpy(), user.item_ids[window])
            np.testing.assert_array_equal(cats[b].numpy(), user.features["category"][window])
            np.testing.assert_array_equal(times[b].numpy(), user.timestamps[window])
            # Windows of at most max_seq_len; all but a user's oldest open with 64 context events.
            assert n <= 128 and context == (64 if start else 0)
            rows = query_rows[query_users == b] - int(batch.offsets()[b])
            targets[uid] += (start + rows + 1).tolist()
            ends[uid].append(start + n)
    # Every training event but a user's first is predicted exactly once; windows end at the input's end.
    assert sorted(targets) == list(range(seqs.num_users))
    for uid, predicted in targets.items():
        assert sorted(predicted) == list(range(1, int(end[uid]))), uid
        assert max(ends[uid]) == int(end[uid])
    windows = 1 + np.maximum(end - 128 + 63, 0) // 64
    assert reader.stats.users == int(windows.sum()) > seqs.num_users
    assert reader.stats.targets == int((end - 1).sum())
    assert reader.stats.windowed_users == int((end > 128).sum()) > 0
    assert reader.stats.truncated_users == 0 and reader.stats.skipped_users == 0


def test_evaluation_rows_keep_the_last_max_seq_len_events(synthetic) -> None:
    path, seqs = synthetic
    reader = _reading(path, split="test")()
    end, _ = split_positions(seqs.lengths, Split.TEST)
    batches = list(reader)
    rows = sum(b.batch_size for b in batches)
    starts = torch.cat([b.history_starts for b in batches])
    history = torch.cat([b.history_lengths() for b in batches])
    users = torch.cat([b.user_ids for b in batches])
    assert rows == int((end >= 1).sum()) == reader.stats.users
    assert torch.equal(history, torch.from_numpy(end[users.numpy()]))
    assert torch.equal(starts, (history - 128).clamp(min=0))
    assert all((b.context_lengths == 0).all() for b in batches)
    assert reader.stats.truncated_users == int((end > 128).sum()) > 0
    assert reader.stats.truncated_events == int(np.maximum(end - 128, 0).sum())
    assert reader.stats.targets == 0
    # The cut events' items ride along, so the seen items are the user's whole input.
    for batch in batches:
        assert batch.prior_item_ids.numel() == int(batch.history_starts.sum())
        seen, seen_lengths = batch.seen_items()
        assert torch.equal(seen_lengths, batch.history_lengths())
        for uid, items in zip(batch.user_ids.tolist(), seen.split(seen_lengths.tolist())):
            np.testing.assert_array_equal(items.numpy(), seqs.rows(uid, uid + 1).item_ids[: end[uid]])
    assert next(iter(_reading(path)())).prior_item_ids is None  # training batches carry none


def test_batches_are_packed_greedily_and_respect_max_batch_size(synthetic) -> None:
    path, _ = synthetic
    batches = list(_reading(path, max_batch_size=7)())
    sizes = [b.batch_size for b in batches]
    tokens = [b.timestamps.numel() for b in batches]
    assert max(sizes) == 7
    # Greedy: a batch was closed only because the next user would not fit.
    for b, nxt in zip(batches[:-1], batches[1:]):
        first_next = int(nxt.features[ITEM_KEY].lengths()[0])
        assert b.batch_size == 7 or b.timestamps.numel() + first_next > 512
    assert sum(tokens) == sum(int(b.features[ITEM_KEY].lengths().sum()) for b in batches)


def test_ten_thousand_event_user_never_makes_a_batch_explode(tmp_path: Path, caplog) -> None:
    lengths = np.array([10_000, 5, 7])
    offsets = np.r_[0, np.cumsum(lengths)]
    seqs = Sequences(
        user_ids=np.array([1, 2, 3]),
        offsets=offsets,
        item_ids=np.ones(offsets[-1], np.int64),
        timestamps=np.arange(offsets[-1]),
        features={},
    )
    path = tmp_path / "long.parquet"
    write_sequences(path, seqs, SequenceDatasetInfo(num_items=1))
    reader = _reading(path, max_tokens=1024, max_seq_len=512, split="test")()
    with caplog.at_level(logging.WARNING, logger="torchrec_hytrec.data.reader"):
        batches = list(reader)
    assert all(b.timestamps.numel() <= 1024 for b in batches)
    first = batches[0]
    assert first.user_ids[0] == 1 and int(first.features[ITEM_KEY].lengths()[0]) == 512
    assert first.timestamps[511] == 9_998 and first.target_timestamps[0] == 9_999
    assert (
        "1 test inputs cut to their last max_seq_len=512 events (9487 older events not read)" in caplog.text
    )
    # Every pass cuts the same users: later passes say it at INFO only.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="torchrec_hytrec.data.reader"):
        assert len(list(reader)) == len(batches)
    assert "inputs cut" not in caplog.text
    # Training reads all 9,998 training events of the long user, as windows of at most 512.
    train = _reading(path, max_tokens=1024, max_seq_len=512, window_overlap=128)()
    with caplog.at_level(logging.WARNING, logger="torchrec_hytrec.data.reader"):
        batches = list(train)
    assert not caplog.text
    lengths = torch.cat([b.features[ITEM_KEY].lengths() for b in batches])
    assert int(lengths.max()) == 512 and train.stats.windowed_users == 1
    assert train.stats.targets == 9_997 + 2 + 4  # every event but each user's first


def test_two_ranks_read_disjoint_shares_covering_all_users(synthetic) -> None:
    path, seqs = synthetic
    for epoch in (0, 1):
        shares = []
        for rank in range(2):
            reader = _reading(path, shuffle=True, seed=5)(rank=rank, world_size=2)
            reader.set_epoch(epoch)
            shares.append(_users(list(reader)))
        assert not set(shares[0]) & set(shares[1])
        assert sorted(shares[0] + shares[1]) == list(range(seqs.num_users))
        assert abs(len(shares[0]) - len(shares[1])) < 60


def test_shuffle_is_seeded_per_epoch(synthetic) -> None:
    path, _ = synthetic
    reader = _reading(path, shuffle=True, seed=1)()
    first = _users(list(reader))
    assert _users(list(reader)) == first
    reader.set_epoch(1)
    second = _users(list(reader))
    assert second != first and sorted(second) == sorted(first)
    assert _users(list(_reading(path)())) == sorted(first)


def test_resume_continues_where_it_left(synthetic) -> None:
    path, _ = synthetic
    make = _reading(path, shuffle=True, seed=2)
    reader = make()
    reader.set_epoch(3)
    full = list(reader)
    assert len(full) > 10
    partial = make()
    partial.set_epoch(3)
    for n, _ in enumerate(partial):
        if n == 4:
            break
    state = partial.state_dict()
    assert state == {"epoch": 3, "batches": 5}
    resumed = make()
    resumed.load_state_dict(state)
    peek = next(iter(resumed))  # a peek (e.g. for a shape probe) must not lose the position
    assert peek.user_ids.tolist() == full[5].user_ids.tolist()
    rest = list(resumed)
    assert [b.user_ids.tolist() for b in rest] == [b.user_ids.tolist() for b in full[5:]]
    assert resumed.state_dict() == {"epoch": 3, "batches": len(full)}
    resumed.set_epoch(4)
    assert resumed.state_dict() == {"epoch": 4, "batches": 0}


def test_worker_skip_follows_dataloader_order() -> None:
    # Workers with 3, 1 and 2 batches are yielded as (k, w): w0 w1 w2 | w0 w2 | w0.
    order = [0, 1, 2, 0, 2, 0]
    for consumed in range(len(order) + 1):
        for w in range(3):
            assert _worker_skip(consumed, [3, 1, 2], w) == order[:consumed].count(w)
    positions = [(w, k) for k in range(3) for w in range(3) if k < [3, 1, 2][w]]
    assert [_stream_index([3, 1, 2], w, k) for w, k in positions] == list(range(len(order)))


def test_count_packed_matches_pack() -> None:
    rng = np.random.default_rng(0)
    for max_batch_size in (None, 1, 3):
        for size in (0, 1, 50):
            lengths = rng.integers(1, 65, size)
            blocks = [SimpleNamespace(lengths=part) for part in np.array_split(lengths, 4)]
            packed = sum(1 for _ in _pack(iter(blocks), 64, max_batch_size))
            assert _count_packed(lengths, 64, max_batch_size) == packed


def test_dataloader_workers_split_the_rank_share_and_resume(synthetic) -> None:
    path, seqs = synthetic
    make = _reading(path, shuffle=True, seed=4, max_tokens=256)
    reader = make(rank=1, world_size=2)
    direct = _users(list(reader))
    loader = DataLoader(reader, batch_size=None, num_workers=2)
    batches = list(loader)
    full = [b.user_ids.tolist() for b in batches]
    assert sorted(_users(batches)) == sorted(direct)
    # The share of rank 1 is split between the two workers by row group.
    resumed = make(rank=1, world_size=2)
    resumed.load_state_dict({"epoch": 0, "batches": len(full) - 3})
    rest = [b.user_ids.tolist() for b in DataLoader(resumed, batch_size=None, num_workers=2)]
    assert rest == full[-3:]


def test_time_unit_is_converted_to_seconds(tmp_path: Path) -> None:
    seqs = Sequences(
        user_ids=np.array([0]),
        offsets=np.array([0, 3]),
        item_ids=np.array([1, 2, 1]),
        timestamps=np.array([1_500, 2_000, 4_999]),
        features={},
    )
    path = tmp_path / "ms.parquet"
    write_sequences(path, seqs, SequenceDatasetInfo(num_items=2, time_unit="ms"))
    (batch,) = _reading(path, split="test")()
    assert batch.timestamps.tolist() == [1, 2] and batch.target_timestamps.tolist() == [4]
    assert batch.targets.tolist() == [1] and batch.features[TARGET_KEY].lengths().tolist() == [1]


def test_config_and_file_errors(synthetic, tmp_path: Path) -> None:
    path, seqs = synthetic
    with pytest.raises(ValueError, match=r"max_seq_len \(600\) <= max_tokens \(512\)"):
        _reading(path, max_seq_len=600)
    with pytest.raises(ValueError, match=r"features \['price'\] not in"):
        _reading(path, features=["price"])()
    other = tmp_path / "other.parquet"
    write_sequences(other, seqs.rows(0, 5), SequenceDatasetInfo(num_items=5_000))
    with pytest.raises(DataValidationError, match="other.parquet: catalogue 5000"):
        SequenceReader([path, other])
    with pytest.raises(ValueError, match="15 row groups cannot be shared by 16 ranks"):
        _reading(path)(rank=0, world_size=16)
    names = r"\['none', 'uniform', 'catalogue'\]"
    with pytest.raises(ValueError, match=rf"negatives must be one of {names}, got 'hard'"):
        _reading(path, negatives="hard")()
    for negatives, num_negatives in (("uniform", 0), ("none", -1)):
        with pytest.raises(ValueError, match=f"num_negatives must be >= 1 .*, got {num_negatives}"):
            _reading(path, negatives=negatives, num_negatives=num_negatives)()


def test_item_only_features_and_directory_paths(synthetic, tmp_path: Path) -> None:
    path, _ = synthetic
    reader = SequenceReader([path.parent], ReaderConfig(max_tokens=512, max_seq_len=128), features=[])
    batch = next(iter(reader))
    assert reader.keys == [ITEM_KEY] and batch.features.keys() == sequence_keys([])


def test_pipelineable_to(synthetic) -> None:
    path, _ = synthetic
    batch = next(iter(_reading(path)()))
    assert isinstance(batch, Pipelineable)
    moved = batch.to(torch.device("cpu"), non_blocking=True)
    assert torch.equal(moved.features.values(), batch.features.values())
    assert torch.equal(moved.offsets(), batch.offsets())
    assert torch.equal(moved.timestamps, batch.timestamps)
    evaluation = next(iter(_reading(path, split="test", max_seq_len=8)()))
    assert torch.equal(evaluation.to(torch.device("cpu")).prior_item_ids, evaluation.prior_item_ids)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pin_memory / record_stream need CUDA")
def test_pipelineable_pin_memory_and_record_stream(synthetic) -> None:
    path, _ = synthetic
    batch = next(iter(_reading(path)()))
    pinned = batch.pin_memory()
    assert pinned.features.values().is_pinned() and pinned.timestamps.is_pinned()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        on_gpu = pinned.to(torch.device("cuda"), non_blocking=True)
    on_gpu.record_stream(torch.cuda.current_stream())
    torch.cuda.synchronize()
    assert torch.equal(on_gpu.features.values().cpu(), batch.features.values())


@pytest.fixture(scope="module")
def uneven(tmp_path_factory: pytest.TempPathFactory) -> Tuple[Path, Sequences]:
    """8 row groups, the last of 6 users: neither 2 nor 3 ranks get equal shares."""
    data = generate(SyntheticConfig(num_users=230, median_length=30, max_length=700, seed=8))
    path = tmp_path_factory.mktemp("uneven") / "uneven.parquet"
    write_sequences(path, data.sequences, data.info, row_group_size=32)
    return path, data.sequences


def _check_real_users(batches: List[SequenceBatch], seqs: Sequences, split: Split) -> List[int]:
    """Real users of ``batches`` after checking each one's events and target against the source
    (a training user once, at its oldest window); synthetic user ids are row numbers."""
    end, target = split_positions(seqs.lengths, split)
    users = []
    for batch in batches:
        # A batch is all real users or all padding.
        assert batch.weights.unique().tolist() in ([0.0], [1.0])
        if not batch.weights[0]:
            continue
        kjt = batch.features
        lengths = kjt[ITEM_KEY].lengths().tolist()
        items, cats = kjt[ITEM_KEY].values().split(lengths), kjt["category"].values().split(lengths)
        times = batch.timestamps.split(lengths)
        for b, uid in enumerate(batch.user_ids.tolist()):
            user = seqs.rows(uid, uid + 1)
            start = int(batch.history_starts[b])
            window = slice(start, start + lengths[b])
            assert window.stop == int(end[uid]) or split is Split.TRAIN
            if split is Split.TRAIN and start:
                continue  # a later window of a user (windows: test_batches_match_the_source...)
            np.testing.assert_array_equal(items[b].numpy(), user.item_ids[window])
            np.testing.assert_array_equal(cats[b].numpy(), user.features["category"][window])
            np.testing.assert_array_equal(times[b].numpy(), user.timestamps[window])
            if split is not Split.TRAIN:
                t = int(target[uid])
                assert int(batch.targets[b]) == user.item_ids[t]
                assert int(batch.target_timestamps[b]) == user.timestamps[t]
            users.append(uid)
    return users


def _split_users(seqs: Sequences, split: Split) -> List[int]:
    end, _ = split_positions(seqs.lengths, split)
    return np.flatnonzero(end >= (2 if split is Split.TRAIN else 1)).tolist()


def _same(a: SequenceBatch, b: SequenceBatch) -> bool:
    return all(
        torch.equal(x, y)
        for x, y in [
            (a.features.values(), b.features.values()),
            (a.features.lengths(), b.features.lengths()),
            (a.user_ids, b.user_ids),
            (a.target_timestamps, b.target_timestamps),
            (a.weights, b.weights),
        ]
    )


def _same_users(a: SequenceBatch, b: SequenceBatch) -> bool:
    """Same users with the same events and targets (candidates may differ)."""
    keys = [k for k in a.features.keys() if k != CANDIDATE_KEY]
    return torch.equal(a.user_ids, b.user_ids) and all(
        torch.equal(a.features[k].values(), b.features[k].values())
        and torch.equal(a.features[k].lengths(), b.features[k].lengths())
        for k in keys
    )


def _check_equal_steps(
    per_rank: List[List[SequenceBatch]],
    readers: List[SequenceReader],
    seqs: Sequences,
    split: Split,
    num_workers: Optional[int] = None,
) -> None:
    """Same steps on every rank, every split user once with its events, padding of weight 0."""
    steps = readers[0].num_batches(num_workers)
    assert [len(batches) for batches in per_rank] == [steps] * len(per_rank)
    assert [r.num_batches(num_workers) for r in readers] == [steps] * len(readers)
    users = [u for batches in per_rank for u in _check_real_users(batches, seqs, split)]
    assert sorted(users) == _split_users(seqs, split)
    padding = [b for batches in per_rank for b in batches if not b.weights.any()]
    # The shares are uneven, so some rank pads; every padding batch copies rank 0's first batch
    # (with candidates of its own). Padding is packed as without workers, which here makes the
    # same first batch: it does not reach rank 0's second row group.
    assert padding
    for b in padding:
        assert _same_users(b, per_rank[0][0])


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("split", [Split.TRAIN, Split.VALID])
def test_every_rank_takes_the_same_number_of_steps(uneven, world_size: int, split: Split) -> None:
    path, seqs = uneven
    for epoch in (0, 1):
        readers = [
            _reading(path, split=split, shuffle=True, seed=6)(rank=r, world_size=world_size)
            for r in range(world_size)
        ]
        for reader in readers:
            reader.set_epoch(epoch)
        per_rank = [list(reader) for reader in readers]
        _check_equal_steps(per_rank, readers, seqs, split)
        assert [r.stats.padding_batches for r in readers] == [
            sum(not b.weights.any() for b in batches) for batches in per_rank
        ]
        assert sum(len(_users(batches)) for batches in per_rank) == len(_split_users(seqs, split))


@pytest.mark.parametrize("world_size", [2, 3])
def test_every_rank_takes_the_same_number_of_steps_with_dataloader_workers(uneven, world_size: int) -> None:
    path, seqs = uneven
    make = _reading(path, shuffle=True, seed=6, negatives="uniform", num_negatives=3)
    readers = [make(rank=r, world_size=world_size) for r in range(world_size)]
    per_rank = [list(DataLoader(reader, batch_size=None, num_workers=2)) for reader in readers]
    _check_equal_steps(per_rank, readers, seqs, Split.TRAIN, num_workers=2)
    # Candidates follow the batch's place in the rank's stream, however many workers made it.
    for reader, batches in zip(readers, per_rank):
        direct = list(reader)
        for a, b in zip(direct, batches):
            assert torch.equal(a.candidates, b.candidates)


def test_padding_when_a_rank_has_no_batch(tmp_path: Path) -> None:
    # Row groups of 5 users; in rank 0's (0 and 2) every user is too short to evaluate.
    lengths = np.repeat([2, 6, 2, 6], 5)
    offsets = np.r_[0, np.cumsum(lengths)]
    seqs = Sequences(
        user_ids=np.arange(lengths.size),
        offsets=offsets,
        item_ids=np.ones(offsets[-1], np.int64),
        timestamps=np.arange(offsets[-1]),
        features={},
    )
    path = tmp_path / "short.parquet"
    write_sequences(path, seqs, SequenceDatasetInfo(num_items=1), row_group_size=5)
    make = _reading(path, split="valid", max_tokens=16, max_seq_len=8)
    readers = [make(rank=r, world_size=2) for r in range(2)]
    per_rank = [list(reader) for reader in readers]
    steps = readers[0].num_batches()
    assert steps > 0 and [len(b) for b in per_rank] == [steps, steps]
    # Rank 0 only pads, with the first batch of rank 1 (the first rank with a batch).
    assert all(not b.weights.any() and _same_users(b, per_rank[1][0]) for b in per_rank[0])
    assert readers[0].stats.padding_batches == steps and readers[0].stats.users == 0
    assert sorted(_users(per_rank[1])) == [*range(5, 10), *range(15, 20)]
    loaded = list(DataLoader(make(rank=0, world_size=2), batch_size=None, num_workers=2))
    # Rank 1's workers each pack one of its row groups, so batches no longer span them: 4 steps.
    assert len(loaded) == readers[0].num_batches(2) == 4 and not any(b.weights.any() for b in loaded)
    # Nothing to read on any rank: no step at all.
    short = tmp_path / "shorter.parquet"
    write_sequences(short, seqs.rows(0, 5), SequenceDatasetInfo(num_items=1), row_group_size=3)
    empty = [_reading(short, split="valid")(rank=r, world_size=2) for r in range(2)]
    assert [r.num_batches() for r in empty] == [0, 0] and not list(empty[0]) + list(empty[1])


def _key(batch: SequenceBatch) -> Tuple:
    return tuple(batch.features.values().tolist()), tuple(batch.user_ids.tolist()), float(batch.weights[0])


def _check_resume(
    make: Callable[..., SequenceReader],
    rank: int,
    world_size: int,
    num_workers: int,
    stops: List[int],
    unordered: List[int],
) -> None:
    """Resuming after ``stops`` batches gives the rest of the pass; after ``unordered``, in some order."""

    def read(reader: SequenceReader) -> List[SequenceBatch]:
        if num_workers:
            return list(DataLoader(reader, batch_size=None, num_workers=num_workers))
        return list(reader)

    reader = make(rank=rank, world_size=world_size)
    reader.set_epoch(2)
    full = read(reader)
    assert not full[-1].weights.any()  # the pass ends with padding, which resuming must keep
    for stop in stops + unordered:
        resumed = make(rank=rank, world_size=world_size)
        resumed.load_state_dict({"epoch": 2, "batches": stop})
        rest = read(resumed)
        assert len(rest) == len(full) - stop
        if stop in stops:
            assert all(_same(a, b) for a, b in zip(rest, full[stop:]))
        else:
            assert sorted(map(_key, rest)) == sorted(map(_key, full[stop:]))


def test_resume_keeps_the_padding(uneven) -> None:
    path, _ = uneven
    make = _reading(path, split="valid", shuffle=True, seed=9, negatives="uniform", num_negatives=4)
    padding = []
    for r in range(3):
        reader = make(rank=r, world_size=3)
        reader.set_epoch(2)
        padding.append(sum(not b.weights.any() for b in reader))
    # Resume on the rank that pads most: at the start, inside its own batches, inside the padding.
    rank = int(np.argmax(padding))
    reader = make(rank=rank, world_size=3)
    reader.set_epoch(2)
    steps = reader.num_batches()
    own = steps - padding[rank]
    assert 0 < own < steps - 1
    _check_resume(make, rank, 3, 0, [0, 1, own - 1, own, steps - 1, steps], [])
    partial = make(rank=rank, world_size=3)
    partial.set_epoch(2)
    for n, _ in enumerate(partial):
        if n == own:  # the first padding batch
            break
    assert partial.state_dict() == {"epoch": 2, "batches": own + 1}
    # A new DataLoader starts its round of workers at worker 0: resumed inside a round (after
    # worker 0's first batch, before worker 1's), the same batches come in another order.
    _check_resume(make, rank, 3, 2, [2, reader.num_batches(2) - 1], [1])


def test_uniform_candidates(uneven) -> None:
    path, seqs = uneven
    num_items = _reading(path)().info.num_items
    make = _reading(path, shuffle=True, negatives="uniform", num_negatives=50)
    first = list(make(rank=1, world_size=2))
    again = list(make(rank=1, world_size=2))
    for batch, twin in zip(first, again):
        cands = batch.candidates
        assert cands.dtype == torch.int64 and cands.numel() == 50
        assert 1 <= int(cands.min()) and int(cands.max()) <= num_items
        lengths = batch.features[CANDIDATE_KEY].lengths()
        assert lengths[:-1].eq(0).all() and int(lengths[-1]) == 50
        assert torch.equal(cands, twin.candidates)
    assert len({tuple(b.candidates.tolist()) for b in first}) == len(first)  # a fresh draw per batch
    other_rank = make(rank=0, world_size=2)
    other_epoch = make(rank=1, world_size=2)
    other_epoch.set_epoch(1)
    for reader in (other_rank, other_epoch):
        assert not torch.equal(next(iter(reader)).candidates, first[0].candidates)


def test_catalogue_candidates_in_every_split(uneven) -> None:
    path, _ = uneven
    for split in Split:
        reader = _reading(path, split=split, negatives="catalogue")()
        catalogue = torch.arange(1, reader.info.num_items + 1)
        for batch in reader:
            assert torch.equal(batch.candidates, catalogue)
            lengths = batch.features[CANDIDATE_KEY].lengths()
            assert lengths[:-1].eq(0).all() and int(lengths[-1]) == catalogue.numel()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_rank(rank: int, world_size: int, port: int, path: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        reader = SequenceReader([path], ReaderConfig(max_tokens=512, max_seq_len=128, shuffle=True))
        users = _users(list(reader))
        gathered: List[List[int]] = [[] for _ in range(world_size)]
        dist.all_gather_object(gathered, users)
        assert not set(gathered[0]) & set(gathered[1])
        assert sorted(set(gathered[0] + gathered[1])) == list(range(reader.info.num_users))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_gloo_ranks_default_to_their_process_group_share(synthetic) -> None:
    path, _ = synthetic
    mp.spawn(_gloo_rank, args=(2, _free_port(), str(path)), nprocs=2, join=True)
