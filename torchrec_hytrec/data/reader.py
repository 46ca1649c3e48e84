"""Streams Parquet sequence files into token-bounded :class:`SequenceBatch` es.

Sharding: the row groups of all files form one list; each epoch it is optionally shuffled
(same order on every rank), rank ``r`` of ``W`` takes positions ``r, r + W, ...`` and, inside
a ``DataLoader``, worker ``w`` of ``K`` takes every ``K``-th of those. Shares are disjoint and
together cover every row group.

Equal steps: every sharded step is a collective, so a rank that ran out of batches early would
deadlock the others. Each rank therefore counts, from per-user lengths cached at construction,
the batches of every rank's share this epoch (a pure function of the files, the config, the
epoch and the number of ``DataLoader`` workers, which must be the same on all ranks) and ends
its epoch (in a ``DataLoader``: worker 0's share) with as many *padding batches* as it lacks to
the largest count: copies, with all ``weights`` zero, of the first batch of the first rank
that has any, packed as without workers (so every rank builds the same one). No batch is dropped;
:meth:`SequenceReader.num_batches` is the per-rank count, padding included.

Batching: users are packed greedily, in (optionally shuffled) order, while the batch holds at
most ``max_tokens`` events (and ``max_batch_size`` users, if set); batches may span row groups.
No batch row exceeds ``max_seq_len`` events (``max_seq_len <= max_tokens``), so a 10k-event
user never makes a batch explode, and no training event is left out: a longer training history
is read as consecutive windows, each after the oldest starting with ``overlap`` events of the
previous one as context (:class:`ReaderConfig`; the batch's ``context_lengths``), so every event
but the user's first is predicted exactly once per epoch (``stats.targets`` counts them). An
evaluation row holds the last ``max_seq_len`` events before its target; that cut is counted in
:attr:`SequenceReader.stats` and logged once per epoch, and the items of the events it cut ride
in the batch's ``prior_item_ids`` (the seen items a ranking may remove, never model input).

Splits (see :mod:`torchrec_hytrec.data.splits`): training batches hold all but each user's last
two events (no ``target_item_id``, ``target_timestamps`` ``-1``); evaluation batches hold the
history before the held-out event and its item / time in ``target_item_id`` (one per user) /
``target_timestamps``. Users without a row in the split (e.g. fewer than 3 events in valid /
test, fewer than 2 input events in train) are skipped and counted in the stats.

Softmax candidates (``negatives``, every split): none, ``num_negatives`` uniform
item ids, or the whole catalogue, all in the last user's slot of ``candidate_item_id``. Uniform
draws are seeded by ``(seed, epoch, rank, b)``, ``b`` the batch's position in the rank's stream,
so they do not depend on the number of ``DataLoader`` workers.

Shuffling is two-level (row-group order, then users within a row group), seeded by
``(seed, epoch)``, so an epoch's batch stream is a pure function of the config, the epoch, the
rank and the number of workers. That is what makes resumption exact: :meth:`state_dict` records
the epoch and how many batches (padding included) were consumed, and a reader given it by
:meth:`load_state_dict` skips exactly those batches (without building their tensors), including
the share each ``DataLoader`` worker had already produced.
"""

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from torch.utils.data import IterableDataset, get_worker_info
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_hytrec.data.batch import ITEM_KEY, SequenceBatch, sequence_keys, training_queries
from torchrec_hytrec.data.parquet import info_of, open_parquet, read_row_group
from torchrec_hytrec.data.schema import (
    ITEM_IDS,
    MAPPING_COLUMNS,
    MAPPING_SUFFIX,
    TIME_UNITS,
    USER_ID,
    DataValidationError,
    PathLike,
    SequenceDatasetInfo,
)
from torchrec_hytrec.data.splits import Split, split_positions

logger = logging.getLogger(__name__)

NEGATIVES = ("none", "uniform", "catalogue")
# Appended to the candidates' seed so their stream never coincides with a row group's shuffle
# (seeded by ``[seed, epoch, file, row_group]``, also four integers).
_CANDIDATE_STREAM = 1


@dataclass(frozen=True)
class ReaderConfig:
    """How a :class:`SequenceReader` batches what it reads (what it reads is given to the reader).

    Args:
        max_tokens: most events in one batch.
        max_seq_len: most events of one batch row. A training history longer than this is read
            as consecutive windows of at most ``max_seq_len`` events (see ``window_overlap``), so
            every event is read and predicted; an evaluation row keeps the last ``max_seq_len``
            events before its target.
        window_overlap: events each training window after a user's oldest repeats from the one
            before it, as context it reads but does not predict again; ``None``: half of
            ``max_seq_len``.
        max_batch_size: most rows in one batch (``None``: bounded by tokens only).
        shuffle: shuffle row groups and users within row groups each epoch.

    Example::

        >>> from torchrec_hytrec import ReaderConfig
        >>> config = ReaderConfig(max_tokens=32768, max_seq_len=2048, shuffle=True)
        >>> config.overlap, config.stride  # a 5000-event input: windows end at 5000, 3976, 2952, 1928
        (1024, 1024)
    """

    max_tokens: int = 65_536
    max_seq_len: int = 2_048
    window_overlap: Optional[int] = None
    max_batch_size: Optional[int] = None
    shuffle: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.max_seq_len <= self.max_tokens:
            raise ValueError(f"need 1 <= max_seq_len ({self.max_seq_len}) <= max_tokens ({self.max_tokens})")
        if self.window_overlap is not None and not 0 <= self.window_overlap < self.max_seq_len:
            raise ValueError(
                f"window_overlap must be in [0, max_seq_len = {self.max_seq_len}), got {self.window_overlap}"
            )
        if self.max_batch_size is not None and self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")

    @property
    def overlap(self) -> int:
        """Context events at the start of every training window but a user's oldest."""
        return self.max_seq_len // 2 if self.window_overlap is None else self.window_overlap

    @property
    def stride(self) -> int:
        """Events between the ends of two consecutive training windows of a user."""
        return self.max_seq_len - self.overlap


@dataclass
class ReaderStats:
    """Counts of one pass of a reader (one worker).

    Args:
        users: real (weight 1) rows yielded (a training history read as several windows counts
            once per window).
        events: events of those rows yielded (a window's context included).
        targets: training targets among them (every training event but each user's first,
            once); 0 for evaluation splits.
        windowed_users: training histories longer than ``max_seq_len``, read as several windows.
        truncated_users: evaluation rows cut to their last ``max_seq_len`` events.
        truncated_events: older events those rows do not hold.
        skipped_users: users with no row in the split.
        padding_batches: padding (all-zero weight) batches yielded.

    Example::

        reader.stats.targets
    """

    users: int = 0
    events: int = 0
    targets: int = 0
    windowed_users: int = 0
    truncated_users: int = 0
    truncated_events: int = 0
    skipped_users: int = 0
    padding_batches: int = 0


@dataclass(frozen=True)
class _RowGroup:
    file: int
    index: int
    first_row: int
    # Events of every row, cached so batches can be counted without reading the data.
    lengths: np.ndarray = field(compare=False, repr=False)


@dataclass
class _Ranges:
    """The batch rows of one row group's users: a user's row (``users``) may repeat, once per
    training window; ``starts`` / ``lengths`` place each row in the user's events, ``contexts``
    are its leading context events, ``targets`` the held-out event's position (``-1`` in
    training)."""

    users: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray
    contexts: np.ndarray
    targets: np.ndarray


@dataclass
class _Block:
    """Users of one row group ready for batching: inputs gathered, in batching order.

    ``values`` are the timestamps (seconds), the item ids and the side features, in key order;
    ``prior_items`` (evaluation only) the items before each row, at ``prior_offsets``.
    """

    lengths: np.ndarray
    contexts: np.ndarray
    history_starts: np.ndarray
    offsets: np.ndarray
    user_ids: np.ndarray
    values: List[np.ndarray]
    targets: np.ndarray
    target_timestamps: np.ndarray
    prior_items: Optional[np.ndarray] = None
    prior_offsets: Optional[np.ndarray] = None


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


def _count_packed(lengths: np.ndarray, max_tokens: int, max_batch_size: Optional[int]) -> int:
    """Batches :func:`_pack` makes of users with these lengths (each ``<= max_tokens``).

    Every rank counts every rank's batches each epoch, so this jumps a whole batch per step
    (a binary search on the token prefix sums) instead of walking the users like :func:`_pack`.
    """
    prefix = np.r_[0, np.cumsum(lengths)]
    max_users = max_batch_size or lengths.size
    start = batches = 0
    while start < lengths.size:
        fits = int(np.searchsorted(prefix, prefix[start] + max_tokens, side="right")) - 1
        start = min(fits, start + max_users)
        batches += 1
    return batches


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


def _stream_index(counts: Sequence[int], worker: int, k: int) -> int:
    """Position of ``worker``'s ``k``-th batch in the ``DataLoader``'s output (see :func:`_worker_skip`)."""
    return sum(min(count, k) for count in counts) + sum(count > k for count in counts[:worker])


def _is_mapping(path: Path) -> bool:
    """Whether ``path`` is an id mapping the converter saved next to its output."""
    if not path.name.endswith(MAPPING_SUFFIX):
        return False
    try:
        return pq.read_schema(str(path)).names == MAPPING_COLUMNS
    except (OSError, ValueError, pa.ArrowException):
        # Not readable as a mapping: kept, so that reading it names what is wrong.
        return False


class SequenceReader(IterableDataset):
    """Iterable of :class:`SequenceBatch` over Parquet sequence files (see module docstring).

    Usable directly (``for batch in reader``) or in a ``torch.utils.data.DataLoader`` with
    ``batch_size=None`` and any number of workers (the same on every rank). Every rank yields
    :meth:`num_batches` batches per epoch; the last ones of a rank may be padding batches, whose
    ``weights`` are all zero.

    Args:
        paths: Parquet files, or directories whose ``*.parquet`` files are read in name order
            (the converter's id mappings, ``*.map.parquet``, skipped). No file may be given twice,
            and no user may have rows in two places (row groups or files).
        config: how to batch (:class:`ReaderConfig`).
        split: ``train``, ``valid`` or ``test`` (leave-one-out).
        features: side features to load (``None``: all in the file metadata).
        negatives: softmax candidates of every batch (``candidate_item_id``): ``"none"``,
            ``"uniform"`` (``num_negatives`` item ids drawn uniformly, with replacement, from
            ``[1, num_items]``) or ``"catalogue"`` (every item id, ``1 .. num_items``).
        num_negatives: candidates per batch with ``negatives="uniform"`` (>= 1); unused otherwise.
        seed: shuffling and uniform-candidate seed.
        rank: this process' rank (default: ``torch.distributed`` rank, or 0).
        world_size: number of ranks (default: ``torch.distributed`` world size, or 1).

    Example::

        >>> import tempfile
        >>> from pathlib import Path
        >>> from torchrec_hytrec import ReaderConfig, SequenceReader
        >>> from torchrec_hytrec.data.parquet import write_sequences
        >>> from torchrec_hytrec.data.synthetic import SyntheticConfig, generate
        >>> data = generate(SyntheticConfig(num_users=40, median_length=10, max_length=30, seed=0))
        >>> path = Path(tempfile.mkdtemp()) / "seq.parquet"
        >>> _ = write_sequences(path, data.sequences, data.info, row_group_size=8)
        >>> reader = SequenceReader([path], ReaderConfig(max_tokens=256, max_seq_len=64),
        ...                         negatives="uniform", num_negatives=16, rank=1, world_size=2)
        >>> reader.set_epoch(0)
        >>> batches = list(reader)  # every rank yields reader.num_batches() of them
        >>> len(batches) == reader.num_batches(), batches[0].candidates.numel()
        (True, 16)
        >>> # Padding batches (weights 0) keep this rank stepping while the other still has data.
        >>> sorted({float(b.weights.sum()) > 0 for b in batches})
        [False, True]
    """

    def __init__(
        self,
        paths: Sequence[PathLike],
        config: Optional[ReaderConfig] = None,
        *,
        split: Union[Split, str] = Split.TRAIN,
        features: Optional[Sequence[str]] = None,
        negatives: str = "none",
        num_negatives: int = 0,
        seed: int = 0,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
    ) -> None:
        super().__init__()
        if negatives not in NEGATIVES:
            raise ValueError(f"negatives must be one of {list(NEGATIVES)}, got {negatives!r}")
        if num_negatives < 0 or (negatives == "uniform" and num_negatives < 1):
            raise ValueError(
                f"num_negatives must be >= 1 with negatives='uniform' (>= 0 otherwise), got {num_negatives}"
            )
        distributed = dist.is_available() and dist.is_initialized()
        self._config = config if config is not None else ReaderConfig()
        self._split = Split(split)
        self._negatives, self._num_negatives, self._seed = negatives, num_negatives, seed
        self._rank = rank if rank is not None else (dist.get_rank() if distributed else 0)
        self._world_size = (
            world_size if world_size is not None else (dist.get_world_size() if distributed else 1)
        )
        if not 0 <= self._rank < self._world_size:
            raise ValueError(f"rank {self._rank} outside world size {self._world_size}")
        self._files = self._list_files(paths)
        infos = [info_of(open_parquet(p), str(p)) for p in self._files]
        self._info = self._merge_infos(infos)
        self._time_scales = [TIME_UNITS[i.time_unit] for i in infos]
        names = list(features) if features is not None else self._info.feature_names
        unknown = sorted(set(names) - set(self._info.feature_names))
        if unknown:
            raise ValueError(f"features {unknown} not in {self._files[0]} (has {self._info.feature_names})")
        self._features = names
        self._row_groups = []
        user_ids = []
        for f, info in enumerate(infos):
            groups, users = self._read_row_groups(f, info)
            self._row_groups += groups
            user_ids.append(users)
        self._check_unique_users(user_ids)
        if len(self._row_groups) < self._world_size:
            raise ValueError(
                f"{len(self._row_groups)} row groups cannot be shared by {self._world_size} ranks; "
                "write smaller row groups"
            )
        self._epoch = 0
        self._warned_truncation = False
        self._consumed = 0
        self._skip = 0
        # (epoch, workers) -> batches of every (rank, worker): counting reads no data but visits
        # every row group, so do it once per epoch.
        self._counts: Dict[Tuple[int, int], List[List[int]]] = {}
        self.stats = ReaderStats()

    @staticmethod
    def _list_files(paths: Sequence[PathLike]) -> List[Path]:
        """The files to read; the same file reached twice (named twice, or also inside a named
        directory, or through a link) is refused: its users would be read twice."""
        files: List[Path] = []
        for p in map(Path, paths):
            if p.is_dir():
                files.extend(f for f in sorted(p.glob("*.parquet")) if not _is_mapping(f))
            elif p.exists():
                files.append(p)
            else:
                raise FileNotFoundError(f"{p} does not exist")
        if not files:
            raise FileNotFoundError(f"no Parquet files in {list(map(str, paths))}")
        seen: Dict[Tuple[int, int], Path] = {}
        for f in files:
            st = f.stat()
            first = seen.setdefault((st.st_dev, st.st_ino), f)
            if first is not f:
                raise ValueError(f"{f} is given twice (also as {first})")
        return files

    def _check_unique_users(self, user_ids: List[np.ndarray]) -> None:
        """Refuses a user with rows in two places, naming both (file and row)."""
        everyone = np.concatenate(user_ids)
        order = np.argsort(everyone, kind="stable")
        dup = np.flatnonzero(everyone[order][1:] == everyone[order][:-1])
        if not dup.size:
            return
        starts = np.cumsum([0] + [u.size for u in user_ids])

        def place(flat: int) -> str:
            file = int(np.searchsorted(starts, flat, side="right") - 1)
            return f"{self._files[file]} row {flat - starts[file]}"

        first, second = (int(order[dup[0] + k]) for k in (0, 1))
        raise DataValidationError(
            f"user {int(everyone[first])} appears in {place(first)} and {place(second)} "
            "(each user must be one row)"
        )

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

    def _read_row_groups(self, file: int, info: SequenceDatasetInfo) -> Tuple[List[_RowGroup], np.ndarray]:
        """The row groups of one file with their users' lengths, and its user ids.

        Only ``item_ids`` and ``user_id`` are read; the counts in the file's metadata are checked
        against them.
        """
        path = self._files[file]
        pf = open_parquet(path)
        groups = []
        user_ids = []
        first_row = events = 0
        for i in range(pf.num_row_groups):
            try:
                table = pf.read_row_group(i, columns=[ITEM_IDS, USER_ID])
            except (OSError, pa.ArrowException) as e:
                raise DataValidationError(f"{path}: row group {i} is unreadable ({e})") from e
            for name in (ITEM_IDS, USER_ID):
                column = table.column(name)
                if column.null_count:
                    row = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
                    raise DataValidationError(f"{path}: row {first_row + row}: {name} is null")
            users, items = table.column(USER_ID), table.column(ITEM_IDS)
            if users.type != pa.int64():
                raise DataValidationError(f"{path}: column 'user_id' has type {users.type}, expected int64")
            if not (pa.types.is_list(items.type) or pa.types.is_large_list(items.type)):
                raise DataValidationError(
                    f"{path}: column 'item_ids' has type {items.type}, expected list<int64>"
                )
            user_ids.append(users.to_numpy())
            # int32 halves what every DataLoader worker receives a copy of.
            lengths = pc.list_value_length(items).to_numpy().astype(np.int32)
            groups.append(_RowGroup(file, i, first_row, lengths))
            first_row += lengths.size
            events += int(lengths.sum(dtype=np.int64))
        if (info.num_users, info.num_events) != (first_row, events):
            raise DataValidationError(
                f"{path}: metadata says {info.num_users} users / {info.num_events} events, "
                f"file holds {first_row} / {events}"
            )
        return groups, np.concatenate(user_ids) if user_ids else np.zeros(0, np.int64)

    @property
    def info(self) -> SequenceDatasetInfo:
        """Dataset facts of all files together (timestamps as read are always seconds)."""
        return self._info

    @property
    def keys(self) -> List[str]:
        """Per-event keys of the batches: ``item_id`` then the side features.

        The batches' KeyedJaggedTensor has ``sequence_keys(keys[1:])``: these between the
        timestamps and the target / candidate keys.
        """
        return [ITEM_KEY] + self._features

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch's shuffle; resets the consumed-batch count unless resuming into it."""
        if epoch != self._epoch:
            self._epoch, self._consumed, self._skip = epoch, 0, 0

    def state_dict(self) -> Dict[str, int]:
        """``{"epoch", "batches"}``: batches consumed this epoch (padding included) by iterating this object.

        When batches come through a ``DataLoader`` with workers, the iteration happens in the
        workers: count the batches you consumed and pass that number to :meth:`load_state_dict`.
        """
        return {"epoch": self._epoch, "batches": self._consumed}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        """Resumes after ``state["batches"]`` batches of ``state["epoch"]``.

        Every iteration of that epoch (a peek at the first batch included) starts at this
        position, until :meth:`set_epoch` moves to another epoch. Through a ``DataLoader`` with
        workers the remaining batches are exactly those not consumed, but a new ``DataLoader``
        starts its round of workers at worker 0: resumed inside a round, the first few come in
        another order.
        """
        self._epoch, self._consumed, self._skip = (
            int(state["epoch"]),
            int(state["batches"]),
            int(state["batches"]),
        )

    def num_batches(self, num_workers: Optional[int] = None) -> int:
        """Batches every rank yields this epoch, padding included (the same on all ranks).

        Args:
            num_workers: workers of the ``DataLoader`` the reader is iterated in (0 or 1: none).
                Default: this worker's ``DataLoader``'s inside a worker, else none. Batches do not
                span the row groups of different workers, so the count depends on it.
        """
        if num_workers is None:
            worker = get_worker_info()
            num_workers = 1 if worker is None else worker.num_workers
        return max(sum(c) for c in self._batch_counts(max(num_workers, 1)))

    def _rank_share(self, rank: int) -> List[_RowGroup]:
        """Row groups of ``rank`` this epoch."""
        order = list(self._row_groups)
        if self._config.shuffle:
            perm = np.random.default_rng([self._seed, self._epoch]).permutation(len(order))
            order = [order[i] for i in perm]
        return order[rank :: self._world_size]

    def _batch_counts(self, num_workers: int) -> List[List[int]]:
        """``[W][K]`` batches of every worker of every rank this epoch, padding excluded."""
        key = (self._epoch, num_workers)
        if key not in self._counts:
            c = self._config

            def count(groups: List[_RowGroup]) -> int:
                kept = [np.zeros(0, np.int64)]
                kept += [
                    self._input_ranges(g.lengths, self._row_order(g, g.lengths.size)).lengths for g in groups
                ]
                return _count_packed(np.concatenate(kept), c.max_tokens, c.max_batch_size)

            self._counts[key] = [
                [count(share[w::num_workers]) for w in range(num_workers)]
                for share in map(self._rank_share, range(self._world_size))
            ]
        return self._counts[key]

    def _row_order(self, group: _RowGroup, num_rows: int) -> Optional[np.ndarray]:
        if not self._config.shuffle:
            return None
        seed = [self._seed, self._epoch, group.file, group.index]
        return np.random.default_rng(seed).permutation(num_rows)

    def _input_ranges(self, lengths: np.ndarray, order: Optional[np.ndarray]) -> _Ranges:
        """The batch rows of the users of one row group, in batching order (see :class:`_Ranges`).

        A training input of ``n > max_seq_len`` events becomes windows ending at ``n``,
        ``n - stride``, ... (oldest first): each starts ``max_seq_len`` events before its end,
        the oldest at 0, and every window but the oldest begins with ``overlap`` events of the
        one before it, its context. An evaluation input keeps its last ``max_seq_len`` events.
        """
        c = self._config
        end, target = split_positions(lengths, self._split)
        min_input = 2 if self._split is Split.TRAIN else 1
        users = np.flatnonzero(end >= min_input)
        if order is not None:
            users = order[np.isin(order, users)]
        end, target = end[users], target[users]
        if self._split is Split.TRAIN:
            windows = 1 + -(-np.maximum(end - c.max_seq_len, 0) // c.stride)
            users, end = np.repeat(users, windows), np.repeat(end, windows)
            # Index of each window from the user's most recent (0), listed oldest first.
            first = np.repeat(np.cumsum(windows) - windows, windows)
            back = np.repeat(windows, windows) - 1 - (np.arange(users.size) - first)
            end = end - back * c.stride
            target = np.full_like(end, -1)
        start = np.maximum(end - c.max_seq_len, 0)
        context = np.where(start > 0, c.overlap, 0) if self._split is Split.TRAIN else np.zeros_like(start)
        return _Ranges(users=users, starts=start, lengths=end - start, contexts=context, targets=target)

    def _blocks(self, groups: List[_RowGroup], stats: ReaderStats) -> Iterator[_Block]:
        """Reads each row group into a :class:`_Block`."""
        files: Dict[int, pq.ParquetFile] = {}
        for group in groups:
            path = self._files[group.file]
            pf = files.setdefault(group.file, open_parquet(path))
            seqs = read_row_group(pf, group.index, self._info, str(path), group.first_row)
            r = self._input_ranges(seqs.lengths, self._row_order(group, seqs.num_users))
            rows = r.users
            first = seqs.offsets[:-1][rows]
            index = _gather_index(first + r.starts, r.lengths)
            scale = self._time_scales[group.file]
            target = r.targets
            has_target = target >= 0
            target_index = first + np.where(has_target, target, 0)
            stats.skipped_users += seqs.num_users - np.unique(rows).size
            prior = None
            if self._split is Split.TRAIN:
                stats.windowed_users += np.unique(rows[r.starts > 0]).size
            else:
                stats.truncated_users += int((r.starts > 0).sum())
                stats.truncated_events += int(r.starts.sum())
                # The events cut from an evaluation row are still the user's seen items.
                prior = seqs.item_ids[_gather_index(first, r.starts)]
            yield _Block(
                lengths=r.lengths,
                contexts=r.contexts,
                history_starts=r.starts,
                offsets=np.r_[0, np.cumsum(r.lengths)],
                user_ids=seqs.user_ids[rows],
                values=[seqs.timestamps[index] // scale, seqs.item_ids[index]]
                + [seqs.features[k][index] for k in self._features],
                targets=np.where(has_target, seqs.item_ids[target_index], -1),
                target_timestamps=np.where(has_target, seqs.timestamps[target_index] // scale, -1),
                prior_items=prior,
                prior_offsets=None if prior is None else np.r_[0, np.cumsum(r.starts)],
            )

    def _candidates(self, index: int) -> np.ndarray:
        """Softmax candidates of the rank's ``index``-th batch this epoch."""
        if self._negatives == "uniform":
            rng = np.random.default_rng([self._seed, self._epoch, self._rank, index, _CANDIDATE_STREAM])
            return rng.integers(1, self._info.num_items + 1, size=self._num_negatives, dtype=np.int64)
        if self._negatives == "catalogue":
            return np.arange(1, self._info.num_items + 1, dtype=np.int64)
        return np.zeros(0, np.int64)

    def _to_batch(self, parts: List[Tuple[_Block, int, int]], index: int, weight: float) -> SequenceBatch:
        blocks = [b for b, _, _ in parts]
        rows = [slice(i, j) for _, i, j in parts]
        spans = [slice(b.offsets[i], b.offsets[j]) for b, i, j in parts]

        def per_user(name: str) -> np.ndarray:
            return np.concatenate([getattr(b, name)[r] for b, r in zip(blocks, rows)])

        lengths = torch.from_numpy(per_user("lengths")).to(torch.int32)
        batch_size = lengths.numel()
        evaluation = self._split is not Split.TRAIN
        targets = per_user("targets") if evaluation else np.zeros(0, np.int64)
        candidates = self._candidates(index)
        candidate_lengths = torch.zeros(batch_size, dtype=torch.int32)
        candidate_lengths[-1] = candidates.size
        values = [b.values[k][s] for k in range(len(self._features) + 2) for b, s in zip(blocks, spans)]
        prior = None
        if evaluation:
            prior = torch.from_numpy(
                np.concatenate([b.prior_items[b.prior_offsets[i] : b.prior_offsets[j]] for b, i, j in parts])
            )
        return SequenceBatch(
            features=KeyedJaggedTensor(
                keys=sequence_keys(self._features),
                values=torch.from_numpy(np.concatenate(values + [targets, candidates])),
                lengths=torch.cat(
                    [
                        lengths.repeat(len(self._features) + 2),
                        torch.full((batch_size,), int(evaluation), dtype=torch.int32),
                        candidate_lengths,
                    ]
                ),
            ),
            user_ids=torch.from_numpy(per_user("user_ids")),
            target_timestamps=torch.from_numpy(per_user("target_timestamps")),
            weights=torch.full((batch_size,), weight, dtype=torch.float32),
            context_lengths=torch.from_numpy(per_user("contexts")),
            history_starts=torch.from_numpy(per_user("history_starts")),
            prior_item_ids=prior,
        )

    def _parts(
        self, groups: List[_RowGroup], stats: ReaderStats, padding: int, source: int
    ) -> Iterator[Tuple[List[Tuple[_Block, int, int]], float]]:
        """``(users, weight)`` of a worker's batches: its own, then ``padding`` padding batches.

        A padding batch is the first batch of rank ``source``'s share: every rank can read every
        row group, so all ranks pad with the same batch. Its reading is not counted in ``stats``.
        """
        c = self._config
        for parts in _pack(self._blocks(groups, stats), c.max_tokens, c.max_batch_size):
            yield parts, 1.0
        if padding:
            blocks = self._blocks(self._rank_share(source), ReaderStats())
            parts = next(_pack(blocks, c.max_tokens, c.max_batch_size))
            for _ in range(padding):
                yield parts, 0.0

    def __iter__(self) -> Iterator[SequenceBatch]:
        worker = get_worker_info()
        workers, wid = (1, 0) if worker is None else (worker.num_workers, worker.id)
        every = self._batch_counts(workers)
        totals = [sum(c) for c in every]
        own = every[self._rank]
        # One worker pads for the whole rank; any would do, as long as all workers agree which.
        counts = list(own)
        counts[0] += max(totals) - totals[self._rank]
        # Only used when padding, i.e. when some rank has a batch.
        source = next((r for r, total in enumerate(totals) if total), 0)
        skip = self._consumed = self._skip
        if skip and workers > 1:
            skip = _worker_skip(skip, counts, wid)
        stats = self.stats = ReaderStats()
        groups = self._rank_share(self._rank)[wid::workers]
        for k, (parts, weight) in enumerate(self._parts(groups, stats, counts[wid] - own[wid], source)):
            if k < skip:
                continue
            batch = self._to_batch(parts, _stream_index(counts, wid, k), weight)
            if weight:
                stats.users += batch.batch_size
                stats.events += batch.timestamps.numel()
                if self._split is Split.TRAIN:
                    stats.targets += training_queries(batch.offsets(), batch.context_lengths)[0].numel()
            else:
                stats.padding_batches += 1
            self._consumed += 1
            yield batch
        if stats.truncated_users:
            # The same users are cut every epoch: say it once loudly, then only at INFO.
            log = logger.info if self._warned_truncation else logger.warning
            self._warned_truncation = True
            log(
                "epoch %d rank %d worker %d: %d %s inputs cut to their last max_seq_len=%d events "
                "(%d older events not read)",
                self._epoch,
                self._rank,
                wid,
                stats.truncated_users,
                self._split.value,
                self._config.max_seq_len,
                stats.truncated_events,
            )
