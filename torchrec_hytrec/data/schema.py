"""The Parquet layout of behaviour sequences, its metadata, and its validation.

One row per user::

    user_id     int64
    item_ids    list<int64>   item ids in [1, num_items]; 0 is reserved for padding
    timestamps  list<int64>   event times in ``time_unit``, non-decreasing within the row
    <feature>   list<int64>   optional side features aligned with item_ids, ids in [1, cardinality]

The Arrow schema metadata key ``torchrec_hytrec`` holds a JSON :class:`SequenceDatasetInfo`
(catalogue size, side-feature cardinalities, time unit, counts). Embedding tables therefore have
``num_items + 1`` rows (and ``cardinality + 1`` for a feature) so that id 0 can stay padding.

Files are written with page checksums and read with checksum verification, so a corrupted data
page is an error rather than silently wrong ids; they are written to a temporary name and
renamed, so a failed write (a full disk) never leaves a truncated file under the final name.
Every reader path validates what it reads with :func:`check_sequences`; all problems raise
:class:`DataValidationError` naming the file and the row / user at fault.
"""

import contextlib
import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

USER_ID = "user_id"
ITEM_IDS = "item_ids"
TIMESTAMPS = "timestamps"
METADATA_KEY = b"torchrec_hytrec"
FORMAT_VERSION = 1
# Seconds per unit: batches always carry seconds (see ``SequenceBatch``).
TIME_UNITS: Dict[str, int] = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}
DEFAULT_ROW_GROUP_SIZE = 1024
# The converter saves each id mapping as ``<output stem>.<column>.map.parquet`` (columns ``id``,
# ``raw``) next to its output; readers given a directory skip these.
MAPPING_SUFFIX = ".map.parquet"
MAPPING_COLUMNS = ["id", "raw"]

PathLike = Union[str, Path]


class DataValidationError(ValueError):
    """Raised for any malformed input; the message names the file and the row / user."""


class DataWriteError(OSError):
    """Raised when an output file cannot be written (e.g. a full disk); the message names it."""


@dataclass(frozen=True)
class SequenceDatasetInfo:
    """Dataset facts stored in the Parquet file metadata.

    Args:
        num_items: catalogue size; item ids lie in ``[1, num_items]``.
        feature_cardinalities: side-feature name to cardinality (ids in ``[1, cardinality]``),
            in column order.
        time_unit: unit of the stored timestamps, one of ``s``, ``ms``, ``us``, ``ns``.
        num_users: rows in the file (filled in by :func:`write_sequences`).
        num_events: events in the file (filled in by :func:`write_sequences`).
        source: free-form provenance, e.g. the converter and input file.

    Example::

        info = SequenceDatasetInfo(num_items=12101, feature_cardinalities={"category": 40})
        write_sequences("beauty.parquet", sequences, info)
        assert read_info("beauty.parquet").num_items == 12101
    """

    num_items: int
    feature_cardinalities: Dict[str, int] = field(default_factory=dict)
    time_unit: str = "s"
    num_users: int = 0
    num_events: int = 0
    source: str = ""

    def __post_init__(self) -> None:
        if self.num_items < 1:
            raise DataValidationError(f"num_items must be >= 1, got {self.num_items}")
        if self.time_unit not in TIME_UNITS:
            raise DataValidationError(
                f"time_unit must be one of {sorted(TIME_UNITS)}, got {self.time_unit!r}"
            )
        for name, card in self.feature_cardinalities.items():
            if name in (USER_ID, ITEM_IDS, TIMESTAMPS) or card < 1:
                raise DataValidationError(f"bad side feature {name!r} with cardinality {card}")
        if self.num_users < 0 or self.num_events < 0:
            raise DataValidationError(
                f"negative counts: num_users {self.num_users}, num_events {self.num_events}"
            )

    @property
    def feature_names(self) -> List[str]:
        return list(self.feature_cardinalities)

    def to_json(self) -> str:
        return json.dumps({"format_version": FORMAT_VERSION, **dataclasses.asdict(self)})

    @classmethod
    def from_json(cls, text: Union[str, bytes], source: str) -> "SequenceDatasetInfo":
        """Parses :meth:`to_json`'s output (bytes as UTF-8), naming ``source`` in every error."""
        try:
            raw = json.loads(text)
            version = raw.pop("format_version")
        except (ValueError, KeyError, AttributeError, TypeError) as e:
            raise DataValidationError(f"{source}: unreadable {METADATA_KEY.decode()} metadata: {e!r}")
        if version != FORMAT_VERSION:
            raise DataValidationError(f"{source}: format_version {version}, expected {FORMAT_VERSION}")
        try:
            return cls(**raw)
        except (TypeError, DataValidationError) as e:
            raise DataValidationError(f"{source}: bad {METADATA_KEY.decode()} metadata: {e}")


@dataclass
class Sequences:
    """Users' event sequences as flat numpy arrays (the in-memory form of one file or row group).

    Args:
        user_ids: ``[U]`` int64.
        offsets: ``[U + 1]`` int64 start of each user's events.
        item_ids: ``[N]`` int64.
        timestamps: ``[N]`` int64, in the dataset's ``time_unit``.
        features: side-feature name to ``[N]`` int64 values aligned with ``item_ids``.

    Example::

        seqs = Sequences(
            user_ids=np.array([7]), offsets=np.array([0, 2]),
            item_ids=np.array([3, 1]), timestamps=np.array([10, 25]), features={},
        )
    """

    user_ids: np.ndarray
    offsets: np.ndarray
    item_ids: np.ndarray
    timestamps: np.ndarray
    features: Dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def num_users(self) -> int:
        return self.user_ids.shape[0]

    @property
    def num_events(self) -> int:
        return int(self.offsets[-1])

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def rows(self, start: int, stop: int) -> "Sequences":
        """Users ``[start, stop)`` with offsets rebased to 0."""
        lo, hi = self.offsets[start], self.offsets[stop]
        return Sequences(
            user_ids=self.user_ids[start:stop],
            offsets=self.offsets[start : stop + 1] - lo,
            item_ids=self.item_ids[lo:hi],
            timestamps=self.timestamps[lo:hi],
            features={k: v[lo:hi] for k, v in self.features.items()},
        )


def _where(source: str, user_ids: np.ndarray, row: int, first_row: int) -> str:
    return f"{source}: row {first_row + row} (user {int(user_ids[row])})"


def check_unique_users(user_ids: np.ndarray, source: str, first_row: int = 0) -> None:
    """Refuses a user on several rows: each user is one row, its events grouped in it.

    Raises:
        DataValidationError: naming the user and the first two rows holding it.
    """
    order = np.argsort(user_ids, kind="stable")
    ranked = user_ids[order]
    dup = np.flatnonzero(ranked[1:] == ranked[:-1])
    if dup.size:
        rows = np.flatnonzero(user_ids == ranked[dup[0]])[:2] + first_row
        raise DataValidationError(
            f"{source}: user {int(ranked[dup[0]])} appears in rows {int(rows[0])} and {int(rows[1])} "
            "(each user must be one row)"
        )


def check_sequences(seqs: Sequences, info: SequenceDatasetInfo, source: str, first_row: int = 0) -> None:
    """Validates decoded sequences against ``info``, vectorised over all events.

    Timestamps out of order are refused (with the user and position) rather than sorted: a
    Parquet file is the canonical, already-sorted form, and the converters sort interaction
    logs stably before writing.

    Args:
        seqs: the rows to check.
        info: the dataset facts (catalogue and feature cardinalities).
        source: file name used in error messages.
        first_row: row number of ``seqs``' first row in the file, for error messages.

    Raises:
        DataValidationError: naming ``source`` and the first offending row and user.
    """
    n = seqs.num_events
    for name, arr in [(ITEM_IDS, seqs.item_ids), (TIMESTAMPS, seqs.timestamps)] + list(seqs.features.items()):
        if arr.shape != (n,):
            raise DataValidationError(f"{source}: column {name!r} has {arr.shape[0]} values, expected {n}")
    missing = set(info.feature_cardinalities) - set(seqs.features)
    if missing:
        raise DataValidationError(f"{source}: missing side-feature columns {sorted(missing)}")
    bad = np.flatnonzero(seqs.user_ids < 0)
    if bad.size:
        raise DataValidationError(f"{_where(source, seqs.user_ids, bad[0], first_row)}: negative user_id")
    check_unique_users(seqs.user_ids, source, first_row)
    lengths = seqs.lengths
    bad = np.flatnonzero(lengths <= 0)
    if bad.size:
        raise DataValidationError(f"{_where(source, seqs.user_ids, bad[0], first_row)}: empty sequence")

    def fail_at_event(event: int, what: str) -> None:
        row = int(np.searchsorted(seqs.offsets, event, side="right") - 1)
        pos = event - int(seqs.offsets[row])
        raise DataValidationError(f"{_where(source, seqs.user_ids, row, first_row)}, position {pos}: {what}")

    ranges = [(ITEM_IDS, seqs.item_ids, info.num_items)] + [
        (name, seqs.features[name], card) for name, card in info.feature_cardinalities.items()
    ]
    for name, arr, high in ranges:
        bad = np.flatnonzero((arr < 1) | (arr > high))
        if bad.size:
            fail_at_event(int(bad[0]), f"{name} value {int(arr[bad[0]])} outside [1, {high}]")
    ts = seqs.timestamps
    bad = np.flatnonzero(ts < 0)
    if bad.size:
        fail_at_event(int(bad[0]), f"negative timestamp {int(ts[bad[0]])}")
    decreasing = ts[1:] < ts[:-1]
    # A decrease across two users is fine: only compare events of the same user.
    decreasing[seqs.offsets[1:-1] - 1] = False
    bad = np.flatnonzero(decreasing)
    if bad.size:
        e = int(bad[0]) + 1
        fail_at_event(e, f"timestamps out of order ({int(ts[e - 1])} then {int(ts[e])})")


def _list_column(
    table: pa.Table, name: str, source: str, user_ids: np.ndarray, first_row: int
) -> Tuple[np.ndarray, np.ndarray]:
    """``(offsets, values)`` of a ``list<int64>`` column, refusing nulls, NaNs and other types."""
    col = table.column(name).combine_chunks()
    if not pa.types.is_list(col.type) and not pa.types.is_large_list(col.type):
        raise DataValidationError(f"{source}: column {name!r} has type {col.type}, expected list<int64>")
    if col.null_count:
        row = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataValidationError(f"{_where(source, user_ids, row, first_row)}: {name} is null")
    offsets = np.asarray(col.offsets, dtype=np.int64)
    offsets = offsets - offsets[0]
    values = col.flatten()

    def fail_at(mask: np.ndarray, what: str) -> None:
        event = int(np.flatnonzero(mask)[0])
        row = int(np.searchsorted(offsets, event, side="right") - 1)
        raise DataValidationError(
            f"{_where(source, user_ids, row, first_row)}, position {event - int(offsets[row])}: {name} {what}"
        )

    if values.null_count:
        fail_at(values.is_null().to_numpy(zero_copy_only=False), "has a null value")
    if pa.types.is_floating(values.type):
        v = values.to_numpy(zero_copy_only=False)
        if np.isnan(v).any():
            fail_at(np.isnan(v), "has a NaN value")
    if values.type != pa.int64():
        raise DataValidationError(f"{source}: column {name!r} has type {col.type}, expected list<int64>")
    return offsets, values.to_numpy()


def table_to_sequences(
    table: pa.Table, info: SequenceDatasetInfo, source: str, first_row: int = 0
) -> Sequences:
    """Decodes and validates an Arrow table in the sequence schema.

    Args:
        table: rows in the sequence schema (a whole file or one row group).
        info: the dataset facts.
        source: file name used in error messages.
        first_row: row number of the table's first row in the file, for error messages.

    Returns:
        The validated :class:`Sequences`.
    """
    names = [USER_ID, ITEM_IDS, TIMESTAMPS] + info.feature_names
    missing = [c for c in names if c not in table.column_names]
    if missing:
        raise DataValidationError(f"{source}: missing columns {missing} (has {table.column_names})")
    uid_col = table.column(USER_ID)
    if uid_col.type != pa.int64():
        raise DataValidationError(f"{source}: column 'user_id' has type {uid_col.type}, expected int64")
    if uid_col.null_count:
        row = int(np.flatnonzero(uid_col.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataValidationError(f"{source}: row {first_row + row}: user_id is null")
    user_ids = uid_col.to_numpy()
    offsets, item_ids = _list_column(table, ITEM_IDS, source, user_ids, first_row)
    columns = {}
    for name in [TIMESTAMPS] + info.feature_names:
        col_offsets, columns[name] = _list_column(table, name, source, user_ids, first_row)
        bad = np.flatnonzero(col_offsets != offsets)
        if bad.size:
            row = int(bad[0]) - 1
            raise DataValidationError(
                f"{_where(source, user_ids, row, first_row)}: {name} has "
                f"{col_offsets[row + 1] - col_offsets[row]} values but item_ids has "
                f"{offsets[row + 1] - offsets[row]}"
            )
    seqs = Sequences(
        user_ids=user_ids,
        offsets=offsets,
        item_ids=item_ids,
        timestamps=columns.pop(TIMESTAMPS),
        features=columns,
    )
    check_sequences(seqs, info, source, first_row)
    return seqs


def arrow_schema(info: SequenceDatasetInfo) -> pa.Schema:
    """The Arrow schema of a sequence file, with ``info`` in its metadata."""
    fields = [pa.field(USER_ID, pa.int64(), nullable=False)] + [
        pa.field(name, pa.list_(pa.int64()), nullable=False)
        for name in [ITEM_IDS, TIMESTAMPS] + info.feature_names
    ]
    return pa.schema(fields, metadata={METADATA_KEY: info.to_json()})


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """A temporary sibling of ``path`` to write to, renamed to ``path`` when the block succeeds.

    Whatever the block raises, the temporary file is removed and ``path`` is left as it was; an
    ``OSError`` (a full disk, a file size limit) is raised again as a :class:`DataWriteError`
    naming ``path`` (one raised by a nested block is passed on as it is).

    Example::

        with atomic_path("out/mapping.parquet") as tmp:
            pq.write_table(table, str(tmp))
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except DataWriteError:
        raise
    except OSError as e:
        raise DataWriteError(f"cannot write {path}: {e}") from e
    finally:
        tmp.unlink(missing_ok=True)


def write_sequences(
    path: PathLike,
    seqs: Sequences,
    info: SequenceDatasetInfo,
    row_group_size: int = DEFAULT_ROW_GROUP_SIZE,
) -> SequenceDatasetInfo:
    """Validates and writes ``seqs`` to ``path``, ``row_group_size`` users per row group.

    Args:
        path: output Parquet file.
        seqs: the sequences, sorted in time within each user.
        info: dataset facts; ``num_users`` / ``num_events`` are filled in from ``seqs``.
        row_group_size: users per row group (the unit ranks and workers split).

    Returns:
        The info as written.

    Raises:
        DataValidationError: ``seqs`` break a rule of :func:`check_sequences`.
        DataWriteError: the file could not be written (e.g. a full disk), naming ``path``;
            nothing is left under ``path`` then (see :func:`atomic_path`).
    """
    if row_group_size < 1:
        raise ValueError(f"row_group_size must be >= 1, got {row_group_size}")
    info = dataclasses.replace(info, num_users=seqs.num_users, num_events=seqs.num_events)
    check_sequences(seqs, info, str(path))
    schema = arrow_schema(info)
    with atomic_path(path) as tmp, pq.ParquetWriter(str(tmp), schema, write_page_checksum=True) as writer:
        for start in range(0, seqs.num_users, row_group_size):
            part = seqs.rows(start, min(start + row_group_size, seqs.num_users))
            if part.num_events > np.iinfo(np.int32).max:
                # list<int64> has int32 offsets: more events would wrap around.
                raise DataValidationError(
                    f"{path}: row group at row {start} would hold {part.num_events} events, more than "
                    "a list column can; write smaller row groups"
                )
            offsets = pa.array(part.offsets.astype(np.int32))
            lists = [
                pa.ListArray.from_arrays(offsets, pa.array(v, pa.int64()))
                for v in [part.item_ids, part.timestamps] + [part.features[k] for k in info.feature_names]
            ]
            writer.write_table(
                pa.Table.from_arrays([pa.array(part.user_ids, pa.int64())] + lists, schema=schema)
            )
    return info


def open_parquet(path: PathLike) -> pq.ParquetFile:
    """Opens a sequence file with page-checksum verification; unreadable files raise."""
    try:
        return pq.ParquetFile(str(path), page_checksum_verification=True)
    # A damaged footer can also give undecodable names (UnicodeDecodeError, a ValueError).
    except (OSError, ValueError, pa.ArrowException) as e:
        raise DataValidationError(f"{path}: not a readable Parquet file ({e})") from e


def info_of(pf: pq.ParquetFile, source: str) -> SequenceDatasetInfo:
    """The :class:`SequenceDatasetInfo` stored in an open file's metadata."""
    meta = pf.schema_arrow.metadata or {}
    if METADATA_KEY not in meta:
        raise DataValidationError(
            f"{source}: no {METADATA_KEY.decode()} metadata; write it with write_sequences or "
            "python -m torchrec_hytrec.data.convert"
        )
    return SequenceDatasetInfo.from_json(meta[METADATA_KEY], source)


def read_info(path: PathLike) -> SequenceDatasetInfo:
    """The :class:`SequenceDatasetInfo` of a sequence file."""
    return info_of(open_parquet(path), str(path))


def read_row_group(
    pf: pq.ParquetFile, index: int, info: SequenceDatasetInfo, source: str, first_row: int
) -> Sequences:
    """Reads, decodes and validates one row group."""
    try:
        table = pf.read_row_group(index, columns=[USER_ID, ITEM_IDS, TIMESTAMPS] + info.feature_names)
    except (OSError, pa.ArrowException) as e:
        raise DataValidationError(f"{source}: row group {index} is unreadable ({e})") from e
    return table_to_sequences(table, info, source, first_row)


def iter_row_groups(path: PathLike) -> Iterator[Sequences]:
    """Streams the validated row groups of a file."""
    pf = open_parquet(path)
    info = info_of(pf, str(path))
    first_row = 0
    for i in range(pf.num_row_groups):
        yield read_row_group(pf, i, info, str(path), first_row)
        first_row += pf.metadata.row_group(i).num_rows


def read_sequences(path: PathLike) -> Tuple[Sequences, SequenceDatasetInfo]:
    """Reads a whole file, validating every row group and the file-level facts.

    Beyond the per-row checks this verifies that user ids are unique in the file and that the
    counts in the metadata match the content.
    """
    info = read_info(path)
    parts = list(iter_row_groups(path))
    seqs = concat_sequences(parts, info.feature_names)
    # Row groups were checked one by one; a user may still repeat across them.
    check_unique_users(seqs.user_ids, str(path))
    if (info.num_users, info.num_events) != (seqs.num_users, seqs.num_events):
        raise DataValidationError(
            f"{path}: metadata says {info.num_users} users / {info.num_events} events, "
            f"file holds {seqs.num_users} / {seqs.num_events}"
        )
    return seqs, info


def concat_sequences(parts: List[Sequences], feature_names: Optional[List[str]] = None) -> Sequences:
    """Concatenates row blocks in order."""
    names = feature_names if feature_names is not None else (list(parts[0].features) if parts else [])
    if not parts:
        empty = np.zeros(0, dtype=np.int64)
        return Sequences(empty, np.zeros(1, np.int64), empty, empty, {k: empty for k in names})
    lengths = np.concatenate([p.lengths for p in parts])
    offsets = np.zeros(lengths.shape[0] + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return Sequences(
        user_ids=np.concatenate([p.user_ids for p in parts]),
        offsets=offsets,
        item_ids=np.concatenate([p.item_ids for p in parts]),
        timestamps=np.concatenate([p.timestamps for p in parts]),
        features={k: np.concatenate([p.features[k] for p in parts]) for k in names},
    )
