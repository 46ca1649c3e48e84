import os
import socket
from pathlib import Path
from typing import List

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed.checkpoint import FileSystemWriter

from torchrec_hytrec.training.checkpoint import CheckpointManager, rng_state, set_rng_state


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


def _sharded_resume_worker(rank: int, world_size: int, port: int, root: str) -> None:
    """Trains a row-wise sharded table + dense layer, checkpoints, and checks exact resumption."""
    from torchrec import EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
    from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
    from torchrec.optim.optimizers import in_backward_optimizer_filter
    from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ec = EmbeddingCollection(
                tables=[EmbeddingConfig(name="item_table", embedding_dim=8, num_embeddings=64, feature_names=["item_id"])],
                device=torch.device("meta"),
            )
            self.dense = torch.nn.Linear(8, 1)

        def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
            values = self.ec(kjt)["item_id"].values()
            # Dropout draws from the RNG, so resumption must restore it to match.
            return (torch.nn.functional.dropout(self.dense(values), 0.5) - 1.0).pow(2).mean()

    def build(seed: int):
        torch.manual_seed(seed)
        model = Tiny()
        apply_optimizer_in_backward(RowWiseAdagrad, model.ec.parameters(), {"lr": 0.1})
        plan = EmbeddingShardingPlanner(
            topology=Topology(world_size=world_size, compute_device="cpu"),
            constraints={"item_table": ParameterConstraints(sharding_types=["row_wise"])},
        ).collective_plan(model, [EmbeddingCollectionSharder()], dist.GroupMember.WORLD)
        assert plan.plan["ec"]["item_table"].sharding_type == "row_wise"
        dmp = DistributedModelParallel(model, device=torch.device("cpu"), plan=plan,
                                       sharders=[EmbeddingCollectionSharder()])
        dense = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(dmp.named_parameters())),
                                      lambda ps: torch.optim.AdamW(ps, lr=0.01))
        return dmp, CombinedOptimizer([dmp.fused_optimizer, dense])

    def batch(step: int) -> KeyedJaggedTensor:
        g = torch.Generator().manual_seed(100 * step + rank)
        return KeyedJaggedTensor.from_lengths_sync(
            keys=["item_id"], values=torch.randint(0, 64, (12,), generator=g), lengths=torch.tensor([5, 7])
        )

    def train(model, optimizer, steps: range) -> List[float]:
        losses = []
        for step in steps:
            optimizer.zero_grad()
            loss = model(batch(step))
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return losses

    def state(model, optimizer) -> dict:
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                f"rank_{rank}": {"rng": rng_state()}}

    manager = CheckpointManager(root, keep_last=2)
    model, optimizer = build(seed=0)
    train(model, optimizer, range(3))
    manager.save(3, state(model, optimizer))
    expected = train(model, optimizer, range(3, 6))

    model, optimizer = build(seed=1)
    # AdamW creates its state lazily; DCP loads in place, so the state must exist first.
    optimizer.init_state()
    restored = state(model, optimizer)
    manager.load(manager.latest(), restored)
    optimizer.load_state_dict(restored["optimizer"])
    set_rng_state(restored[f"rank_{rank}"]["rng"])
    assert train(model, optimizer, range(3, 6)) == expected
    dist.destroy_process_group()


@pytest.mark.slow
def test_sharded_model_and_fused_optimizer_resume_exactly_on_two_ranks(tmp_path: Path) -> None:
    mp.spawn(_sharded_resume_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)


def test_clear_removes_complete_and_half_written_checkpoints_only(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    manager.save(1, _linear_state(1))
    manager.save(2, _linear_state(2))
    (tmp_path / ".tmp-step_000000003").mkdir()
    (tmp_path / "notes.txt").write_text("kept")
    assert manager.clear() == 2
    assert manager.latest() is None
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
