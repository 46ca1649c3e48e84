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
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from tqdm import tqdm

from torchrec_hytrec.data.reader import ReaderConfig, SequenceReader
from torchrec_hytrec.data.schema import write_sequences
from torchrec_hytrec.data.splits import Split
from torchrec_hytrec.data.synthetic import generate
from torchrec_hytrec.models.evaluation import RetrievalEvaluator, RetrievalMetrics
from torchrec_hytrec.models.retrieval import HyTRecRetrieval, HyTRecRetrievalTrain, RetrievalConfig
from torchrec_hytrec.models.embeddings import side_feature_rows
from torchrec_hytrec.models.sharding import apply_sparse_optimizer, make_optimizer, shard_model
from torchrec_hytrec.modules import HyTRecEncoder
from torchrec_hytrec.training.checkpoint import CheckpointManager, rng_state, set_rng_state
from torchrec_hytrec.training.config import TrainConfig, config_reference, config_to_dict, load_config
from torchrec_hytrec.training.distributed import DistEnv, init_distributed
from torchrec_hytrec.training.metrics_log import MetricsLogger
from torchrec_hytrec.training.pipeline import make_pipeline, pipeline_outputs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m torchrec_hytrec.train",
        description=__doc__.split("\n\n")[0],
        epilog="config keys (--set KEY=VALUE, or the same nesting in --config YAML), with their defaults:\n"
        + config_reference(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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
    synth = cfg.data.synthetic
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


def make_reader(
    cfg: TrainConfig, path: Path, split: Split, retrieval: Optional[RetrievalConfig] = None
) -> SequenceReader:
    """A reader of ``split``; with ``retrieval``, its batches carry the candidates its loss needs."""
    train = split is Split.TRAIN
    negatives, num_negatives = retrieval.reader_negatives() if retrieval is not None else ("none", 0)
    return SequenceReader(ReaderConfig(
        paths=[path],
        split=split,
        max_tokens=cfg.data.token_budget if train else cfg.data.eval_token_budget,
        max_seq_len=cfg.data.max_seq_len,
        shuffle=train,
        seed=cfg.seed,
        negatives=negatives,
        num_negatives=num_negatives,
    ))


def build_model(cfg: TrainConfig, reader: SequenceReader) -> HyTRecRetrievalTrain:
    """The unsharded train wrapper for ``reader``'s dataset, tables on ``meta`` (``shard_model``
    materialises them)."""
    model = HyTRecRetrieval(
        cfg.model.retrieval,
        HyTRecEncoder(cfg.model.encoder),
        num_items=reader.info.num_items,
        side_features=side_feature_rows(reader.info, reader.keys[1:]),
        device=torch.device("meta"),
    )
    return HyTRecRetrievalTrain(model)


def is_real(weights: torch.Tensor) -> bool:
    """Whether a batch is a real one rather than the reader's zero-weight padding."""
    return bool(weights.sum() > 0)


def item_popularity(reader: SequenceReader, num_items: int) -> torch.Tensor:
    """``[num_items + 1]`` event counts of every item in all ranks' training inputs."""
    counts = torch.zeros(num_items + 1, dtype=torch.int64)
    for batch in reader:
        if is_real(batch.weights):
            counts += torch.bincount(batch.item_ids, minlength=num_items + 1)
    dist.all_reduce(counts)
    return counts


def popularity_ranks(counts: torch.Tensor) -> torch.Tensor:
    """``[num_items + 1]`` 0-based rank of each item when recommending by popularity (id breaks ties)."""
    order = torch.argsort(-counts[1:], stable=True) + 1
    ranks = torch.empty_like(counts)
    ranks[order] = torch.arange(order.numel())
    return ranks


def evaluate_split(
    model: nn.Module, pipeline: TrainPipelineSparseDist, reader: SequenceReader, pop_ranks: torch.Tensor,
    ks: Sequence[int], device: torch.device,
) -> Tuple[Dict[str, float], Dict[str, float]]:
    """HR/NDCG@ks and MRR of the model and of the popularity baseline on one split, all ranks.

    Returns:
        ``(overall, detail)``: the overall figures with the popularity baseline's, and every
        figure of the model, by history-length bucket too.
    """
    evaluator = RetrievalEvaluator(model, metrics=RetrievalMetrics(hr_ks=ks, ndcg_ks=ks, device=device))
    popularity = RetrievalMetrics(hr_ks=ks, ndcg_ks=ks, device=device)
    model.eval()
    with torch.no_grad():
        for outputs in pipeline_outputs(pipeline, reader):
            evaluator.update(outputs)
            popularity.update(pop_ranks.to(device)[outputs.positive_ids], outputs.lengths, outputs.weights)
    model.train()
    popularity.all_reduce()
    model_metrics, pop_metrics = evaluator.compute(), popularity.compute()
    # A split without users (tiny datasets) reports NaN rather than failing the run.
    out = {name: model_metrics.get(name, math.nan) for name in evaluator.metrics.metric_names}
    out.update({f"pop_hr@{k}": pop_metrics.get(f"hr@{k}", math.nan) for k in ks})
    return out, model_metrics


class Trainer:
    """Trains sharded HyTRec retrieval, evaluates every epoch and checkpoints with DCP.

    Everything a resumed run needs to continue bit for bit is in :meth:`state_dict`: model and
    optimizer (sharded), progress, and per rank the reader position, the epoch's running loss
    and the RNG states (under a rank key: DCP keeps one copy of keys every rank shares).

    Args:
        cfg: the run's config.
        env: this process's place in the job, from :func:`init_distributed`.

    Example::

        env = init_distributed()
        rows = Trainer(load_config(overrides=["epochs=1"]), env).fit(resume=False)
    """

    def __init__(self, cfg: TrainConfig, env: DistEnv) -> None:
        self.cfg = cfg
        self.env = env
        self.out_dir = Path(cfg.out_dir)
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        data_path = Path(cfg.data.path) if cfg.data.path else synthetic_dataset(cfg, env)
        plain = make_reader(cfg, data_path, Split.TRAIN)
        retrieval = cfg.model.retrieval
        self.train_reader = make_reader(cfg, data_path, Split.TRAIN, retrieval)
        self.eval_readers = {s: make_reader(cfg, data_path, s, retrieval) for s in (Split.VALID, Split.TEST)}
        self.popularity_ranks = popularity_ranks(item_popularity(plain, plain.info.num_items))

        model = build_model(cfg, plain)
        apply_sparse_optimizer(model, cfg.optim)
        self.model = shard_model(model, cfg.model.sharding, device=env.device)
        self.optimizer = make_optimizer(self.model, cfg.optim)
        self.pipeline = make_pipeline(self.model, self.optimizer, env.device)
        self.checkpoints = CheckpointManager(self.out_dir / "checkpoints", keep_last=cfg.checkpoint.keep_last)
        # epoch_step: batches of the current epoch trained (the pipeline reads ahead of it).
        self.progress = {"epoch": 0, "global_step": 0, "epoch_step": 0}
        self.epoch_loss = {"loss_sum": 0.0, "loss_count": 0}
        # Step of the newest checkpoint: an epoch that ends on it needs no second copy.
        self._saved_step = -1

    @property
    def _rank_key(self) -> str:
        return f"rank{self.env.rank}"

    def state_dict(self) -> Dict[str, Any]:
        """The checkpointed state; tensors alias the live ones, so loading into it is in place."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "progress": dict(self.progress),
            self._rank_key: {"rng": rng_state(), **self.epoch_loss},
        }

    def save(self) -> None:
        step = self.progress["global_step"]
        if step != self._saved_step:
            self.checkpoints.save(step, self.state_dict())
            self._saved_step = step

    def restore(self, resume: bool) -> None:
        """Loads the newest complete checkpoint when ``resume``; otherwise clears earlier ones."""
        latest = self.checkpoints.latest() if resume else None
        if latest is None:
            if resume:
                self._print(f"no complete checkpoint under {self.checkpoints.root}; starting from scratch")
            else:
                # A later --resume must not pick up an earlier run's checkpoints.
                removed = self.checkpoints.clear()
                if removed:
                    self._print(f"fresh run: removed {removed} checkpoints of an earlier run")
            return
        saved_world = self.checkpoints.info(latest)["world_size"]
        if saved_world != self.env.world_size:
            raise ValueError(
                f"{latest} was written by {saved_world} processes, this job has {self.env.world_size}: "
                "resume with the same number (reader positions and RNG streams are per rank)"
            )
        # AdamW creates its state lazily; loading in place needs it to exist.
        self.optimizer.init_state()
        state = self.state_dict()
        self.checkpoints.load(latest, state)
        self.optimizer.load_state_dict(state["optimizer"])
        self.progress.update(state["progress"])
        mine = state[self._rank_key]
        # Batches are a pure function of (seed, epoch, rank, index): skip the ones trained.
        self.train_reader.load_state_dict({"epoch": self.progress["epoch"], "batches": self.progress["epoch_step"]})
        self.epoch_loss.update(loss_sum=mine["loss_sum"], loss_count=mine["loss_count"])
        set_rng_state(mine["rng"])
        self._saved_step = self.progress["global_step"]
        self._print(f"resumed from {latest} at epoch {self.progress['epoch']}, "
                    f"global step {self.progress['global_step']}")

    def train_epoch(self, epoch: int) -> float:
        """One pass over this rank's training share (continuing a restored position); the mean loss."""
        every = self.cfg.checkpoint.every_n_steps
        self.train_reader.set_epoch(epoch)
        self.model.train()
        # Under TorchX/torchrun stderr is a log file: refresh it rarely.
        bar = tqdm(desc=f"epoch {epoch}", unit="batch", disable=not self.env.is_main, dynamic_ncols=True,
                   mininterval=0.5 if sys.stderr.isatty() else 15.0)
        for outputs in pipeline_outputs(self.pipeline, self.train_reader):
            self._maybe_inject_fault()
            loss = float(outputs.loss)
            if is_real(outputs.weights):
                self.epoch_loss["loss_sum"] += loss
                self.epoch_loss["loss_count"] += 1
            self.progress["global_step"] += 1
            self.progress["epoch_step"] += 1
            bar.update()
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            if every and self.progress["global_step"] % every == 0:
                self.save()
        bar.close()
        totals = torch.tensor([self.epoch_loss["loss_sum"], self.epoch_loss["loss_count"]], dtype=torch.float64)
        dist.all_reduce(totals)
        return float(totals[0] / totals[1])

    def evaluate(self) -> Tuple[Dict[str, float], Dict[str, Any]]:
        """Model and popularity metrics on the valid and test splits.

        Returns:
            ``(row, detail)``: the overall figures prefixed by split for the epoch table, and per
            split every figure of the model, by history-length bucket too (too many for a table).
        """
        row: Dict[str, float] = {}
        detail: Dict[str, Any] = {}
        for split, reader in self.eval_readers.items():
            metrics, detail[split.value] = evaluate_split(
                self.model, self.pipeline, reader, self.popularity_ranks, self.cfg.eval_ks, self.env.device
            )
            row.update({f"{split.value}_{k}": v for k, v in metrics.items()})
        return row, detail

    def fit(self, resume: bool) -> List[Dict[str, Any]]:
        """Runs (or resumes) every epoch; returns the metric rows (on rank 0; empty elsewhere)."""
        self.restore(resume)
        metrics_log = MetricsLogger(self.out_dir, start_epoch=self.progress["epoch"], enabled=self.env.is_main)
        if self.env.is_main:
            (self.out_dir / "config.json").write_text(json.dumps(config_to_dict(self.cfg), indent=2))
        for epoch in range(self.progress["epoch"], self.cfg.epochs):
            started = time.perf_counter()
            train_loss = self.train_epoch(epoch)
            metrics, detail = self.evaluate()
            row = {"train_loss": train_loss, **metrics, "epoch_s": time.perf_counter() - started}
            metrics_log.log(epoch, row, detail)
            if self.env.is_main:
                table = metrics_log.table()
                print(table if epoch == 0 else table.splitlines()[-1], flush=True)
            self.progress.update(epoch=epoch + 1, epoch_step=0)
            self.epoch_loss.update(loss_sum=0.0, loss_count=0)
            self.save()
        self._print(f"\nfinal metrics ({self.out_dir / 'metrics.jsonl'}):\n{metrics_log.table()}")
        metrics_log.close()
        return metrics_log.rows

    def _print(self, text: str) -> None:
        if self.env.is_main:
            print(text, flush=True)

    def _maybe_inject_fault(self) -> None:
        step = self.progress["global_step"]
        if (
            self.cfg.fault_at_step == step
            and self.env.rank == self.env.world_size - 1
            and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0
        ):
            print(f"[fault injection] rank {self.env.rank} SIGKILLs itself before step {step}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    env = init_distributed()
    # The cores are shared out between the local processes unless OMP_NUM_THREADS says otherwise.
    threads = int(os.environ.get("OMP_NUM_THREADS", "0")) or (os.cpu_count() or 1) // int(
        os.environ.get("LOCAL_WORLD_SIZE", "1")
    )
    torch.set_num_threads(max(1, threads))
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    try:
        return Trainer(cfg, env).fit(resume=args.resume or restarted)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
