"""Reading and writing sequence files: Parquet in the layout of ``data/schema.py``.

Files are written with page checksums and read with checksum verification, so a corrupted data
page is an error rather than silently wrong ids; they are written to a temporary name and
renamed (:func:`atomic_path`), so a failed write (a full disk) never leaves a truncated file under
the final name. Every reader path validates what it reads with
:func:`~torchrec_hytrec.data.validation.check_sequences`; all problems raise
:class:`~torchrec_hytrec.data.schema.DataValidationError` naming the file and the row / user at
fault, and a failed write raises :class:`~torchrec_hytrec.data.schema.DataWriteError`.
"""

import contextlib
import dataclasses
import os
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from torchrec_hytrec.data.schema import (
    DEFAULT_ROW_GROUP_SIZE,
    ITEM_IDS,
    METADATA_KEY,
    TIMESTAMPS,
    USER_ID,
    DataValidationError,
    DataWriteError,
    PathLike,
    SequenceDatasetInfo,
    Sequences,
    arrow_schema,
)
from torchrec_hytrec.data.validation import check_sequences, check_unique_users, row_location


def _list_column(
    table: pa.Table, name: str, source: str, user_ids: np.ndarray, first_row: int
) -> Tuple[np.ndarray, np.ndarray]:
    """``(offsets, values)`` of a ``list<int64>`` column, refusing nulls, NaNs and other types."""
    col = table.column(name).combine_chunks()
    if not pa.types.is_list(col.type) and not pa.types.is_large_list(col.type):
        raise DataValidationError(f"{source}: column {name!r} has type {col.type}, expected list<int64>")
    if col.null_count:
        row = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataValidationError(f"{row_location(source, user_ids, row, first_row)}: {name} is null")
    offsets = np.asarray(col.offsets, dtype=np.int64)
    offsets = offsets - offsets[0]
    values = col.flatten()

    def fail_at(mask: np.ndarray, what: str) -> None:
        event = int(np.flatnonzero(mask)[0])
        row = int(np.searchsorted(offsets, event, side="right") - 1)
        where = row_location(source, user_ids, row, first_row)
        raise DataValidationError(f"{where}, position {event - int(offsets[row])}: {name} {what}")

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
                f"{row_location(source, user_ids, row, first_row)}: {name} has "
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
