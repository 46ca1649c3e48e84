"""Atomic, verifiable ``torch.distributed.checkpoint`` snapshots: write to a temp dir, checksum, mark,
rename."""

import contextlib
import json
import logging
import os
import random
import re
import shutil
import warnings
import zlib
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, TypeVar

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "COMPLETE"
_NAME = re.compile(r"^step_(\d{9})$")
_TMP = ".tmp-"
# A checkpoint being deleted; renamed first so a crash midway never leaves it looking complete.
_OLD = ".old-"
_CHUNK = 8 << 20
# Stands for a fingerprint field one side lacks (``None`` is a value a field can have).
_ABSENT = object()
_T = TypeVar("_T")


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


def _on_rank0(fn: Callable[[], _T]) -> _T:
    """Runs ``fn`` on rank 0 only and returns its result on every rank (collective when distributed).

    Decisions about files on the shared filesystem (which checkpoint to load, whether a save
    succeeded) are taken once, so ranks can never disagree, and the files are read once rather
    than by every rank. An exception on rank 0 is raised on every rank instead of leaving the
    others waiting in a collective for ever.
    """
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return fn()
    box: List[Any] = [None]
    error: Optional[BaseException] = None
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", fn())
        except Exception as e:  # re-raised below, after the other ranks have been told
            error = e
            box[0] = ("error", f"{type(e).__name__}: {e}")
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    status, value = box[0]
    if status == "error":
        raise RuntimeError(f"rank 0 failed: {value}")
    return value


def _crc32(path: Path) -> str:
    crc = 0
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            crc = zlib.crc32(view[:n], crc)
    return f"{crc:08x}"


def _file_records(directory: Path) -> Dict[str, Dict[str, Any]]:
    """Size and CRC-32 of every file of a checkpoint directory except the marker."""
    return {
        p.name: {"bytes": p.stat().st_size, "crc32": _crc32(p)}
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name != COMPLETE_MARKER
    }


def _stats(directory: Path) -> Tuple[Tuple[str, int, int], ...]:
    """Name, size and modification time of every file: what changes when one is rewritten."""
    stats = []
    for p in sorted(directory.iterdir()):
        if p.is_file():
            st = p.stat()
            stats.append((p.name, st.st_size, st.st_mtime_ns))
    return tuple(stats)


def _flatten(value: Any, prefix: str = "") -> Dict[str, Any]:
    """Nested dicts as ``{"a.b": leaf}``, so a difference is named by its full key."""
    if isinstance(value, dict) and value:
        out: Dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: value}


def _show(value: Any) -> str:
    return "(not recorded)" if value is _ABSENT else json.dumps(value)


class CheckpointManager:
    """Saves, verifies, finds and prunes checkpoints under one directory.

    Every rank writes its shards with ``torch.distributed.checkpoint`` into ``.tmp-step_N``;
    once all ranks are done, rank 0 computes the size and CRC-32 of every file in it, writes
    them with the run's fingerprint into a ``COMPLETE`` marker and renames the directory to
    ``step_N`` (a rename is atomic on POSIX filesystems). A checkpoint counts as *complete* when
    its name is final and the marker is inside, and as *intact* when moreover every file the
    marker lists is there with its size and checksum (:meth:`verify`). A job killed mid-save
    leaves nothing that a resume could mistake for a complete checkpoint, and a checkpoint
    damaged later (a truncated copy, a flipped bit, a deleted shard) is detected instead of
    loaded; :meth:`latest_intact` then falls back to the newest one that is still intact. The
    root must be on storage every rank sees (a shared filesystem on multi-node jobs): rank 0
    checksums the files every rank wrote.

    Args:
        root: directory holding the checkpoints.
        keep_last: how many complete checkpoints to keep; older ones are deleted after a save.

    Example::

        manager = CheckpointManager("runs/hytrec/checkpoints", keep_last=3)
        manager.save(step, {"model": model.state_dict(), "optimizer": optimizer.state_dict()},
                     fingerprint={"seed": 0, "data": {"path": "beauty.parquet"}})
        latest = manager.latest_intact()
        if latest is not None:
            manager.check_fingerprint(latest, {"seed": 0, "data": {"path": "beauty.parquet"}})
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
            manager.load(latest, state)
    """

    def __init__(self, root: "str | os.PathLike[str]", keep_last: int = 3) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.root = Path(root)
        self.keep_last = keep_last
        # Checkpoints latest_intact verified, with their files' stats then: load() reads them
        # again only if a file changed since.
        self._verified: Dict[Path, Tuple[Tuple[str, int, int], ...]] = {}

    def _named(self) -> List[Path]:
        """Directories with a final checkpoint name, marker or not, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.iterdir():
            m = _NAME.match(p.name)
            if m and p.is_dir():
                found.append((int(m.group(1)), p))
        return [p for _, p in sorted(found)]

    def complete(self) -> List[Path]:
        """Complete checkpoints (final name and marker; not verified), oldest first."""
        return [p for p in self._named() if (p / COMPLETE_MARKER).is_file()]

    def latest(self) -> Optional[Path]:
        """The newest complete checkpoint, or ``None``; :meth:`latest_intact` also verifies it."""
        done = self.complete()
        return done[-1] if done else None

    def latest_intact(self) -> Optional[Path]:
        """The newest checkpoint that passes :meth:`verify`, or ``None``; collective when distributed.

        Rank 0 verifies (newest first) and every rank gets its choice. Each newer checkpoint
        skipped, and each half-written ``.tmp-step_N`` left by a save that did not finish, is
        reported with ``logging.warning`` naming the path and the reason.
        """

        def find() -> Optional[str]:
            if self.root.is_dir():
                for p in sorted(self.root.iterdir()):
                    if p.is_dir() and p.name.startswith(_TMP) and _NAME.match(p.name.removeprefix(_TMP)):
                        logger.warning("ignoring %s: half-written (a save that did not finish)", p)
            for p in reversed(self._named()):
                reason = self.verify(p)
                if reason is None:
                    return str(p)
                logger.warning("skipping checkpoint %s: %s", p, reason)
            return None

        found = _on_rank0(find)
        if found is None:
            return None
        self._verified[Path(found)] = _stats(Path(found))
        return Path(found)

    def save(self, step: int, state: Dict[str, Any], fingerprint: Optional[Dict[str, Any]] = None) -> Path:
        """Writes ``state`` as the checkpoint of global step ``step``; collective over all ranks.

        Args:
            step: global optimizer step; names the checkpoint. A checkpoint of the same step
                already there (e.g. a damaged one a resume fell back from) is replaced.
            state: a ``torch.distributed.checkpoint`` state dict. Values that differ between
                ranks (RNG, data position) must sit under rank-specific keys.
            fingerprint: JSON-serialisable facts of the run that a resume must share (seed,
                data, model shape, ...), recorded in the marker for :meth:`check_fingerprint`.

        Returns:
            The final checkpoint directory.
        """
        # Serialised up front, on every rank: a TypeError after the shards were written would
        # leave the other ranks waiting for rank 0.
        recorded = json.loads(json.dumps(fingerprint or {}))
        final = self.root / f"step_{step:09d}"
        tmp = self.root / f"{_TMP}{final.name}"
        if _rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            # Left over by an attempt that died mid-save.
            shutil.rmtree(tmp, ignore_errors=True)
        _barrier()
        with _quiet_single_process():
            dcp.save(state, checkpoint_id=tmp)

        def finish() -> None:
            # dcp.save returns on rank 0 only after every rank reported its files written.
            marker = {
                "step": step,
                "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                "files": _file_records(tmp),
                "fingerprint": recorded,
            }
            with open(tmp / COMPLETE_MARKER, "w") as f:
                json.dump(marker, f)
                f.flush()
                os.fsync(f.fileno())
            if final.exists():
                self._discard(final)
            os.rename(tmp, final)
            _fsync_dir(self.root)
            for old in self.complete()[: -self.keep_last]:
                self._discard(old)
            # Left by a deletion that a crash interrupted.
            for p in self.root.glob(f"{_OLD}step_*"):
                shutil.rmtree(p, ignore_errors=True)

        _on_rank0(finish)
        return final

    def _discard(self, path: Path) -> None:
        """Deletes a checkpoint directory (renamed first, see ``_OLD``)."""
        trash = self.root / f"{_OLD}{path.name}"
        shutil.rmtree(trash, ignore_errors=True)
        os.rename(path, trash)
        shutil.rmtree(trash)

    @staticmethod
    def _marker(path: Path) -> Dict[str, Any]:
        marker = path / COMPLETE_MARKER
        if not marker.is_file():
            raise ValueError(f"checkpoint {path} is not complete (no {COMPLETE_MARKER} marker)")
        try:
            content = json.loads(marker.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"checkpoint {path}: unreadable {COMPLETE_MARKER} marker ({e})") from e
        if not isinstance(content, dict) or not isinstance(content.get("fingerprint", {}), dict):
            raise ValueError(f"checkpoint {path}: unreadable {COMPLETE_MARKER} marker (not a JSON object)")
        return content

    @staticmethod
    def info(path: "str | os.PathLike[str]") -> Dict[str, int]:
        """What the completion marker of a checkpoint records: ``step`` and ``world_size``."""
        marker = CheckpointManager._marker(Path(path))
        try:
            return {"step": int(marker["step"]), "world_size": int(marker["world_size"])}
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"checkpoint {path}: unreadable {COMPLETE_MARKER} marker ({e!r})") from e

    @staticmethod
    def fingerprint(path: "str | os.PathLike[str]") -> Dict[str, Any]:
        """The fingerprint :meth:`save` recorded (``{}`` when none was given)."""
        return CheckpointManager._marker(Path(path)).get("fingerprint", {})

    @staticmethod
    def check_fingerprint(path: "str | os.PathLike[str]", fingerprint: Dict[str, Any]) -> None:
        """Refuses to continue from a checkpoint made by a run with other facts.

        Args:
            path: the checkpoint.
            fingerprint: this run's facts, as would be given to :meth:`save`.

        Raises:
            ValueError: naming every differing field (nested keys dotted) with both values.
        """
        path = Path(path)
        theirs = _flatten(CheckpointManager.fingerprint(path))
        # A JSON round trip, as the recorded one had, so a tuple equals the list it became.
        ours = _flatten(json.loads(json.dumps(fingerprint)))
        diffs = [
            f"{k}={_show(theirs.get(k, _ABSENT))}, this run has {k}={_show(ours.get(k, _ABSENT))}"
            for k in sorted(set(theirs) | set(ours))
            if theirs.get(k, _ABSENT) != ours.get(k, _ABSENT)
        ]
        if diffs:
            raise ValueError(f"checkpoint {path.name} ({path}) was made with " + "; ".join(diffs))

    @staticmethod
    def verify(path: "str | os.PathLike[str]") -> Optional[str]:
        """Checks a checkpoint against its marker without loading it; reads every file once.

        Returns:
            ``None`` when the checkpoint is intact, else the reason, e.g. ``"missing COMPLETE
            marker"``, ``"file __0_0.distcp missing"``, ``"truncated __1_0.distcp (100 of 6416
            bytes)"`` or ``"checksum mismatch in __0_0.distcp"``.
        """
        path = Path(path)
        if not path.is_dir():
            return "missing directory"
        if not (path / COMPLETE_MARKER).is_file():
            return f"missing {COMPLETE_MARKER} marker"
        try:
            marker = CheckpointManager._marker(path)
        except ValueError as e:
            return str(e).removeprefix(f"checkpoint {path}: ")
        if "files" not in marker:
            return f"{COMPLETE_MARKER} marker records no checksums (written by an older version)"
        try:
            files = {
                str(name): (int(want["bytes"]), str(want["crc32"])) for name, want in marker["files"].items()
            }
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            return f"unreadable {COMPLETE_MARKER} marker (bad file list: {e!r})"
        # A file the marker does not list would be loaded unchecked (e.g. a damaged name in it).
        unlisted = sorted(
            p.name
            for p in path.iterdir()
            if p.is_file() and p.name != COMPLETE_MARKER and p.name not in files
        )
        if unlisted:
            return f"file {unlisted[0]} not recorded in {COMPLETE_MARKER}"
        for name, (want_bytes, want_crc) in files.items():
            p = path / name
            try:
                size = p.stat().st_size
                if size < want_bytes:
                    return f"truncated {name} ({size} of {want_bytes} bytes)"
                if size > want_bytes:
                    return f"{name} has {size} bytes, {COMPLETE_MARKER} records {want_bytes}"
                if _crc32(p) != want_crc:
                    return f"checksum mismatch in {name}"
            except FileNotFoundError:
                return f"file {name} missing"
            except OSError as e:
                return f"unreadable {name} ({e})"
        return None

    def clear(self) -> int:
        """Deletes every checkpoint, complete or not (a fresh run reusing the directory); collective.

        Returns:
            How many complete checkpoints were deleted.
        """
        removed = len(self.complete())
        if _rank() == 0 and self.root.is_dir():
            for p in self.root.iterdir():
                if p.is_dir() and _NAME.match(p.name.removeprefix(_TMP).removeprefix(_OLD)):
                    shutil.rmtree(p)
        self._verified.clear()
        _barrier()
        return removed

    def load(self, path: "str | os.PathLike[str]", state: Dict[str, Any]) -> None:
        """Loads an intact checkpoint into ``state`` in place; collective over all ranks.

        Unless :meth:`latest_intact` just chose it, rank 0 first verifies the checkpoint, so a
        damaged one is an error rather than silently wrong weights.

        Args:
            path: a directory returned by :meth:`latest_intact`, :meth:`latest` or :meth:`save`.
            state: a state dict of the same structure as saved, whose tensors (sharded ones
                included) are filled in place and whose other values are replaced.

        Raises:
            ValueError: the checkpoint is incomplete or damaged (the reason of :meth:`verify`).
        """
        path = Path(path)
        if not (path / COMPLETE_MARKER).is_file():
            raise ValueError(f"checkpoint {path} is not complete (no {COMPLETE_MARKER} marker)")
        # Decided on rank 0 alone (its cache), so every rank takes part in the same collectives.
        reason = _on_rank0(lambda: None if self._verified.get(path) == _stats(path) else self.verify(path))
        if reason is not None:
            raise ValueError(f"checkpoint {path} is damaged: {reason}")
        with _quiet_single_process():
            dcp.load(state, checkpoint_id=path)
