"""Property tests (issue #15): over generated inputs, the converters and the Parquet reader either
give back exactly the data (same users, items and events: nothing merged, nothing lost) or raise
a named error (``DataValidationError`` naming the file, and the line / row of the damage).

Inputs: ids as text, numbers, huge, zero-padded, with separators, quotes and newlines inside;
times in seconds or milliseconds; and one damage per example (a missing value, a bad type, a
negative time, bytes that are not UTF-8, an extra field, a truncated file, a duplicate user, a
flipped bit, a column of the wrong type, decreasing times). An oracle (Python's :mod:`csv` on
the same bytes) says what the file holds.
"""

import csv
import dataclasses
import io
import re
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from torchrec_hytrec.data.convert import main, mapping_path
from torchrec_hytrec.data.parquet import read_sequences, write_sequences
from torchrec_hytrec.data.reader import ReaderConfig, SequenceReader
from torchrec_hytrec.data.schema import METADATA_KEY, DataValidationError, SequenceDatasetInfo, Sequences

# The whole property suite belongs to the full tier (`make test`), not the unit tier.
pytestmark = pytest.mark.slow
# Fast enough for < 60 s on 2 shared cores; deadline off (a first example pays imports).
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ID_TEXT = st.one_of(
    st.integers(0, 10**6).map(str),
    st.integers(0, 999).map(lambda n: f"{n:04d}"),
    st.integers(10**19, 10**30).map(str),
    st.sampled_from(["1e3", "1000", "7", "007", "7.0", "NA", "null", "nan", "-1", "+1", " 7", "inf"]),
    st.text(
        st.characters(codec="utf-8", exclude_categories=("Cs", "Cc"))
        | st.sampled_from([",", '"', "\n", "\r"]),
        min_size=1,
        max_size=6,
    ),
)
UNITS = {"s": 1, "ms": 1_000}


def expected_events(events: List[Tuple[str, str, int]], scale: int) -> Dict[str, List[Tuple[str, int]]]:
    """Per user, its (item, seconds) by time, ties in input order: what a conversion must give."""
    out: Dict[str, List[Tuple[int, int, str]]] = {}
    for k, (user, item, time) in enumerate(events):
        out.setdefault(user, []).append((time, k, item))
    # The converter sorts by the floored seconds, ties in input order.
    return {
        u: [(item, s) for s, _, item in sorted((t // scale, k, i) for t, k, i in evs)]
        for u, evs in out.items()
    }


def converted_events(out: Path, user_col: str = "user_id", item_col: str = "item_id") -> Dict:
    """The same view of a converted file, through its mappings (identity when none)."""
    seqs, info = read_sequences(out)
    assert (info.num_users, info.num_events) == (seqs.num_users, seqs.num_events)

    def names(column: str):
        path = mapping_path(out, column)
        return pq.read_table(str(path)).column("raw").to_pylist() if path.exists() else None

    users, items = names(user_col), names(item_col)
    result = {}
    for r in range(seqs.num_users):
        user = seqs.rows(r, r + 1)
        key = users[int(user.user_ids[0]) - 1] if users else int(user.user_ids[0])
        result[key] = [
            (items[int(i) - 1] if items else int(i), int(t)) for i, t in zip(user.item_ids, user.timestamps)
        ]
    # Dense catalogue: every item id in 1..num_items is used.
    assert info.num_items == np.unique(seqs.item_ids).size == seqs.item_ids.max()
    return result


def csv_oracle(data: bytes, scale: int) -> Optional[Dict[str, List[Tuple[str, int]]]]:
    """What a CSV file holds, read by Python's csv module; ``None`` when it is not a valid log."""
    try:
        text = data.decode("utf-8")
        rows = [r for r in csv.reader(io.StringIO(text, newline=""), strict=True) if r]
    except (UnicodeDecodeError, csv.Error):
        return None
    if not rows or rows[0] != ["user_id", "item_id", "timestamp"] or len(rows) < 2:
        return None
    events = []
    for r in rows[1:]:
        if len(r) != 3 or not r[0] or not r[1] or not re.fullmatch(r"[0-9]+", r[2]):
            return None
        events.append((r[0], r[1], int(r[2])))
    return expected_events(events, scale)


@st.composite
def interaction_logs(draw):
    users = draw(st.lists(ID_TEXT, min_size=1, max_size=6, unique=True))
    items = draw(st.lists(ID_TEXT, min_size=1, max_size=8, unique=True))
    unit = draw(st.sampled_from(sorted(UNITS)))
    n = draw(st.integers(1, 25))
    events = [
        (
            draw(st.sampled_from(users)),
            draw(st.sampled_from(items)),
            draw(st.integers(0, 10**10 * UNITS[unit] - 1)),
        )
        for _ in range(n)
    ]
    blanks = draw(st.lists(st.integers(0, n), max_size=3))
    damage = draw(st.sampled_from(["none", "missing", "badtime", "negative", "latin1", "extra", "truncate"]))
    return (
        events,
        unit,
        blanks,
        damage,
        draw(st.integers(0, n - 1)),
        draw(st.integers(0, 2)),
        draw(st.floats(0, 1)),
    )


def render_record(fields: List[str]) -> str:
    """One CSV record, CRLF-terminated: the writer quotes a field only for characters of its line
    terminator, so a lone ``\r`` inside a value is quoted only with this one."""
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\r\n").writerow(fields)
    return buf.getvalue()


@SETTINGS
@given(interaction_logs())
def test_interactions_round_trip_or_named_error(case) -> None:
    events, unit, blanks, damage, k, column, cut = case
    records = [render_record(["user_id", "item_id", "timestamp"])]
    starts = []  # physical line of each event's record
    line = 2
    for i, (user, item, time) in enumerate(events):
        if i in blanks:
            records.append("\n")
            line += 1
        fields = [user, item, str(time)]
        if i == k and damage == "missing":
            fields[column] = ""
        elif i == k and damage == "badtime":
            fields[2] = "12:30"
        elif i == k and damage == "negative":
            fields[2] = str(-time - 1)
        elif i == k and damage == "extra":
            fields.append("x")
        text = render_record(fields)
        if i == k and damage == "latin1":
            text = text.replace(fields[min(column, 1)], fields[min(column, 1)] + "\udce9", 1)
        records.append(text)
        starts.append(line)
        line += text.count("\n")
    data = "".join(records).encode("utf-8", "surrogateescape")
    if damage == "truncate":
        data = data[: int(len(data) * cut)]
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "log.csv", Path(tmp) / "log.parquet"
        src.write_bytes(data)
        expected = csv_oracle(data, UNITS[unit])
        try:
            main(["--format", "interactions", str(src), str(out), "--time-unit", unit])
        except DataValidationError as e:
            event(f"{damage}: named error")
            assert expected is None, f"valid input refused: {e}"
            assert str(e).startswith(f"{src}: "), e
            if damage not in ("none", "truncate"):
                assert f"line {starts[k]}:" in str(e), (damage, starts[k], str(e))
            return
        event(f"{damage}: round trip")
        assert expected is not None, f"{damage} accepted"
        assert converted_events(out) == expected


@st.composite
def s3rec_logs(draw):
    n = draw(st.integers(1, 8))
    users = draw(st.lists(st.integers(0, 10**12), min_size=n, max_size=n, unique=True))
    sparse = draw(st.booleans())
    items_pool = st.integers(1, 10**15) if sparse else st.integers(1, 6)
    rows = [(u, draw(st.lists(items_pool, min_size=1, max_size=10))) for u in users]
    rows = [
        (u, its, draw(st.lists(st.integers(0, 10**6), min_size=len(its), max_size=len(its))))
        for u, its in rows
    ]
    damage = draw(
        st.sampled_from(
            ["none", "dupuser", "padded", "zero", "neggap", "latin1", "gapcount", "truncate", "blank"]
        )
    )
    return rows, damage, draw(st.integers(0, n - 1)), draw(st.floats(0, 1))


@SETTINGS
@given(s3rec_logs())
def test_s3rec_round_trip_or_named_error(case) -> None:
    rows, damage, k, cut = case
    lines = []
    for i, (user, items, gaps) in enumerate(rows):
        uid, its, gs = str(user), [str(x) for x in items], [str(g) for g in gaps]
        if i == k and damage == "padded":
            its[0] = "0" + its[0]
        elif i == k and damage == "zero":
            its[-1] = "0"
        elif i == k and damage == "neggap":
            gs[-1] = "-" + str(gaps[-1] + 1)
        elif i == k and damage == "gapcount":
            gs.append("1")
        elif i == k and damage == "latin1":
            uid += "\udcff"
        lines.append(f"{uid} {' '.join(its)}\t{' '.join(gs)}\n")
        if i == k and damage == "blank":
            lines.append("\n")
    bad_line = k + 1
    if damage == "dupuser":
        lines.append(lines[k])
        bad_line = len(lines)
    data = "".join(lines).encode("utf-8", "surrogateescape")
    if damage == "truncate":
        data = data[: int(len(data) * cut)]
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "gaps.txt", Path(tmp) / "gaps.parquet"
        src.write_bytes(data)
        try:
            main(["--format", "s3rec", str(src), str(out)])
        except DataValidationError as e:
            event(f"{damage}: named error")
            assert damage not in ("none", "blank"), f"valid input refused: {e}"
            assert str(e).startswith(f"{src}: "), e
            if damage != "truncate":
                assert f"line {bad_line}" in str(e), (damage, bad_line, str(e))
            return
        event(f"{damage}: round trip")
        assert damage in ("none", "blank", "truncate"), f"{damage} accepted"
        got = {u: [(int(i), t) for i, t in events] for u, events in converted_events(out).items()}
        if damage == "truncate":
            # Whatever the cut left must be exactly what the remaining complete lines say.
            kept = data.decode("utf-8").splitlines()
            assert len(got) == len([x for x in kept if x.strip()])
            return
        assert got == {
            u: [(int(i), int(t)) for i, t in zip(items, np.cumsum(gaps))] for u, items, gaps in rows
        }


@st.composite
def sequence_files(draw):
    n = draw(st.integers(1, 12))
    users = draw(st.lists(st.integers(0, 10**15), min_size=n, max_size=n, unique=True))
    lengths = draw(st.lists(st.integers(1, 12), min_size=n, max_size=n))
    num_items = draw(st.integers(1, 50))
    total = sum(lengths)
    items = draw(st.lists(st.integers(1, num_items), min_size=total, max_size=total))
    steps = draw(st.lists(st.integers(0, 10**9), min_size=total, max_size=total))
    damage = draw(st.sampled_from(["none", "truncate", "flip", "retype", "decreasing", "counts"]))
    return (
        users,
        lengths,
        num_items,
        items,
        steps,
        draw(st.integers(1, 5)),
        damage,
        draw(st.floats(0, 1)),
        draw(st.integers(0, 7)),
    )


def _test_split(seqs: Sequences) -> Dict[int, Tuple[List[int], int]]:
    """Per user with >= 3 events: the test split's history and target (leave-one-out)."""
    out = {}
    for r in range(seqs.num_users):
        user = seqs.rows(r, r + 1)
        if user.num_events >= 3:
            out[int(user.user_ids[0])] = (user.item_ids[:-1].tolist(), int(user.item_ids[-1]))
    return out


@SETTINGS
@given(sequence_files())
def test_parquet_reader_round_trip_or_named_error(case) -> None:
    users, lengths, num_items, items, steps, row_group_size, damage, where, bit = case
    offsets = np.r_[0, np.cumsum(lengths)]
    # Times non-decreasing within each user: per-user cumulative sums of the steps.
    times = np.concatenate([np.cumsum(steps[a:b]) for a, b in zip(offsets[:-1], offsets[1:])])
    seqs = Sequences(np.array(users, np.int64), offsets, np.array(items, np.int64), times, {})
    info = SequenceDatasetInfo(num_items=num_items)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "seq.parquet"
        written = write_sequences(path, seqs, info, row_group_size=row_group_size)
        bad_row = None
        if damage in ("truncate", "flip"):
            data = bytearray(path.read_bytes())
            at = min(int(len(data) * where), len(data) - 1)
            if damage == "truncate":
                data = data[:at]
            else:
                data[at] ^= 1 << bit
            path.write_bytes(bytes(data))
        elif damage == "retype":
            table = pq.read_table(str(path))
            kind = [pa.list_(pa.float64()), pa.list_(pa.int32()), pa.string()][bit % 3]
            name = "user_id" if kind == pa.string() else ["item_ids", "timestamps"][bit % 2]
            column = table.column(name).cast(kind, safe=False)
            table = table.set_column(table.schema.get_field_index(name), name, column)
            pq.write_table(table.replace_schema_metadata({METADATA_KEY: written.to_json()}), str(path))
        elif damage == "decreasing":
            longer = [r for r, n in enumerate(lengths) if n >= 2]
            if not longer:
                return
            bad_row = longer[bit % len(longer)]
            t = times.copy()
            t[offsets[bad_row]] = t[offsets[bad_row] + 1] + 1
            table = pq.read_table(str(path))
            column = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(t))
            table = table.set_column(table.schema.get_field_index("timestamps"), "timestamps", column)
            pq.write_table(
                table.replace_schema_metadata({METADATA_KEY: written.to_json()}),
                str(path),
                row_group_size=row_group_size,
            )
        elif damage == "counts":
            wrong = dataclasses.replace(written, num_events=written.num_events + 1 + bit)
            table = pq.read_table(str(path)).replace_schema_metadata({METADATA_KEY: wrong.to_json()})
            pq.write_table(table, str(path))
        try:
            got, got_info = read_sequences(path)
            reader = SequenceReader([path], ReaderConfig(max_tokens=64, max_seq_len=64), split="test")
            batches = list(reader)
        except DataValidationError as e:
            event(f"{damage}: named error")
            assert damage != "none", f"valid file refused: {e}"
            assert str(path) in str(e), e
            if bad_row is not None:
                assert f"row {bad_row} " in str(e), (bad_row, str(e))
            return
        event(f"{damage}: round trip")
        assert damage in ("none", "truncate", "flip"), f"{damage} accepted"
        # Accepted: exactly the data written, whatever bytes were hit.
        for name in ("user_ids", "offsets", "item_ids", "timestamps"):
            assert np.array_equal(getattr(got, name), getattr(seqs, name)), name
        assert dataclasses.replace(got_info, source="") == dataclasses.replace(written, source="")
        read = {}
        for b in batches:
            histories = b.features["item_id"].values().split(b.features["item_id"].lengths().tolist())
            for u, h, t, w in zip(b.user_ids.tolist(), histories, b.targets.tolist(), b.weights.tolist()):
                if w:
                    read[u] = (h.tolist(), t)
        assert read == _test_split(seqs)
