"""Converters: the real Beauty and ML-100k files, generic tables, MovieLens, CLI and errors;
id identity, time units, physical line numbers, non-UTF-8 input and full disks."""

import logging
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from torchrec_hytrec.data.convert import main, mapping_path
from torchrec_hytrec.data.parquet import read_sequences
from torchrec_hytrec.data.schema import DataValidationError, DataWriteError

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
    info = main(
        [
            "--format",
            "interactions",
            str(src),
            str(out),
            "--sep",
            "\\t",
            "--user-col",
            "who",
            "--item-col",
            "what",
            "--time-col",
            "when_ms",
            "--feature-cols",
            "shelf",
            "--time-unit",
            "ms",
        ]
    )
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
    src.write_text(
        "1::1193::5::978300760\n1::661::3::978302109\n2::1193::4::978298413\n2::3408::4::978299000\n"
    )
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
        ("user_id,item_id,timestamp\n1,2,3\n1,4,nan\n", r"line 3: timestamp is NaN"),
        ("user_id,item_id,timestamp\n1,2,3\n1,,4\n", r"line 3: item_id is empty, null or NaN"),
        ("user_id,item_id,timestamp\n1,2,3\n1,4,-5\n", r"line 3: negative timestamp -5"),
        ("user_id,item_id,time\n1,2,3\n", r"missing columns \['timestamp'\]"),
        ("user_id,item_id,timestamp\n1,2,3\n1,2\n", r"line 3: expected 3 fields, got 2: '1,2'"),
        ("user_id,item_id,timestamp\n1,2,3\n1,4,NA\n", r"line 3: timestamp 'NA' is not a number"),
        ("user_id,item_id,timestamp\n1,2,3\n1,4,1.5e3\n1,4,x\n", r"line 4: timestamp 'x' is not a number"),
        ("user_id,item_id\n1,2\n", r"missing columns \['timestamp'\]"),
        ("user_id,item_id,timestamp\n", r"no interactions"),
        ("", r"empty file"),
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
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
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


def _user_items(out: Path, user_col: str = "user_id", item_col: str = "item_id") -> dict:
    """``{raw user: [(raw item, time), ...]}`` of a converted file, through its mappings."""
    seqs, _ = read_sequences(out)
    users = pq.read_table(str(mapping_path(out, user_col))).column("raw").to_pylist()
    items = pq.read_table(str(mapping_path(out, item_col))).column("raw").to_pylist()
    return {
        users[int(u) - 1]: [(items[int(i) - 1], int(t)) for i, t in zip(user.item_ids, user.timestamps)]
        for u, user in ((seqs.user_ids[r], seqs.rows(r, r + 1)) for r in range(seqs.num_users))
    }


def test_ids_distinct_as_text_stay_distinct(tmp_path: Path) -> None:
    huge = "123456789012345678901234567890"
    src = tmp_path / "ids.csv"
    src.write_text(
        "user_id,item_id,timestamp\n"
        f"007,1e3,10\n7,1000,11\n{huge},{huge}1,12\n{huge}1,{huge},13\nNA,null,14\n7,1e3,15\n"
    )
    out = tmp_path / "ids.parquet"
    info = main(["--format", "interactions", str(src), str(out)])
    assert (info.num_users, info.num_items, info.num_events) == (5, 5, 6)
    assert _user_items(out) == {
        "007": [("1e3", 10)],
        "7": [("1000", 11), ("1e3", 15)],
        huge: [(f"{huge}1", 12)],
        f"{huge}1": [(huge, 13)],
        "NA": [("null", 14)],
    }
    # Not all integers: text order. Integers: numeric order, "07" after "7" at the same value.
    assert pq.read_table(str(mapping_path(out, "user_id"))).column("raw").to_pylist() == [
        "007",
        huge,
        f"{huge}1",
        "7",
        "NA",
    ]
    src.write_text("user_id,item_id,timestamp\n10,1,1\n9,1,2\n07,1,3\n7,1,4\n")
    main(["--format", "interactions", str(src), str(out)])
    raw = pq.read_table(str(mapping_path(out, "user_id"))).column("raw").to_pylist()
    assert raw == ["07", "7", "9", "10"]


@pytest.mark.parametrize("scale, unit", [(1, "s"), (1_000, "ms"), (1_000_000, "us"), (1_000_000_000, "ns")])
def test_time_unit_is_detected_from_the_magnitude_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, scale: int, unit: str
) -> None:
    src = tmp_path / "t.csv"
    # A fraction of a second in the unit, floored away.
    top = 1_700_000_100 * scale + scale // 2
    src.write_text(f"user_id,item_id,timestamp\n1,2,{1_700_000_000 * scale}\n1,3,{top}\n")
    with caplog.at_level(logging.WARNING):
        main(["--format", "interactions", str(src), str(tmp_path / "t.parquet")])
    assert f"the largest value {top} is read as {unit} (2023-11-14 UTC)" in caplog.text
    seqs, _ = read_sequences(tmp_path / "t.parquet")
    assert seqs.timestamps.tolist() == [1_700_000_000, 1_700_000_100]


def test_an_explicit_unit_that_makes_no_date_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "t.csv"
    src.write_text("user_id,item_id,timestamp\n1,2,1700000000000\n\n1,3,1700000100000\n")
    with pytest.raises(
        DataValidationError,
        match=r"t.csv: line 4: timestamp 1700000100000 read as s is after the year 5000; "
        r"did you mean --time-unit ms",
    ):
        main(["--format", "interactions", str(src), str(tmp_path / "t.parquet"), "--time-unit", "s"])
    main(["--format", "interactions", str(src), str(tmp_path / "t.parquet"), "--time-unit", "ms"])
    assert read_sequences(tmp_path / "t.parquet")[0].timestamps.tolist() == [1_700_000_000, 1_700_000_100]


def test_errors_name_the_physical_line_after_blank_lines_and_quoted_newlines(tmp_path: Path) -> None:
    src = tmp_path / "q.csv"
    src.write_text('user_id,item_id,timestamp\n\n"a\nb",x,1\n\n\n"c",",\n\n",2\nd,,3\n')
    with pytest.raises(DataValidationError, match=r"q.csv: line 10: item_id is empty"):
        main(["--format", "interactions", str(src), str(tmp_path / "q.parquet")])
    src.write_text('user_id,item_id,timestamp\n\n"a\nb",x,1\n\n"c",",\n",2\nd,y,-3\n')
    with pytest.raises(DataValidationError, match=r"q.csv: line 8: negative timestamp -3"):
        main(["--format", "interactions", str(src), str(tmp_path / "q.parquet")])
    # Values holding the separator or a newline are ids like any other.
    src.write_text('user_id,item_id,timestamp\n\n"a\nb",x,1\n\n"c",",\n",2\n')
    main(["--format", "interactions", str(src), str(tmp_path / "q.parquet")])
    assert _user_items(tmp_path / "q.parquet") == {"a\nb": [("x", 1)], "c": [(",\n", 2)]}


def test_non_utf8_input_names_the_file_and_line(tmp_path: Path) -> None:
    src = tmp_path / "latin1.csv"
    src.write_bytes(b"user_id,item_id,timestamp,title\n1,a,1,ok\n\n1,caf\xe9,2,ok\n")
    with pytest.raises(DataValidationError, match=r"latin1.csv: line 4: item_id 'caf.*' is not valid UTF-8"):
        main(["--format", "interactions", str(src), str(tmp_path / "o.parquet")])
    # Columns that are not converted are not decoded either.
    src.write_bytes(b"user_id,item_id,timestamp,title\n1,a,1,caf\xe9\n")
    assert main(["--format", "interactions", str(src), str(tmp_path / "o.parquet")]).num_events == 1
    gaps = tmp_path / "gaps.txt"
    gaps.write_bytes(b"1 5 6\t0 10\n\n2 5\xff\t0\n")
    with pytest.raises(DataValidationError, match=r"gaps.txt: line 3: not valid UTF-8 \(byte 0xff at col"):
        main(["--format", "s3rec", str(gaps), str(tmp_path / "o.parquet")])


@pytest.mark.parametrize(
    "body, message",
    [
        ("1 5 6\t0 10\n2 5\t0\n1 7\t3\n", r"line 3: user 1 is already on line 1 \(one line per user\)"),
        ("1 5 007\t0 10\n", r"line 1 \(user 1\): item id '007' is not an integer"),
        ("+1 5\t0\n", r"line 1: user id '\+1' is not an integer"),
        ("1 5 0\t0 10\n", r"line 1 \(user 1\): item id 0 is not >= 1 \(0 is padding\)"),
        ("1 5 99999999999999999999\t0 10\n", r"line 1 \(user 1\): item id '9{20}' is not an integer"),
        ("1 5 6\t0 100000000000\n", r"line 1 \(user 1\): gap 100000000000 s is more than 3000 years"),
    ],
)
def test_s3rec_identity_errors(tmp_path: Path, body: str, message: str) -> None:
    src = tmp_path / "gaps.txt"
    src.write_text(body)
    with pytest.raises(DataValidationError, match=f"gaps.txt: {message}"):
        main(["--format", "s3rec", str(src), str(tmp_path / "out.parquet")])


def test_s3rec_sparse_ids_are_remapped_densely(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    src = tmp_path / "sparse.txt"
    # Item 10^15 would make a catalogue of 10^15 rows (petabytes of embeddings).
    src.write_text("1 5 1000000000000000\t0 10\n\n2 5 9\t0 3\n")
    out = tmp_path / "sparse.parquet"
    with caplog.at_level(logging.WARNING):
        info = main(["--format", "s3rec", str(src), str(out)])
    assert (info.num_users, info.num_items, info.num_events) == (2, 3, 4)
    assert "item ids are not exactly 1..n (3 distinct, largest 1000000000000000)" in caplog.text
    seqs, _ = read_sequences(out)
    assert seqs.item_ids.tolist() == [1, 3, 1, 2]
    assert pq.read_table(str(mapping_path(out, "item_id"))).to_pydict() == {
        "id": [1, 2, 3],
        "raw": ["5", "9", "1000000000000000"],
    }
    # Dense ids are kept, with no mapping.
    src.write_text("1 2 1\t0 10\n2 3\t0\n")
    dense = tmp_path / "dense.parquet"
    main(["--format", "s3rec", str(src), str(dense)])
    assert read_sequences(dense)[0].item_ids.tolist() == [2, 1, 3]
    assert not mapping_path(dense, "item_id").exists()


def _limit_file_size() -> None:
    # The size limit is set from outside the converter, before it starts: a write past it fails
    # with EFBIG (SIGXFSZ ignored) exactly as a full disk fails with ENOSPC.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))


def _big_log(path: Path) -> None:
    rng = np.random.default_rng(0)
    rows = [f"u{u},i{i},{1_700_000_000 + t}" for u, i, t in rng.integers(0, 50_000, (20_000, 3))]
    path.write_text("user_id,item_id,timestamp\n" + "\n".join(rows) + "\n")


def test_a_failed_write_names_the_output_and_leaves_nothing(tmp_path: Path) -> None:
    src, out = tmp_path / "big.csv", tmp_path / "out" / "big.parquet"
    _big_log(src)
    out.parent.mkdir()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torchrec_hytrec.data.convert",
            "--format",
            "interactions",
            str(src),
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=_limit_file_size,
    )
    assert proc.returncode == 1
    assert f"error: cannot write {out.parent}" in proc.stderr and "File too large" in proc.stderr
    assert list(out.parent.iterdir()) == []


def test_a_full_disk_names_the_output_and_keeps_the_previous_one(tmp_path: Path) -> None:
    src, disk = tmp_path / "big.csv", tmp_path / "disk"
    _big_log(src)
    disk.mkdir()
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True
    )
    if mount.returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        out = disk / "big.parquet"
        out.write_bytes(b"previous")
        # The mappings are written first: whichever file fills the disk is named.
        message = rf"cannot write {disk}/big\.\S*parquet: .*No space left on device"
        with pytest.raises(DataWriteError, match=message):
            main(["--format", "interactions", str(src), str(out)])
        assert [p.name for p in disk.iterdir()] == ["big.parquet"] and out.read_bytes() == b"previous"
    finally:
        subprocess.run(["umount", str(disk)], check=True)
