"""Sharded (DistributedModelParallel, 2 gloo ranks) equals unsharded: loss, one step, evaluation."""

import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import NUM_ITEMS, TINY_JOB, free_port, make_batch
from test_models_ranking import USER_BUCKETS, make_ranker
from test_models_retrieval import make_retrieval
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.distributed.model_parallel import DistributedModelParallel

from torchrec_hytrec.data.ranking import ranking_batch_from_sequences
from torchrec_hytrec.models.evaluation import RetrievalEvaluator
from torchrec_hytrec.models.item_table import item_collection, item_table_shards
from torchrec_hytrec.models.serving import retrieve_topk
from torchrec_hytrec.models.sharding import shard_model, sharding_constraints
from torchrec_hytrec.training.config import load_config
from torchrec_hytrec.training.distributed import init_distributed
from torchrec_hytrec.training.optimizer import (
    OptimizerConfig,
    apply_sparse_optimizer,
    make_dense_optimizer,
    make_optimizer,
)
from torchrec_hytrec.training.trainer import Trainer

WORLD = 2
OPT = OptimizerConfig(sparse_optimizer="rowwise_adagrad", sparse_lr=0.1, dense_lr=0.01)


def _spawn(worker: Callable[..., None], *args: object) -> None:
    mp.spawn(worker, args=(free_port(), *args), nprocs=WORLD, join=True)


def _init(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)


def _copy_into(sharded: DistributedModelParallel, reference: Dict[str, torch.Tensor]) -> None:
    """Writes the unsharded weights into the sharded model: each rank its own shards."""
    with torch.no_grad():
        for key, value in sharded.state_dict().items():
            if isinstance(value, ShardedTensor):
                for shard in value.local_shards():
                    (row, col), (rows, cols) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                    shard.tensor.copy_(reference[key][row : row + rows, col : col + cols])
            else:
                value.copy_(reference[key])


def _assert_weights_equal(sharded: DistributedModelParallel, reference: Dict[str, torch.Tensor]) -> List[str]:
    """Compares every local shard and every dense tensor; returns the keys of sharded tables."""
    tables = []
    for key, value in sharded.state_dict().items():
        if isinstance(value, ShardedTensor):
            tables.append(key)
            for shard in value.local_shards():
                (row, col), (rows, cols) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                want = reference[key][row : row + rows, col : col + cols]
                torch.testing.assert_close(
                    shard.tensor, want, atol=1e-5, rtol=1e-4, msg=lambda m: f"{key}: {m}"
                )
        else:
            torch.testing.assert_close(
                value, reference[key], atol=1e-5, rtol=1e-4, msg=lambda m: f"{key}: {m}"
            )
    return tables


def _sharded_and_reference(
    build: Callable[[], nn.Module], plan_kind: str, opt: OptimizerConfig = OPT
) -> Tuple[DistributedModelParallel, nn.Module]:
    reference = build()
    apply_sparse_optimizer(reference, opt)
    model = build()
    apply_sparse_optimizer(model, opt)
    sharded = shard_model(model, plan_kind, device=torch.device("cpu"))
    _copy_into(sharded, reference.state_dict())
    return sharded, reference


def one_step_worker(
    rank: int,
    port: int,
    build: Callable[[], nn.Module],
    make_batches: Callable[[], list],
    plan_kind: str,
    opt: OptimizerConfig = OPT,
) -> None:
    _init(rank, port)
    sharded, reference = _sharded_and_reference(build, plan_kind, opt)
    optimizer = make_optimizer(sharded, opt)
    reference_dense = make_dense_optimizer(reference, opt)
    batches = make_batches()
    initial = {k: v.clone() for k, v in reference.state_dict().items()}

    torch.manual_seed(100 + rank)  # in-batch negatives come from the global RNG
    loss, _ = sharded(batches[rank])
    loss.backward()
    optimizer.step()

    # The data-parallel loss is the mean of the ranks' losses (DDP averages dense gradients).
    reference_losses = []
    for r, batch in enumerate(batches):
        torch.manual_seed(100 + r)
        reference_losses.append(reference(batch)[0])
    torch.stack(reference_losses).mean().backward()
    reference_dense.step()

    torch.testing.assert_close(loss.detach(), reference_losses[rank].detach())
    after = reference.state_dict()
    tables = _assert_weights_equal(sharded, after)
    assert tables, "no table was sharded"
    changed = {k for k in after if not torch.equal(after[k], initial[k])}
    assert set(tables) <= changed and len(changed) > len(tables), (
        "the step must move tables and dense weights"
    )
    dist.destroy_process_group()


def _retrieval_full() -> nn.Module:
    return make_retrieval("full", seed=0)


def _retrieval_sampled() -> nn.Module:
    return make_retrieval("sampled", seed=0, num_uniform_negatives=8, num_in_batch_negatives=16)


def _retrieval_batches() -> list:
    return [make_batch([6, 3, 9], seed=10), make_batch([4, 12], seed=11)]


def _sampled_batches() -> list:
    return [
        make_batch([6, 3, 9], seed=10, candidates="uniform"),
        make_batch([4, 12], seed=11, candidates="uniform"),
    ]


@pytest.mark.slow
@pytest.mark.parametrize(
    "plan_kind,build,batches,sparse_optimizer",
    [
        ("row_wise", _retrieval_full, _retrieval_batches, "rowwise_adagrad"),
        ("table_wise", _retrieval_sampled, _sampled_batches, "adagrad"),
    ],
    ids=["row_wise", "table_wise"],
)
def test_retrieval_sharded_step_equals_unsharded(
    plan_kind: str, build: Callable[[], nn.Module], batches: Callable[[], list], sparse_optimizer: str
) -> None:
    opt = OptimizerConfig(sparse_optimizer=sparse_optimizer, sparse_lr=0.1, dense_lr=0.01)
    _spawn(one_step_worker, build, batches, plan_kind, opt)


def _ranker_batches() -> list:
    generator = torch.Generator().manual_seed(0)
    return [
        ranking_batch_from_sequences(
            make_batch(lengths, seed=seed),
            num_items=NUM_ITEMS,
            num_negatives=2,
            user_buckets=USER_BUCKETS,
            generator=generator,
        )
        for lengths, seed in (([5, 8, 3], 30), ([9, 4], 31))
    ]


@pytest.mark.slow
def test_ranker_sharded_step_equals_unsharded() -> None:
    """Item EmbeddingCollection row-wise, pooled EmbeddingBagCollection table-wise (CPU)."""
    _spawn(one_step_worker, make_ranker, _ranker_batches, "row_wise")


def checkpoint_worker(rank: int, port: int) -> None:
    _init(rank, port)
    batches = _retrieval_batches()
    models, optimizers = [], []
    for _ in range(3):
        model = _retrieval_full()
        apply_sparse_optimizer(model, OPT)
        models.append(shard_model(model, "row_wise", device=torch.device("cpu")))
        optimizers.append(make_optimizer(models[-1], OPT))
    trained, resumed, weights_only = models
    loss, _ = trained(batches[rank])
    loss.backward()
    optimizers[0].step()

    state = optimizers[0].state_dict()
    keys = list(state["state"])
    assert any("embeddings.item.weight" in k for k in keys) and any("encoder" in k for k in keys), keys
    for model, optimizer in ((resumed, optimizers[1]), (weights_only, None)):
        if optimizer is not None:
            optimizer.init_state()  # AdamW state is lazy; loading fills existing tensors in place
            optimizer.load_state_dict(state)
        model.load_state_dict(trained.state_dict())

    for model, optimizer in zip(models, optimizers):
        optimizer.zero_grad()
        loss, _ = model(batches[1 - rank])
        loss.backward()
        optimizer.step()
    _assert_weights_equal(resumed, _global_state(trained))
    with pytest.raises(AssertionError):  # without the optimizer state the step differs
        _assert_weights_equal(weights_only, _global_state(trained))
    dist.destroy_process_group()


def _global_state(model: DistributedModelParallel) -> Dict[str, torch.Tensor]:
    """Full tensors of every entry (tables gathered to every rank)."""
    out = {}
    for key, value in model.state_dict().items():
        if isinstance(value, ShardedTensor):
            full = torch.zeros(value.size()) if dist.get_rank() == 0 else None
            value.gather(dst=0, out=full)
            full = full if full is not None else torch.zeros(value.size())
            dist.broadcast(full, src=0)
            value = full
        out[key] = value.clone()
    return out


@pytest.mark.slow
def test_combined_optimizer_state_dict_round_trip() -> None:
    _spawn(checkpoint_worker)


def eval_worker(rank: int, port: int) -> None:
    _init(rank, port)
    sharded, reference = _sharded_and_reference(_retrieval_full, "row_wise")
    shards, is_sharded = item_table_shards(sharded.module.model.embedding_collection)
    assert is_sharded and len(shards) == 1 and shards[0][1].shape[0] < 41  # this rank holds part of the rows
    batches = [make_batch([5, 9, 2], seed=20, evaluation=True), make_batch([3, 30], seed=21, evaluation=True)]
    sharded.eval()
    reference.eval()
    for exclude_seen in (False, True):
        evaluator = RetrievalEvaluator(sharded, exclude_seen=exclude_seen)
        reference_evaluator = RetrievalEvaluator(reference, exclude_seen=exclude_seen)
        with torch.no_grad():
            _, outputs = sharded(batches[rank])
            ranks = evaluator.update(outputs)
            reference_ranks = [reference_evaluator.update(reference(b)[1]) for b in batches]
        assert torch.equal(ranks, reference_ranks[rank])
        got, want = evaluator.compute(), reference_evaluator.compute()
        assert got.keys() == want.keys() and got["count"] == 5
        for key in want:
            assert got[key] == pytest.approx(want[key], abs=1e-9), key

    with torch.no_grad():
        _, outputs = sharded(batches[rank])
        scores, ids = retrieve_topk(outputs.query, shards, k=7, process_group=dist.GroupMember.WORLD)
        whole, _ = item_table_shards(reference.model.embedding_collection)
        want_scores, want_ids = retrieve_topk(reference(batches[rank])[1].query, whole, k=7)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(scores, want_scores)
    dist.destroy_process_group()


@pytest.mark.slow
def test_row_wise_sharded_evaluation_equals_unsharded() -> None:
    _spawn(eval_worker)


def test_sharding_constraints_encode_cpu_limits() -> None:
    model = make_ranker()  # EC tables "item", "category"; EBC tables "user_bucket", "recent_items"
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    row_wise = sharding_constraints(model, "row_wise", cpu)
    assert row_wise["item"].sharding_types == ["row_wise"] and row_wise["category"].sharding_types == [
        "row_wise"
    ]
    assert row_wise["user_bucket"].sharding_types == ["table_wise"]  # no row-wise pooled tables on CPU
    assert all(c.compute_kernels == ["fused"] for c in row_wise.values())
    assert sharding_constraints(model, "row_wise", gpu)["user_bucket"].sharding_types == ["row_wise"]
    assert all(
        c.sharding_types == ["table_wise"] for c in sharding_constraints(model, "table_wise", cpu).values()
    )
    auto = sharding_constraints(model, "auto", cpu)
    assert all("data_parallel" not in c.sharding_types for c in auto.values())
    with pytest.raises(ValueError, match="plan_kind"):
        sharding_constraints(model, "column", cpu)


def trainer_tables_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    env = init_distributed()
    overrides = [TINY_JOB[i + 1] for i, a in enumerate(TINY_JOB) if a == "--set"]
    cfg = load_config(overrides=[*overrides, f"out_dir={out_dir}", f"data.cache_dir={out_dir}/data"])
    trainer = Trainer(cfg, env)
    ((start, rows),), sharded = item_table_shards(item_collection(trainer.model))
    assert sharded
    shards: List[Any] = [None] * WORLD
    dist.all_gather_object(shards, (start, rows[:50].clone()))
    dist.destroy_process_group()
    if rank == 0:
        (_, first), (_, second) = shards
        # Every row its own draw: no row of one shard repeats a row of the other.
        assert torch.cdist(first, second).min() > 1e-3


@pytest.mark.slow
def test_trainer_shards_start_from_different_draws(tmp_path: Path) -> None:
    _spawn(trainer_tables_worker, str(tmp_path))
