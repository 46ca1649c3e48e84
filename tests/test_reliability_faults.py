"""Faults injected from outside the job (issue #15): a worker SIGKILLed by another process mid-epoch
or mid-save, and a damaged newest checkpoint. The job must end as an uninterrupted run would.

Unlike ``test_fault_tolerance.py`` (the trainer's own ``--fault-at-step`` hook), the kill comes
from this test process: it watches ``out_dir/checkpoints`` and sends SIGKILL to a worker, found
as a child of the torchrun process, when a checkpoint appears (mid-epoch) or while a
``.tmp-step_N`` directory exists (mid-save).
"""

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable, Dict, List

import pytest
from helpers import launch_tiny_job

from torchrec_hytrec.training.checkpoint import CheckpointManager

ROOT = Path(__file__).resolve().parents[1]


def finish(proc: subprocess.Popen, out_dir: Path, timeout: float = 300) -> str:
    """Waits for the job; returns its log."""
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return (out_dir.parent / f"{out_dir.name}.log").read_text()


def workers(torchrun_pid: int) -> Dict[int, int]:
    """``{rank: pid}`` of the worker processes torchrun started (its children with ``RANK`` set)."""
    found = {}
    try:
        tasks = list(Path(f"/proc/{torchrun_pid}/task").iterdir())
        children = [int(c) for t in tasks for c in (t / "children").read_text().split()]
    except (FileNotFoundError, ProcessLookupError):
        return found
    for child in children:
        try:
            environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except (FileNotFoundError, ProcessLookupError):
            continue
        for var in environ:
            if var.startswith(b"RANK="):
                found[int(var[5:])] = child
    return found


def wait_for(proc: subprocess.Popen, condition: Callable[[], bool], timeout: float = 240) -> None:
    """Polls ``condition`` (every millisecond: a save of the tiny model takes tens of them)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, "the job ended before the fault could be injected"
        assert time.monotonic() < deadline, "timed out waiting for the fault's moment"
        time.sleep(0.001)


def kill_worker(proc: subprocess.Popen, rank: int) -> int:
    """SIGKILLs the worker of ``rank``; returns its pid."""
    pid = workers(proc.pid)[rank]
    os.kill(pid, signal.SIGKILL)
    return pid


def rows(out_dir: Path) -> List[Dict[str, float]]:
    """The metric rows without the wall-clock column."""
    return [
        {k: v for k, v in json.loads(line).items() if k != "epoch_s"}
        for line in (out_dir / "metrics.jsonl").read_text().splitlines()
    ]


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, object]:
    """An uninterrupted run: the metrics every faulty run must end with."""
    root = tmp_path_factory.mktemp("faults")
    out = root / "clean"
    log = finish(launch_tiny_job(out, root / "data"), out)
    assert "resumed from" not in log
    return {"root": root, "rows": rows(out)}


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.parametrize("moment, rank", [("mid-epoch", 1), ("mid-save", 0), ("mid-save", 1)])
def test_a_worker_killed_from_outside_resumes_to_the_same_metrics(clean, moment: str, rank: int) -> None:
    root: Path = clean["root"]
    out = root / f"{moment}-rank{rank}"
    ckpt = out / "checkpoints"
    proc = launch_tiny_job(out, root / "data")
    if moment == "mid-epoch":
        # Just after the first step checkpoint, while the epoch goes on.
        wait_for(proc, lambda: (ckpt / "step_000000004" / "COMPLETE").is_file())
        kill_worker(proc, rank)
    else:
        # While the second checkpoint is being written: its temporary directory exists.
        wait_for(proc, lambda: (ckpt / ".tmp-step_000000008").exists())
        kill_worker(proc, rank)
        assert not (ckpt / "step_000000008").exists(), "the save had finished: not mid-save"
    log = finish(proc, out)
    assert proc.returncode == 0, log[-5000:]
    assert log.count("resumed from") == 1, log[-5000:]
    if moment == "mid-save":
        assert "resumed from" in log and "step_000000004 at epoch 0" in log, log[-5000:]
    # Bit for bit: JSON writes floats exactly, so equal rows mean equal metrics.
    assert rows(out) == clean["rows"]
    manager = CheckpointManager(ckpt)
    assert manager.latest_intact() == manager.latest() and not list(ckpt.glob(".*"))


@pytest.mark.slow
@pytest.mark.e2e
def test_a_damaged_newest_checkpoint_is_never_loaded(clean) -> None:
    root: Path = clean["root"]
    out = root / "damaged"
    log = finish(launch_tiny_job(out, root / "data", ["--epochs", "1"]), out)
    manager = CheckpointManager(out / "checkpoints")
    newest = manager.latest()
    # keep_last=2: the epoch's end and the periodic save before it.
    older, last = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert newest is not None and newest.name == last, log[-3000:]
    shard = newest / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    assert manager.verify(newest) == "checksum mismatch in __1_0.distcp"

    proc = launch_tiny_job(out, root / "data", ["--resume"])
    log = finish(proc, out)
    # The trainer takes the newest *intact* checkpoint: it falls back and ends as a clean run.
    assert proc.returncode == 0, log[-5000:]
    assert f"skipping checkpoint {newest}: checksum mismatch in __1_0.distcp" in log
    assert f"{older} at epoch 0" in log, log[-5000:]
    assert rows(out) == clean["rows"]
