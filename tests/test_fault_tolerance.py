"""A worker SIGKILLed mid-epoch under torchrun: the job restarts, resumes and ends where it would have."""

import json
import re
from pathlib import Path
from typing import Dict, List

import pytest
from helpers import launch_tiny_job

EVERY = 4
FAULT_AT = 7
# Runs on CPU with the same thread count are bitwise deterministic; the tolerance only absorbs
# formatting through JSON.
TOLERANCE = 1e-9


def _torchrun(out_dir: Path, data_dir: Path, extra: List[str]) -> str:
    proc = launch_tiny_job(out_dir, data_dir, extra)
    proc.wait(timeout=300)
    log = (out_dir.parent / f"{out_dir.name}.log").read_text()
    assert proc.returncode == 0, log[-5000:]
    return log


def _rows(out_dir: Path) -> List[Dict[str, float]]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.e2e
def test_killed_worker_resumes_and_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    clean_log = _torchrun(tmp_path / "clean", tmp_path / "data", [])
    faulty_log = _torchrun(tmp_path / "faulty", tmp_path / "data", ["--fault-at-step", str(FAULT_AT)])

    assert "[fault injection] rank 1 SIGKILLs itself before step 7" in faulty_log
    assert "[fault injection]" not in clean_log and "resumed from" not in clean_log
    resumed = re.findall(r"resumed from \S+step_(\d+) at epoch (\d+), global step (\d+)", faulty_log)
    assert len(resumed) == 1, faulty_log[-5000:]
    step = int(resumed[0][2])
    # At most one checkpoint interval of work is repeated.
    assert FAULT_AT - EVERY <= step < FAULT_AT

    clean, faulty = _rows(tmp_path / "clean"), _rows(tmp_path / "faulty")
    assert [r["epoch"] for r in faulty] == [0, 1]
    for a, b in zip(clean, faulty):
        for key in a:
            if key != "epoch_s":
                assert b[key] == pytest.approx(a[key], abs=TOLERANCE), (a["epoch"], key)
