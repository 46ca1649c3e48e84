"""A worker SIGKILLed mid-epoch under torchrun: the job restarts, resumes and ends where it would have."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest

# Small enough for ~1 minute per run on 2 cores; several checkpoint intervals per epoch.
TINY = [
    "--epochs",
    "2",
    "--set",
    "data.synthetic.num_users=160",
    "--set",
    "data.synthetic.max_length=120",
    "--set",
    "data.row_group_size=16",
    "--set",
    "data.token_budget=512",
    "--set",
    "data.eval_token_budget=4096",
    "--set",
    "data.max_seq_len=100",
    "--set",
    "model.encoder.embedding_dim=16",
    "--set",
    "model.encoder.short_window=8",
    "--set",
    "model.encoder.dropout=0.1",
    "--set",
    "checkpoint.every_n_steps=4",
    "--set",
    "checkpoint.keep_last=2",
]
EVERY = 4
FAULT_AT = 7
# Runs on CPU with the same thread count are bitwise deterministic; the tolerance only absorbs
# formatting through JSON.
TOLERANCE = 1e-9


def _torchrun(out_dir: Path, data_dir: Path, extra: List[str]) -> str:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--max-restarts",
        "1",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        "localhost:0",
        "--monitor-interval",
        "0.5",
        "-m",
        "torchrec_hytrec.train",
        *TINY,
        "--out-dir",
        str(out_dir),
        "--set",
        f"data.cache_dir={data_dir}",
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LOGLEVEL": "WARNING"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    log = proc.stdout + proc.stderr
    (out_dir.parent / f"{out_dir.name}.log").write_text(log)
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
