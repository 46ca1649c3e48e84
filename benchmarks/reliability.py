"""Reliability under bad input and faults (issue #15): tries generated bad inputs of every class and
workers killed from outside, counts the outcomes, and writes ``docs/RELIABILITY.md``.

    python benchmarks/reliability.py [--seed 0] [--scale 1] [--fault-runs 20] [--out docs/RELIABILITY.md]

Every input ends in one of:

* named error: refused with an error naming what is wrong and where (file and line / row /
  user, the checkpoint and file, the argument);
* correct handling: accepted, and what comes out is exactly right (checked against an oracle);
* wrongly refused: a valid input refused;
* misnamed error: refused, but the error names the wrong place (or none);
* silent acceptance: a bad input accepted as if it were fine;
* corruption: accepted, and what comes out is wrong (merged ids, lost events, other weights).

The last four are failures: the script exits 1 if any occurs. Inputs are drawn from a seeded
generator, so a run is reproducible; ``--scale`` multiplies the inputs per class. Fault runs
launch the tiny 2-process training job of ``tests/test_fault_tolerance.py`` under torchrun and
SIGKILL one worker from this process, mid-epoch or mid-save, then compare the final metrics
with an uninterrupted run's (about 15 s each on 2 cores).
"""

import argparse
import contextlib
import dataclasses
import io
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_reliability_faults import finish, kill_worker, launch, rows, wait_for  # noqa: E402
from test_reliability_properties import converted_events, csv_oracle, render_record  # noqa: E402
from torchx.specs.builders import materialize_appdef  # noqa: E402

from torchrec_hytrec.data.convert import main as convert  # noqa: E402
from torchrec_hytrec.data.convert import mapping_path  # noqa: E402
from torchrec_hytrec.data.parquet import read_sequences, write_sequences  # noqa: E402
from torchrec_hytrec.data.reader import ReaderConfig, SequenceReader  # noqa: E402
from torchrec_hytrec.data.schema import METADATA_KEY, SequenceDatasetInfo, Sequences  # noqa: E402
from torchrec_hytrec.training.checkpoint import COMPLETE_MARKER, CheckpointManager  # noqa: E402

OUTCOMES = [
    "named error",
    "correct handling",
    "wrongly refused",
    "misnamed error",
    "silent acceptance",
    "corruption",
]
FAILURES = OUTCOMES[2:]


@dataclasses.dataclass
class Tally:
    """Outcomes of one class of inputs, with one example message per outcome."""

    name: str
    tried: str
    counts: Counter = dataclasses.field(default_factory=Counter)
    examples: Dict[str, str] = dataclasses.field(default_factory=dict)
    notes: List[str] = dataclasses.field(default_factory=list)

    def add(self, outcome: str, detail: str = "") -> None:
        assert outcome in OUTCOMES, outcome
        self.counts[outcome] += 1
        self.examples.setdefault(outcome, detail.splitlines()[0][:200] if detail else "")


def _quiet(fn: Callable, *args):
    """Runs ``fn`` with its stderr (the converter's summary and notices) swallowed."""
    with contextlib.redirect_stderr(io.StringIO()):
        return fn(*args)


def _convert(args: List[str]) -> Optional[Exception]:
    try:
        _quiet(convert, args)
    except ValueError as e:
        return e
    return None


def _refused(tally: Tally, error: Exception, must_name: Sequence[str]) -> None:
    """A refusal of a bad input: named when its message holds every expected part."""
    message = str(error)
    named = all(part in message for part in must_name)
    tally.add("named error" if named else "misnamed error", message)


def _log_file(tmp: Path, records: List[List[str]], blanks: Sequence[int] = ()) -> Tuple[Path, List[int]]:
    """Writes a CSV log (header first); returns it and the physical line of each record."""
    text, starts, line = [render_record(["user_id", "item_id", "timestamp"])], [], 2
    for i, fields in enumerate(records):
        if i in blanks:
            text.append("\n")
            line += 1
        rendered = render_record(fields)
        text.append(rendered)
        starts.append(line)
        line += rendered.count("\n")
    path = tmp / "log.csv"
    path.write_text("".join(text))
    return path, starts


# Pairs that type inference would merge: equal as numbers, different as text.
COLLIDING = [
    ("007", "7"),
    ("1e3", "1000"),
    (str(2**63), str(2**63 + 1)),
    ("123456789012345678901", "123456789012345678902"),
    ("9007199254740993", "9007199254740992"),
    ("7.0", "7"),
    (" 7", "7"),
    ("+5", "5"),
    ("0x10", "16"),
    ("NA", "null"),
]


def converter_ids(rng: np.random.Generator, n: int, tmp: Path) -> Tally:
    tally = Tally(
        "converter: ids", "ids equal as numbers but distinct as text (007/7, 1e3/1000, > 2^63, 2^53 + 1)"
    )
    for _ in range(n):
        pairs = [COLLIDING[i] for i in rng.choice(len(COLLIDING), size=3, replace=False)]
        tokens = [t for pair in pairs for t in pair]
        events = [
            [
                tokens[rng.integers(len(tokens))],
                tokens[rng.integers(len(tokens))],
                str(rng.integers(1e9, 2e9)),
            ]
            for _ in range(rng.integers(4, 30))
        ]
        src, _ = _log_file(tmp, events)
        out = tmp / "ids.parquet"
        error = _convert(["--format", "interactions", str(src), str(out), "--time-unit", "s"])
        if error is not None:
            tally.add("wrongly refused", str(error))
            continue
        expected = csv_oracle(src.read_bytes(), 1)
        tally.add("correct handling" if converted_events(out) == expected else "corruption")
    return tally


def converter_time_units(rng: np.random.Generator, n: int, tmp: Path) -> Tally:
    tally = Tally(
        "converter: time units",
        "current dates in s / ms / us / ns without --time-unit; ms or finer given as --time-unit s",
    )
    units = {"s": 1, "ms": 10**3, "us": 10**6, "ns": 10**9}
    for k in range(n):
        unit = list(units)[k % 4]
        seconds = rng.integers(946_684_800, 1_893_456_000, size=rng.integers(3, 20))
        raw = seconds * units[unit] + rng.integers(0, units[unit], size=seconds.size)
        events = [["u", f"i{j}", str(t)] for j, t in enumerate(raw)]
        src, starts = _log_file(tmp, events)
        out = tmp / "t.parquet"
        explicit = unit != "s" and k % 8 >= 4
        error = _convert(
            ["--format", "interactions", str(src), str(out)] + (["--time-unit", "s"] if explicit else [])
        )
        if explicit:
            if error is None:
                tally.add("silent acceptance", f"{unit} values read as seconds")
            else:
                top = int(np.argmax(raw))
                _refused(tally, error, [str(src), f"line {starts[top]}", "--time-unit"])
        elif error is not None:
            tally.add("wrongly refused", str(error))
        else:
            got = sorted(t for evs in converted_events(out).values() for _, t in evs)
            tally.add("correct handling" if got == sorted(seconds.tolist()) else "corruption", unit)
    return tally


def converter_duplicate_users(rng: np.random.Generator, n: int, tmp: Path) -> Tally:
    tally = Tally(
        "converter: duplicate users",
        "a user's events spread over the log (one row expected); an S3Rec user on two lines (refused)",
    )
    for k in range(n):
        if k % 2 == 0:
            events = [
                [f"u{rng.integers(5)}", f"i{rng.integers(9)}", str(rng.integers(1e9, 2e9))]
                for _ in range(rng.integers(5, 40))
            ]
            src, _ = _log_file(tmp, events)
            out = tmp / "dup.parquet"
            error = _convert(["--format", "interactions", str(src), str(out)])
            if error is not None:
                tally.add("wrongly refused", str(error))
                continue
            seqs, _ = read_sequences(out)
            ok = seqs.num_users == len({e[0] for e in events}) and converted_events(out) == csv_oracle(
                src.read_bytes(), 1
            )
            tally.add("correct handling" if ok else "corruption")
        else:
            lines = [f"{u} {u + 1} {u + 2}\t0 {u}\n" for u in range(1, rng.integers(3, 9))]
            first = int(rng.integers(len(lines)))
            lines.insert(int(rng.integers(first + 1, len(lines) + 1)), lines[first])
            src = tmp / "dup.txt"
            src.write_text("".join(lines))
            error = _convert(["--format", "s3rec", str(src), str(tmp / "dup.parquet")])
            if error is None:
                tally.add("silent acceptance", "a user on two lines written twice")
            else:
                second = [i for i, line in enumerate(lines) if line == lines[first]][1]
                _refused(tally, error, [str(src), f"line {second + 1}", f"already on line {first + 1}"])
    return tally


def converter_sparse_ids(rng: np.random.Generator, n: int, tmp: Path) -> Tally:
    tally = Tally(
        "converter: sparse ids",
        "S3Rec / MovieLens / RecBole item ids up to 10^15 (the catalogue must stay dense)",
    )
    for k in range(n):
        fmt = ["s3rec", "movielens", "recbole"][k % 3]
        items = rng.integers(1, 10**15, size=rng.integers(2, 12))
        src = tmp / f"sparse.{fmt}"
        if fmt == "s3rec":
            src.write_text(" ".join(["1", *map(str, items)]) + "\t" + " ".join(["0"] * items.size) + "\n")
        elif fmt == "movielens":
            src.write_text("".join(f"1::{i}::5::{1_600_000_000 + j}\n" for j, i in enumerate(items)))
        else:
            src.write_text(
                "user_id:token\titem_id:token\ttimestamp:float\n"
                + "".join(f"1\t{i}\t{1_600_000_000 + j}\n" for j, i in enumerate(items))
            )
        out = tmp / "sparse.parquet"
        error = _convert(["--format", fmt, str(src), str(out)])
        if error is not None:
            tally.add("wrongly refused", str(error))
            continue
        seqs, info = read_sequences(out)
        column = {"s3rec": "item_id", "movielens": "item", "recbole": "item_id"}[fmt]
        raw = pq.read_table(str(mapping_path(out, column))).column("raw").to_pylist()
        got = [int(raw[i - 1]) for i in seqs.item_ids]
        dense = info.num_items == np.unique(items).size
        tally.add("correct handling" if dense and got == items.tolist() else "corruption", fmt)
    return tally


def converter_line_numbers(rng: np.random.Generator, n: int, tmp: Path) -> Tally:
    tally = Tally(
        "converter: line numbers",
        "blank lines and quoted newlines before one bad record (empty id, negative or non-numeric "
        "time, extra field): the error must name its physical line",
    )
    for k in range(n):
        records = [
            [
                f"u{rng.integers(4)}" + ("\nx" if rng.random() < 0.3 else ""),
                f'i"{rng.integers(9)}',
                str(j + 1),
            ]
            for j in range(rng.integers(3, 25))
        ]
        bad = int(rng.integers(len(records)))
        kind = ["empty", "negative", "text", "extra"][k % 4]
        if kind == "empty":
            records[bad][int(rng.integers(2))] = ""
        elif kind == "negative":
            records[bad][2] = "-5"
        elif kind == "text":
            records[bad][2] = "soon"
        else:
            records[bad].append("?")
        blanks = rng.choice(len(records), size=min(3, len(records)), replace=False).tolist()
        src, starts = _log_file(tmp, records, blanks)
        error = _convert(["--format", "interactions", str(src), str(tmp / "l.parquet")])
        if error is None:
            tally.add("silent acceptance", kind)
        else:
            _refused(tally, error, [str(src), f"line {starts[bad]}:"])
    return tally


def converter_non_utf8(rng: np.random.Generator, n: int, tmp: Path) -> Tally:
    tally = Tally("converter: non-UTF-8", "one Latin-1 byte in an id of one record, in every format")
    for k in range(n):
        fmt = ["interactions", "recbole", "movielens", "s3rec"][k % 4]
        count = int(rng.integers(2, 15))
        bad = int(rng.integers(count))
        if fmt == "s3rec":
            lines = [f"{u} {u} {u + 1}\t0 5\n".encode() for u in range(1, count + 1)]
            lines[bad] = lines[bad].replace(b" ", b"\xe9 ", 1)
            header = b""
        else:
            sep = {"interactions": ",", "recbole": "\t", "movielens": "::"}[fmt]
            rating = ["5"] if fmt == "movielens" else []
            lines = [
                sep.join([f"u{j}", f"caf{j}", *rating, str(1_600_000_000 + j)]).encode() + b"\n"
                for j in range(count)
            ]
            lines[bad] = lines[bad].replace(b"caf", b"caf\xe9", 1)
            header = {
                "interactions": b"user_id,item_id,timestamp\n",
                "recbole": b"user_id:token\titem_id:token\ttimestamp:float\n",
                "movielens": b"",
            }[fmt]
        src = tmp / f"latin1.{fmt}"
        src.write_bytes(header + b"".join(lines))
        error = _convert(["--format", fmt, str(src), str(tmp / "u.parquet")])
        if error is None:
            tally.add("silent acceptance", fmt)
        else:
            _refused(tally, error, [str(src), f"line {bad + 1 + bool(header)}:", "UTF-8"])
    return tally


def converter_full_disk(rng: np.random.Generator, n: int, tmp: Path) -> Tally:
    tally = Tally(
        "converter: failed writes",
        "a file size limit set from outside the converter process (writes fail as on a full disk)",
    )
    src = tmp / "big.csv"
    lines = [f"u{u},i{i},{1_700_000_000 + t}" for u, i, t in rng.integers(0, 50_000, (20_000, 3))]
    src.write_text("user_id,item_id,timestamp\n" + "\n".join(lines) + "\n")
    for _ in range(n):
        limit = int(rng.integers(1_000, 400_000))
        out_dir = tmp / "disk"
        shutil.rmtree(out_dir, ignore_errors=True)
        out_dir.mkdir()

        def limit_size(limit: int = limit) -> None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "torchrec_hytrec.data.convert",
                "--format",
                "interactions",
                str(src),
                str(out_dir / "big.parquet"),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            preexec_fn=limit_size,
            cwd=ROOT,
        )
        left = sorted(p.name for p in out_dir.iterdir())
        if proc.returncode == 0:
            tally.add(
                "correct handling"
                if read_sequences(out_dir / "big.parquet")[0].num_events == 20_000
                else "corruption",
                f"limit {limit}",
            )
        elif left:
            tally.add("corruption", f"limit {limit}: left {left}")
        else:
            message = proc.stderr.strip().splitlines()[-1]
            named = message.startswith(f"error: cannot write {out_dir}/")
            tally.add("named error" if named else "misnamed error", message)
    return tally


def _sequences(rng: np.random.Generator, first_user: int = 0) -> Sequences:
    n = int(rng.integers(2, 12))
    lengths = rng.integers(1, 10, size=n)
    offsets = np.r_[0, np.cumsum(lengths)]
    times = np.concatenate([np.cumsum(rng.integers(0, 10**6, size=m)) for m in lengths])
    return Sequences(
        user_ids=np.arange(first_user, first_user + n, dtype=np.int64),
        offsets=offsets,
        item_ids=rng.integers(1, 20, size=offsets[-1]),
        timestamps=times,
        features={},
    )


def reader_damage(rng: np.random.Generator, n: int, tmp: Path) -> Tally:
    tally = Tally(
        "reader: damaged Parquet",
        "truncated files, flipped bits, columns of the wrong type, decreasing times, wrong metadata "
        "counts, a user in two files / row groups, a file given twice, a converter output directory",
    )
    info = SequenceDatasetInfo(num_items=20)
    kinds = [
        "truncate",
        "flip",
        "retype",
        "decreasing",
        "counts",
        "dup-files",
        "dup-groups",
        "twice",
        "converted",
    ]
    for k in range(n):
        kind = kinds[k % len(kinds)]
        case = tmp / f"reader{k}"
        case.mkdir()
        path = case / "a.parquet"
        seqs = _sequences(rng)
        written = write_sequences(path, seqs, info, row_group_size=int(rng.integers(1, 5)))
        paths: List[Path] = [path]
        valid = kind in ("converted",)
        if kind in ("truncate", "flip"):
            data = bytearray(path.read_bytes())
            at = int(rng.integers(len(data)))
            if kind == "truncate":
                data = data[:at]
            else:
                data[at] ^= 1 << int(rng.integers(8))
            path.write_bytes(bytes(data))
        elif kind == "retype":
            table = pq.read_table(str(path))
            name, typ = [
                ("item_ids", pa.list_(pa.float64())),
                ("timestamps", pa.list_(pa.int32())),
                ("user_id", pa.string()),
            ][k % 3]
            table = table.set_column(table.schema.get_field_index(name), name, table.column(name).cast(typ))
            pq.write_table(table.replace_schema_metadata({METADATA_KEY: written.to_json()}), str(path))
        elif kind == "decreasing":
            t = seqs.timestamps.copy()
            t[-1] = -1
            table = pq.read_table(str(path))
            column = pa.ListArray.from_arrays(pa.array(seqs.offsets.astype(np.int32)), pa.array(t))
            table = table.set_column(table.schema.get_field_index("timestamps"), "timestamps", column)
            pq.write_table(table.replace_schema_metadata({METADATA_KEY: written.to_json()}), str(path))
        elif kind == "counts":
            wrong = dataclasses.replace(written, num_users=written.num_users + int(rng.integers(1, 3)))
            table = pq.read_table(str(path)).replace_schema_metadata({METADATA_KEY: wrong.to_json()})
            pq.write_table(table, str(path))
        elif kind == "dup-files":
            other = _sequences(rng, first_user=int(rng.integers(seqs.num_users)))
            write_sequences(case / "b.parquet", other, info)
            paths = [path, case / "b.parquet"]
        elif kind == "dup-groups":
            table = pq.read_table(str(path))
            twice = pa.concat_tables([table, table.slice(int(rng.integers(table.num_rows)), 1)])
            meta = dataclasses.replace(
                written,
                num_users=twice.num_rows,
                num_events=int(
                    pa.compute.sum(pa.compute.list_value_length(twice.column("item_ids"))).as_py()
                ),
            )
            pq.write_table(
                twice.replace_schema_metadata({METADATA_KEY: meta.to_json()}),
                str(path),
                row_group_size=table.num_rows,
            )
        elif kind == "twice":
            paths = [path, case]
        else:
            log = case / "log.csv"
            log.write_text(
                "user_id,item_id,timestamp\n"
                + "".join(
                    f"u{u},i{rng.integers(6)},{1_600_000_000 + j}\n"
                    for j, u in enumerate(rng.integers(0, 4, 24))
                )
            )
            path.unlink()
            _quiet(convert, ["--format", "interactions", str(log), str(path)])
            log.unlink()
            seqs, written = read_sequences(path)
            paths = [case]
        try:
            got, got_info = read_sequences(path)
            reader = SequenceReader(paths, ReaderConfig(max_tokens=64, max_seq_len=64), split="test")
            list(reader)
        except ValueError as e:
            if valid:
                tally.add("wrongly refused", str(e))
            else:
                _refused(tally, e, [str(case)])
            continue
        same = all(
            np.array_equal(getattr(got, f), getattr(seqs, f))
            for f in ("user_ids", "offsets", "item_ids", "timestamps")
        )
        same = same and dataclasses.replace(got_info, source="") == dataclasses.replace(written, source="")
        if not same:
            tally.add("corruption", kind)
        elif valid or kind in ("truncate", "flip"):
            tally.add("correct handling", f"{kind}: the damage hit bytes that change nothing read")
        else:
            tally.add("silent acceptance", kind)
    return tally


def checkpoint_damage(rng: np.random.Generator, n: int, tmp: Path) -> Tally:
    tally = Tally(
        "checkpoint: damaged newest",
        "a flipped bit in any file (marker included), a truncated, grown, deleted or extra file, a "
        "missing marker: the newest must be refused and the previous one taken",
    )
    master = tmp / "ckpt"
    manager = CheckpointManager(master, keep_last=2)
    states = []
    for step in (1, 2):
        torch.manual_seed(step)
        states.append({"w": torch.randn(64, 16), "b": torch.randn(16), "progress": {"step": step}})
        _quiet(manager.save, step, states[-1])
    kinds = ["flip", "truncate", "grow", "delete", "extra", "marker-flip", "no-marker"]
    for k in range(n):
        kind = kinds[k % len(kinds)]
        root = tmp / f"ckpt{k}"
        shutil.copytree(master, root)
        newest = root / "step_000000002"
        files = sorted(p for p in newest.iterdir() if p.name != COMPLETE_MARKER)
        victim = files[int(rng.integers(len(files)))]
        if kind in ("flip", "marker-flip"):
            victim = newest / COMPLETE_MARKER if kind == "marker-flip" else victim
            data = bytearray(victim.read_bytes())
            data[int(rng.integers(len(data)))] ^= 1 << int(rng.integers(8))
            victim.write_bytes(bytes(data))
        elif kind == "truncate":
            victim.write_bytes(victim.read_bytes()[: int(rng.integers(victim.stat().st_size))])
        elif kind == "grow":
            victim.write_bytes(victim.read_bytes() + b"\0")
        elif kind == "delete":
            victim.unlink()
        elif kind == "extra":
            (newest / "__9_0.distcp").write_bytes(b"x")
        else:
            (newest / COMPLETE_MARKER).unlink()
        damaged = CheckpointManager(root, keep_last=2)
        reason = damaged.verify(newest)
        # latest_intact warns about the checkpoint it skips: expected here, once per input.
        logging.getLogger("torchrec_hytrec.training.checkpoint").setLevel(logging.ERROR)
        chosen = damaged.latest_intact()
        logging.getLogger("torchrec_hytrec.training.checkpoint").setLevel(logging.NOTSET)
        if reason is not None:
            named = chosen == root / "step_000000001"
            tally.add("named error" if named else "misnamed error", f"{newest.name}: {reason}")
            continue
        target = {"w": torch.zeros(64, 16), "b": torch.zeros(16), "progress": {"step": 0}}
        try:
            _quiet(damaged.load, newest, target)
        except Exception as e:  # whatever DCP raises on bytes it cannot read
            tally.add("misnamed error", f"{kind}: verified, then {type(e).__name__}: {e}")
            continue
        same = all(torch.equal(target[k], states[1][k]) for k in ("w", "b")) and target["progress"] == {
            "step": 2
        }
        tally.add("correct handling" if same else "corruption", f"{kind}: bytes that change nothing loaded")
    return tally


def _hytrec_component():
    import importlib.util

    spec = importlib.util.spec_from_file_location("hytrec_component", ROOT / "torchx_components" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.hytrec


def torchx_arguments(rng: np.random.Generator, n: int, tmp: Path) -> Tally:
    tally = Tally(
        "torchx component: arguments",
        "--resume spelt true/TRUE/1/yes/on/false/0/no/off (any case) or misspelt; --epochs 0, -1, 1.5",
    )
    component = _hytrec_component()
    valid = ["true", "yes", "1", "on", "false", "no", "0", "off"]
    invalid = ["maybe", "ture", "y", "2", "", "yes please", "fasle", "none"]
    for k in range(n):
        if k % 5 == 4:
            value = ["0", "-1", "1.5", "x"][k % 4]
            cli, wanted = ["--epochs", value], ["--epochs"]
        elif k % 2:
            word = valid[int(rng.integers(len(valid)))]
            value = "".join(c.upper() if rng.random() < 0.5 else c for c in word)
            (role,) = materialize_appdef(component, ["--resume", value]).roles
            resumed = role.args[1].endswith("--resume")
            tally.add("correct handling" if resumed == (word in valid[:4]) else "corruption", value)
            continue
        else:
            value = invalid[int(rng.integers(len(invalid)))]
            cli, wanted = ["--resume", value], ["--resume", repr(value)]
        try:
            materialize_appdef(component, cli)
        except ValueError as e:
            _refused(tally, e, wanted)
            continue
        tally.add("silent acceptance", " ".join(cli))
    return tally


def fault_runs(rng: np.random.Generator, n: int, tmp: Path) -> Tally:
    tally = Tally(
        "faults: worker SIGKILLed from outside",
        "the tiny 2-process job under torchrun (one restart), a worker killed mid-epoch (after a "
        "checkpoint, plus 0-300 ms) or mid-save (while .tmp-step_N exists); metrics must equal an "
        "uninterrupted run's",
    )
    if not n:
        return tally
    data = tmp / "data"
    clean = tmp / "clean"
    log = finish(launch(clean, data), clean)
    assert "resumed from" not in log, log[-3000:]
    expected = rows(clean)
    moments = [("mid-epoch", step) for step in (4, 8, 12, 16)] + [
        ("mid-save", step) for step in (4, 8, 12, 16)
    ]
    for k in range(n):
        moment, step = moments[k % len(moments)]
        rank = int(rng.integers(2))
        out = tmp / f"fault{k}"
        ckpt = out / "checkpoints"
        proc = launch(out, data)
        name = f"step_{step:09d}"
        detail = f"{moment} of {name}, rank {rank}"
        try:
            if moment == "mid-epoch":
                wait_for(proc, lambda: (ckpt / name / COMPLETE_MARKER).is_file())
                time.sleep(float(rng.uniform(0, 0.3)))
            else:
                wait_for(proc, lambda: (ckpt / f".tmp-{name}").exists())
            kill_worker(proc, rank)
            if moment == "mid-save" and (ckpt / name).exists():
                detail += " (the save had just finished)"
        except (AssertionError, KeyError) as e:
            # No fault went in (the moment passed unseen): not a fault run.
            finish(proc, out)
            tally.notes.append(f"{detail}: not injected ({e!r}), not counted")
            continue
        log = finish(proc, out)
        tally.notes.append(detail)
        if proc.returncode != 0:
            tally.add("wrongly refused", f"{detail}: job failed: {log.strip().splitlines()[-1]}")
        elif rows(out) != expected:
            tally.add("corruption", f"{detail}: metrics differ")
        else:
            tally.add("correct handling", detail)
    return tally


CLASSES = [
    (converter_ids, 40),
    (converter_time_units, 32),
    (converter_duplicate_users, 20),
    (converter_sparse_ids, 21),
    (converter_line_numbers, 40),
    (converter_non_utf8, 32),
    (converter_full_disk, 6),
    (reader_damage, 63),
    (checkpoint_damage, 42),
    (torchx_arguments, 20),
]


def report(tallies: List[Tally], command: str, started: str, seconds: float) -> str:
    bad_inputs = sum(sum(t.counts.values()) for t in tallies if not t.name.startswith("faults"))
    faults = sum(sum(t.counts.values()) for t in tallies if t.name.startswith("faults"))
    lines = [
        "# Reliability under bad input and faults",
        "",
        "Generated by `benchmarks/reliability.py` (issue #15); do not edit by hand. This page was made by",
        "",
        f"    {command}",
        "",
        f"started {started}, {seconds:.0f} s, on {os.cpu_count()} CPU cores: {bad_inputs} generated bad "
        f"inputs and {faults} fault runs.",
        "",
        "Outcomes: **named error** (refused, naming what is wrong and where: file and line / row / user, "
        "checkpoint and file, argument), **correct handling** (accepted, output exactly right against an "
        "oracle), and the failures: **wrongly refused** (a valid input refused, or a job that did not "
        "recover), **misnamed error** (refused without the right place), **silent acceptance** (bad input "
        "taken as fine), **corruption** (wrong output).",
        "",
        "| class | inputs | " + " | ".join(OUTCOMES) + " |",
        "|---|---:|" + "---:|" * len(OUTCOMES),
    ]
    for t in tallies:
        lines.append(
            f"| {t.name} | {sum(t.counts.values())} | "
            + " | ".join(str(t.counts[o]) for o in OUTCOMES)
            + " |"
        )
    totals = Counter()
    for t in tallies:
        totals.update(t.counts)
    lines.append(
        f"| **total** | {sum(totals.values())} | " + " | ".join(str(totals[o]) for o in OUTCOMES) + " |"
    )
    lines += ["", "## What each class tries, with an example of each outcome", ""]
    for t in tallies:
        lines += [f"### {t.name}", "", t.tried + ".", ""] + [f"- note: {note}" for note in t.notes]
        for outcome in OUTCOMES:
            if outcome in t.examples:
                lines.append(
                    f"- {outcome}: `{t.examples[outcome]}`" if t.examples[outcome] else f"- {outcome}"
                )
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=1.0, help="multiplies the inputs per class")
    p.add_argument("--fault-runs", type=int, default=20, help="torchrun jobs with a worker killed (0: none)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "RELIABILITY.md")
    args = p.parse_args()
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    t0 = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    tallies = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (make, count) in enumerate(CLASSES + [(fault_runs, args.fault_runs)]):
            work = Path(tmp) / str(i)
            work.mkdir()
            n = count if make is fault_runs else max(1, round(count * args.scale))
            tally = make(rng, n, work)
            print(f"{tally.name}: " + ", ".join(f"{o} {c}" for o, c in tally.counts.items()), flush=True)
            tallies.append(tally)
    argv = " ".join(
        a if a.startswith("-") or "/" not in a else os.path.relpath(a, ROOT) for a in sys.argv[1:]
    )
    command = f"python benchmarks/reliability.py {argv}".rstrip()
    args.out.write_text(report(tallies, command, started, time.perf_counter() - t0))
    print(f"wrote {args.out}")
    failures = sum(t.counts[o] for t in tallies for o in FAILURES)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
