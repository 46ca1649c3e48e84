"""The retrieval trainer behind ``python -m torchrec_hytrec.train``: sharded HyTRec retrieval on
TorchRec's train pipeline, evaluated every epoch, checkpointed with DCP, resumable bit for bit.

Run identity: every checkpoint carries the run's fingerprint (the config that shapes the model and
the data order, the dataset's identity, the world size). ``--resume`` refuses a checkpoint with
another fingerprint, naming the differing fields. A fresh run refuses an ``out_dir`` that holds
checkpoints (it deletes them only when told to with ``overwrite``) and then claims the directory
for its job (``run.json``); a torchelastic restart of a fresh run resumes only from a directory
its own job claimed, so it can never continue another run. One job at a time holds ``out_dir``
(a lock file).
"""

import fcntl
import hashlib
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, TextIO, Tuple

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from torchrec_hytrec.data.reader import SequenceReader
from torchrec_hytrec.data.splits import Split
from torchrec_hytrec.data.synthetic import cached_synthetic_dataset
from torchrec_hytrec.models.embeddings import side_feature_rows
from torchrec_hytrec.models.retrieval import HyTRecRetrieval, HyTRecRetrievalTrain
from torchrec_hytrec.models.sharding import shard_model
from torchrec_hytrec.modules import HyTRecEncoder
from torchrec_hytrec.training.checkpoint import CheckpointManager, rng_state, set_rng_state
from torchrec_hytrec.training.config import TrainConfig, config_to_dict
from torchrec_hytrec.training.distributed import DistEnv
from torchrec_hytrec.training.evaluation import evaluate_retrieval, item_popularity, popularity_ranks
from torchrec_hytrec.training.loop import batch_weight, make_pipeline, train_epoch
from torchrec_hytrec.training.metrics_log import MetricsLogger, format_table
from torchrec_hytrec.training.optimizer import (
    apply_sparse_optimizer,
    dense_lr_at,
    make_optimizer,
    set_dense_lr,
)

# Config keys a resumed run may change: how long it runs, where it writes, how it checkpoints.
_RESUMABLE_CHANGES = ("epochs", "out_dir", "fault_at_step", "checkpoint", "eval_save_ranks", "early_stopping")


def make_reader(cfg: TrainConfig, path: Path, split: Split, with_candidates: bool = True) -> SequenceReader:
    """A reader of ``split``; ``with_candidates``: its batches carry what the loss needs."""
    negatives, num_negatives = cfg.model.retrieval.reader_negatives() if with_candidates else ("none", 0)
    return SequenceReader(
        [path],
        cfg.data.train if split is Split.TRAIN else cfg.data.eval,
        split=split,
        negatives=negatives,
        num_negatives=num_negatives,
        seed=cfg.seed,
    )


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


def data_identity(path: Path) -> Dict[str, Any]:
    """What identifies a dataset cheaply: each file's size and a hash of its Parquet footer (row
    groups, column chunk sizes and statistics), so a rewritten dataset is a different one."""
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    out = {}
    for f in files:
        with open(f, "rb") as fh:
            fh.seek(-8, os.SEEK_END)
            footer_len = int.from_bytes(fh.read(4), "little")
            fh.seek(-8 - footer_len, os.SEEK_END)
            digest = hashlib.sha256(fh.read(footer_len)).hexdigest()[:16]
        out[f.name] = f"{f.stat().st_size}:{digest}"
    return out


def run_fingerprint(cfg: TrainConfig, data_path: Path, world_size: int) -> Dict[str, Any]:
    """The facts a checkpoint must share with the run that resumes it, flattened to dotted keys."""
    flat: Dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                flat[f"{prefix}{key}"] = value

    walk({k: v for k, v in config_to_dict(cfg).items() if k not in _RESUMABLE_CHANGES}, "")
    flat.update({f"data_identity.{k}": v for k, v in data_identity(data_path).items()})
    flat["world_size"] = world_size
    # JSON round trip: tuples become lists, as they come back from the marker file.
    return json.loads(json.dumps(flat))


class OutDirLock:
    """An exclusive ``flock`` on ``out_dir/.lock`` held by rank 0 while the job runs, so two jobs
    never write one ``out_dir``; the kernel releases it when the process dies.

    Args:
        out_dir: the run's directory (created if missing).

    Example::

        lock = OutDirLock(Path("runs/x"))   # raises RuntimeError if another job holds it
        lock.release()
    """

    def __init__(self, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / ".lock"
        self._file: Optional[TextIO] = open(self.path, "a+")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "unknown"
            self._file.close()
            self._file = None
            raise RuntimeError(
                f"{out_dir} is in use by another job (lock {self.path} held by pid {holder}); "
                "give this run another out_dir"
            ) from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(str(os.getpid()))
        self._file.flush()

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


class Trainer:
    """Trains sharded HyTRec retrieval, evaluates every epoch and checkpoints with DCP.

    Everything a resumed run needs to continue bit for bit is in :meth:`state_dict`: model and
    optimizer (sharded), progress (epoch, global step, steps of the current epoch: the batches are
    a pure function of seed, epoch, rank and index, so the reader skips exactly those), and per rank
    the epoch's running loss and the RNG states (under a rank key: DCP keeps one copy of keys
    every rank shares).

    Args:
        cfg: the run's config.
        env: this process's place in the job, from ``init_distributed``.

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
        if cfg.data.path:
            data_path = Path(cfg.data.path)
        else:
            data_path = cached_synthetic_dataset(
                cfg.data.synthetic, Path(cfg.data.cache_dir), cfg.data.row_group_size, write=env.is_main
            )
            dist.barrier()
        plain = make_reader(cfg, data_path, Split.TRAIN, with_candidates=False)
        self.train_reader = make_reader(cfg, data_path, Split.TRAIN)
        self.eval_readers = {s: make_reader(cfg, data_path, s) for s in (Split.VALID, Split.TEST)}
        self.popularity_ranks = popularity_ranks(item_popularity(plain, plain.info.num_items))
        self.fingerprint = run_fingerprint(cfg, data_path, env.world_size)

        model = build_model(cfg, plain)
        apply_sparse_optimizer(model, cfg.optim)
        # Each rank materialises its own table shards from the global generator: with the same
        # seed everywhere the shards would start as copies of each other (row j of one shard equal
        # to row j of the next). DDP broadcasts rank 0's dense weights, so only the tables differ.
        torch.manual_seed(int(np.random.SeedSequence([cfg.seed, env.rank]).generate_state(1)[0]))
        self.model = shard_model(model, cfg.model.sharding, device=env.device)
        self.optimizer = make_optimizer(self.model, cfg.optim)
        self.pipeline = make_pipeline(self.model, self.optimizer, env.device)
        self.checkpoints = CheckpointManager(self.out_dir / "checkpoints", keep_last=cfg.checkpoint.keep_last)
        # epoch_step: batches of the current epoch trained (the pipeline reads ahead of it).
        # best / epochs_since_best: early stopping's state, the same on every rank (the metrics
        # are reduced over ranks), so every rank stops after the same epoch.
        self.progress = {
            "epoch": 0,
            "global_step": 0,
            "epoch_step": 0,
            "best": -math.inf,
            "epochs_since_best": 0,
        }
        # Sums over the epoch's steps so far (checkpointed: a resumed epoch continues them);
        # targets: training events predicted (the query weights of real batches).
        self.epoch_loss = {"loss_sum": 0.0, "loss_count": 0, "targets": 0.0}
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
            self.checkpoints.save(step, self.state_dict(), fingerprint=self.fingerprint)
            self._saved_step = step

    def _claimed_by_this_job(self) -> bool:
        """Whether ``out_dir`` was claimed by an earlier attempt of this job (rank 0 decides)."""
        claim = self.out_dir / "run.json"
        mine = False
        if self.env.is_main and claim.exists():
            mine = json.loads(claim.read_text()).get("job") == _job_key()
        decision = [mine]
        dist.broadcast_object_list(decision, src=0)
        return bool(decision[0])

    def _claim(self) -> None:
        if self.env.is_main:
            (self.out_dir / "run.json").write_text(json.dumps({"job": _job_key(), "pid": os.getpid()}))

    def restore(self, resume: bool, overwrite: bool = False, restarted: bool = False) -> None:
        """Loads the newest intact checkpoint of this run when resuming.

        Args:
            resume: continue the run whose checkpoints ``out_dir`` holds (same fingerprint).
            overwrite: a fresh run deletes the checkpoints it finds instead of refusing them.
            restarted: this is a torchelastic restart: a fresh run's restart resumes what its own
                job wrote, and is otherwise a fresh run again.
        """
        resume = resume or (restarted and self._claimed_by_this_job())
        if not resume:
            existing = self.checkpoints.complete()
            if existing and not overwrite:
                raise FileExistsError(
                    f"{self.checkpoints.root} holds {len(existing)} checkpoints of an earlier run "
                    f"(newest {existing[-1].name}): continue it with --resume, or delete them with "
                    "--overwrite, or choose another --out-dir"
                )
            removed = self.checkpoints.clear() if overwrite else 0
            if removed:
                self._print(f"--overwrite: removed {removed} checkpoints of an earlier run")
            self._claim()
            return
        latest = self.checkpoints.latest_intact()
        if latest is None:
            self._print(f"no intact checkpoint under {self.checkpoints.root}; starting from scratch")
            return
        self.checkpoints.check_fingerprint(latest, self.fingerprint)
        # AdamW creates its state lazily; loading in place needs it to exist.
        self.optimizer.init_state()
        state = self.state_dict()
        self.checkpoints.load(latest, state)
        self.optimizer.load_state_dict(state["optimizer"])
        self.progress.update(state["progress"])
        mine = state[self._rank_key]
        self.train_reader.load_state_dict(
            {"epoch": self.progress["epoch"], "batches": self.progress["epoch_step"]}
        )
        self.epoch_loss.update(
            loss_sum=mine["loss_sum"], loss_count=mine["loss_count"], targets=mine["targets"]
        )
        set_rng_state(mine["rng"])
        self._saved_step = self.progress["global_step"]
        self._print(
            f"resumed from {latest} at epoch {self.progress['epoch']}, "
            f"global step {self.progress['global_step']}"
        )

    def train_epoch(self, epoch: int) -> Tuple[float, int]:
        """One pass over this rank's training share (continuing a restored position).

        Returns:
            ``(mean loss, targets)``: the targets are the training events all ranks predicted in
            the epoch, a resumed epoch's earlier steps included (every training event but each
            user's first).
        """
        every = self.cfg.checkpoint.every_n_steps
        self.train_reader.set_epoch(epoch)
        # Under TorchX/torchrun stderr is a log file: refresh it rarely.
        bar = tqdm(
            desc=f"epoch {epoch}",
            unit="batch",
            disable=not self.env.is_main,
            dynamic_ncols=True,
            mininterval=0.5 if sys.stderr.isatty() else 15.0,
        )

        steps_per_epoch = self.train_reader.num_batches()

        def schedule_next_step() -> None:
            epochs_done = epoch + self.progress["epoch_step"] / steps_per_epoch
            set_dense_lr(self.optimizer, dense_lr_at(self.cfg.optim, epochs_done))

        def on_step(outputs: Any) -> None:
            self._maybe_inject_fault()
            loss = float(outputs.loss)
            weight = batch_weight(outputs)
            if weight > 0:
                self.epoch_loss["loss_sum"] += loss
                self.epoch_loss["loss_count"] += 1
                self.epoch_loss["targets"] += weight
                bar.set_postfix(loss=f"{loss:.4f}", refresh=False)  # padding batches' loss is 0
            self.progress["global_step"] += 1
            self.progress["epoch_step"] += 1
            bar.update()
            schedule_next_step()
            if every and self.progress["global_step"] % every == 0:
                self.save()

        schedule_next_step()
        train_epoch(self.pipeline, self.model, self.train_reader, on_step)
        bar.close()
        totals = torch.tensor(
            [self.epoch_loss["loss_sum"], self.epoch_loss["loss_count"], self.epoch_loss["targets"]],
            dtype=torch.float64,
        )
        dist.all_reduce(totals)
        return float(totals[0] / totals[1]), int(totals[2])

    def evaluate(self) -> tuple:
        """Model and popularity metrics on the valid and test splits.

        Returns:
            ``(row, detail)``: the overall figures prefixed by split for the epoch table, and per
            split every figure of the model, by history-length bucket too (too many for a table).
        """
        row: Dict[str, float] = {}
        detail: Dict[str, Any] = {}
        users: Dict[str, np.ndarray] = {}
        for split, reader in self.eval_readers.items():
            metrics, detail[split.value], per_user = evaluate_retrieval(
                self.model,
                reader,
                pipeline=self.pipeline,
                ks=self.cfg.eval_ks,
                protocols=self.cfg.eval_protocols,
                popularity=self.popularity_ranks,
                device=self.env.device,
                per_user=self.cfg.eval_save_ranks,
            )
            row.update({f"{split.value}_{k}": v for k, v in metrics.items()})
            users.update({f"{split.value}_{k}": v for k, v in (per_user or {}).items()})
        if users and self.env.is_main:
            path = self.out_dir / "ranks" / f"epoch{self.progress['epoch']:03d}.npz"
            path.parent.mkdir(exist_ok=True)
            np.savez_compressed(path, **users)
        return row, detail

    def fit(self, resume: bool, overwrite: bool = False, restarted: bool = False) -> List[Dict[str, Any]]:
        """Runs (or resumes) every epoch; returns the metric rows (on rank 0; empty elsewhere).

        Args: as :meth:`restore`.
        """
        lock = OutDirLock(self.out_dir) if self.env.is_main else None
        try:
            return self._fit(resume, overwrite, restarted)
        finally:
            if lock is not None:
                lock.release()

    def _fit(self, resume: bool, overwrite: bool, restarted: bool) -> List[Dict[str, Any]]:
        self.restore(resume, overwrite, restarted)
        metrics_log = MetricsLogger(
            self.out_dir, start_epoch=self.progress["epoch"], enabled=self.env.is_main
        )
        if self.env.is_main:
            (self.out_dir / "config.json").write_text(json.dumps(config_to_dict(self.cfg), indent=2))
        detail: Dict[str, Any] = {}
        stopping = self.cfg.early_stopping
        for epoch in range(self.progress["epoch"], self.cfg.epochs):
            if stopping.patience and self.progress["epochs_since_best"] >= stopping.patience:
                best_epoch = epoch - 1 - stopping.patience
                self._print(
                    f"early stopping: {stopping.metric} last improved at epoch {best_epoch} "
                    f"({self.progress['best']:.4f}); no new best in {stopping.patience} epochs"
                )
                if self.env.is_main:
                    (self.out_dir / "early_stopped.json").write_text(
                        json.dumps(
                            {"before_epoch": epoch, "best_epoch": best_epoch, "best": self.progress["best"]}
                        )
                    )
                break
            started = time.perf_counter()
            train_loss, train_targets = self.train_epoch(epoch)
            metrics, detail = self.evaluate()
            row = {
                "train_loss": train_loss,
                "train_targets": train_targets,
                **metrics,
                "epoch_s": time.perf_counter() - started,
            }
            metrics_log.log(epoch, row, detail)
            if self.env.is_main:
                table = metrics_log.table()
                print(table if epoch == 0 else table.splitlines()[-1], flush=True)
            if metrics[stopping.metric] > self.progress["best"]:
                self.progress.update(best=metrics[stopping.metric], epochs_since_best=0)
            else:
                self.progress["epochs_since_best"] += 1
            self.progress.update(epoch=epoch + 1, epoch_step=0)
            self.epoch_loss.update(loss_sum=0.0, loss_count=0, targets=0.0)
            self.save()
        self._print(f"\nfinal metrics ({self.out_dir / 'metrics.jsonl'}):\n{metrics_log.table()}")
        if "test" in detail:
            self._print(
                "\ntest split by history length (last epoch):\n"
                + bucket_table(detail["test"], self.cfg.eval_ks)
            )
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


def _job_key() -> str:
    """Identifies one launch across its torchelastic restarts: the run id and the agent process
    (the workers' parent), which a restart keeps and another launch does not."""
    return f"{os.environ.get('TORCHELASTIC_RUN_ID', 'none')}:{os.getppid()}"


def bucket_table(detail: Dict[str, float], ks: List[int]) -> str:
    """The model's and the popularity baseline's figures per history-length bucket, as a table."""
    buckets = [name.split("/", 1)[1] for name in detail if name.startswith("count/")]
    rows = []
    for bucket in buckets:
        row: Dict[str, Any] = {"history": bucket, "users": int(detail[f"count/{bucket}"])}
        for k in ks:
            row[f"hr@{k}"] = detail.get(f"hr@{k}/{bucket}", float("nan"))
            row[f"pop_hr@{k}"] = detail.get(f"pop_hr@{k}/{bucket}", float("nan"))
        row["ndcg@" + str(ks[0])] = detail.get(f"ndcg@{ks[0]}/{bucket}", float("nan"))
        rows.append(row)
    return format_table(rows)
