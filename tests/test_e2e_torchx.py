"""``torchx run -s local_cwd`` of the ``hytrec`` component, as ``make train`` launches it."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _torchx(tmp_path: Path, extra: List[str], overrides: List[str]) -> dict:
    torchx = Path(sys.executable).with_name("torchx")
    out_dir = tmp_path / "run"
    cmd = [
        str(torchx),
        "run",
        "-s",
        "local_cwd",
        "torchx_components/train.py:hytrec",
        "--out_dir",
        str(out_dir),
        "--overrides",
        ",".join([f"data.cache_dir={tmp_path / 'data'}", *overrides]),
        *extra,
    ]
    # torchx launches `torchrun` from PATH: the one of this interpreter's environment.
    env = {**os.environ, "PATH": f"{torchx.parent}:{os.environ['PATH']}"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Job finished: SUCCEEDED" in log, log[-5000:]
    assert "final metrics" in log
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert (out_dir / "metrics.csv").is_file()
    assert list((out_dir / "tensorboard").glob("events.out.tfevents.*"))
    return {"rows": rows, "checkpoints": sorted(p.name for p in (out_dir / "checkpoints").iterdir())}


@pytest.mark.e2e
def test_two_rank_local_launch_beats_popularity(tmp_path: Path) -> None:
    result = _torchx(
        tmp_path,
        ["--epochs", "3"],
        ["data.synthetic.num_users=600", "data.row_group_size=32", "model.encoder.embedding_dim=32"],
    )
    rows = result["rows"]
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    last = rows[-1]
    # Both evaluated on the same held-out events of the same users.
    assert last["test_hr@10"] > 1.3 * last["test_pop_hr@10"]
    assert last["valid_hr@10"] > 1.3 * last["valid_pop_hr@10"]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]


@pytest.mark.e2e
def test_two_nodes_of_one_process_rendezvous_and_train(tmp_path: Path) -> None:
    # Two "nodes" on one machine: the c10d rendezvous path a multi-node cluster job takes.
    result = _torchx(
        tmp_path,
        ["--epochs", "1", "-j", "2x1", "--rdzv_port", str(_free_port())],
        ["data.synthetic.num_users=120", "data.row_group_size=16", "model.encoder.embedding_dim=16"],
    )
    assert [r["epoch"] for r in result["rows"]] == [0]
    assert result["checkpoints"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
