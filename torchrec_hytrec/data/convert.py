"""Converters from interaction logs to the Parquet sequence format.

``python -m torchrec_hytrec.data.convert --format {interactions,s3rec,recbole,movielens} IN OUT``

* ``interactions``: a CSV/TSV table with user, item and timestamp columns and optional
  categorical side-feature columns (names configurable, header or ``--columns``).
* ``recbole``: a RecBole atomic ``.inter`` file (TSV, header ``name:type``).
* ``movielens``: MovieLens ``ratings.dat`` (``user::item::rating::timestamp``, no header).
* ``s3rec``: the S3Rec / FMLP-Rec gap format, one user per line ``uid i1 i2 ...<TAB>g1 g2 ...``
  where ``g_j`` is the gap in seconds to the previous event; timestamps are the cumulative gaps
  from ``--origin``.

Identity: for the table formats every id column (users, items, side features) is read as *text*
(no type inference: ``007`` and ``7``, or ``1e3`` and ``1000``, are different ids, and ids
beyond 64-bit integers keep every digit) and remapped to contiguous integers from 1 (0 stays
padding), in numeric order when all ids are integers (ties by text) and in text order otherwise;
only an empty field is missing. Each mapping is saved next to OUT as
``<OUT stem>.<column>.map.parquet`` with columns ``id`` and ``raw``. S3Rec ids are integers:
spellings other than the plain decimal one (``007``, ``+7``) are refused; item ids are kept
when they are exactly ``1..n`` and otherwise remapped densely (with a mapping and a notice), so
a sparse id can never inflate the catalogue the trainer allocates. Each user is one row: the
events of a user are grouped (and an S3Rec user on two lines is refused).

Time: timestamps are converted to seconds (fractions floored). ``--time-unit`` names the unit of
numeric timestamps; by default (``auto``) it is chosen from the largest value, as the smallest
of s, ms, us, ns in which it is a date before the year 5000 (current dates are about 1.7e9 s,
1.7e12 ms, 1.7e15 us), and the choice is logged. An explicit unit under which the values would
lie after the year 5000 is refused.

Events are sorted by (user, timestamp) with a *stable* sort: events with equal timestamps keep
their order in the input file. Nulls, NaNs, negative timestamps, malformed records and bytes
that are not UTF-8 are refused with the file and the *physical* line of the record (blank lines
and quoted newlines counted). The output and the mappings are written to temporary names and
renamed, so a failed write (a full disk) raises a ``DataWriteError`` naming the output and leaves
no truncated file.
"""

import argparse
import contextlib
import csv
import datetime
import io
import logging
import re
import sys
from pathlib import Path
from typing import BinaryIO, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from torchrec_hytrec.data.parquet import atomic_path, write_sequences
from torchrec_hytrec.data.schema import (
    DEFAULT_ROW_GROUP_SIZE,
    MAPPING_COLUMNS,
    MAPPING_SUFFIX,
    TIME_UNITS,
    DataValidationError,
    PathLike,
    SequenceDatasetInfo,
    Sequences,
)

logger = logging.getLogger(__name__)

FORMATS = ("interactions", "s3rec", "recbole", "movielens")
MOVIELENS_COLUMNS = ["user", "item", "rating", "timestamp"]
AUTO = "auto"
# Seconds from 1970 up to the year 5138: larger values are not seconds of a real date.
MAX_SECONDS = 100_000_000_000
_INT64_MAX = np.iinfo(np.int64).max
# The one spelling of an S3Rec id: a plain decimal integer.
_DECIMAL = re.compile(r"0|-?[1-9][0-9]*")

LineOf = Callable[[int], int]
Converted = Tuple[Sequences, SequenceDatasetInfo, Dict[str, pa.Table]]


def build_sequences(
    users: np.ndarray, items: np.ndarray, timestamps: np.ndarray, features: Dict[str, np.ndarray]
) -> Sequences:
    """Groups flat events into per-user sequences sorted by time.

    Args:
        users: ``[E]`` int64 user id of each event.
        items: ``[E]`` int64 item id of each event.
        timestamps: ``[E]`` int64 time of each event.
        features: side-feature name to ``[E]`` int64 values.

    Returns:
        Users in increasing id order, one row each; within a user events by time, ties in input
        order (``np.lexsort`` is stable).
    """
    order = np.lexsort((timestamps, users))
    sorted_users = users[order]
    starts = np.flatnonzero(np.r_[True, sorted_users[1:] != sorted_users[:-1]])
    return Sequences(
        user_ids=sorted_users[starts].astype(np.int64),
        offsets=np.r_[starts, len(order)].astype(np.int64),
        item_ids=items[order].astype(np.int64),
        timestamps=timestamps[order].astype(np.int64),
        features={k: v[order].astype(np.int64) for k, v in features.items()},
    )


class TextRecords:
    """The records of a delimited text file with the physical line each starts on.

    Arrow's reader skips blank lines and reads quoted newlines inside a value, so table row ``r``
    is not file line ``r + 2``. This reads the file again with :mod:`csv` (the same quoting
    rules: ``"`` quotes, doubled inside) only when an error needs a line, so the fast path pays
    nothing.

    Args:
        path: the file (named in errors).
        sep: the field separator.
        header: whether the first record is a header.
        data: the file's bytes when they were transformed before parsing (MovieLens).
    """

    def __init__(self, path: PathLike, sep: str, header: bool, data: Optional[bytes] = None) -> None:
        self.path = path
        self.sep = sep
        self.header = header
        self.data = data

    def _open(self) -> BinaryIO:
        return io.BytesIO(self.data) if self.data is not None else open(self.path, "rb")

    def records(self) -> Iterator[Tuple[int, List[str]]]:
        """``(first line, fields)`` of every non-blank record, the header included.

        Lines end at ``\n`` (as for ``sed -n``/editors); bytes that are not UTF-8 come out as lone
        surrogates (``surrogateescape``); a leading byte-order mark is dropped, as Arrow does.
        """
        with self._open() as raw:
            lines = (line.decode("utf-8", "surrogateescape") for line in raw)
            reader = csv.reader(lines, delimiter=self.sep)
            line = 1
            try:
                for fields in reader:
                    start, line = line, reader.line_num + 1
                    if start == 1 and fields:
                        fields[0] = fields[0].removeprefix("\ufeff")
                    if fields:
                        yield start, fields
            except csv.Error as e:
                raise DataValidationError(f"{self.path}: line {line}: malformed record ({e})") from e

    def first(self) -> List[str]:
        """The first record (the header, when there is one)."""
        for line, fields in self.records():
            bad = _not_utf8(fields)
            if bad is not None:
                raise DataValidationError(f"{self.path}: line {line}: {fields[bad]!r} is not valid UTF-8")
            return fields
        raise DataValidationError(f"{self.path}: empty file")

    def line_of(self, row: int) -> int:
        """The line where table row ``row`` (0-based, header excluded) starts."""
        target = row + self.header
        for i, (line, _) in enumerate(self.records()):
            if i == target:
                return line
        raise IndexError(f"{self.path}: no row {row}")

    def bad_record(self, num_fields: int, columns: Dict[str, int]) -> Optional[str]:
        """Where and why the first malformed record is: a wrong field count, or a used field
        (``columns``: name to index) that is not UTF-8. ``None`` when every record is fine."""
        for line, fields in self.records():
            if len(fields) != num_fields:
                shown = self.sep.join(fields)[:80]
                return f"line {line}: expected {num_fields} fields, got {len(fields)}: {shown!r}"
            for name, index in columns.items():
                if _not_utf8([fields[index]]) is not None:
                    return f"line {line}: {name} {fields[index]!r} is not valid UTF-8"
        return None


def _not_utf8(fields: List[str]) -> Optional[int]:
    """Index of the first field holding undecodable bytes (lone surrogates), or ``None``."""
    for i, f in enumerate(fields):
        if any("\udc80" <= c <= "\udcff" for c in f):
            return i
    return None


def _first_line(mask: np.ndarray, line_of: LineOf) -> int:
    return line_of(int(np.flatnonzero(mask)[0]))


def _check_not_null(col: pa.ChunkedArray, name: str, source: str, line_of: LineOf) -> None:
    if col.null_count:
        line = _first_line(col.is_null().to_numpy(zero_copy_only=False), line_of)
        raise DataValidationError(f"{source}: line {line}: {name} is empty, null or NaN")


def remap_ids(col: pa.ChunkedArray, name: str, source: str, line_of: LineOf) -> Tuple[np.ndarray, pa.Table]:
    """Maps raw id texts to ``1..n``; returns the ids and the ``(id, raw)`` mapping table.

    Args:
        col: the ids as text, exactly as in the file.
        name: column name, for errors.
        source: file name, for errors.
        line_of: table row to file line, for errors.
    """
    _check_not_null(col, name, source, line_of)
    text = col.cast(pa.string())
    uniq = pc.unique(text)
    try:
        # Numeric order when every id is an integer; "7" and "007" stay two ids, in text order.
        table = pa.table({"key": pc.cast(uniq, pa.int64()), "raw": uniq})
        order = pc.sort_indices(table, sort_keys=[("key", "ascending"), ("raw", "ascending")])
    except pa.ArrowInvalid:
        order = pc.sort_indices(uniq)
    uniq = pc.take(uniq, order)
    ids = pc.index_in(text, value_set=uniq).to_numpy().astype(np.int64) + 1
    mapping = pa.table({"id": np.arange(1, len(uniq) + 1, dtype=np.int64), "raw": uniq})
    return ids, mapping


def _unparsable_row(col: pa.ChunkedArray) -> int:
    """First row of a text column that is neither a number nor an ISO-8601 time like the rows
    before it (a bisection on prefixes: a cast fails or succeeds for a whole array)."""
    values = col.combine_chunks()

    def parses(n: int) -> bool:
        prefix = values.slice(0, n)
        for kind in (pa.float64(), pa.timestamp("ns")):
            try:
                pc.cast(prefix, kind)
                return True
            except pa.ArrowInvalid:
                pass
        return False

    lo, hi = 0, len(values)  # parses(lo) holds, parses(hi) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if parses(mid) else (lo, mid)
    return lo


def _date(seconds: float) -> str:
    moment = datetime.datetime.fromtimestamp(min(seconds, MAX_SECONDS), datetime.timezone.utc)
    return moment.strftime("%Y-%m-%d")


def timestamps_to_seconds(
    col: pa.ChunkedArray, name: str, time_unit: str, source: str, line_of: LineOf
) -> np.ndarray:
    """Integer / float / datetime column to int64 seconds, refusing nulls, NaNs, negatives and
    values that are no date in ``time_unit``.

    Args:
        col: the timestamps.
        name: column name, for errors.
        time_unit: unit of numeric values, or ``"auto"`` to choose it from the largest value.
        source: file name, for errors.
        line_of: table row to file line, for errors.
    """
    _check_not_null(col, name, source, line_of)
    if pa.types.is_timestamp(col.type):
        # A datetime carries its unit; floor to seconds (a cast to seconds refuses fractions).
        seconds = np.floor_divide(col.cast(pa.int64()).to_numpy(), TIME_UNITS[col.type.unit])
        bad = seconds < 0
        if bad.any():
            raise DataValidationError(f"{source}: line {_first_line(bad, line_of)}: {name} before 1970")
        return seconds.astype(np.int64)
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        row = _unparsable_row(col)
        value = col[row].as_py()
        raise DataValidationError(
            f"{source}: line {line_of(row)}: {name} {value!r} is not a number or an ISO-8601 time "
            "like the values before it"
        )
    if pa.types.is_date(col.type):
        return timestamps_to_seconds(col.cast(pa.timestamp("s")), name, time_unit, source, line_of)
    if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)):
        # E.g. times of day (Arrow reads "12:30:00" as time32): no date, so no event time.
        raise DataValidationError(
            f"{source}: line {line_of(0)}: {name} {col[0].as_py()!r} is a {col.type}, expected numbers "
            "or datetimes"
        )
    values = col.to_numpy()
    if pa.types.is_floating(col.type) and np.isnan(values).any():
        raise DataValidationError(f"{source}: line {_first_line(np.isnan(values), line_of)}: {name} is NaN")
    if (values < 0).any():
        line = _first_line(values < 0, line_of)
        raise DataValidationError(f"{source}: line {line}: negative {name} {values[values < 0][0]}")
    top = values.max()
    if time_unit == AUTO:
        fits = [u for u in ("s", "ms", "us", "ns") if top / TIME_UNITS[u] < MAX_SECONDS]
        if not fits:
            line = _first_line(values == top, line_of)
            raise DataValidationError(f"{source}: line {line}: {name} {top} is no date in any unit")
        time_unit = fits[0]
        logger.warning(
            "%s: %s: no --time-unit given; the largest value %s is read as %s (%s UTC)",
            source,
            name,
            top,
            time_unit,
            _date(top / TIME_UNITS[time_unit]),
        )
    elif top / TIME_UNITS[time_unit] >= MAX_SECONDS:
        line = _first_line(values == top, line_of)
        fits = [u for u in ("ms", "us", "ns") if top / TIME_UNITS[u] < MAX_SECONDS]
        hint = f"; did you mean --time-unit {fits[0]}?" if fits else ""
        raise DataValidationError(
            f"{source}: line {line}: {name} {top} read as {time_unit} is after the year 5000{hint}"
        )
    return np.floor_divide(values, TIME_UNITS[time_unit]).astype(np.int64)


def convert_table(
    table: pa.Table,
    *,
    source: str,
    line_of: LineOf,
    user_col: str,
    item_col: str,
    time_col: str,
    feature_cols: Sequence[str] = (),
    time_unit: str = AUTO,
) -> Converted:
    """Converts an interactions table (one event per row, id columns as text) into sequences.

    Args:
        table: the events.
        source: file name for error messages and the metadata.
        line_of: file line of a table row, for error messages.
        user_col: user id column.
        item_col: item id column.
        time_col: timestamp column.
        feature_cols: categorical side-feature columns.
        time_unit: unit of ``time_col`` when numeric, or ``"auto"``.

    Returns:
        ``(sequences, info, mappings)`` with one mapping table per id column.
    """
    cols = [user_col, item_col, time_col, *feature_cols]
    missing = [c for c in cols if c not in table.column_names]
    if missing:
        raise DataValidationError(f"{source}: missing columns {missing} (has {table.column_names})")
    if table.num_rows == 0:
        raise DataValidationError(f"{source}: no interactions")
    mappings: Dict[str, pa.Table] = {}
    ids: Dict[str, np.ndarray] = {}
    for name in [user_col, item_col, *feature_cols]:
        ids[name], mappings[name] = remap_ids(table.column(name), name, source, line_of)
    seconds = timestamps_to_seconds(table.column(time_col), time_col, time_unit, source, line_of)
    seqs = build_sequences(ids[user_col], ids[item_col], seconds, {name: ids[name] for name in feature_cols})
    info = SequenceDatasetInfo(
        num_items=mappings[item_col].num_rows,
        feature_cardinalities={name: mappings[name].num_rows for name in feature_cols},
        source=source,
    )
    return seqs, info, mappings


def read_table(
    path: PathLike,
    *,
    sep: str,
    columns: Sequence[str],
    time_col: str,
    column_names: Optional[List[str]] = None,
    data: Optional[bytes] = None,
    typed_header: bool = False,
) -> Tuple[pa.Table, TextRecords]:
    """Reads the used columns of a delimited text table: ids as text, the time column inferred.

    Args:
        path: the file.
        sep: field separator.
        columns: the columns to read (the others are not parsed).
        time_col: the one column whose type is inferred.
        column_names: names when the file has no header.
        data: the file's bytes, when transformed before parsing.
        typed_header: header fields are ``name:type`` (RecBole); columns are named without type.

    Returns:
        The table with ``columns`` in order, and the file's records for line numbers.
    """
    records = TextRecords(path, sep, header=column_names is None, data=data)
    header = column_names if column_names is not None else records.first()
    names = [h.split(":")[0] for h in header] if typed_header else list(header)
    missing = [c for c in columns if c not in names]
    if missing:
        raise DataValidationError(f"{path}: missing columns {missing} (has {names})")
    if len(set(names)) != len(names):
        raise DataValidationError(f"{path}: repeated column names in {names}")
    raw = {c: header[names.index(c)] for c in columns}
    try:
        table = pacsv.read_csv(
            io.BytesIO(data) if data is not None else str(path),
            read_options=pacsv.ReadOptions(column_names=column_names),
            parse_options=pacsv.ParseOptions(delimiter=sep, newlines_in_values=True),
            convert_options=pacsv.ConvertOptions(
                column_types={raw[c]: pa.string() for c in columns if c != time_col},
                include_columns=[raw[c] for c in columns],
                # Only an empty field is missing: "NA" or "null" are ids like any other text.
                null_values=[""],
                strings_can_be_null=True,
            ),
        )
    except pa.ArrowInvalid as e:
        where = records.bad_record(len(header), {c: names.index(c) for c in columns})
        raise DataValidationError(f"{path}: {where or f'malformed table ({e})'}") from e
    return table.rename_columns(list(columns)), records


def convert_interactions(
    path: PathLike,
    *,
    sep: str = ",",
    column_names: Optional[List[str]] = None,
    user_col: str = "user_id",
    item_col: str = "item_id",
    time_col: str = "timestamp",
    feature_cols: Sequence[str] = (),
    time_unit: str = AUTO,
) -> Converted:
    """Converts a CSV/TSV interactions table (see :func:`convert_table` for the arguments)."""
    columns = [user_col, item_col, time_col, *feature_cols]
    table, records = read_table(path, sep=sep, columns=columns, time_col=time_col, column_names=column_names)
    return convert_table(
        table,
        source=str(path),
        line_of=records.line_of,
        user_col=user_col,
        item_col=item_col,
        time_col=time_col,
        feature_cols=feature_cols,
        time_unit=time_unit,
    )


def convert_recbole(path: PathLike, feature_cols: Sequence[str] = (), time_unit: str = AUTO) -> Converted:
    """Converts a RecBole atomic ``.inter`` file (``user_id``, ``item_id``, ``timestamp`` fields)."""
    columns = ["user_id", "item_id", "timestamp", *feature_cols]
    # RecBole headers are ``name:type``; the type suffix is not part of the field name.
    table, records = read_table(path, sep="\t", columns=columns, time_col="timestamp", typed_header=True)
    return convert_table(
        table,
        source=str(path),
        line_of=records.line_of,
        user_col="user_id",
        item_col="item_id",
        time_col="timestamp",
        feature_cols=feature_cols,
        time_unit=time_unit,
    )


def convert_movielens(path: PathLike, time_unit: str = AUTO) -> Converted:
    """Converts MovieLens ``ratings.dat`` (``UserID::MovieID::Rating::Timestamp``)."""
    # Arrow's CSV parser takes one-character delimiters only; lines stay where they were.
    try:
        data = Path(path).read_bytes().replace(b"::", b"\t")
    except OSError as e:
        raise DataValidationError(f"{path}: cannot read ({e})") from e
    columns = ["user", "item", "timestamp"]
    table, records = read_table(
        path, sep="\t", columns=columns, time_col="timestamp", column_names=MOVIELENS_COLUMNS, data=data
    )
    return convert_table(
        table,
        source=str(path),
        line_of=records.line_of,
        user_col="user",
        item_col="item",
        time_col="timestamp",
        time_unit=time_unit,
    )


def _decimals(tokens: List[str], what: str, where: Callable[[int], str]) -> np.ndarray:
    """Plain decimal integer tokens as int64; any other spelling, or overflow, is refused."""
    text = np.array(tokens, dtype=str)
    try:
        values = text.astype(np.int64)
        bad = np.flatnonzero(text != values.astype(str))
    except (ValueError, OverflowError):
        values = np.zeros(0, np.int64)
        bad = [i for i, t in enumerate(tokens) if not _DECIMAL.fullmatch(t) or abs(int(t)) > _INT64_MAX]
    if len(bad):
        i = int(bad[0])
        raise DataValidationError(
            f"{where(i)}: {what} {tokens[i]!r} is not an integer (plain decimal, int64)"
        )
    return values


def convert_s3rec(path: PathLike, origin: int = 0) -> Converted:
    """Converts the S3Rec gap format; times are ``origin + cumsum(gaps)`` seconds.

    Item ids are kept when they are exactly ``1..n``; otherwise they are remapped densely in
    numeric order (a notice is logged and the mapping returned), so a sparse id cannot inflate
    the catalogue. User ids are kept; a user on two lines is refused. Blank lines are skipped.
    """
    users: List[int] = []
    line_nos: List[int] = []
    seen: Dict[int, int] = {}
    lengths: List[int] = []
    items: List[str] = []
    gaps: List[str] = []
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataValidationError(f"{path}: cannot read ({e})") from e
    with f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataValidationError(
                    f"{path}: line {line_no}: not valid UTF-8 "
                    f"(byte {raw[e.start]:#04x} at column {e.start + 1})"
                ) from None
            if not line.strip():
                continue
            parts = line.rstrip("\r\n").split("\t")
            ids = parts[0].split()
            if len(parts) != 2 or len(ids) < 2:
                raise DataValidationError(
                    f"{path}: line {line_no}: expected 'uid item ...<TAB>gap ...', got {line[:80]!r}"
                )
            line_gaps = parts[1].split()
            if len(line_gaps) != len(ids) - 1:
                raise DataValidationError(
                    f"{path}: line {line_no} (user {ids[0]}): {len(ids) - 1} items but {len(line_gaps)} gaps"
                )
            if not _DECIMAL.fullmatch(ids[0]) or abs(int(ids[0])) > _INT64_MAX:
                raise DataValidationError(
                    f"{path}: line {line_no}: user id {ids[0]!r} is not an integer (plain decimal, int64)"
                )
            uid = int(ids[0])
            if uid in seen:
                raise DataValidationError(
                    f"{path}: line {line_no}: user {uid} is already on line {seen[uid]} (one line per user)"
                )
            seen[uid] = line_no
            users.append(uid)
            line_nos.append(line_no)
            lengths.append(len(line_gaps))
            items.extend(ids[1:])
            gaps.extend(line_gaps)
    if not users:
        raise DataValidationError(f"{path}: no users")
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])

    def where(event: int) -> str:
        row = int(np.searchsorted(offsets, event, side="right") - 1)
        return f"{path}: line {line_nos[row]} (user {users[row]})"

    values = _decimals(items, "item id", where)
    if (values < 1).any():
        e = int(np.flatnonzero(values < 1)[0])
        raise DataValidationError(f"{where(e)}: item id {values[e]} is not >= 1 (0 is padding)")
    gap_values = _decimals(gaps, "gap", where)
    if (gap_values < 0).any():
        e = int(np.flatnonzero(gap_values < 0)[0])
        raise DataValidationError(f"{where(e)}: negative gap {gap_values[e]}")
    if (gap_values >= MAX_SECONDS).any():
        e = int(np.flatnonzero(gap_values >= MAX_SECONDS)[0])
        raise DataValidationError(f"{where(e)}: gap {gap_values[e]} s is more than 3000 years")
    # Per-user cumulative sums from one global cumsum: subtract the total before each user.
    total = np.cumsum(gap_values)
    before = np.r_[0, total][offsets[:-1]]
    timestamps = origin + total - np.repeat(before, lengths)
    if (timestamps >= MAX_SECONDS).any():
        e = int(np.flatnonzero(timestamps >= MAX_SECONDS)[0])
        raise DataValidationError(
            f"{where(e)}: time {timestamps[e]} s (origin + gaps) is after the year 5000"
        )
    uniq, item_ids = np.unique(values, return_inverse=True)
    item_ids = item_ids.astype(np.int64) + 1
    mappings: Dict[str, pa.Table] = {}
    if uniq[-1] != uniq.size:
        logger.warning(
            "%s: item ids are not exactly 1..n (%d distinct, largest %d): remapped densely to 1..%d, "
            "the mapping is saved as the item_id mapping",
            path,
            uniq.size,
            uniq[-1],
            uniq.size,
        )
        mappings["item_id"] = pa.table(
            {
                "id": np.arange(1, uniq.size + 1, dtype=np.int64),
                "raw": pa.array(uniq.astype(str), pa.string()),
            }
        )
    seqs = Sequences(
        user_ids=np.array(users, dtype=np.int64),
        offsets=offsets,
        item_ids=item_ids,
        timestamps=timestamps,
        features={},
    )
    return seqs, SequenceDatasetInfo(num_items=int(uniq.size), source=str(path)), mappings


def mapping_path(out: PathLike, column: str) -> Path:
    """Where the id mapping of ``column`` is saved next to ``out``."""
    out = Path(out)
    return out.with_name(f"{out.stem}.{column}{MAPPING_SUFFIX}")


def write_outputs(
    out: PathLike,
    seqs: Sequences,
    info: SequenceDatasetInfo,
    mappings: Dict[str, pa.Table],
    row_group_size: int,
) -> SequenceDatasetInfo:
    """Writes the sequences and the mappings, each under a temporary name first.

    The mappings are only renamed into place once the sequences are, so a failure (a full disk)
    never pairs a new output with old mappings or the reverse.

    Raises:
        DataWriteError: naming the file that could not be written.
    """
    with contextlib.ExitStack() as staged:
        for column, mapping in mappings.items():
            tmp = staged.enter_context(atomic_path(mapping_path(out, column)))
            pq.write_table(mapping.select(MAPPING_COLUMNS), str(tmp))
        # A failure here ends the mappings' blocks too, which then remove their temporary files.
        return write_sequences(out, seqs, info, row_group_size=row_group_size)


def _parser() -> argparse.ArgumentParser:
    def separator(text: str) -> str:
        sep = text.replace("\\t", "\t")
        if len(sep) != 1:
            raise argparse.ArgumentTypeError(f"a separator is one character, got {text!r}")
        return sep

    def row_group_size(text: str) -> int:
        n = int(text)
        if n < 1:
            raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
        return n

    p = argparse.ArgumentParser(
        prog="python -m torchrec_hytrec.data.convert",
        description="Convert interaction logs to HyTRec Parquet sequences (one row per user).",
    )
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("input", help="input file")
    p.add_argument("output", help="output Parquet file")
    p.add_argument(
        "--sep", default=",", type=separator, help="interactions: field separator (use '\\t' for TSV)"
    )
    p.add_argument(
        "--columns", default=None, help="interactions: comma-separated names when the file has no header"
    )
    p.add_argument("--user-col", default="user_id", help="interactions: user column")
    p.add_argument("--item-col", default="item_id", help="interactions: item column")
    p.add_argument("--time-col", default="timestamp", help="interactions: timestamp column")
    p.add_argument(
        "--feature-cols", default="", help="interactions/recbole: comma-separated categorical side features"
    )
    p.add_argument(
        "--time-unit",
        default=AUTO,
        choices=[AUTO, *TIME_UNITS],
        help="interactions/recbole/movielens: unit of numeric timestamps (auto: from the "
        "largest value, logged)",
    )
    p.add_argument("--origin", type=int, default=0, help="s3rec: time of each user's first event, seconds")
    p.add_argument(
        "--row-group-size",
        type=row_group_size,
        default=DEFAULT_ROW_GROUP_SIZE,
        help="users per Parquet row group",
    )
    return p


def main(argv: Optional[Sequence[str]] = None) -> SequenceDatasetInfo:
    """Runs the converter CLI; returns the written info.

    Raises:
        DataValidationError: the input is malformed (the message names the file and line).
        DataWriteError: the output could not be written (the message names it).
    """
    args = _parser().parse_args(argv)
    features = [c for c in args.feature_cols.split(",") if c]
    if args.format == "interactions":
        seqs, info, mappings = convert_interactions(
            args.input,
            sep=args.sep,
            column_names=args.columns.split(",") if args.columns else None,
            user_col=args.user_col,
            item_col=args.item_col,
            time_col=args.time_col,
            feature_cols=features,
            time_unit=args.time_unit,
        )
    elif args.format == "recbole":
        seqs, info, mappings = convert_recbole(args.input, features, time_unit=args.time_unit)
    elif args.format == "movielens":
        seqs, info, mappings = convert_movielens(args.input, time_unit=args.time_unit)
    else:
        if args.origin < 0:
            raise DataValidationError(f"--origin must be >= 0, got {args.origin}")
        seqs, info, mappings = convert_s3rec(args.input, origin=args.origin)
    info = write_outputs(args.output, seqs, info, mappings, args.row_group_size)
    print(
        f"{args.output}: {info.num_users} users, {info.num_items} items, {info.num_events} events"
        + "".join(f", {k} cardinality {v}" for k, v in info.feature_cardinalities.items()),
        file=sys.stderr,
    )
    return info


if __name__ == "__main__":
    logging.basicConfig(format="%(message)s", level=logging.INFO)
    try:
        main()
    except (DataValidationError, OSError) as e:
        sys.exit(f"error: {e}")
