"""Training entry point: ``python -m torchrec_hytrec.train`` (alone, under torchrun or TorchX).

With no arguments it generates the seeded synthetic dataset (cached under ``runs/data``) and
trains :class:`~torchrec_hytrec.models.retrieval.HyTRecRetrieval` with row-wise sharded tables;
``--data PATH`` trains on a Parquet dataset written by ``python -m torchrec_hytrec.data.convert``.
Each epoch it evaluates the full catalogue on the leave-one-out valid and test splits, next to a
popularity baseline on the same users, and writes the metrics as a table, JSONL, CSV and
TensorBoard events under ``out_dir``. Checkpoints (``torch.distributed.checkpoint``) are taken
every ``checkpoint.every_n_steps`` steps and at each epoch end; ``--resume`` (implied on a
torchelastic restart) continues from the newest intact one of the same run.

Example::

    python -m torchrec_hytrec.train --epochs 2 --set model.preset=sasrec_like
    torchrun --nproc_per_node 2 -m torchrec_hytrec.train --data beauty.parquet --resume
"""

import argparse
import json
import os
from typing import Any, Dict, List, Optional, Sequence

import torch.distributed as dist

from torchrec_hytrec.training.config import TrainConfig, config_reference, load_config
from torchrec_hytrec.training.distributed import configure_threads, init_distributed
from torchrec_hytrec.training.trainer import Trainer


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m torchrec_hytrec.train",
        description=__doc__.split("\n\n")[0],
        epilog="config keys (--set KEY=VALUE, or the same nesting in --config YAML), with their defaults:\n"
        + config_reference(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="YAML config (default: the built-in one, as in configs/default.yaml)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override, repeatable: --set model.preset=sasrec_like --set optim.dense_lr=3e-4",
    )
    p.add_argument("--data", help="Parquet dataset from the converter (data.path); default: synthetic")
    p.add_argument("--epochs", type=int, help="epochs (epochs)")
    p.add_argument("--out-dir", help="metrics and checkpoints directory (out_dir)")
    p.add_argument("--seed", type=int, help="seed (seed)")
    resume = p.add_mutually_exclusive_group()
    resume.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest intact checkpoint of the same run in out_dir "
        "(implied on a torchelastic restart)",
    )
    resume.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh and delete the checkpoints an earlier run left in out_dir "
        "(without it a fresh run refuses such an out_dir)",
    )
    p.add_argument(
        "--fault-at-step",
        type=int,
        help="test knob: the last rank SIGKILLs itself at this global step on the first attempt",
    )
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The config file, then ``--set`` overrides, then the explicit flags."""
    flags = {
        "data.path": args.data,
        "epochs": args.epochs,
        "out_dir": args.out_dir,
        "seed": args.seed,
        "fault_at_step": args.fault_at_step,
    }
    explicit = [f"{k}={json.dumps(v)}" for k, v in flags.items() if v is not None]
    return load_config(args.config, [*args.overrides, *explicit])


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    env = init_distributed()
    configure_threads()
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    try:
        return Trainer(cfg, env).fit(
            resume=args.resume, overwrite=args.overwrite and not restarted, restarted=restarted
        )
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
