"""Streams Parquet sequence files into token-bounded :class:`SequenceBatch` es.

Sharding: the row groups of all files form one list; each epoch it is optionally shuffled
(same order on every rank), rank ``r`` of ``W`` takes positions ``r, r + W, ...`` and, inside
a ``DataLoader``, worker ``w`` of ``K`` takes every ``K``-th of those. Shares are disjoint and
together cover every row group; ranks may get different numbers of batches.

Batching: users are packed greedily, in (optionally shuffled) order, while the batch holds at
most ``max_tokens`` events (and ``max_batch_size`` users, if set); batches may span row groups.
A user's input is cut to its most recent ``max_seq_len`` events (``max_seq_len <= max_tokens``),
so a 10k-event user never makes a batch explode. Truncation is a configured choice, counted in
:attr:`SequenceReader.stats` and logged once per epoch.

Splits (see :mod:`torchrec_hytrec.data.splits`): training batches hold all but each user's last
two events (targets ``-1``); evaluation batches hold the history before the held-out event and
its item / time in ``targets`` / ``target_timestamps``. Users without a row in the split (e.g.
fewer than 3 events in valid / test, fewer than 2 input events in train) are skipped and
counted in the stats.

Shuffling is two-level (row-group order, then users within a row group), seeded by
``(seed, epoch)``, so an epoch's batch stream is a pure function of the config, the epoch, the
rank and the number of workers. That is what makes resumption exact: :meth:`state_dict` records
the epoch and how many batches were consumed, and a reader given it by :meth:`load_state_dict`
skips exactly those batches (without building their tensors), including the share each
``DataLoader`` worker had already produced.
"""

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from torch.utils.data import IterableDataset, get_worker_info
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_hytrec.data.batch import ITEM_KEY, SequenceBatch
from torchrec_hytrec.data.schema import (
    ITEM_IDS,
    TIME_UNITS,
    DataValidationError,
    PathLike,
    SequenceDatasetInfo,
    info_of,
    open_parquet,
    read_row_group,
)
from torchrec_hytrec.data.splits import Split, split_positions

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReaderConfig:
    """What and how a :class:`SequenceReader` reads.

    Args:
        paths: Parquet files, or directories whose ``*.parquet`` files are read in name order.
        split: ``train``, ``valid`` or ``test`` (leave-one-out).
        max_tokens: most events in one batch.
        max_seq_len: most recent events kept per user (older ones are not read).
        max_batch_size: most users in one batch (``None``: bounded by tokens only).
        shuffle: shuffle row groups and users within row groups each epoch.
        seed: shuffling seed.
        features: side features to load (``None``: all in the file metadata).

    Example::

        config = ReaderConfig(paths=["train.parquet"], max_tokens=32768, max_seq_len=2048)
    """

    paths: Sequence[PathLike]
    split: Split = Split.TRAIN
    max_tokens: int = 65_536
    max_seq_len: int = 2_048
    max_batch_size: Optional[int] = None
    shuffle: bool = False
    seed: int = 0
    features: Optional[Sequence[str]] = None

    def __post_init__(self) -> None:
        if not 1 <= self.max_seq_len <= self.max_tokens:
            raise ValueError(
                f"need 1 <= max_seq_len ({self.max_seq_len}) <= max_tokens ({self.max_tokens})"
            )
        if self.max_batch_size is not None and self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        object.__setattr__(self, "split", Split(self.split))


@dataclass
class ReaderStats:
    """Counts of one pass of a reader (one worker).

    Args:
        users: users yielded.
        events: events yielded.
        truncated_users: users cut to ``max_seq_len``.
        truncated_events: older events those users lost.
        skipped_users: users with no row in the split.

    Example::

        reader.stats.truncated_users
    """

    users: int = 0
    events: int = 0
    truncated_users: int = 0
    truncated_events: int = 0
    skipped_users: int = 0


@dataclass(frozen=True)
class _RowGroup:
    file: int
    index: int
    first_row: int


@dataclass
class _Block:
    """Users of one row group ready for batching: inputs gathered, in batching order."""

    lengths: np.ndarray
    offsets: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64))
    user_ids: Optional[np.ndarray] = None
    values: Optional[List[np.ndarray]] = None
    timestamps: Optional[np.ndarray] = None
    targets: Optional[np.ndarray] = None
    target_timestamps: Optional[np.ndarray] = None


def _gather_index(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Flat event indices of ranges ``[starts, starts + lengths)`` concatenated."""
    out_offsets = np.r_[0, np.cumsum(lengths)]
    return np.repeat(starts - out_offsets[:-1], lengths) + np.arange(out_offsets[-1])


def _pack(
    blocks: Iterator[_Block], max_tokens: int, max_batch_size: Optional[int]
) -> Iterator[List[Tuple[_Block, int, int]]]:
    """Greedy token-bounded packing; yields batches as lists of ``(block, first, stop)`` users."""
    max_users = max_batch_size or np.iinfo(np.int64).max
    pending: List[Tuple[_Block, int, int]] = []
    tokens = users = 0
    for block in blocks:
        start = 0
        for i, n in enumerate(block.lengths.tolist()):
            if tokens + n > max_tokens or users == max_users:
                yield pending + ([(block, start, i)] if i > start else [])
                pending, tokens, users, start = [], 0, 0, i
            tokens += n
            users += 1
        if block.lengths.size > start:
            pending.append((block, start, block.lengths.size))
    if pending:
        yield pending


def _worker_skip(consumed: int, counts: Sequence[int], worker: int) -> int:
    """Batches of ``worker`` among the first ``consumed`` batches a ``DataLoader`` yields.

    An in-order ``DataLoader`` returns the ``k``-th batch of every worker still running before
    any ``(k+1)``-th, in worker order, so batch ``(w, k)`` comes at its place in ``(k, w)`` order.
    """
    skip = 0
    seen = 0
    for k in range(max(counts, default=0)):
        for w, count in enumerate(counts):
            if k >= count:
                continue
            if seen == consumed:
                return skip
            seen += 1
            skip += w == worker
    return skip


class SequenceReader(IterableDataset):
    """Iterable of :class:`SequenceBatch` over Parquet sequence files (see module docstring).

    Usable directly (``for batch in reader``) or in a ``torch.utils.data.DataLoader`` with
    ``batch_size=None`` and any number of workers.

    Args:
        config: what to read and how to batch it.
        rank: this process' rank (default: ``torch.distributed`` rank, or 0).
        world_size: number of ranks (default: ``torch.distributed`` world size, or 1).

    Example::

        reader = SequenceReader(ReaderConfig(paths=["data.parquet"], shuffle=True))
        for epoch in range(2):
            reader.set_epoch(epoch)
            for batch in reader:
                embeddings = ec(batch.features)
    """

    def __init__(
        self, config: ReaderConfig, rank: Optional[int] = None, world_size: Optional[int] = None
    ) -> None:
        super().__init__()
        distributed = dist.is_available() and dist.is_initialized()
        self._config = config
        self._rank = rank if rank is not None else (dist.get_rank() if distributed else 0)
        self._world_size = (
            world_size if world_size is not None else (dist.get_world_size() if distributed else 1)
        )
        if not 0 <= self._rank < self._world_size:
            raise ValueError(f"rank {self._rank} outside world size {self._world_size}")
        self._files = self._list_files(config.paths)
        infos = [info_of(open_parquet(p), str(p)) for p in self._files]
        self._info = self._merge_infos(infos)
        self._time_scales = [TIME_UNITS[i.time_unit] for i in infos]
        names = list(config.features) if config.features is not None else self._info.feature_names
        unknown = sorted(set(names) - set(self._info.feature_names))
        if unknown:
            raise ValueError(f"features {unknown} not in {self._files[0]} (has {self._info.feature_names})")
        self._features = names
        self._row_groups: List[_RowGroup] = []
        for f, path in enumerate(self._files):
            meta = open_parquet(path).metadata
            first_row = 0
            for i in range(meta.num_row_groups):
                self._row_groups.append(_RowGroup(f, i, first_row))
                first_row += meta.row_group(i).num_rows
        if len(self._row_groups) < self._world_size:
            raise ValueError(
                f"{len(self._row_groups)} row groups cannot be shared by {self._world_size} ranks; "
                "write smaller row groups"
            )
        self._epoch = 0
        self._warned_truncation = False
        self._consumed = 0
        self._skip = 0
        self.stats = ReaderStats()

    @staticmethod
    def _list_files(paths: Sequence[PathLike]) -> List[Path]:
        files: List[Path] = []
        for p in map(Path, paths):
            if p.is_dir():
                files.extend(sorted(p.glob("*.parquet")))
            elif p.exists():
                files.append(p)
            else:
                raise FileNotFoundError(f"{p} does not exist")
        if not files:
            raise FileNotFoundError(f"no Parquet files in {list(map(str, paths))}")
        return files

    def _merge_infos(self, infos: List[SequenceDatasetInfo]) -> SequenceDatasetInfo:
        first = infos[0]
        for path, info in zip(self._files[1:], infos[1:]):
            if (info.num_items, info.feature_cardinalities) != (first.num_items, first.feature_cardinalities):
                raise DataValidationError(
                    f"{path}: catalogue {info.num_items} / {info.feature_cardinalities} differs from "
                    f"{self._files[0]}: {first.num_items} / {first.feature_cardinalities}"
                )
        return SequenceDatasetInfo(
            num_items=first.num_items,
            feature_cardinalities=first.feature_cardinalities,
            num_users=sum(i.num_users for i in infos),
            num_events=sum(i.num_events for i in infos),
            source=", ".join(map(str, self._files)),
        )

    @property
    def info(self) -> SequenceDatasetInfo:
        """Dataset facts of all files together (timestamps as read are always seconds)."""
        return self._info

    @property
    def keys(self) -> List[str]:
        """KeyedJaggedTensor keys of the batches: ``item_id`` then the side features."""
        return [ITEM_KEY] + self._features

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch's shuffle; resets the consumed-batch count unless resuming into it."""
        if epoch != self._epoch:
            self._epoch, self._consumed, self._skip = epoch, 0, 0

    def state_dict(self) -> Dict[str, int]:
        """``{"epoch", "batches"}``: batches consumed this epoch by iterating this object.

        When batches come through a ``DataLoader`` with workers, the iteration happens in the
        workers: count the batches you consumed and pass that number to :meth:`load_state_dict`.
        """
        return {"epoch": self._epoch, "batches": self._consumed}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        """Resumes after ``state["batches"]`` batches of ``state["epoch"]``.

        Every iteration of that epoch (a peek at the first batch included) starts at this
        position, until :meth:`set_epoch` moves to another epoch.
        """
        self._epoch, self._consumed, self._skip = int(state["epoch"]), int(state["batches"]), int(state["batches"])

    def _shares(self) -> Tuple[List[List[_RowGroup]], int]:
        """Row groups of every worker of this rank for this epoch, and this worker's index."""
        order = list(self._row_groups)
        if self._config.shuffle:
            perm = np.random.default_rng([self._config.seed, self._epoch]).permutation(len(order))
            order = [order[i] for i in perm]
        mine = order[self._rank :: self._world_size]
        worker = get_worker_info()
        workers, wid = (1, 0) if worker is None else (worker.num_workers, worker.id)
        return [mine[w::workers] for w in range(workers)], wid

    def _row_order(self, group: _RowGroup, num_rows: int) -> Optional[np.ndarray]:
        if not self._config.shuffle:
            return None
        seed = [self._config.seed, self._epoch, group.file, group.index]
        return np.random.default_rng(seed).permutation(num_rows)

    def _input_ranges(
        self, lengths: np.ndarray, order: Optional[np.ndarray]
    ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Kept rows (in batching order), their input start / length, and target positions."""
        end, target = split_positions(lengths, self._config.split)
        min_input = 2 if self._config.split is Split.TRAIN else 1
        rows = np.flatnonzero(end >= min_input)
        if order is not None:
            rows = order[np.isin(order, rows)]
        start = np.maximum(end[rows] - self._config.max_seq_len, 0)
        return rows, start, end[rows] - start, target[rows]

    def _blocks(self, groups: List[_RowGroup], stats: Optional[ReaderStats]) -> Iterator[_Block]:
        """Reads each row group into a :class:`_Block`; ``stats=None`` reads lengths only."""
        files: Dict[int, pq.ParquetFile] = {}
        for group in groups:
            path = self._files[group.file]
            pf = files.setdefault(group.file, open_parquet(path))
            if stats is None:
                raw = pf.read_row_group(group.index, columns=[ITEM_IDS]).column(ITEM_IDS)
                lengths = pc.list_value_length(raw).to_numpy(zero_copy_only=False).astype(np.int64)
                _, _, kept, _ = self._input_ranges(lengths, self._row_order(group, len(lengths)))
                yield _Block(lengths=kept)
                continue
            seqs = read_row_group(pf, group.index, self._info, str(path), group.first_row)
            rows, start, kept, target = self._input_ranges(seqs.lengths, self._row_order(group, seqs.num_users))
            first = seqs.offsets[:-1][rows]
            index = _gather_index(first + start, kept)
            scale = self._time_scales[group.file]
            has_target = target >= 0
            target_index = first + np.where(has_target, target, 0)
            stats.skipped_users += seqs.num_users - rows.size
            stats.truncated_users += int((start > 0).sum())
            stats.truncated_events += int(start.sum())
            yield _Block(
                lengths=kept,
                offsets=np.r_[0, np.cumsum(kept)],
                user_ids=seqs.user_ids[rows],
                values=[seqs.item_ids[index]] + [seqs.features[k][index] for k in self._features],
                timestamps=seqs.timestamps[index] // scale,
                targets=np.where(has_target, seqs.item_ids[target_index], -1),
                target_timestamps=np.where(has_target, seqs.timestamps[target_index] // scale, -1),
            )

    def _to_batch(self, parts: List[Tuple[_Block, int, int]]) -> SequenceBatch:
        blocks = [b for b, _, _ in parts]
        rows = [slice(i, j) for _, i, j in parts]
        spans = [slice(b.offsets[i], b.offsets[j]) for b, i, j in parts]

        def per_user(name: str) -> torch.Tensor:
            return torch.from_numpy(np.concatenate([getattr(b, name)[r] for b, r in zip(blocks, rows)]))

        values = [b.values[k][s] for k in range(len(self.keys)) for b, s in zip(blocks, spans)]
        lengths = per_user("lengths").to(torch.int32)
        return SequenceBatch(
            features=KeyedJaggedTensor(
                keys=self.keys,
                values=torch.from_numpy(np.concatenate(values)),
                lengths=lengths.repeat(len(self.keys)),
            ),
            timestamps=torch.from_numpy(np.concatenate([b.timestamps[s] for b, s in zip(blocks, spans)])),
            user_ids=per_user("user_ids"),
            targets=per_user("targets"),
            target_timestamps=per_user("target_timestamps"),
        )

    def _count_batches(self, groups: List[_RowGroup]) -> int:
        blocks = self._blocks(groups, stats=None)
        return sum(1 for _ in _pack(blocks, self._config.max_tokens, self._config.max_batch_size))

    def __iter__(self) -> Iterator[SequenceBatch]:
        shares, wid = self._shares()
        skip = self._consumed = self._skip
        if skip and len(shares) > 1:
            skip = _worker_skip(skip, [self._count_batches(s) for s in shares], wid)
        stats = self.stats = ReaderStats()
        blocks = self._blocks(shares[wid], stats)
        for n, parts in enumerate(_pack(blocks, self._config.max_tokens, self._config.max_batch_size)):
            if n < skip:
                continue
            batch = self._to_batch(parts)
            stats.users += batch.batch_size
            stats.events += batch.timestamps.numel()
            self._consumed += 1
            yield batch
        if stats.truncated_users:
            # The same users are cut every epoch: say it once loudly, then only at INFO.
            log = logger.info if self._warned_truncation else logger.warning
            self._warned_truncation = True
            log(
                "epoch %d rank %d worker %d: %d users cut to their last max_seq_len=%d events "
                "(%d older events not read)", self._epoch, self._rank, wid, stats.truncated_users,
                self._config.max_seq_len, stats.truncated_events,
            )
