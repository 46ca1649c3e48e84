"""Converters: the real Beauty and ML-100k files, generic tables, MovieLens, CLI and errors."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from torchrec_hytrec.data.convert import main, mapping_path
from torchrec_hytrec.data.schema import DataValidationError, read_sequences

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
BEAUTY = DATA / "amazon_beauty.txt"
ML100K = DATA / "ml-100k.inter"


@pytest.mark.skipif(not BEAUTY.exists(), reason=f"{BEAUTY} absent")
def test_beauty_s3rec_counts_and_times(tmp_path: Path) -> None:
    out = tmp_path / "beauty.parquet"
    info = main(["--format", "s3rec", str(BEAUTY), str(out)])
    seqs, read = read_sequences(out)
    assert (info.num_users, info.num_items, info.num_events) == (22_363, 12_101, 198_502)
    assert read == info
    assert np.unique(seqs.item_ids).size == 12_101
    # Line 2 of the file: "2 6 7 8 9 10 4 11<TAB>0 3801600 0 604800 864000 86400 0".
    user2 = seqs.rows(1, 2)
    assert user2.user_ids.tolist() == [2]
    assert user2.item_ids.tolist() == [6, 7, 8, 9, 10, 4, 11]
    assert user2.timestamps.tolist() == [0, 3801600, 3801600, 4406400, 5270400, 5356800, 5356800]


@pytest.mark.skipif(not ML100K.exists(), reason=f"{ML100K} absent")
def test_ml100k_recbole_counts_and_mapping(tmp_path: Path) -> None:
    out = tmp_path / "ml.parquet"
    info = main(["--format", "recbole", str(ML100K), str(out)])
    assert (info.num_users, info.num_items, info.num_events) == (943, 1_682, 100_000)
    seqs, _ = read_sequences(out)
    items = pq.read_table(str(mapping_path(out, "item_id"))).to_pydict()
    users = pq.read_table(str(mapping_path(out, "user_id"))).to_pydict()
    # Integer tokens map in numeric order, so ids coincide with ML-100k's 1..n numbering.
    assert items["raw"][:3] == ["1", "2", "3"] and items["id"][:3] == [1, 2, 3]
    # First data line: user 196 rated item 242 at 881250949.
    uid = users["id"][users["raw"].index("196")]
    row = int(np.flatnonzero(seqs.user_ids == uid)[0])
    user = seqs.rows(row, row + 1)
    pos = int(np.flatnonzero(user.timestamps == 881250949)[0])
    assert items["raw"][int(user.item_ids[pos]) - 1] == "242"


def test_interactions_string_ids_features_ties_and_units(tmp_path: Path) -> None:
    src = tmp_path / "log.tsv"
    src.write_text(
        "who\twhat\twhen_ms\tshelf\n"
        "bob\tpen\t5000\ttools\n"
        "amy\tink\t2000\ttools\n"
        "bob\tcup\t1000\tkitchen\n"
        "bob\tink\t5000\ttools\n"
        "amy\tpen\t2999\ttools\n"
    )
    out = tmp_path / "log.parquet"
    info = main([
        "--format", "interactions", str(src), str(out), "--sep", "\\t", "--user-col", "who",
        "--item-col", "what", "--time-col", "when_ms", "--feature-cols", "shelf", "--time-unit", "ms",
    ])
    assert (info.num_users, info.num_items, info.feature_cardinalities) == (2, 3, {"shelf": 2})
    seqs, _ = read_sequences(out)
    items = pq.read_table(str(mapping_path(out, "what"))).to_pydict()
    assert items == {"id": [1, 2, 3], "raw": ["cup", "ink", "pen"]}
    assert pq.read_table(str(mapping_path(out, "who"))).to_pydict()["raw"] == ["amy", "bob"]
    # amy: ink@2s, pen@2.999s -> floored to 2; bob: cup@1, then the 5s tie in file order: pen, ink.
    assert seqs.item_ids.tolist() == [2, 3, 1, 3, 2]
    assert seqs.timestamps.tolist() == [2, 2, 1, 5, 5]
    assert seqs.features["shelf"].tolist() == [2, 2, 1, 2, 2]


def test_movielens_ratings_dat(tmp_path: Path) -> None:
    src = tmp_path / "ratings.dat"
    src.write_text("1::1193::5::978300760\n1::661::3::978302109\n2::1193::4::978298413\n2::3408::4::978299000\n")
    out = tmp_path / "ml1m.parquet"
    info = main(["--format", "movielens", str(src), str(out)])
    assert (info.num_users, info.num_items, info.num_events) == (2, 3, 4)
    seqs, _ = read_sequences(out)
    assert seqs.lengths.tolist() == [2, 2]
    assert seqs.item_ids.tolist() == [2, 1, 2, 3]  # 661 -> 1, 1193 -> 2, 3408 -> 3
    assert seqs.timestamps.tolist() == [978300760, 978302109, 978298413, 978299000]


@pytest.mark.parametrize(
    "body, message",
    [
        ("user_id,item_id,timestamp\n1,2,3\n1,4,nan\n", r"line 3: timestamp is empty, null or NaN"),
        ("user_id,item_id,timestamp\n1,2,3\n1,,4\n", r"line 3: item_id is empty, null or NaN"),
        ("user_id,item_id,timestamp\n1,2,3\n1,4,-5\n", r"line 3: negative timestamp -5"),
        ("user_id,item_id,time\n1,2,3\n", r"missing columns \['timestamp'\]"),
        ("user_id,item_id,timestamp\n1,2,3\n1,2\n", r"malformed table"),
    ],
)
def test_interactions_errors_name_file_and_line(tmp_path: Path, body: str, message: str) -> None:
    src = tmp_path / "bad.csv"
    src.write_text(body)
    with pytest.raises(DataValidationError, match=f"bad.csv: .*{message}"):
        main(["--format", "interactions", str(src), str(tmp_path / "out.parquet")])


@pytest.mark.parametrize(
    "body, message",
    [
        ("1 5 6\t0 10\n2 5 6\t0\n", r"line 2 \(user 2\): 2 items but 1 gaps"),
        ("1 5 6\t0 10\n2 5 x\t0 3\n", r"line 2 \(user 2\): item id 'x' is not an integer"),
        ("1 5 6\t0 -10\n", r"line 1 \(user 1\): negative gap -10"),
        ("1 5 6 0 10\n", r"line 1: expected"),
    ],
)
def test_s3rec_errors_name_file_line_and_user(tmp_path: Path, body: str, message: str) -> None:
    src = tmp_path / "gaps.txt"
    src.write_text(body)
    with pytest.raises(DataValidationError, match=f"gaps.txt: {message}"):
        main(["--format", "s3rec", str(src), str(tmp_path / "out.parquet")])


def test_cli_help_and_module_entry_point(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "torchrec_hytrec.data.convert", "--help"],
        capture_output=True, text=True, check=True, timeout=120,
    )
    assert "--format {interactions,s3rec,recbole,movielens}" in done.stdout


def test_headerless_csv_with_named_columns(tmp_path: Path) -> None:
    src = tmp_path / "plain.csv"
    src.write_text("7,42,100\n7,41,90\n8,42,5\n")
    out = tmp_path / "plain.parquet"
    info = main(["--format", "interactions", str(src), str(out), "--columns", "user_id,item_id,timestamp"])
    assert (info.num_users, info.num_items, info.num_events) == (2, 2, 3)
    seqs, _ = read_sequences(out)
    assert seqs.item_ids.tolist() == [1, 2, 2] and seqs.timestamps.tolist() == [90, 100, 5]
