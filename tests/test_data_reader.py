"""SequenceReader: batches against the source, token budget, sharding, shuffling, resumption,
DataLoader workers, 2 real gloo ranks, and the Pipelineable contract."""

import logging
import os
import socket
from pathlib import Path
from typing import List, Tuple

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader
from torchrec.streamable import Pipelineable

from torchrec_hytrec.data.batch import ITEM_KEY, SequenceBatch
from torchrec_hytrec.data.reader import ReaderConfig, SequenceReader, _worker_skip
from torchrec_hytrec.data.schema import DataValidationError, SequenceDatasetInfo, Sequences, write_sequences
from torchrec_hytrec.data.splits import Split, split_positions
from torchrec_hytrec.data.synthetic import SyntheticConfig, generate


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Tuple[Path, Sequences]:
    config = SyntheticConfig(num_users=300, median_length=30, max_length=700, seed=3)
    data = generate(config)
    path = tmp_path_factory.mktemp("reader") / "syn.parquet"
    write_sequences(path, data.sequences, data.info, row_group_size=20)
    return path, data.sequences


def _config(path: Path, **kwargs) -> ReaderConfig:
    return ReaderConfig(paths=[path], **{"max_tokens": 512, "max_seq_len": 128, **kwargs})


def _users(batches: List[SequenceBatch]) -> List[int]:
    return [u for b in batches for u in b.user_ids.tolist()]


def test_batches_match_the_source_within_the_token_budget(synthetic) -> None:
    path, seqs = synthetic
    reader = SequenceReader(_config(path))
    assert reader.keys == [ITEM_KEY, "category"]
    end, _ = split_positions(seqs.lengths, Split.TRAIN)
    seen = set()
    for batch in reader:
        kjt = batch.features
        lengths = kjt[ITEM_KEY].lengths()
        assert kjt.keys() == reader.keys
        assert torch.equal(kjt["category"].lengths(), lengths)
        assert int(lengths.sum()) <= 512 and batch.timestamps.numel() == int(lengths.sum())
        assert (batch.targets == -1).all() and (batch.target_timestamps == -1).all()
        items = kjt[ITEM_KEY].to_dense()
        cats = kjt["category"].to_dense()
        times = batch.timestamps.split(lengths.tolist())
        for b, uid in enumerate(batch.user_ids.tolist()):
            user = seqs.rows(uid, uid + 1)  # synthetic user ids are row numbers
            e = int(end[uid])
            window = slice(max(0, e - 128), e)
            np.testing.assert_array_equal(items[b].numpy(), user.item_ids[window])
            np.testing.assert_array_equal(cats[b].numpy(), user.features["category"][window])
            np.testing.assert_array_equal(times[b].numpy(), user.timestamps[window])
            seen.add(uid)
    assert seen == set(range(seqs.num_users))
    assert reader.stats.users == seqs.num_users
    assert reader.stats.truncated_users == int((end > 128).sum()) > 0
    assert reader.stats.truncated_events == int(np.maximum(end - 128, 0).sum())


def test_batches_are_packed_greedily_and_respect_max_batch_size(synthetic) -> None:
    path, _ = synthetic
    batches = list(SequenceReader(_config(path, max_batch_size=7)))
    sizes = [b.batch_size for b in batches]
    tokens = [b.timestamps.numel() for b in batches]
    assert max(sizes) == 7
    # Greedy: a batch was closed only because the next user would not fit.
    for b, nxt in zip(batches[:-1], batches[1:]):
        first_next = int(nxt.features[ITEM_KEY].lengths()[0])
        assert b.batch_size == 7 or b.timestamps.numel() + first_next > 512
    assert sum(tokens) == sum(int(b.features[ITEM_KEY].lengths().sum()) for b in batches)


def test_ten_thousand_event_user_is_truncated_not_exploding(tmp_path: Path, caplog) -> None:
    lengths = np.array([10_000, 5, 7])
    offsets = np.r_[0, np.cumsum(lengths)]
    seqs = Sequences(
        user_ids=np.array([1, 2, 3]), offsets=offsets, item_ids=np.ones(offsets[-1], np.int64),
        timestamps=np.arange(offsets[-1]), features={},
    )
    path = tmp_path / "long.parquet"
    write_sequences(path, seqs, SequenceDatasetInfo(num_items=1))
    reader = SequenceReader(_config(path, max_tokens=1024, max_seq_len=512, split="test"))
    with caplog.at_level(logging.WARNING, logger="torchrec_hytrec.data.reader"):
        batches = list(reader)
    assert all(b.timestamps.numel() <= 1024 for b in batches)
    first = batches[0]
    assert first.user_ids[0] == 1 and int(first.features[ITEM_KEY].lengths()[0]) == 512
    assert first.timestamps[511] == 9_998 and first.target_timestamps[0] == 9_999
    assert "1 users cut to their last max_seq_len=512 events (9487 older events not read)" in caplog.text
    # Every pass cuts the same users: later passes say it at INFO only.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="torchrec_hytrec.data.reader"):
        assert len(list(reader)) == len(batches)
    assert "users cut" not in caplog.text


def test_two_ranks_read_disjoint_shares_covering_all_users(synthetic) -> None:
    path, seqs = synthetic
    for epoch in (0, 1):
        shares = []
        for rank in range(2):
            reader = SequenceReader(_config(path, shuffle=True, seed=5), rank=rank, world_size=2)
            reader.set_epoch(epoch)
            shares.append(_users(list(reader)))
        assert not set(shares[0]) & set(shares[1])
        assert sorted(shares[0] + shares[1]) == list(range(seqs.num_users))
        assert abs(len(shares[0]) - len(shares[1])) < 60


def test_shuffle_is_seeded_per_epoch(synthetic) -> None:
    path, _ = synthetic
    reader = SequenceReader(_config(path, shuffle=True, seed=1))
    first = _users(list(reader))
    assert _users(list(reader)) == first
    reader.set_epoch(1)
    second = _users(list(reader))
    assert second != first and sorted(second) == sorted(first)
    assert _users(list(SequenceReader(_config(path)))) == sorted(first)


def test_resume_continues_where_it_left(synthetic) -> None:
    path, _ = synthetic
    config = _config(path, shuffle=True, seed=2)
    reader = SequenceReader(config)
    reader.set_epoch(3)
    full = list(reader)
    assert len(full) > 10
    partial = SequenceReader(config)
    partial.set_epoch(3)
    for n, _ in enumerate(partial):
        if n == 4:
            break
    state = partial.state_dict()
    assert state == {"epoch": 3, "batches": 5}
    resumed = SequenceReader(config)
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


def test_dataloader_workers_split_the_rank_share_and_resume(synthetic) -> None:
    path, seqs = synthetic
    config = _config(path, shuffle=True, seed=4, max_tokens=256)
    reader = SequenceReader(config, rank=1, world_size=2)
    direct = _users(list(reader))
    loader = DataLoader(reader, batch_size=None, num_workers=2)
    full = [b.user_ids.tolist() for b in loader]
    assert sorted(u for b in full for u in b) == sorted(direct)
    # The share of rank 1 is split between the two workers by row group.
    resumed = SequenceReader(config, rank=1, world_size=2)
    resumed.load_state_dict({"epoch": 0, "batches": len(full) - 3})
    rest = [b.user_ids.tolist() for b in DataLoader(resumed, batch_size=None, num_workers=2)]
    assert rest == full[-3:]


def test_time_unit_is_converted_to_seconds(tmp_path: Path) -> None:
    seqs = Sequences(
        user_ids=np.array([0]), offsets=np.array([0, 3]), item_ids=np.array([1, 2, 1]),
        timestamps=np.array([1_500, 2_000, 4_999]), features={},
    )
    path = tmp_path / "ms.parquet"
    write_sequences(path, seqs, SequenceDatasetInfo(num_items=2, time_unit="ms"))
    (batch,) = SequenceReader(_config(path, split="test"))
    assert batch.timestamps.tolist() == [1, 2] and batch.target_timestamps.tolist() == [4]


def test_config_and_file_errors(synthetic, tmp_path: Path) -> None:
    path, seqs = synthetic
    with pytest.raises(ValueError, match=r"max_seq_len \(600\) <= max_tokens \(512\)"):
        _config(path, max_seq_len=600)
    with pytest.raises(ValueError, match=r"features \['price'\] not in"):
        SequenceReader(_config(path, features=["price"]))
    other = tmp_path / "other.parquet"
    write_sequences(other, seqs.rows(0, 5), SequenceDatasetInfo(num_items=5_000))
    with pytest.raises(DataValidationError, match="other.parquet: catalogue 5000"):
        SequenceReader(ReaderConfig(paths=[path, other]))
    with pytest.raises(ValueError, match="15 row groups cannot be shared by 16 ranks"):
        SequenceReader(_config(path), rank=0, world_size=16)


def test_item_only_features_and_directory_paths(synthetic, tmp_path: Path) -> None:
    path, _ = synthetic
    reader = SequenceReader(ReaderConfig(paths=[path.parent], features=[], max_tokens=512, max_seq_len=128))
    batch = next(iter(reader))
    assert batch.features.keys() == [ITEM_KEY]


def test_pipelineable_to(synthetic) -> None:
    path, _ = synthetic
    batch = next(iter(SequenceReader(_config(path))))
    assert isinstance(batch, Pipelineable)
    moved = batch.to(torch.device("cpu"), non_blocking=True)
    assert torch.equal(moved.features.values(), batch.features.values())
    assert torch.equal(moved.offsets(), batch.offsets())
    assert torch.equal(moved.timestamps, batch.timestamps)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pin_memory / record_stream need CUDA")
def test_pipelineable_pin_memory_and_record_stream(synthetic) -> None:
    path, _ = synthetic
    batch = next(iter(SequenceReader(_config(path))))
    pinned = batch.pin_memory()
    assert pinned.features.values().is_pinned() and pinned.timestamps.is_pinned()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        on_gpu = pinned.to(torch.device("cuda"), non_blocking=True)
    on_gpu.record_stream(torch.cuda.current_stream())
    torch.cuda.synchronize()
    assert torch.equal(on_gpu.features.values().cpu(), batch.features.values())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_rank(rank: int, world_size: int, port: int, path: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        reader = SequenceReader(ReaderConfig(paths=[path], max_tokens=512, max_seq_len=128, shuffle=True))
        users = _users(list(reader))
        gathered: List[List[int]] = [[] for _ in range(world_size)]
        dist.all_gather_object(gathered, users)
        assert not set(gathered[0]) & set(gathered[1])
        assert sorted(gathered[0] + gathered[1]) == list(range(reader.info.num_users))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_gloo_ranks_default_to_their_process_group_share(synthetic) -> None:
    path, _ = synthetic
    mp.spawn(_gloo_rank, args=(2, _free_port(), str(path)), nprocs=2, join=True)
