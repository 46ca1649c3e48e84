"""Builders shared by the tests: hand-made batches and free ports for process groups."""

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_hytrec.data.batch import SequenceBatch, sequence_keys

NUM_ITEMS = 40
SIDE = {"category": 5}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_batch(
    lengths: Sequence[int],
    *,
    seed: int,
    num_items: int = NUM_ITEMS,
    side_features: Optional[Dict[str, int]] = None,
    evaluation: bool = False,
    candidates: str = "catalogue",
    num_negatives: int = 8,
) -> SequenceBatch:
    """A hand-built batch: items follow ``item + 1`` chains (learnable), gaps of minutes to days.

    ``candidates`` is ``"catalogue"`` (every item), ``"uniform"`` (``num_negatives`` random items)
    or ``"none"``, as ``SequenceReader(negatives=...)``; an evaluation batch's target is the successor of
    each user's last item, an hour after it.
    """
    side_features = SIDE if side_features is None else side_features
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    starts = torch.randint(1, num_items + 1, (len(lengths),), generator=g)
    items = torch.cat([(s - 1 + torch.arange(n)) % num_items + 1 for s, n in zip(starts.tolist(), lengths)])
    gaps = torch.randint(60, 3 * 86400, (total,), generator=g)
    times = torch.cat([torch.cumsum(t, 0) for t in torch.split(gaps, list(lengths))]) + 1_600_000_000
    lengths_t = torch.tensor(lengths, dtype=torch.long)
    side_values = [torch.randint(0, rows, (total,), generator=g) for rows in side_features.values()]
    batch_size = len(lengths)
    ends = torch.cumsum(lengths_t, 0) - 1
    if evaluation:
        targets, target_lengths = items[ends] % num_items + 1, torch.ones(batch_size, dtype=torch.long)
        target_times = times[ends] + 3600
    else:
        targets, target_lengths = torch.zeros(0, dtype=torch.long), torch.zeros(batch_size, dtype=torch.long)
        target_times = torch.full((batch_size,), -1)
    pool = {
        "catalogue": torch.arange(1, num_items + 1),
        "uniform": torch.randint(1, num_items + 1, (num_negatives,), generator=g),
        "none": torch.zeros(0, dtype=torch.long),
    }[candidates]
    pool_lengths = torch.zeros(batch_size, dtype=torch.long)
    pool_lengths[-1] = pool.numel()
    features = KeyedJaggedTensor(
        keys=sequence_keys(list(side_features)),
        values=torch.cat([times, items, *side_values, targets, pool]),
        lengths=torch.cat([lengths_t.repeat(2 + len(side_features)), target_lengths, pool_lengths]),
    )
    return SequenceBatch(
        features=features,
        user_ids=torch.arange(batch_size) + 1000 * seed,
        target_timestamps=target_times,
        weights=torch.ones(batch_size),
    )


# Small enough for ~1 minute per run on 2 cores; several checkpoint intervals per epoch.
TINY_JOB = [
    "--epochs",
    "2",
    "--set",
    "data.synthetic.num_users=160",
    "--set",
    "data.synthetic.max_length=120",
    "--set",
    "data.row_group_size=16",
    "--set",
    "data.train.max_tokens=512",
    "--set",
    "data.eval.max_tokens=4096",
    "--set",
    "data.train.max_seq_len=100",
    "--set",
    "data.eval.max_seq_len=100",
    "--set",
    "model.encoder.embedding_dim=16",
    "--set",
    "model.encoder.short_window=8",
    "--set",
    "model.encoder.dropout=0.1",
    "--set",
    "checkpoint.every_n_steps=4",
    "--set",
    "checkpoint.keep_last=2",
]


def launch_tiny_job(out_dir: Path, data_dir: Path, extra: Sequence[str] = ()) -> subprocess.Popen:
    """Starts the ``TINY_JOB`` training run as 2 processes under torchrun (one restart allowed),
    its output in ``<out_dir>.log``."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--max-restarts", "1",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0", "--monitor-interval", "0.5",
        "-m", "torchrec_hytrec.train", *TINY_JOB, "--out-dir", str(out_dir),
        "--set", f"data.cache_dir={data_dir}", *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LOGLEVEL": "WARNING"}
    log = open(out_dir.parent / f"{out_dir.name}.log", "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=Path(__file__).parents[1])
