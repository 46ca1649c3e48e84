"""CheckpointManager: atomic saves, exact sharded resumption, integrity checks and fingerprints."""

import json
import logging
import os
import re
import shutil
import socket
from pathlib import Path
from typing import Callable, List, Tuple

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed.checkpoint import FileSystemWriter

from torchrec_hytrec.training.checkpoint import COMPLETE_MARKER, CheckpointManager, rng_state, set_rng_state

FINGERPRINT = {"seed": 0, "data": {"path": "/d/a.parquet", "num_items": 64}, "model": {"dims": [8, 1]}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _linear_state(seed: int) -> dict:
    torch.manual_seed(seed)
    lin = torch.nn.Linear(4, 3)
    return {"model": lin.state_dict(), "progress": {"epoch": seed, "step": 10 * seed}}


def test_save_then_load_restores_tensors_objects_and_rng(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    saved = _linear_state(1)
    saved["rank_0"] = {"rng": rng_state(), "data": {"row_group": 3, "offset": 17}}
    expected_draw = torch.rand(5)
    path = manager.save(12, saved)
    assert path.name == "step_000000012" and manager.info(path) == {"step": 12, "world_size": 1}
    assert manager.verify(path) is None and manager.fingerprint(path) == {}
    marker = json.loads((path / COMPLETE_MARKER).read_text())
    # Every file DCP wrote is listed with its size and checksum.
    assert set(marker["files"]) == {p.name for p in path.iterdir()} - {COMPLETE_MARKER}
    assert {".metadata", "__0_0.distcp"} <= set(marker["files"])

    torch.rand(100)
    target = _linear_state(2)
    target["rank_0"] = {"rng": rng_state(), "data": {"row_group": 0, "offset": 0}}
    manager.load(manager.latest(), target)
    assert torch.equal(target["model"]["weight"], saved["model"]["weight"])
    assert target["progress"] == {"epoch": 1, "step": 10}
    assert target["rank_0"]["data"] == {"row_group": 3, "offset": 17}
    set_rng_state(target["rank_0"]["rng"])
    assert torch.equal(torch.rand(5), expected_draw)


def test_keeps_only_the_last_n(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in (5, 10, 15, 20):
        manager.save(step, _linear_state(step))
    assert [p.name for p in manager.complete()] == ["step_000000015", "step_000000020"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000000015", "step_000000020"]


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_half_written_checkpoints_are_never_taken_as_complete(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    good = manager.save(10, _linear_state(1))
    # A save that died before the rename: real DCP files in the temp directory.
    dcp.save(_linear_state(2), checkpoint_id=tmp_path / ".tmp-step_000000020", no_dist=True)
    # A directory with a final name but no marker (e.g. copied by a tool that is not atomic).
    dcp.save(_linear_state(3), checkpoint_id=tmp_path / "step_000000030", no_dist=True)
    assert manager.latest() == good
    with pytest.raises(ValueError, match="step_000000030 is not complete"):
        manager.load(tmp_path / "step_000000030", _linear_state(0))


def test_a_save_that_fails_midway_leaves_the_previous_checkpoint_latest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manager = CheckpointManager(tmp_path)
    good = manager.save(10, _linear_state(1))

    def crash(self, plan, planner):  # the process dies while shards are being written
        raise OSError("disk gone")

    monkeypatch.setattr(FileSystemWriter, "write_data", crash)
    with pytest.raises(dcp.api.CheckpointException):
        manager.save(20, _linear_state(2))
    monkeypatch.undo()
    assert manager.latest() == good
    # The next save of that step clears the leftover and succeeds.
    assert manager.save(20, _linear_state(2)) == manager.latest()
    assert not (tmp_path / ".tmp-step_000000020").exists()


def _build_sharded(rank: int, world_size: int, seed: int):
    """A row-wise sharded table + dense layer under DMP, with a fused sparse and an AdamW optimizer."""
    from torchrec import EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
    from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
    from torchrec.optim.optimizers import in_backward_optimizer_filter
    from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ec = EmbeddingCollection(
                tables=[
                    EmbeddingConfig(
                        name="item_table", embedding_dim=8, num_embeddings=64, feature_names=["item_id"]
                    )
                ],
                device=torch.device("meta"),
            )
            self.dense = torch.nn.Linear(8, 1)

        def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
            values = self.ec(kjt)["item_id"].values()
            # Dropout draws from the RNG, so resumption must restore it to match.
            return (torch.nn.functional.dropout(self.dense(values), 0.5) - 1.0).pow(2).mean()

    torch.manual_seed(seed)
    model = Tiny()
    apply_optimizer_in_backward(RowWiseAdagrad, model.ec.parameters(), {"lr": 0.1})
    plan = EmbeddingShardingPlanner(
        topology=Topology(world_size=world_size, compute_device="cpu"),
        constraints={"item_table": ParameterConstraints(sharding_types=["row_wise"])},
    ).collective_plan(model, [EmbeddingCollectionSharder()], dist.GroupMember.WORLD)
    assert plan.plan["ec"]["item_table"].sharding_type == "row_wise"
    dmp = DistributedModelParallel(
        model, device=torch.device("cpu"), plan=plan, sharders=[EmbeddingCollectionSharder()]
    )
    dense = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(dmp.named_parameters())), lambda ps: torch.optim.AdamW(ps, lr=0.01)
    )
    return dmp, CombinedOptimizer([dmp.fused_optimizer, dense])


def _train(model, optimizer, rank: int, steps: range) -> List[float]:
    from torchrec import KeyedJaggedTensor

    losses = []
    for step in steps:
        g = torch.Generator().manual_seed(100 * step + rank)
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=["item_id"], values=torch.randint(0, 64, (12,), generator=g), lengths=torch.tensor([5, 7])
        )
        optimizer.zero_grad()
        loss = model(kjt)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def _state(model, optimizer, rank: int) -> dict:
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        f"rank_{rank}": {"rng": rng_state()},
    }


def _join(rank: int, world_size: int, port: int) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)


def _save_two_checkpoints_worker(rank: int, world_size: int, port: int, root: str) -> None:
    """Saves steps 3 and 6 of the sharded model: real DCP shards written by two ranks."""
    _join(rank, world_size, port)
    manager = CheckpointManager(root, keep_last=2)
    model, optimizer = _build_sharded(rank, world_size, seed=0)
    for steps in (range(3), range(3, 6)):
        _train(model, optimizer, rank, steps)
        manager.save(steps.stop, _state(model, optimizer, rank), fingerprint=FINGERPRINT)
    dist.destroy_process_group()


def _sharded_resume_worker(rank: int, world_size: int, port: int, root: str) -> None:
    """Checkpoints a sharded model twice, damages the newest, and checks the exact resumption
    from the previous one that both ranks fall back to."""
    _join(rank, world_size, port)
    manager = CheckpointManager(root, keep_last=2)
    model, optimizer = _build_sharded(rank, world_size, seed=0)
    _train(model, optimizer, rank, range(3))
    manager.save(3, _state(model, optimizer, rank))
    expected = _train(model, optimizer, rank, range(3, 6))
    newest = manager.save(6, _state(model, optimizer, rank))
    if rank == 0:
        # A flipped bit in the shard the *other* rank wrote: rank 0 checks what every rank wrote.
        with open(newest / "__1_0.distcp", "r+b") as f:
            f.seek(100)
            byte = f.read(1)
            f.seek(100)
            f.write(bytes([byte[0] ^ 0x01]))
    dist.barrier()

    model, optimizer = _build_sharded(rank, world_size, seed=1)
    # AdamW creates its state lazily; DCP loads in place, so the state must exist first.
    optimizer.init_state()
    restored = _state(model, optimizer, rank)
    with pytest.raises(ValueError, match=r"step_000000006 is damaged: checksum mismatch in __1_0.distcp"):
        manager.load(newest, restored)
    latest = manager.latest_intact()
    assert latest is not None and latest.name == "step_000000003"
    manager.load(latest, restored)
    optimizer.load_state_dict(restored["optimizer"])
    set_rng_state(restored[f"rank_{rank}"]["rng"])
    assert _train(model, optimizer, rank, range(3, 6)) == expected
    # Saving the step of the damaged checkpoint again replaces it.
    assert manager.save(6, _state(model, optimizer, rank)) == newest
    assert manager.latest_intact() == newest and manager.verify(newest) is None
    dist.destroy_process_group()


@pytest.mark.slow
def test_sharded_model_and_fused_optimizer_resume_exactly_on_two_ranks(tmp_path: Path) -> None:
    mp.spawn(_sharded_resume_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)


@pytest.fixture(scope="module")
def two_rank_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("two_rank") / "checkpoints"
    mp.spawn(_save_two_checkpoints_worker, args=(2, _free_port(), str(root)), nprocs=2, join=True)
    return root


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def _grow(path: Path) -> None:
    with open(path, "ab") as f:
        f.write(b"\0")


DAMAGE: List[Tuple[str, Callable[[Path], None], str]] = [
    ("flip", lambda d: _flip_byte(d / "__0_0.distcp"), r"checksum mismatch in __0_0\.distcp"),
    ("flip-metadata", lambda d: _flip_byte(d / ".metadata"), r"checksum mismatch in \.metadata"),
    ("no-marker", lambda d: (d / COMPLETE_MARKER).unlink(), r"missing COMPLETE marker"),
    (
        "bad-marker",
        lambda d: (d / COMPLETE_MARKER).write_text('{"step": 6'),
        r"unreadable COMPLETE marker \(.*\)",
    ),
    ("no-shard", lambda d: (d / "__1_0.distcp").unlink(), r"file __1_0\.distcp missing"),
    ("no-metadata", lambda d: (d / ".metadata").unlink(), r"file \.metadata missing"),
    ("truncated", lambda d: _truncate(d / "__1_0.distcp"), r"truncated __1_0\.distcp \(\d+ of \d+ bytes\)"),
    ("grown", lambda d: _grow(d / "__0_0.distcp"), r"__0_0\.distcp has \d+ bytes, COMPLETE records \d+"),
    # A damaged name in the marker: the shard it no longer lists would go unchecked.
    (
        "renamed-in-marker",
        lambda d: _edit_marker(d, '"__0_0.distcp"', '"__0_9.distcp"'),
        r"file __0_0\.distcp not recorded in COMPLETE",
    ),
    (
        "bad-file-list",
        lambda d: _edit_marker(d, '"bytes"', '"bytez"'),
        r"unreadable COMPLETE marker \(bad file list: KeyError\('bytes'\)\)",
    ),
    (
        "marker-not-object",
        lambda d: (d / COMPLETE_MARKER).write_text("[1]"),
        r"unreadable COMPLETE marker \(not a JSON object\)",
    ),
]


def _edit_marker(directory: Path, old: str, new: str) -> None:
    marker = directory / COMPLETE_MARKER
    text = marker.read_text()
    assert old in text
    marker.write_text(text.replace(old, new, 1))


@pytest.mark.slow  # two spawned ranks write the checkpoints
@pytest.mark.parametrize("damage, reason", [(f, r) for _, f, r in DAMAGE], ids=[n for n, _, _ in DAMAGE])
def test_a_damaged_newest_checkpoint_is_reported_and_skipped(
    two_rank_root: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    damage: Callable[[Path], None],
    reason: str,
) -> None:
    root = tmp_path / "checkpoints"
    shutil.copytree(two_rank_root, root)
    manager = CheckpointManager(root, keep_last=2)
    older, newest = root / "step_000000003", root / "step_000000006"
    assert manager.verify(newest) is None and manager.latest_intact() == newest
    damage(newest)
    assert re.fullmatch(reason, manager.verify(newest))
    with caplog.at_level(logging.WARNING):
        assert manager.latest_intact() == older
    assert re.search(rf"skipping checkpoint {re.escape(str(newest))}: {reason}", caplog.text)
    if (newest / COMPLETE_MARKER).is_file():
        with pytest.raises(ValueError, match=rf"step_000000006 is damaged: {reason}"):
            manager.load(newest, {"x": torch.zeros(1)})
    # With every checkpoint damaged there is nothing to resume from.
    damage(older)
    assert manager.latest_intact() is None


@pytest.mark.slow
def test_fingerprint_mismatch_names_every_field(two_rank_root: Path) -> None:
    path = two_rank_root / "step_000000006"
    assert CheckpointManager.fingerprint(path) == FINGERPRINT
    # Equal after a JSON round trip (the tuple is the list it was saved as): accepted.
    CheckpointManager.check_fingerprint(path, {**FINGERPRINT, "model": {"dims": (8, 1)}})
    ours = {
        "seed": 1,
        "data": {"path": "/d/b.parquet", "num_items": 64},
        "model": {"dims": [8, 1]},
        "world_size": 2,
    }
    with pytest.raises(ValueError) as e:
        CheckpointManager.check_fingerprint(path, ours)
    assert str(e.value) == (
        f'checkpoint step_000000006 ({path}) was made with data.path="/d/a.parquet", this run has '
        'data.path="/d/b.parquet"; seed=0, this run has seed=1; world_size=(not recorded), this run '
        "has world_size=2"
    )


def test_saving_over_a_damaged_checkpoint_replaces_it(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=2)
    manager.save(1, _linear_state(1))
    damaged = manager.save(2, _linear_state(2))
    _flip_byte(damaged / "__0_0.distcp")
    assert manager.latest_intact() == tmp_path / "step_000000001"
    assert manager.save(2, _linear_state(3)) == damaged
    assert manager.verify(damaged) is None and manager.latest_intact() == damaged
    target = _linear_state(0)
    manager.load(damaged, target)
    assert torch.equal(target["model"]["weight"], _linear_state(3)["model"]["weight"])
    # Pruning leaves no renamed leftovers.
    manager.save(3, _linear_state(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000000002", "step_000000003"]


def test_half_written_saves_are_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    manager = CheckpointManager(tmp_path)
    good = manager.save(10, _linear_state(1))
    (tmp_path / ".tmp-step_000000020").mkdir()
    with caplog.at_level(logging.WARNING):
        assert manager.latest_intact() == good
    assert f"ignoring {tmp_path / '.tmp-step_000000020'}: half-written" in caplog.text


def test_clear_removes_complete_and_half_written_checkpoints_only(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    manager.save(1, _linear_state(1))
    manager.save(2, _linear_state(2))
    (tmp_path / ".tmp-step_000000003").mkdir()
    (tmp_path / "notes.txt").write_text("kept")
    assert manager.clear() == 2
    assert manager.latest() is None
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
