"""Training entry point: ``python -m torchrec_hytrec.train`` (alone, under torchrun or TorchX).

With no arguments it generates the seeded synthetic dataset (cached under ``runs/data``) and
trains :class:`~torchrec_hytrec.models.retrieval.HyTRecRetrieval` with row-wise sharded tables;
``--data PATH`` trains on a Parquet dataset written by ``python -m torchrec_hytrec.data.convert``.
Each epoch it evaluates the full catalogue on the leave-one-out valid and test splits, next to a
popularity baseline on the same users, and writes the metrics as a table, JSONL, CSV and
TensorBoard events under ``out_dir``. Checkpoints (``torch.distributed.checkpoint``) are taken
every ``checkpoint.every_n_steps`` steps and at each epoch end; ``--resume`` (implied on a
torchelastic restart) continues from the newest complete one.

Example::

    python -m torchrec_hytrec.train --epochs 2 --set model.preset=sasrec_like
    torchrun --nproc_per_node 2 -m torchrec_hytrec.train --data beauty.parquet --resume
"""

import argparse
import dataclasses
import hashlib
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from torchrec_hytrec.data.batch import ITEM_KEY, SequenceBatch
from torchrec_hytrec.data.reader import ReaderConfig, SequenceReader
from torchrec_hytrec.data.schema import write_sequences
from torchrec_hytrec.data.splits import Split
from torchrec_hytrec.data.synthetic import SyntheticConfig, generate
from torchrec_hytrec.models.evaluation import RetrievalEvaluator, RetrievalMetrics
from torchrec_hytrec.models.retrieval import HyTRecRetrieval, RetrievalConfig
from torchrec_hytrec.models.sharding import apply_sparse_optimizer, make_optimizer, shard_model
from torchrec_hytrec.modules import HyTRecConfig, HyTRecEncoder
from torchrec_hytrec.training.checkpoint import CheckpointManager, rng_state, set_rng_state
from torchrec_hytrec.training.config import TrainConfig, config_to_dict, load_config
from torchrec_hytrec.training.distributed import DistEnv, init_distributed
from torchrec_hytrec.training.metrics_log import MetricsLogger


PRESETS = ("hytrec", "sasrec_like", "pure_linear")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m torchrec_hytrec.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="YAML config (default: the built-in one, as in configs/default.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, repeatable: --set model.preset=sasrec_like --set optim.dense_lr=3e-4")
    p.add_argument("--data", help="Parquet dataset from the converter (data.path); default: synthetic")
    p.add_argument("--epochs", type=int, help="epochs (epochs)")
    p.add_argument("--out-dir", help="metrics and checkpoints directory (out_dir)")
    p.add_argument("--seed", type=int, help="seed (seed)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint in out_dir (implied on a torchelastic restart)")
    p.add_argument("--fault-at-step", type=int,
                   help="test knob: the last rank SIGKILLs itself before this global step on the first attempt")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The config file, then ``--set`` overrides, then the explicit flags."""
    flags = {"data.path": args.data, "epochs": args.epochs, "out_dir": args.out_dir, "seed": args.seed,
             "fault_at_step": args.fault_at_step}
    explicit = [f"{k}={json.dumps(v)}" for k, v in flags.items() if v is not None]
    return load_config(args.config, [*args.overrides, *explicit])


def synthetic_dataset(cfg: TrainConfig, env: DistEnv) -> Path:
    """Generates the synthetic dataset once per generator config; every rank gets the same path."""
    synth = SyntheticConfig.small(seed=cfg.seed)
    try:
        synth = dataclasses.replace(synth, **cfg.data.synthetic)
    except TypeError as e:
        raise ValueError(f"data.synthetic: {e}; SyntheticConfig has {[f.name for f in dataclasses.fields(synth)]}")
    key = json.dumps({**dataclasses.asdict(synth), "row_group_size": cfg.data.row_group_size}, sort_keys=True)
    path = Path(cfg.data.cache_dir) / f"synthetic-{hashlib.sha1(key.encode()).hexdigest()[:12]}.parquet"
    if env.is_main and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        data = generate(synth)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        write_sequences(tmp, data.sequences, data.info, row_group_size=cfg.data.row_group_size)
        os.replace(tmp, path)
        print(f"synthetic dataset: {path} ({data.info.num_users} users, {data.info.num_items} items, "
              f"{data.info.num_events} events)", flush=True)
    dist.barrier()
    return path


def make_reader(cfg: TrainConfig, path: Path, split: Split) -> SequenceReader:
    train = split is Split.TRAIN
    return SequenceReader(ReaderConfig(
        paths=[path],
        split=split,
        max_tokens=cfg.data.token_budget if train else cfg.data.eval_token_budget,
        max_seq_len=cfg.data.max_seq_len,
        shuffle=train,
        seed=cfg.seed,
    ))


def build_model(cfg: TrainConfig, reader: SequenceReader) -> nn.Module:
    """The unsharded retrieval model, tables on ``meta`` (``shard_model`` materialises them)."""
    if cfg.model.preset not in PRESETS:
        raise ValueError(f"model.preset must be one of {PRESETS}, got {cfg.model.preset!r}")
    encoder_cfg = getattr(HyTRecConfig, cfg.model.preset)(embedding_dim=cfg.model.embedding_dim, **cfg.model.encoder)
    info = reader.info
    # Side-feature ids lie in [1, cardinality]; row 0 stays padding.
    side = {name: info.feature_cardinalities[name] + 1 for name in reader.keys[1:]}
    retrieval = RetrievalConfig(
        num_items=info.num_items, embedding_dim=cfg.model.embedding_dim, side_features=side, **cfg.model.retrieval
    )
    return HyTRecRetrieval(retrieval, HyTRecEncoder(encoder_cfg), device=torch.device("meta"))


def lockstep(batches: Iterable[SequenceBatch], filler: SequenceBatch) -> Iterator[Tuple[SequenceBatch, bool]]:
    """Yields ``(batch, real)`` until every rank's batches are exhausted.

    Ranks read disjoint row groups and so may hold different numbers of batches, while every
    sharded forward is a collective. A rank that runs out keeps stepping with ``filler`` and
    ``real=False`` until all ranks are done; its caller gives such steps no weight.
    """
    it = iter(batches)
    while True:
        batch = next(it, None)
        more = torch.tensor([0 if batch is None else 1])
        dist.all_reduce(more, op=dist.ReduceOp.MAX)
        if not more.item():
            return
        yield (filler, False) if batch is None else (batch, True)


def item_popularity(reader: SequenceReader, num_items: int) -> torch.Tensor:
    """``[num_items + 1]`` event counts of every item in all ranks' training inputs."""
    counts = torch.zeros(num_items + 1, dtype=torch.int64)
    for batch in reader:
        counts += torch.bincount(batch.features[ITEM_KEY].values(), minlength=num_items + 1)
    dist.all_reduce(counts)
    return counts


def popularity_ranks(counts: torch.Tensor) -> torch.Tensor:
    """``[num_items + 1]`` 0-based rank of each item when recommending by popularity (id breaks ties)."""
    order = torch.argsort(-counts[1:], stable=True) + 1
    ranks = torch.empty_like(counts)
    ranks[order] = torch.arange(order.numel())
    return ranks


def evaluate_split(
    model: nn.Module, reader: SequenceReader, filler: SequenceBatch, pop_ranks: torch.Tensor,
    ks: Sequence[int], device: torch.device,
) -> Dict[str, float]:
    """HR/NDCG@ks and MRR of the model and of the popularity baseline on one split, all ranks."""
    evaluator = RetrievalEvaluator(model, metrics=RetrievalMetrics(hr_ks=ks, ndcg_ks=ks, device=device))
    # Filler steps run the same collectives but land in a throwaway accumulator.
    discard = RetrievalEvaluator(model, metrics=RetrievalMetrics(hr_ks=ks, ndcg_ks=ks, device=device))
    popularity = RetrievalMetrics(hr_ks=ks, ndcg_ks=ks, device=device)
    model.eval()
    with torch.no_grad():
        for batch, real in lockstep(reader, filler):
            batch = batch.to(device)
            _, aux = model(batch)
            (evaluator if real else discard).update(batch, aux)
            if real:
                lengths = batch.offsets()[1:] - batch.offsets()[:-1]
                popularity.update(pop_ranks.to(device)[batch.targets], lengths)
    model.train()
    popularity.all_reduce()
    # Overall figures only: the per-history-length buckets would make the table unreadable.
    model_metrics, pop_metrics = evaluator.compute(), popularity.compute()
    # A split without users (tiny datasets) reports NaN rather than failing the run.
    out = {name: model_metrics.get(name, math.nan) for name in evaluator.metrics.metric_names}
    out.update({f"pop_hr@{k}": pop_metrics.get(f"hr@{k}", math.nan) for k in ks})
    return out


def _first_batch(reader: SequenceReader) -> SequenceBatch:
    batch = next(iter(reader), None)
    if batch is None:
        raise ValueError(f"rank {dist.get_rank()}: no batches in {reader.info.source}")
    return batch


def _maybe_inject_fault(cfg: TrainConfig, env: DistEnv, global_step: int) -> None:
    if (
        cfg.fault_at_step == global_step
        and env.rank == env.world_size - 1
        and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0
    ):
        print(f"[fault injection] rank {env.rank} SIGKILLs itself before step {global_step}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


def train(cfg: TrainConfig, env: DistEnv, resume: bool) -> List[Dict[str, Any]]:
    """Runs (or resumes) training; returns the per-epoch metric rows (on rank 0; empty elsewhere)."""
    out_dir = Path(cfg.out_dir)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    data_path = Path(cfg.data.path) if cfg.data.path else synthetic_dataset(cfg, env)
    train_reader = make_reader(cfg, data_path, Split.TRAIN)
    eval_readers = {s: make_reader(cfg, data_path, s) for s in (Split.VALID, Split.TEST)}
    fillers = {s: _first_batch(r) for s, r in eval_readers.items()}
    pop_ranks = popularity_ranks(item_popularity(make_reader(cfg, data_path, Split.TRAIN), train_reader.info.num_items))
    train_filler = _first_batch(make_reader(cfg, data_path, Split.TRAIN))

    model = build_model(cfg, train_reader)
    apply_sparse_optimizer(model, cfg.optim)
    model = shard_model(model, cfg.model.sharding, device=env.device)
    optimizer = make_optimizer(model, cfg.optim)
    manager = CheckpointManager(out_dir / "checkpoints", keep_last=cfg.checkpoint.keep_last)
    rank_key = f"rank{env.rank}"
    progress = {"epoch": 0, "global_step": 0}
    # Per rank: the epoch's running loss must survive a restart for the epoch's mean to match.
    local = {"loss_sum": 0.0, "loss_count": 0}

    def state() -> Dict[str, Any]:
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "progress": progress,
                rank_key: {"rng": rng_state(), "reader": train_reader.state_dict(), **local}}

    latest = manager.latest() if resume else None
    if latest is not None:
        # AdamW creates its state lazily; loading in place needs it to exist.
        optimizer.init_state()
        restored = state()
        manager.load(latest, restored)
        optimizer.load_state_dict(restored["optimizer"])
        progress.update(restored["progress"])
        mine = restored[rank_key]
        train_reader.load_state_dict(mine["reader"])
        local.update(loss_sum=mine["loss_sum"], loss_count=mine["loss_count"])
        set_rng_state(mine["rng"])
        if env.is_main:
            print(f"resumed from {latest} at epoch {progress['epoch']}, global step {progress['global_step']}",
                  flush=True)
    elif resume:
        if env.is_main:
            print(f"no complete checkpoint under {manager.root}; starting from scratch", flush=True)
    else:
        # A fresh run replaces an earlier run's checkpoints, which a later --resume would pick up.
        removed = manager.clear()
        if removed and env.is_main:
            print(f"fresh run: removed {removed} checkpoints of an earlier run in {manager.root}", flush=True)
    # The step of the newest checkpoint: an epoch that ends on it needs no second copy.
    saved_step = progress["global_step"] if latest is not None else -1

    metrics_log = MetricsLogger(out_dir, start_epoch=progress["epoch"], enabled=env.is_main)
    if env.is_main:
        (out_dir / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2))
    every = cfg.checkpoint.every_n_steps
    model.train()
    for epoch in range(progress["epoch"], cfg.epochs):
        started = time.perf_counter()
        train_reader.set_epoch(epoch)
        # Under TorchX/torchrun stderr is a log file: refresh it rarely.
        bar = tqdm(desc=f"epoch {epoch}", unit="batch", disable=not env.is_main, dynamic_ncols=True,
                   mininterval=0.5 if sys.stderr.isatty() else 15.0)
        for batch, real in lockstep(train_reader, train_filler):
            _maybe_inject_fault(cfg, env, progress["global_step"])
            loss, _ = model(batch.to(env.device))
            # A filler step still runs every collective but must not move any weight.
            (loss if real else loss * 0.0).backward()
            optimizer.step()
            optimizer.zero_grad()
            if real:
                local["loss_sum"] += loss.item()
                local["loss_count"] += 1
            progress["global_step"] += 1
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
            if every and progress["global_step"] % every == 0:
                manager.save(progress["global_step"], state())
                saved_step = progress["global_step"]
        bar.close()
        totals = torch.tensor([local["loss_sum"], local["loss_count"]], dtype=torch.float64)
        dist.all_reduce(totals)
        row: Dict[str, float] = {"train_loss": float(totals[0] / totals[1])}
        for split, reader in eval_readers.items():
            metrics = evaluate_split(model, reader, fillers[split], pop_ranks, cfg.eval_ks, env.device)
            row.update({f"{split.value}_{k}": v for k, v in metrics.items()})
        row["epoch_s"] = time.perf_counter() - started
        metrics_log.log(epoch, row)
        if env.is_main:
            print(metrics_log.table().splitlines()[-1] if epoch > 0 else metrics_log.table(), flush=True)
        progress["epoch"] = epoch + 1
        local.update(loss_sum=0.0, loss_count=0)
        if saved_step != progress["global_step"]:
            manager.save(progress["global_step"], state())
            saved_step = progress["global_step"]
    if env.is_main:
        print(f"\nfinal metrics ({out_dir / 'metrics.jsonl'}):\n{metrics_log.table()}", flush=True)
    metrics_log.close()
    return metrics_log.rows


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    env = init_distributed()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    try:
        return train(cfg, env, resume=args.resume or restarted)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
