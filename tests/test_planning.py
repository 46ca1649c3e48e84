"""Dry-run sharding plans (training/planning.py): no process group, tables on ``meta``."""

import doctest
from typing import List, Tuple

import pytest

from torchrec_hytrec.training import planning
from torchrec_hytrec.training.planning import (
    GIB,
    PlanDoesNotFit,
    PlanResult,
    TablePlan,
    format_plan,
    main,
    plan_tables,
)

NUM_ITEMS = 100_000_000
DIM = 128
TOPOLOGY = {"world_size": 64, "local_world_size": 8}


def _plan_100m(**overrides: object) -> PlanResult:
    kwargs = {"mean_history_length": 1000, "batch_size": 128, "side_features": {"category": 1000}}
    kwargs.update(TOPOLOGY)
    kwargs.update(overrides)
    return plan_tables(NUM_ITEMS, DIM, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def plan_100m() -> PlanResult:
    return _plan_100m()


def _intervals(table: TablePlan, axis: int) -> List[Tuple[int, int]]:
    return sorted({(s.offsets[axis], s.offsets[axis] + s.sizes[axis]) for s in table.shards})


def test_every_row_lies_in_exactly_one_shard(plan_100m: PlanResult) -> None:
    item = plan_100m.table("item")
    assert item.rows == NUM_ITEMS + 1 and item.dim == DIM
    assert not item.replicated
    # Row ranges: consecutive, disjoint, from row 0 to the last row. Each row range is split into
    # column ranges that tile the width (one range of the full width unless column-wise).
    rows = _intervals(item, 0)
    assert rows[0][0] == 0 and rows[-1][1] == item.rows
    assert all(prev[1] == nxt[0] for prev, nxt in zip(rows, rows[1:]))
    for start, stop in rows:
        block = [s for s in item.shards if s.offsets[0] == start]
        assert all(s.sizes[0] == stop - start for s in block)
        cols = sorted((s.offsets[1], s.offsets[1] + s.sizes[1]) for s in block)
        assert cols[0][0] == 0 and cols[-1][1] == DIM
        assert all(prev[1] == nxt[0] for prev, nxt in zip(cols, cols[1:]))
    assert sum(s.sizes[0] * s.sizes[1] for s in item.shards) == item.rows * DIM
    assert set(item.ranks) <= set(range(64))


def test_per_rank_memory_is_below_the_cap(plan_100m: PlanResult) -> None:
    assert len(plan_100m.ranks) == 64
    assert plan_100m.hbm_cap_bytes == 80 * GIB
    for rank in plan_100m.ranks:
        assert 0 < rank.hbm_bytes <= plan_100m.planning_hbm_bytes < plan_100m.hbm_cap_bytes
        assert rank.ddr_bytes <= plan_100m.ddr_cap_bytes
    # Every row's weights (fp32) and row-wise Adagrad state (one fp32 per row) are counted.
    item = plan_100m.table("item")
    assert item.hbm_bytes >= item.rows * (DIM + 1) * 4
    assert plan_100m.table("category").pooling_factors == (1000.0,)
    assert plan_100m.table("item").feature_names == ("item_id", "target_item_id", "candidate_item_id")


def test_optimizer_state_is_counted() -> None:
    small = {"world_size": 2, "plan_kind": "row_wise", "candidates_per_batch": 0}
    bytes_by_opt = {
        opt: plan_tables(10_000, 16, mean_history_length=10, batch_size=8, optimizer=opt, **small)
        .table("item")
        .hbm_bytes
        for opt in ("none", "rowwise_adagrad", "adagrad")
    }
    weights = 10_001 * 16 * 4
    assert bytes_by_opt["rowwise_adagrad"] - bytes_by_opt["none"] == pytest.approx(weights / 16, abs=8)
    assert bytes_by_opt["adagrad"] - bytes_by_opt["none"] == pytest.approx(weights, abs=8)


def test_pooling_factor_changes_the_estimates(plan_100m: PlanResult) -> None:
    one = _plan_100m(mean_history_length=1)
    assert one.table("item").pooling_factors[0] == 1.0
    assert plan_100m.table("item").pooling_factors[0] == 1000.0
    # A thousand ids per sample move a thousand times the rows: more comms, compute and buffers.
    assert plan_100m.max_rank_perf_ms > 10 * one.max_rank_perf_ms
    assert plan_100m.table("item").perf_ms > 10 * one.table("item").perf_ms
    assert plan_100m.max_hbm_bytes > one.max_hbm_bytes


def test_billion_rows_fit_only_with_enough_memory() -> None:
    kwargs = {"mean_history_length": 1000, "batch_size": 128}
    on_one_host = plan_tables(1_000_000_000, DIM, world_size=8, compute_kernels=["fused"], **kwargs)
    assert on_one_host.max_hbm_bytes <= on_one_host.planning_hbm_bytes
    with pytest.raises(PlanDoesNotFit, match="insufficient storage"):
        plan_tables(1_000_000_000, DIM, world_size=4, compute_kernels=["fused"], **kwargs)
    # The same 4 GPUs fit once the table may live in host memory behind an HBM cache.
    cached = plan_tables(1_000_000_000, DIM, world_size=4, **kwargs)
    assert cached.table("item").compute_kernel == "fused_uvm_caching"
    assert 0 < cached.max_ddr_bytes <= cached.ddr_cap_bytes


def test_cpu_plans_fused_kernels_in_host_memory() -> None:
    result = plan_tables(
        100_000,
        32,
        mean_history_length=50,
        batch_size=16,
        world_size=2,
        compute_device="cpu",
        side_features={"category": 100},
    )
    assert result.hbm_cap_bytes == 0
    assert {t.compute_kernel for t in result.tables} == {"fused"}
    assert all(r.hbm_bytes == 0 and r.ddr_bytes > 0 for r in result.ranks)
    with pytest.raises(ValueError, match="needs a GPU"):
        plan_tables(
            10, 8, mean_history_length=5, batch_size=2, world_size=2, compute_device="cpu", optimizer="adam"
        )


def test_bad_topology_is_rejected() -> None:
    with pytest.raises(ValueError, match="must divide"):
        plan_tables(10, 8, mean_history_length=5, batch_size=2, world_size=6, local_world_size=4)


def test_format_plan(plan_100m: PlanResult) -> None:
    text = format_plan(plan_100m)
    assert "64 cuda ranks (8 hosts x 8)" in text
    assert "item_id 1000" in text and "row_wise" in text
    assert "max HBM/rank" in text and "max per-rank perf" in text
    assert len(format_plan(plan_100m, with_stats=True).splitlines()) > len(text.splitlines())


def test_cli(capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "--num-items",
        "100000000",
        "--dim",
        "128",
        "--world-size",
        "64",
        "--local-world-size",
        "8",
        "--mean-history-length",
        "1000",
        "--batch-size",
        "128",
        "--side-feature",
        "category=1000",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "item: 100,000,001 x 128" in out and "category: 1,000 x 128" in out
    too_small = [
        "--num-items",
        "1000000000",
        "--dim",
        "128",
        "--world-size",
        "2",
        "--mean-history-length",
        "10",
        "--batch-size",
        "8",
        "--compute-kernels",
        "fused",
    ]
    assert main(too_small) == 1
    assert "No plan fits" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--mean-history-length" in capsys.readouterr().out


def test_docstring_examples() -> None:
    failures, tried = doctest.testmod(planning, optionflags=doctest.ELLIPSIS)
    assert tried > 0 and failures == 0
