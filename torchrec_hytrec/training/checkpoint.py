"""Atomic ``torch.distributed.checkpoint`` snapshots: write to a temp dir, mark, rename."""

import contextlib
import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

COMPLETE_MARKER = "COMPLETE"
_NAME = re.compile(r"^step_(\d{9})$")


def rng_state() -> Dict[str, Any]:
    """This process's random generator states (torch CPU and CUDA, numpy, Python)."""
    state: Dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restores what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    # A single-process run is intended here; DCP would warn about it on every call.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointManager:
    """Saves, finds and prunes complete checkpoints under one directory.

    Every rank writes its shards with ``torch.distributed.checkpoint`` into ``.tmp-step_N``;
    once all ranks are done, rank 0 writes a ``COMPLETE`` marker and renames the directory to
    ``step_N`` (a rename is atomic on POSIX filesystems). A checkpoint counts only when its
    name is final *and* the marker is inside, so a job killed mid-save leaves nothing that a
    resume could mistake for a complete checkpoint. The root must be on storage every rank
    sees (a shared filesystem on multi-node jobs).

    Args:
        root: directory holding the checkpoints.
        keep_last: how many complete checkpoints to keep; older ones are deleted after a save.

    Example::

        manager = CheckpointManager("runs/hytrec/checkpoints", keep_last=3)
        manager.save(step, {"model": model.state_dict(), "optimizer": optimizer.state_dict()})
        latest = manager.latest()
        if latest is not None:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
            manager.load(latest, state)
    """

    def __init__(self, root: "str | os.PathLike[str]", keep_last: int = 3) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.root = Path(root)
        self.keep_last = keep_last

    def complete(self) -> List[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.iterdir():
            m = _NAME.match(p.name)
            if m and p.is_dir() and (p / COMPLETE_MARKER).is_file():
                found.append((int(m.group(1)), p))
        return [p for _, p in sorted(found)]

    def latest(self) -> Optional[Path]:
        """The newest complete checkpoint, or ``None``."""
        done = self.complete()
        return done[-1] if done else None

    def save(self, step: int, state: Dict[str, Any]) -> Path:
        """Writes ``state`` as the checkpoint of global step ``step``; collective over all ranks.

        Args:
            step: global optimizer step; names the checkpoint.
            state: a ``torch.distributed.checkpoint`` state dict. Values that differ between
                ranks (RNG, data position) must sit under rank-specific keys.

        Returns:
            The final checkpoint directory.
        """
        final = self.root / f"step_{step:09d}"
        tmp = self.root / f".tmp-{final.name}"
        if _rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            # Left over by an attempt that died mid-save.
            shutil.rmtree(tmp, ignore_errors=True)
        _barrier()
        with _quiet_single_process():
            dcp.save(state, checkpoint_id=tmp)
        if _rank() == 0:
            with open(tmp / COMPLETE_MARKER, "w") as f:
                json.dump({"step": step, "world_size": dist.get_world_size() if dist.is_initialized() else 1}, f)
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, final)
            _fsync_dir(self.root)
            for old in self.complete()[: -self.keep_last]:
                shutil.rmtree(old)
        _barrier()
        return final

    @staticmethod
    def info(path: "str | os.PathLike[str]") -> Dict[str, int]:
        """What the completion marker of a checkpoint records: ``step`` and ``world_size``."""
        return json.loads((Path(path) / COMPLETE_MARKER).read_text())

    def clear(self) -> int:
        """Deletes every checkpoint, complete or not (a fresh run reusing the directory); collective.

        Returns:
            How many complete checkpoints were deleted.
        """
        removed = len(self.complete())
        if _rank() == 0 and self.root.is_dir():
            for p in self.root.iterdir():
                if p.is_dir() and _NAME.match(p.name.removeprefix(".tmp-")):
                    shutil.rmtree(p)
        _barrier()
        return removed

    def load(self, path: "str | os.PathLike[str]", state: Dict[str, Any]) -> None:
        """Loads a complete checkpoint into ``state`` in place; collective over all ranks.

        Args:
            path: a directory returned by :meth:`latest` or :meth:`save`.
            state: a state dict of the same structure as saved, whose tensors (sharded ones
                included) are filled in place and whose other values are replaced.
        """
        path = Path(path)
        if not (path / COMPLETE_MARKER).is_file():
            raise ValueError(f"checkpoint {path} is not complete (no {COMPLETE_MARKER} marker)")
        with _quiet_single_process():
            dcp.load(state, checkpoint_id=path)
