"""Catalogue scale: training and full-catalogue top-K over a row-wise sharded item table, by size.

For each catalogue size of ``--num-items`` (default 100k, 1M and 10M items) it starts two gloo
ranks (``torch.multiprocessing``, one fresh pair per size, so every peak is that size's own) and
builds the retrieval model as the trainer does (``training/trainer.py``: ``make_reader`` and
``build_model`` over a ``TrainConfig``): ``HyTRecRetrieval`` + ``HyTRecRetrievalTrain`` with a
small HyTRec encoder and the sampled softmax (``RetrievalConfig(loss="sampled")``, the reader's
uniform negatives plus in-batch ones), tables on ``meta``, the fused row-wise Adagrad registered
(``apply_sparse_optimizer``), the item table row-wise sharded by ``shard_model`` and AdamW for
the rest (``make_optimizer``). It then measures:

* training throughput: ``--warmup`` steps, then ``--steps`` timed steps of
  ``TrainPipelineSparseDist`` (``make_pipeline`` / ``train_epoch``); one step is the time
  between two consecutive steps' ends (the slower rank's), its events the tokens of both ranks'
  real batches; events/s is printed as min/median/max over the timed steps;
* per-rank peak memory: the resident-set high-water mark (``VmHWM`` of ``/proc/self/status``) of
  each rank at the end of the top-K timing, and its rise over the rank's baseline taken after
  the process group is up and before the model is built; the glibc allocator is set up as the
  training entry point sets it (``init_distributed``), so freed memory stays resident and the
  mark is the true peak;
* full-catalogue evaluation over the sharded table, for ``--eval-users`` users (split over the
  ranks; their states are the trained model's on the test split, through the same pipeline in
  evaluation mode): ``retrieve_topk`` (top-``--k`` items; every rank scores all ranks' queries
  against its rows, the per-rank top-K are merged) and ``catalogue_ranks`` (the rank of each
  user's ``k``-th item among the whole catalogue), timed in turns (``benchmarks/timing.py``).

Checks, printed with the figures: the rank of each user's ``k``-th item is ``k - 1`` (top-K and
ranks agree); and, for catalogues of at most ``--check-max-items`` items, the sharded top-K equals
the top-K over the full table gathered from both ranks (the gather happens after the memory is
read, so it does not inflate the peak).

The data is a seeded synthetic set per size, written to Parquet in a temporary directory
(``write_sequences``) and read by ``SequenceReader``: log-normal history lengths (median
``--median-length``, at most ``--max-length``), item ids half log-uniform (Zipf exponent 1) and
half uniform over ``[1, num_items]``, scattered over the id range by a fixed permutation so that
popular items fall on both shards; enough users for the warm-up and timed steps in one epoch.
Each rank seeds its RNG with ``--seed`` plus its rank: TorchRec initialises every rank's table
shard from the global RNG, so under one seed on every rank (as ``Trainer`` seeds) the two shards
start as copies of one another (rank 1's row ``j + 1`` equals rank 0's row ``j``) and their exact
ties would blur the top-K comparison.

Memory: the table plus row-wise Adagrad state is ``(num_items + 1) * (4 * dim + 4)`` bytes split
over the ranks (10M x 64: 2.6 GB). A size whose estimate (twice that, for the initialisation,
plus 1 GiB per rank) would pass ``--memory-budget-gib`` is run at the largest halved dimension
that fits, and that is printed.

The load average is printed at the start and the end (the machines here are shared).

    python benchmarks/bench_catalogue.py                  # 100k, 1M, 10M items (minutes)
    python benchmarks/bench_catalogue.py --quick          # 10k, 100k items, few steps (seconds)
    python benchmarks/bench_catalogue.py --num-items 1000000 --steps 40 --json out.json
"""

import argparse
import dataclasses
import itertools
import json
import math
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from timing import Spread, load_average, memory_kib, time_in_turns

from torchrec_hytrec.data.parquet import write_sequences
from torchrec_hytrec.data.reader import ReaderConfig
from torchrec_hytrec.data.schema import SequenceDatasetInfo, Sequences
from torchrec_hytrec.data.splits import Split
from torchrec_hytrec.models.evaluation import catalogue_ranks
from torchrec_hytrec.models.item_table import all_gather_rows, item_collection, item_table_shards
from torchrec_hytrec.models.retrieval import RetrievalConfig
from torchrec_hytrec.models.serving import retrieve_topk
from torchrec_hytrec.models.sharding import shard_model
from torchrec_hytrec.modules import HyTRecConfig
from torchrec_hytrec.training.config import DataConfig, ModelConfig, TrainConfig
from torchrec_hytrec.training.distributed import configure_threads, init_distributed
from torchrec_hytrec.training.loop import batch_weight, evaluation_outputs, make_pipeline, train_epoch
from torchrec_hytrec.training.optimizer import OptimizerConfig, apply_sparse_optimizer, make_optimizer
from torchrec_hytrec.training.trainer import build_model, make_reader

WORLD = 2
GIB = 2**30
# Per-rank memory besides the table in the estimate: interpreter, torch, TorchRec, the encoder.
_RANK_OVERHEAD_BYTES = GIB


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """What one catalogue size's ranks run (picklable, handed to the spawned workers).

    Args:
        num_items: catalogue size.
        dim: embedding width of the tables and the encoder.
        data_path: the Parquet file.
        out_dir: where each rank writes its ``rank<r>.json``.
        port: the process group's TCP port.
        warmup: untimed training steps.
        steps: timed training steps.
        max_tokens: most events in one rank's training batch.
        max_seq_len: most events of one training row.
        num_negatives: uniform negatives per batch of the sampled softmax.
        eval_users: users of the top-K evaluation, all ranks together.
        eval_seq_len: most events of an evaluation history.
        k: items retrieved per user.
        repeats: timed repeats of the top-K and of the ranks.
        check_max_items: the gathered-table check runs up to this catalogue size.
        seed: data order, negatives and parameter seed.
    """

    num_items: int
    dim: int
    data_path: str
    out_dir: str
    port: int
    warmup: int
    steps: int
    max_tokens: int
    max_seq_len: int
    num_negatives: int
    eval_users: int
    eval_seq_len: int
    k: int
    repeats: int
    check_max_items: int
    seed: int


def free_port() -> int:
    """A TCP port free on the loopback interface now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def table_bytes(num_items: int, dim: int) -> int:
    """Bytes of the fp32 item table plus its row-wise Adagrad state (one float per row)."""
    return (num_items + 1) * (4 * dim + 4)


def memory_estimate(num_items: int, dim: int) -> int:
    """Bytes all ranks together are expected to peak at: the table and its optimizer state twice
    (room for the initialisation) plus a fixed overhead per rank."""
    return 2 * table_bytes(num_items, dim) + WORLD * _RANK_OVERHEAD_BYTES


def fitting_dim(num_items: int, dim: int, budget_bytes: float) -> int:
    """``dim``, halved until :func:`memory_estimate` fits ``budget_bytes`` (at least 4, a width
    the encoder's two heads split into even halves)."""
    while dim > 4 and memory_estimate(num_items, dim) > budget_bytes:
        dim //= 2
    return dim


def synthetic_sequences(
    num_items: int, train_tokens: int, median_length: float, max_length: int, seed: int
) -> Sequences:
    """Seeded histories holding at least ``train_tokens`` training events (all but each user's last
    two), item ids over the whole catalogue (see the module docstring).

    Args:
        num_items: item ids are ``1..num_items``.
        train_tokens: training events to hold at least.
        median_length: median events per user (log-normal, shape 1).
        max_length: longest history.
        seed: random seed.

    Returns:
        The sequences, users ``0..U-1`` in order, timestamps in seconds.
    """
    rng = np.random.default_rng(seed)
    # Every user holds at least 2 training events, so this many users always suffice.
    drawn = rng.lognormal(np.log(median_length), 1.0, train_tokens // 2 + 1)
    lengths = np.clip(np.rint(drawn), 4, max_length).astype(np.int64)
    users = int(np.searchsorted(np.cumsum(lengths - 2), train_tokens)) + 1
    if users > lengths.size:
        raise ValueError(f"could not draw {train_tokens} training events from {lengths.size} users")
    lengths = lengths[:users]
    offsets = np.r_[0, np.cumsum(lengths)]
    n = int(offsets[-1])
    popular = np.minimum(np.exp(rng.random(n) * np.log(num_items)).astype(np.int64), num_items)
    ranks = np.where(rng.random(n) < 0.5, popular, rng.integers(1, num_items + 1, n))
    # i -> (i * stride) mod N is a permutation of the ids when gcd(stride, N) = 1.
    stride = int(num_items * 0.6180339887) | 1
    while math.gcd(stride, num_items) != 1:
        stride += 2
    item_ids = (ranks - 1) * stride % num_items + 1
    elapsed = np.cumsum(rng.lognormal(np.log(3600.0), 1.5, n).astype(np.int64) + 1)
    timestamps = 1_600_000_000 + elapsed - np.repeat(elapsed[offsets[:-1]], lengths)
    return Sequences(
        user_ids=np.arange(users, dtype=np.int64),
        offsets=offsets,
        item_ids=item_ids.astype(np.int64),
        timestamps=timestamps.astype(np.int64),
    )


def train_config(spec: RunSpec) -> TrainConfig:
    """The trainer's config of one size: a small HyTRec encoder, sampled softmax, row-wise tables."""
    eval_per_rank = math.ceil(spec.eval_users / WORLD)
    return TrainConfig(
        seed=spec.seed,
        data=DataConfig(
            path=spec.data_path,
            train=ReaderConfig(max_tokens=spec.max_tokens, max_seq_len=spec.max_seq_len, shuffle=True),
            eval=ReaderConfig(
                max_tokens=eval_per_rank * spec.eval_seq_len,
                max_seq_len=spec.eval_seq_len,
                max_batch_size=eval_per_rank,
            ),
        ),
        model=ModelConfig(
            encoder=HyTRecConfig.hytrec(embedding_dim=spec.dim),
            retrieval=RetrievalConfig(loss="sampled", num_uniform_negatives=spec.num_negatives),
            sharding="row_wise",
        ),
        optim=OptimizerConfig(sparse_optimizer="rowwise_adagrad", sparse_lr=0.05, dense_lr=1e-3),
    )


def worker(rank: int, spec: RunSpec) -> None:
    """One rank of one catalogue size: trains, evaluates and writes ``rank<r>.json``.

    Args:
        rank: this process's rank (``mp.spawn`` passes it first).
        spec: the run.
    """
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(WORLD),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(spec.port),
    )
    env = init_distributed()
    threads = configure_threads()
    # One seed per rank: each rank initialises its table shard from the global RNG, so under one
    # seed on every rank the shards would start as copies of one another (DDP broadcasts the dense
    # parameters from rank 0 either way).
    torch.manual_seed(spec.seed + rank)
    group = dist.GroupMember.WORLD
    out: Dict[str, Any] = {"rank": rank, "threads": threads, "memory_baseline_kib": memory_kib()}

    cfg = train_config(spec)
    data_path = Path(spec.data_path)
    reader = make_reader(cfg, data_path, Split.TRAIN)
    started = time.perf_counter()
    model = build_model(cfg, reader)
    apply_sparse_optimizer(model, cfg.optim)
    sharded = shard_model(model, cfg.model.sharding, device=env.device)
    optimizer = make_optimizer(sharded, cfg.optim)
    pipeline = make_pipeline(sharded, optimizer, env.device)
    dist.barrier()
    out["setup_s"] = time.perf_counter() - started
    shards, is_sharded = item_table_shards(item_collection(sharded))
    if not is_sharded:
        raise RuntimeError("the item table was not sharded")
    out["shards"] = [(row0, int(rows.shape[0])) for row0, rows in shards]
    out["memory_sharded_kib"] = memory_kib()

    # Training: stamps at every step's end; a timed step is the gap between two stamps.
    reader.set_epoch(0)
    batches = spec.warmup + spec.steps + 1
    if reader.num_batches() < batches:
        raise RuntimeError(f"the data holds {reader.num_batches()} batches per rank, {batches} needed")
    stamps: List[float] = []
    events: List[int] = []

    def on_step(outputs: Any) -> None:
        events.append(int(outputs.lengths.sum()) if batch_weight(outputs) > 0 else 0)
        stamps.append(time.perf_counter())

    losses = train_epoch(pipeline, sharded, itertools.islice(reader, batches), on_step)
    step_s = torch.tensor(np.diff(stamps)[spec.warmup :], dtype=torch.float64)
    step_events = torch.tensor(events[spec.warmup + 1 :], dtype=torch.float64)
    dist.all_reduce(step_s, op=dist.ReduceOp.MAX)
    dist.all_reduce(step_events)
    out["step_s"] = step_s.tolist()
    out["step_events"] = step_events.tolist()
    out["losses"] = [losses[0], losses[-1]]
    out["memory_trained_kib"] = memory_kib()

    # Users' states: the first test-split batch of every rank, through the pipeline.
    eval_reader = make_reader(cfg, data_path, Split.TEST)
    eval_reader.set_epoch(0)
    (outputs,) = list(evaluation_outputs(pipeline, sharded, itertools.islice(eval_reader, 1)))
    query = outputs.query[outputs.weights > 0].contiguous()
    users = torch.tensor([query.shape[0]])
    dist.all_reduce(users)
    out["eval_users"] = int(users)

    k = spec.k
    with torch.no_grad():
        scores, ids = retrieve_topk(query, shards, k, group)

        def ranks_of_kth() -> torch.Tensor:
            return catalogue_ranks(
                query=query,
                target_ids=ids[:, -1],
                target_score=scores[:, -1],
                shards=shards,
                process_group=group,
            )

        fns = {
            "topk": lambda: retrieve_topk(query, shards, k, group),
            "ranks": ranks_of_kth,
        }
        spreads = time_in_turns(fns, {name: spec.repeats for name in fns}, env.device)
        out["memory_end_kib"] = memory_kib()
        ranks = ranks_of_kth()
        wrong = torch.tensor([int((ranks != k - 1).sum())])
        dist.all_reduce(wrong)
        out["ranks_wrong"] = int(wrong)
        out["topk_ms"] = dataclasses.asdict(spreads["topk"])
        out["ranks_ms"] = dataclasses.asdict(spreads["ranks"])
        out["gathered_check"] = gathered_check(query, scores, ids, shards, spec, group)
    out["load_average"] = load_average()
    Path(spec.out_dir, f"rank{rank}.json").write_text(json.dumps(out))
    dist.barrier()
    dist.destroy_process_group()


def gathered_check(
    query: torch.Tensor,
    scores: torch.Tensor,
    ids: torch.Tensor,
    shards: List[Tuple[int, torch.Tensor]],
    spec: RunSpec,
    group: dist.ProcessGroup,
) -> Optional[Dict[str, bool]]:
    """Compares the sharded top-K with the top-K over the whole table gathered from every rank
    (collective); ``None`` (skipped on every rank) above ``spec.check_max_items``.

    Returns:
        ``{"ids_equal", "scores_close"}`` of this rank's users, all ranks' verdicts combined.
    """
    if spec.num_items > spec.check_max_items:
        return None
    if len(shards) != 1:
        raise RuntimeError(f"expected one row shard per rank, got {len(shards)}")
    (row0, rows), dim = shards[0], shards[0][1].shape[1]
    gathered, counts = all_gather_rows(rows, group)
    starts, _ = all_gather_rows(torch.tensor([row0]), group)
    full = gathered.new_full((spec.num_items + 1, dim), float("nan"))
    offset = 0
    for start, count in zip(starts.tolist(), counts):
        full[start : start + count] = gathered[offset : offset + count]
        offset += count
    if bool(full.isnan().any()):
        raise RuntimeError("the gathered row shards do not cover the table")
    want_scores, want_ids = retrieve_topk(query, [(0, full)], spec.k)
    verdict = torch.tensor(
        [
            int(not torch.equal(ids, want_ids)),
            int(not torch.allclose(scores, want_scores, rtol=1e-5, atol=1e-6)),
        ]
    )
    dist.all_reduce(verdict)
    return {"ids_equal": int(verdict[0]) == 0, "scores_close": int(verdict[1]) == 0}


def run_size(num_items: int, args: argparse.Namespace) -> Dict[str, Any]:
    """Writes the data of one catalogue size, runs its two ranks, returns its merged row."""
    dim = fitting_dim(num_items, args.dim, args.memory_budget_gib * GIB)
    if dim != args.dim:
        print(
            f"{num_items:,} items: the estimate at dim {args.dim} "
            f"({memory_estimate(num_items, args.dim) / GIB:.1f} GiB) passes the "
            f"{args.memory_budget_gib:g} GiB budget; running at dim {dim} "
            f"({memory_estimate(num_items, dim) / GIB:.1f} GiB)",
            flush=True,
        )
    batches = args.warmup + args.steps + 1
    eval_per_rank = math.ceil(args.eval_users / WORLD)
    # Greedy packing fills a batch to at least max_tokens - max_seq_len: 1.5x is ample.
    train_tokens = int(1.5 * WORLD * batches * args.max_tokens)
    with tempfile.TemporaryDirectory(prefix="bench_catalogue_") as tmp:
        started = time.perf_counter()
        seqs = synthetic_sequences(num_items, train_tokens, args.median_length, args.max_length, args.seed)
        if seqs.num_users < WORLD * eval_per_rank:
            raise ValueError(f"{seqs.num_users} users: fewer than --eval-users {args.eval_users}")
        path = Path(tmp) / "sequences.parquet"
        info = write_sequences(path, seqs, SequenceDatasetInfo(num_items=num_items), args.row_group_size)
        data_s = time.perf_counter() - started
        spec = RunSpec(
            num_items=num_items,
            dim=dim,
            data_path=str(path),
            out_dir=tmp,
            port=free_port(),
            warmup=args.warmup,
            steps=args.steps,
            max_tokens=args.max_tokens,
            max_seq_len=args.max_seq_len,
            num_negatives=args.num_negatives,
            eval_users=args.eval_users,
            eval_seq_len=args.eval_seq_len,
            k=args.k,
            repeats=args.repeats,
            check_max_items=args.check_max_items,
            seed=args.seed,
        )
        started = time.perf_counter()
        mp.spawn(worker, args=(spec,), nprocs=WORLD, join=True)
        run_s = time.perf_counter() - started
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(WORLD)]
    rates = [e / s for e, s in zip(ranks[0]["step_events"], ranks[0]["step_s"])]
    row = {
        "num_items": num_items,
        "dim": dim,
        "table_params": (num_items + 1) * dim,
        "table_and_state_bytes": table_bytes(num_items, dim),
        "users": info.num_users,
        "events": info.num_events,
        "data_s": data_s,
        "run_s": run_s,
        "setup_s": max(r["setup_s"] for r in ranks),
        "events_per_s": dataclasses.asdict(Spread.of(rates)),
        "events_per_step": sum(ranks[0]["step_events"]) / len(rates),
        "losses": ranks[0]["losses"],
        "eval_users": ranks[0]["eval_users"],
        "k": args.k,
        "topk_ms": ranks[0]["topk_ms"],
        "ranks_ms": ranks[0]["ranks_ms"],
        "ranks_wrong": ranks[0]["ranks_wrong"],
        "gathered_check": ranks[0]["gathered_check"],
        "load_average": ranks[0]["load_average"],
        "ranks": [
            {
                "rank": r["rank"],
                "threads": r["threads"],
                "shards": r["shards"],
                "peak_kib": r["memory_end_kib"]["VmHWM"],
                "rise_kib": r["memory_end_kib"]["VmHWM"] - r["memory_baseline_kib"]["VmHWM"],
                "sharded_peak_kib": r["memory_sharded_kib"]["VmHWM"],
                "trained_peak_kib": r["memory_trained_kib"]["VmHWM"],
            }
            for r in ranks
        ],
    }
    print(describe(row), flush=True)
    return row


def _spread(d: Dict[str, float], scale: float = 1.0, digits: int = 0) -> str:
    return "/".join(f"{d[key] * scale:,.{digits}f}" for key in ("min", "median", "max"))


def _check(row: Dict[str, Any]) -> str:
    ranks_ok = "ranks ok" if row["ranks_wrong"] == 0 else f"{row['ranks_wrong']} ranks off"
    check = row["gathered_check"]
    if check is None:
        return f"{ranks_ok}, gathered check skipped"
    same = check["ids_equal"] and check["scores_close"]
    return f"{ranks_ok}, {'= gathered' if same else '!= GATHERED'}"


def describe(row: Dict[str, Any]) -> str:
    """The lines printed when one catalogue size is done."""
    mib = 2**10
    lines = [
        f"{row['num_items']:,} items x dim {row['dim']}: item table {row['table_params']:,} parameters "
        f"({row['table_and_state_bytes'] / GIB:.2f} GiB with row-wise Adagrad state); data "
        f"{row['users']:,} users, {row['events']:,} events (written in {row['data_s']:.1f} s); "
        f"set-up (build + shard) {row['setup_s']:.1f} s, whole run {row['run_s']:.1f} s",
        f"  train: {row['events_per_step']:,.0f} events per step (both ranks), events/s "
        f"min/median/max {_spread(row['events_per_s'])}; "
        f"loss {row['losses'][0]:.3f} -> {row['losses'][1]:.3f}",
    ]
    for r in row["ranks"]:
        shards = ", ".join(f"rows {row0:,}-{row0 + n - 1:,}" for row0, n in r["shards"])
        lines.append(
            f"  rank {r['rank']} ({r['threads']} thread(s), {shards}): "
            f"peak RSS {r['peak_kib'] / mib:,.0f} MiB, "
            f"+{r['rise_kib'] / mib:,.0f} MiB over its baseline (peak after sharding "
            f"{r['sharded_peak_kib'] / mib:,.0f}, after training {r['trained_peak_kib'] / mib:,.0f} MiB)"
        )
    lines.append(
        f"  full-catalogue eval of {row['eval_users']} users over the sharded table: top-{row['k']} "
        f"{_spread(row['topk_ms'], digits=1)} ms, ranks {_spread(row['ranks_ms'], digits=1)} ms "
        f"(min/median/max); {_check(row)}; load average {row['load_average']}"
    )
    return "\n".join(lines)


def table(rows: List[Dict[str, Any]]) -> str:
    """The summary: one row per catalogue size."""
    head = (
        "| items | dim | table params | events/s (min/median/max) | peak RSS rank 0 / 1 (rise), MiB "
        "| top-K ms (median) | ranks ms (median) | check |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in rows:
        peaks = " / ".join(
            f"{r['peak_kib'] / 2**10:,.0f} (+{r['rise_kib'] / 2**10:,.0f})" for r in row["ranks"]
        )
        cells = [
            f"{row['num_items']:,}",
            str(row["dim"]),
            f"{row['table_params']:,}",
            _spread(row["events_per_s"]),
            peaks,
            f"{row['topk_ms']['median']:,.1f}",
            f"{row['ranks_ms']['median']:,.1f}",
            _check(row),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-items", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    p.add_argument("--quick", action="store_true", help="10k and 100k items, few steps: seconds")
    p.add_argument("--dim", type=int, default=64, help="table and encoder width")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=20, help="timed training steps")
    p.add_argument("--max-tokens", type=int, default=4096, help="events per rank's training batch")
    p.add_argument("--max-seq-len", type=int, default=1024)
    p.add_argument("--median-length", type=float, default=200.0)
    p.add_argument("--max-length", type=int, default=2000)
    p.add_argument("--num-negatives", type=int, default=1024, help="uniform negatives per batch")
    p.add_argument("--eval-users", type=int, default=256, help="users of the top-K evaluation, all ranks")
    p.add_argument("--eval-seq-len", type=int, default=256)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3, help="timed repeats of top-K and ranks")
    p.add_argument("--check-max-items", type=int, default=1_000_000, help="largest size checked vs gathered")
    p.add_argument("--memory-budget-gib", type=float, default=16.0)
    p.add_argument("--row-group-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args()
    if args.quick:
        args.num_items = [10_000, 100_000]
        args.warmup, args.steps, args.max_tokens, args.max_seq_len = 1, 4, 1024, 512
        args.median_length, args.max_length = 60.0, 600
        args.num_negatives, args.eval_users, args.k, args.repeats = 256, 32, 20, 2

    print(f"load average {load_average()} at the start", flush=True)
    print(
        f"{WORLD} gloo ranks, item table row-wise sharded; HyTRec encoder (TTTA) dim {args.dim}, sampled "
        f"softmax ({args.num_negatives} uniform + in-batch negatives), row-wise Adagrad + AdamW; "
        f"{args.warmup} warm-up + {args.steps} timed steps of <= {args.max_tokens} events per rank",
        flush=True,
    )
    rows = [run_size(n, args) for n in args.num_items]
    print(table(rows))
    print(f"load average {load_average()} at the end", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
