"""SequenceReader's checks at construction: converter output directories, files given twice,
users in two places, and metadata counts that disagree with the data (issue #15)."""

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from torchrec_hytrec.data import convert
from torchrec_hytrec.data.parquet import write_sequences
from torchrec_hytrec.data.reader import ReaderConfig, SequenceReader
from torchrec_hytrec.data.schema import METADATA_KEY, DataValidationError, SequenceDatasetInfo, Sequences

INFO = SequenceDatasetInfo(num_items=5)


def _seqs(user_ids: list) -> Sequences:
    n = len(user_ids)
    return Sequences(
        user_ids=np.array(user_ids, np.int64),
        offsets=np.arange(0, 3 * n + 1, 3),
        item_ids=np.tile([1, 2, 3], n),
        timestamps=np.tile([10, 20, 30], n),
        features={},
    )


def _reader(*paths: Path) -> SequenceReader:
    return SequenceReader(list(paths), ReaderConfig(max_tokens=64, max_seq_len=8), split="test")


def test_a_converter_output_directory_is_read_without_its_mappings(tmp_path: Path) -> None:
    log = tmp_path / "log.csv"
    log.write_text("user,item,ts,shop\nu1,a,1,s1\nu1,b,2,s2\nu2,a,3,s1\nu2,c,4,s1\nu1,c,5,s1\nu2,b,6,s2\n")
    out_dir = tmp_path / "converted"
    out_dir.mkdir()
    convert.main(
        [
            "--format",
            "interactions",
            str(log),
            str(out_dir / "log.parquet"),
            "--user-col",
            "user",
            "--item-col",
            "item",
            "--time-col",
            "ts",
            "--feature-cols",
            "shop",
        ]
    )
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "log.item.map.parquet",
        "log.parquet",
        "log.shop.map.parquet",
        "log.user.map.parquet",
    ]
    reader = _reader(out_dir)
    assert (reader.info.num_users, reader.info.num_items, reader.info.num_events) == (2, 3, 6)
    assert sorted(int(u) for b in reader for u in b.user_ids) == [1, 2]
    # A file named like a mapping that is not one is read (and refused for what it is).
    pq.write_table(pa.table({"x": [1]}), str(out_dir / "extra.map.parquet"))
    with pytest.raises(DataValidationError, match=r"extra.map.parquet: no torchrec_hytrec metadata"):
        _reader(out_dir)


def test_the_same_file_twice_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "data" / "a.parquet"
    path.parent.mkdir()
    write_sequences(path, _seqs([1, 2]), INFO)
    with pytest.raises(ValueError, match=r"a.parquet is given twice \(also as .*a.parquet\)"):
        _reader(path, path)
    with pytest.raises(ValueError, match="is given twice"):
        _reader(path.parent, path)
    (tmp_path / "link.parquet").symlink_to(path)
    with pytest.raises(ValueError, match=r"link.parquet is given twice \(also as .*data/a.parquet\)"):
        _reader(path, tmp_path / "link.parquet")


def test_a_user_in_two_files_or_row_groups_is_refused(tmp_path: Path) -> None:
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    write_sequences(a, _seqs([1, 2, 3]), INFO)
    write_sequences(b, _seqs([4, 2]), INFO)
    with pytest.raises(DataValidationError, match=rf"user 2 appears in {a} row 1 and {b} row 1"):
        _reader(a, b)
    write_sequences(b, _seqs([4, 5]), INFO)
    assert _reader(a, b).info.num_users == 5
    # Within one file, in two row groups each valid alone (written around the writer's check).
    table = pq.read_table(str(a))
    dup = pa.concat_tables([table, table.slice(2, 1)]).replace_schema_metadata(
        {METADATA_KEY: dataclasses.replace(INFO, num_users=4, num_events=12).to_json()}
    )
    pq.write_table(dup, str(a), row_group_size=3)
    with pytest.raises(DataValidationError, match=rf"user 3 appears in {a} row 2 and {a} row 3"):
        _reader(a)


@pytest.mark.parametrize("num_users, num_events", [(3, 8), (2, 9), (4, 12)])
def test_metadata_counts_must_match_the_data(tmp_path: Path, num_users: int, num_events: int) -> None:
    path = tmp_path / "c.parquet"
    write_sequences(path, _seqs([1, 2, 3]), INFO)
    table = pq.read_table(str(path)).replace_schema_metadata(
        {METADATA_KEY: dataclasses.replace(INFO, num_users=num_users, num_events=num_events).to_json()}
    )
    pq.write_table(table, str(path))
    with pytest.raises(
        DataValidationError,
        match=rf"c.parquet: metadata says {num_users} users / {num_events} events, "
        r"file holds 3 / 9",
    ):
        _reader(path)


def test_null_rows_are_refused_at_construction(tmp_path: Path) -> None:
    path = tmp_path / "n.parquet"
    table = pa.table(
        {
            "user_id": pa.array([1, 2], pa.int64()),
            "item_ids": pa.array([[1, 2], None], pa.list_(pa.int64())),
            "timestamps": pa.array([[1, 2], [3]], pa.list_(pa.int64())),
        }
    ).replace_schema_metadata({METADATA_KEY: dataclasses.replace(INFO, num_users=2, num_events=3).to_json()})
    pq.write_table(table, str(path))
    with pytest.raises(DataValidationError, match=r"n.parquet: row 1: item_ids is null"):
        _reader(path)


def test_columns_of_the_wrong_type_are_refused_at_construction(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    meta = {METADATA_KEY: dataclasses.replace(INFO, num_users=1, num_events=1).to_json()}
    columns = {
        "user_id": pa.array([1], pa.int64()),
        "item_ids": pa.array([1], pa.int64()),
        "timestamps": pa.array([[1]], pa.list_(pa.int64())),
    }
    pq.write_table(pa.table(columns).replace_schema_metadata(meta), str(path))
    with pytest.raises(
        DataValidationError, match=r"t.parquet: column 'item_ids' has type int64, expected list"
    ):
        _reader(path)
    columns["item_ids"], columns["user_id"] = pa.array([[1]], pa.list_(pa.int64())), pa.array(["1"])
    pq.write_table(pa.table(columns).replace_schema_metadata(meta), str(path))
    with pytest.raises(
        DataValidationError, match=r"t.parquet: column 'user_id' has type string, expected int64"
    ):
        _reader(path)
