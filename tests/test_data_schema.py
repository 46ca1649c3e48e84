"""Parquet sequence schema: round trip, metadata, and one test per validation rule."""

import dataclasses
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from torchrec_hytrec.data.parquet import read_info, read_sequences, write_sequences
from torchrec_hytrec.data.schema import (
    METADATA_KEY,
    DataValidationError,
    SequenceDatasetInfo,
    Sequences,
    arrow_schema,
)

INFO = SequenceDatasetInfo(num_items=9, feature_cardinalities={"category": 3})


def _seqs() -> Sequences:
    return Sequences(
        user_ids=np.array([10, 11, 12], dtype=np.int64),
        offsets=np.array([0, 3, 5, 9], dtype=np.int64),
        item_ids=np.array([1, 2, 3, 9, 4, 5, 5, 6, 7], dtype=np.int64),
        timestamps=np.array([0, 10, 10, 3, 4, 100, 200, 200, 300], dtype=np.int64),
        features={"category": np.array([1, 1, 2, 3, 2, 2, 2, 3, 1], dtype=np.int64)},
    )


def _write_table(path: Path, columns: dict, info: SequenceDatasetInfo = INFO) -> Path:
    """Writes raw columns (possibly breaking the schema) with ``info`` in the metadata."""
    table = pa.table(columns).replace_schema_metadata({METADATA_KEY: info.to_json()})
    pq.write_table(table, str(path))
    return path


def _valid_columns() -> dict:
    return {
        "user_id": pa.array([10, 11], pa.int64()),
        "item_ids": pa.array([[1, 2], [3]], pa.list_(pa.int64())),
        "timestamps": pa.array([[5, 6], [7]], pa.list_(pa.int64())),
        "category": pa.array([[1, 2], [3]], pa.list_(pa.int64())),
    }


def test_round_trip_keeps_values_metadata_and_row_groups(tmp_path: Path) -> None:
    path = tmp_path / "s.parquet"
    written = write_sequences(path, _seqs(), INFO, row_group_size=2)
    assert (written.num_users, written.num_events) == (3, 9)
    pf = pq.ParquetFile(str(path))
    assert pf.num_row_groups == 2
    assert pf.schema_arrow.field("item_ids").type == pa.list_(pa.int64())
    assert read_info(path) == written
    seqs, info = read_sequences(path)
    assert info.feature_cardinalities == {"category": 3}
    for name in ("user_ids", "offsets", "item_ids", "timestamps"):
        np.testing.assert_array_equal(getattr(seqs, name), getattr(_seqs(), name))
    np.testing.assert_array_equal(seqs.features["category"], _seqs().features["category"])


def test_valid_hand_written_file_reads(tmp_path: Path) -> None:
    info = SequenceDatasetInfo(num_items=9, feature_cardinalities={"category": 3}, num_users=2, num_events=3)
    seqs, _ = read_sequences(_write_table(tmp_path / "ok.parquet", _valid_columns(), info))
    np.testing.assert_array_equal(seqs.lengths, [2, 1])


@pytest.mark.parametrize(
    "column, value, message",
    [
        (
            "timestamps",
            pa.array([[5], [7]], pa.list_(pa.int64())),
            r"row 0 \(user 10\): timestamps has 1 values but item_ids has 2",
        ),
        (
            "timestamps",
            pa.array([[6, 5], [7]], pa.list_(pa.int64())),
            r"row 0 \(user 10\), position 1: timestamps out of order",
        ),
        (
            "timestamps",
            pa.array([[5, 6], [-7]], pa.list_(pa.int64())),
            r"row 1 \(user 11\), position 0: negative timestamp",
        ),
        (
            "item_ids",
            pa.array([[1, 2], [-3]], pa.list_(pa.int64())),
            r"row 1 \(user 11\), position 0: item_ids value -3 outside \[1, 9\]",
        ),
        (
            "item_ids",
            pa.array([[1, 10], [3]], pa.list_(pa.int64())),
            r"row 0 \(user 10\), position 1: item_ids value 10 outside",
        ),
        (
            "item_ids",
            pa.array([[1, 0], [3]], pa.list_(pa.int64())),
            r"row 0 \(user 10\), position 1: item_ids value 0 outside",
        ),
        (
            "category",
            pa.array([[1, 4], [3]], pa.list_(pa.int64())),
            r"row 0 \(user 10\), position 1: category value 4 outside \[1, 3\]",
        ),
        (
            "item_ids",
            pa.array([[1, None], [3]], pa.list_(pa.int64())),
            r"row 0 \(user 10\), position 1: item_ids has a null value",
        ),
        ("item_ids", pa.array([[1, 2], None], pa.list_(pa.int64())), r"row 1 \(user 11\): item_ids is null"),
        (
            "timestamps",
            pa.array([[5.0, float("nan")], [7.0]], pa.list_(pa.float64())),
            r"row 0 \(user 10\), position 1: timestamps has a NaN value",
        ),
        (
            "timestamps",
            pa.array([[5.0, 6.0], [7.0]], pa.list_(pa.float64())),
            r"column 'timestamps' has type list<\w+: double>, expected list<int64>",
        ),
        ("user_id", pa.array([10, None], pa.int64()), r"row 1: user_id is null"),
        ("user_id", pa.array([10, -1], pa.int64()), r"row 1 \(user -1\): negative user_id"),
    ],
)
def test_bad_values_name_file_row_and_user(
    tmp_path: Path, column: str, value: pa.Array, message: str
) -> None:
    columns = _valid_columns()
    columns[column] = value
    path = _write_table(tmp_path / "bad.parquet", columns)
    with pytest.raises(DataValidationError, match=f"^{re.escape(str(path))}: {message}"):
        read_sequences(path)


def test_empty_sequence_is_refused(tmp_path: Path) -> None:
    columns = _valid_columns()
    for name in ("item_ids", "timestamps", "category"):
        columns[name] = pa.array([[1, 2], []], pa.list_(pa.int64()))
    with pytest.raises(DataValidationError, match=r"empty.parquet: row 1 \(user 11\): empty sequence"):
        read_sequences(_write_table(tmp_path / "empty.parquet", columns))


def test_missing_column_is_refused(tmp_path: Path) -> None:
    columns = _valid_columns()
    del columns["category"]
    with pytest.raises(DataValidationError, match=r"missing.parquet: missing columns \['category'\]"):
        read_sequences(_write_table(tmp_path / "missing.parquet", columns))


def test_missing_metadata_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "plain.parquet"
    pq.write_table(pa.table(_valid_columns()), str(path))
    with pytest.raises(DataValidationError, match="plain.parquet: no torchrec_hytrec metadata"):
        read_info(path)


def test_duplicate_user_and_wrong_counts_are_refused(tmp_path: Path) -> None:
    columns = _valid_columns()
    columns["user_id"] = pa.array([10, 10], pa.int64())
    with pytest.raises(DataValidationError, match=r"dup.parquet: user 10 appears in rows 0 and 1"):
        read_sequences(_write_table(tmp_path / "dup.parquet", columns))
    # In two row groups, each valid alone.
    table = pa.table(columns).replace_schema_metadata(
        {METADATA_KEY: dataclasses.replace(INFO, num_users=2, num_events=3).to_json()}
    )
    pq.write_table(table, str(tmp_path / "groups.parquet"), row_group_size=1)
    assert pq.ParquetFile(str(tmp_path / "groups.parquet")).num_row_groups == 2
    with pytest.raises(DataValidationError, match=r"groups.parquet: user 10 appears in rows 0 and 1"):
        read_sequences(tmp_path / "groups.parquet")
    # The writer refuses it too, and leaves no file behind.
    seqs = _seqs()
    seqs.user_ids[2] = 10
    with pytest.raises(DataValidationError, match=r"w.parquet: user 10 appears in rows 0 and 2"):
        write_sequences(tmp_path / "w.parquet", seqs, INFO, row_group_size=2)
    assert not list(tmp_path.glob("*w.parquet*"))
    with pytest.raises(DataValidationError, match="metadata says 0 users / 0 events, file holds 2 / 3"):
        read_sequences(_write_table(tmp_path / "counts.parquet", _valid_columns()))


def test_truncated_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    write_sequences(path, _seqs(), INFO)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataValidationError, match=r"t.parquet: not a readable Parquet file"):
        read_sequences(path)


def test_corrupt_data_page_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.parquet"
    write_sequences(path, _seqs(), INFO)
    data = bytearray(path.read_bytes())
    # Flip bytes inside the first column chunk's data, past the page header; the page
    # checksum written by write_sequences turns this into an error instead of wrong ids.
    meta = pq.ParquetFile(str(path)).metadata.row_group(0).column(1)
    start = meta.data_page_offset + meta.total_compressed_size // 2
    for i in range(start, start + 4):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DataValidationError, match=r"c.parquet: row group 0 is unreadable"):
        read_sequences(path)


def test_schema_lists_features_and_info_is_checked() -> None:
    schema = arrow_schema(INFO)
    assert schema.names == ["user_id", "item_ids", "timestamps", "category"]
    with pytest.raises(DataValidationError, match="time_unit"):
        SequenceDatasetInfo(num_items=3, time_unit="days")
    with pytest.raises(DataValidationError, match="num_items"):
        SequenceDatasetInfo(num_items=0)
