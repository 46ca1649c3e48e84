"""Converters from interaction logs to the Parquet sequence format.

``python -m torchrec_hytrec.data.convert --format {interactions,s3rec,recbole,movielens} IN OUT``

* ``interactions``: a CSV/TSV table with user, item and timestamp columns and optional
  categorical side-feature columns (names configurable, header or ``--columns``).
* ``recbole``: a RecBole atomic ``.inter`` file (TSV, header ``name:type``).
* ``movielens``: MovieLens ``ratings.dat`` (``user::item::rating::timestamp``, no header).
* ``s3rec``: the S3Rec / FMLP-Rec gap format, one user per line ``uid i1 i2 ...<TAB>g1 g2 ...``
  where ``g_j`` is the gap in seconds to the previous event; timestamps are the cumulative gaps
  from ``--origin``. Its ids already start at 1 and are kept as they are.

For the table formats every id column (users, items, side features) is read as text and
remapped to contiguous integers from 1 (0 stays padding), in numeric order when all ids are
integers and in text order otherwise; each mapping is saved next to OUT as
``<OUT stem>.<column>.map.parquet`` with columns ``id`` and ``raw``. Timestamps are converted to
seconds (``--time-unit`` of the input; fractions of a second are floored).

Events are sorted by (user, timestamp) with a *stable* sort: events with equal timestamps keep
their order in the input file. Nulls, NaNs, negative timestamps and malformed lines are refused
with the file and line.
"""

import argparse
import io
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from torchrec_hytrec.data.schema import (
    DEFAULT_ROW_GROUP_SIZE,
    TIME_UNITS,
    DataValidationError,
    PathLike,
    SequenceDatasetInfo,
    Sequences,
    write_sequences,
)

FORMATS = ("interactions", "s3rec", "recbole", "movielens")
MOVIELENS_COLUMNS = ["user", "item", "rating", "timestamp"]


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
        Users in increasing id order; within a user events by time, ties in input order
        (``np.lexsort`` is stable).
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


def _first_line(mask: np.ndarray, first_line: int) -> int:
    return first_line + int(np.flatnonzero(mask)[0])


def _check_not_null(col: pa.ChunkedArray, name: str, source: str, first_line: int) -> None:
    if col.null_count:
        line = _first_line(col.is_null().to_numpy(zero_copy_only=False), first_line)
        raise DataValidationError(f"{source}: line {line}: {name} is empty, null or NaN")


def remap_ids(
    col: pa.ChunkedArray, name: str, source: str, first_line: int
) -> Tuple[np.ndarray, pa.Table]:
    """Maps raw id tokens to ``1..n``; returns the ids and the ``(id, raw)`` mapping table."""
    _check_not_null(col, name, source, first_line)
    uniq = pc.unique(col.cast(pa.string()))
    try:
        key = pc.cast(uniq, pa.int64())
    except pa.ArrowInvalid:
        key = uniq
    uniq = pc.take(uniq, pc.sort_indices(key))
    ids = pc.index_in(col.cast(pa.string()), value_set=uniq).to_numpy().astype(np.int64) + 1
    mapping = pa.table({"id": np.arange(1, len(uniq) + 1, dtype=np.int64), "raw": uniq})
    return ids, mapping


def timestamps_to_seconds(
    col: pa.ChunkedArray, name: str, time_unit: str, source: str, first_line: int
) -> np.ndarray:
    """Integer / float / datetime column to int64 seconds, refusing nulls, NaNs and negatives."""
    _check_not_null(col, name, source, first_line)
    if pa.types.is_timestamp(col.type):
        return pc.cast(col, pa.timestamp("s")).cast(pa.int64()).to_numpy()
    if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)):
        raise DataValidationError(f"{source}: column {name!r} is {col.type}, expected numbers or datetimes")
    values = col.to_numpy()
    if pa.types.is_floating(col.type) and np.isnan(values).any():
        raise DataValidationError(f"{source}: line {_first_line(np.isnan(values), first_line)}: {name} is NaN")
    if (values < 0).any():
        line = _first_line(values < 0, first_line)
        raise DataValidationError(f"{source}: line {line}: negative {name} {values[values < 0][0]}")
    return np.floor_divide(values, TIME_UNITS[time_unit]).astype(np.int64)


def convert_table(
    table: pa.Table,
    *,
    source: str,
    first_line: int,
    user_col: str,
    item_col: str,
    time_col: str,
    feature_cols: Sequence[str] = (),
    time_unit: str = "s",
) -> Tuple[Sequences, SequenceDatasetInfo, Dict[str, pa.Table]]:
    """Converts an interactions table (one event per row) into sequences.

    Args:
        table: the events.
        source: file name for error messages and the metadata.
        first_line: file line of the table's first row, for error messages.
        user_col: user id column.
        item_col: item id column.
        time_col: timestamp column.
        feature_cols: categorical side-feature columns.
        time_unit: unit of ``time_col`` when numeric.

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
        ids[name], mappings[name] = remap_ids(table.column(name), name, source, first_line)
    seconds = timestamps_to_seconds(table.column(time_col), time_col, time_unit, source, first_line)
    seqs = build_sequences(
        ids[user_col], ids[item_col], seconds, {name: ids[name] for name in feature_cols}
    )
    info = SequenceDatasetInfo(
        num_items=mappings[item_col].num_rows,
        feature_cardinalities={name: mappings[name].num_rows for name in feature_cols},
        source=source,
    )
    return seqs, info, mappings


def read_table(
    path: PathLike, *, sep: str, column_names: Optional[List[str]] = None, data: Optional[bytes] = None
) -> pa.Table:
    """Reads a delimited text table; id columns are inferred later, so nothing is dropped here."""
    try:
        return pacsv.read_csv(
            io.BytesIO(data) if data is not None else str(path),
            read_options=pacsv.ReadOptions(column_names=column_names),
            parse_options=pacsv.ParseOptions(delimiter=sep),
            convert_options=pacsv.ConvertOptions(strings_can_be_null=True),
        )
    except pa.ArrowInvalid as e:
        raise DataValidationError(f"{path}: malformed table ({e})") from e


def convert_recbole(path: PathLike, feature_cols: Sequence[str] = ()) -> Tuple[Sequences, SequenceDatasetInfo, Dict[str, pa.Table]]:
    """Converts a RecBole atomic ``.inter`` file (``user_id``, ``item_id``, ``timestamp`` fields)."""
    table = read_table(path, sep="\t")
    # RecBole headers are ``name:type``; the type suffix is not part of the field name.
    table = table.rename_columns([c.split(":")[0] for c in table.column_names])
    return convert_table(
        table, source=str(path), first_line=2, user_col="user_id", item_col="item_id",
        time_col="timestamp", feature_cols=feature_cols,
    )


def convert_movielens(path: PathLike) -> Tuple[Sequences, SequenceDatasetInfo, Dict[str, pa.Table]]:
    """Converts MovieLens ``ratings.dat`` (``UserID::MovieID::Rating::Timestamp``)."""
    # Arrow's CSV parser takes one-character delimiters only.
    data = Path(path).read_bytes().replace(b"::", b"\t")
    table = read_table(path, sep="\t", column_names=MOVIELENS_COLUMNS, data=data)
    return convert_table(
        table, source=str(path), first_line=1, user_col="user", item_col="item", time_col="timestamp"
    )


def convert_s3rec(path: PathLike, origin: int = 0) -> Tuple[Sequences, SequenceDatasetInfo, Dict[str, pa.Table]]:
    """Converts the S3Rec gap format; ids are kept (they start at 1), times are ``origin + cumsum(gaps)``."""
    users: List[int] = []
    lengths: List[int] = []
    items: List[str] = []
    gaps: List[str] = []
    with open(path) as f:
        for line_no, line in enumerate(f, start=1):
            parts = line.rstrip("\n").split("\t")
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
            try:
                users.append(int(ids[0]))
            except ValueError:
                raise DataValidationError(f"{path}: line {line_no}: user id {ids[0]!r} is not an integer")
            lengths.append(len(line_gaps))
            items.extend(ids[1:])
            gaps.extend(line_gaps)
    if not users:
        raise DataValidationError(f"{path}: no users")
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])

    def parse(tokens: List[str], what: str) -> np.ndarray:
        try:
            return np.array(tokens, dtype=np.int64)
        except ValueError:
            bad = next(i for i, t in enumerate(tokens) if not t.lstrip("-").isdigit())
            row = int(np.searchsorted(offsets, bad, side="right") - 1)
            raise DataValidationError(
                f"{path}: line {row + 1} (user {users[row]}): {what} {tokens[bad]!r} is not an integer"
            )

    item_ids = parse(items, "item id")
    gap_values = parse(gaps, "gap")
    if (gap_values < 0).any():
        e = int(np.flatnonzero(gap_values < 0)[0])
        row = int(np.searchsorted(offsets, e, side="right") - 1)
        raise DataValidationError(f"{path}: line {row + 1} (user {users[row]}): negative gap {gap_values[e]}")
    # Per-user cumulative sums from one global cumsum: subtract the total before each user.
    total = np.cumsum(gap_values)
    before = np.r_[0, total][offsets[:-1]]
    timestamps = origin + total - np.repeat(before, lengths)
    seqs = Sequences(
        user_ids=np.array(users, dtype=np.int64), offsets=offsets, item_ids=item_ids,
        timestamps=timestamps, features={},
    )
    num_items = int(item_ids.max()) if item_ids.size else 1
    return seqs, SequenceDatasetInfo(num_items=max(num_items, 1), source=str(path)), {}


def mapping_path(out: PathLike, column: str) -> Path:
    """Where the id mapping of ``column`` is saved next to ``out``."""
    out = Path(out)
    return out.with_name(f"{out.stem}.{column}.map.parquet")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m torchrec_hytrec.data.convert",
        description="Convert interaction logs to HyTRec Parquet sequences (one row per user).",
    )
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("input", help="input file")
    p.add_argument("output", help="output Parquet file")
    p.add_argument("--sep", default=",", help="interactions: field separator (use '\\t' for TSV)")
    p.add_argument("--columns", default=None, help="interactions: comma-separated names when the file has no header")
    p.add_argument("--user-col", default="user_id", help="interactions: user column")
    p.add_argument("--item-col", default="item_id", help="interactions: item column")
    p.add_argument("--time-col", default="timestamp", help="interactions: timestamp column")
    p.add_argument("--feature-cols", default="", help="interactions/recbole: comma-separated categorical side features")
    p.add_argument("--time-unit", default="s", choices=sorted(TIME_UNITS), help="interactions: unit of numeric timestamps")
    p.add_argument("--origin", type=int, default=0, help="s3rec: time of each user's first event, seconds")
    p.add_argument("--row-group-size", type=int, default=DEFAULT_ROW_GROUP_SIZE, help="users per Parquet row group")
    return p


def main(argv: Optional[Sequence[str]] = None) -> SequenceDatasetInfo:
    """Runs the converter CLI; returns the written info."""
    args = _parser().parse_args(argv)
    features = [c for c in args.feature_cols.split(",") if c]
    if args.format == "interactions":
        names = args.columns.split(",") if args.columns else None
        table = read_table(args.input, sep=args.sep.replace("\\t", "\t"), column_names=names)
        seqs, info, mappings = convert_table(
            table, source=args.input, first_line=1 if names else 2, user_col=args.user_col,
            item_col=args.item_col, time_col=args.time_col, feature_cols=features,
            time_unit=args.time_unit,
        )
    elif args.format == "recbole":
        seqs, info, mappings = convert_recbole(args.input, features)
    elif args.format == "movielens":
        seqs, info, mappings = convert_movielens(args.input)
    else:
        seqs, info, mappings = convert_s3rec(args.input, origin=args.origin)
    info = write_sequences(args.output, seqs, info, row_group_size=args.row_group_size)
    for column, mapping in mappings.items():
        pq.write_table(mapping, str(mapping_path(args.output, column)))
    print(
        f"{args.output}: {info.num_users} users, {info.num_items} items, {info.num_events} events"
        + "".join(f", {k} cardinality {v}" for k, v in info.feature_cardinalities.items()),
        file=sys.stderr,
    )
    return info


if __name__ == "__main__":
    main()
