"""TorchX component for HyTRec training.

``torchx run`` executes this file's source, so it imports only installed packages (torchx).

Example::

    # locally: 1 node x 2 processes on this machine's CPUs
    torchx run -s local_cwd torchx_components/train.py:hytrec
    # two nodes of 8 GPUs on Kubernetes, from an image with this package installed
    torchx run -s kubernetes -cfg queue=default torchx_components/train.py:hytrec \
        --image registry/hytrec:latest -j 2x8 --gpu 8 --data /mnt/logs/beauty.parquet
"""

from typing import Dict, List, Optional, Union

import torchx
import torchx.specs as specs
from torchx.components import dist

_TRUE = ("true", "yes", "1", "on")
_FALSE = ("false", "no", "0", "off")


def _flag(name: str, value: Union[str, bool]) -> bool:
    """A boolean argument in any usual spelling, any case; anything else is refused, not read as false.

    torchx decodes a ``bool`` parameter as ``value.lower() == "true"``, so ``--resume yes`` or
    ``--resume 1`` would silently start over (and clear the checkpoints): the parameter is
    therefore a string, read here.
    """
    if isinstance(value, bool):
        return value
    text = value.strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise ValueError(
        f"--{name}: {value!r} is not a boolean; use one of {'/'.join(_TRUE)} or {'/'.join(_FALSE)} (any case)"
    )


def _at_least_one(name: str, value: Union[str, int]) -> int:
    """An integer >= 1; torchx hands an ``Optional[int]`` parameter over as the text typed."""
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"--{name}: {value!r} is not an integer") from None
    if number < 1:
        raise ValueError(f"--{name} must be >= 1, got {number}")
    return number


def hytrec(
    config: Optional[str] = None,
    data: Optional[str] = None,
    epochs: Optional[int] = None,
    out_dir: Optional[str] = None,
    resume: str = "false",
    overwrite: str = "false",
    overrides: Optional[List[str]] = None,
    j: str = "1x2",
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 4096,
    h: Optional[str] = None,
    image: str = torchx.IMAGE,
    max_retries: int = 0,
    env: Optional[Dict[str, str]] = None,
    rdzv_port: int = 29500,
    name: str = "hytrec",
) -> specs.AppDef:
    """Trains HyTRec retrieval with sharded item tables: ``python -m torchrec_hytrec.train`` under torchrun.

    Every process reads ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` from torchrun, uses gloo on CPU
    and NCCL with one GPU per process when ``gpu`` > 0. With no training arguments it generates
    the seeded synthetic dataset (cached under ``runs/data``) and trains the default config.

    Args:
        config: YAML training config (defaults: ``configs/default.yaml`` values built into the package)
        data: Parquet dataset written by ``python -m torchrec_hytrec.data.convert``; omit for synthetic data
        epochs: overrides the config's number of epochs
        out_dir: where metrics, TensorBoard events and checkpoints go (a shared filesystem on multi-node jobs)
        resume: continue from the newest complete checkpoint in ``out_dir`` (true/yes/1/on or
            false/no/0/off, any case; anything else is an error); set it with ``max_retries`` so that
            a retried job picks up where the failed one stopped
        overwrite: start afresh and delete the checkpoints an earlier run left in ``out_dir``
            (same spellings as ``resume``); without it a fresh run refuses such an ``out_dir``
        overrides: config overrides ``section.key=value``, comma separated
            (e.g. ``model.preset=sasrec_like,seed=1``)
        j: {nnodes}x{nproc_per_node}; for GPU hosts nproc_per_node must not exceed the GPUs per host
        cpu: CPUs per replica (node)
        gpu: GPUs per replica (node); > 0 selects CUDA and NCCL
        memMB: memory in MB per replica
        h: a registered named resource (takes precedence over cpu, gpu, memMB)
        image: container image with this package installed (ignored by ``local_cwd``)
        max_retries: scheduler retries of the whole job
        env: environment variables for the workers (e.g. ENV1=v1,ENV2=v2); ``OMP_NUM_THREADS``
            defaults to the replica's CPUs shared out between its processes; on hosts whose
            cores other processes share, set ``OMP_NUM_THREADS=1`` (the README's "CPU
            processes" gives the measured trade-off; training warns when it starts on busy cores)
        rdzv_port: port on rank 0's host for the c10d rendezvous store (multi-node only)
        name: job name
    """
    if epochs is not None:
        epochs = _at_least_one("epochs", epochs)
    if max_retries < 0:
        raise ValueError(f"--max_retries must be >= 0, got {max_retries}")
    args: List[str] = []
    if config is not None:
        args += ["--config", config]
    if data is not None:
        args += ["--data", data]
    if epochs is not None:
        args += ["--epochs", str(epochs)]
    if out_dir is not None:
        args += ["--out-dir", out_dir]
    resume_run, overwrite_run = _flag("resume", resume), _flag("overwrite", overwrite)
    if resume_run and overwrite_run:
        raise ValueError("--resume and --overwrite exclude each other: continue a run or replace it")
    if resume_run:
        args.append("--resume")
    if overwrite_run:
        args.append("--overwrite")
    for override in overrides or []:
        args += ["--set", override]
    nproc = int(j.split("x")[-1]) if "x" in j else 1
    # torchrun would otherwise force one thread per process and warn about it.
    env = {"OMP_NUM_THREADS": str(max(1, cpu // max(1, nproc))), **(env or {})}
    return dist.ddp(
        *args,
        m="torchrec_hytrec.train",
        image=image,
        name=name,
        h=h,
        cpu=cpu,
        gpu=gpu,
        memMB=memMB,
        j=j,
        env=env,
        max_retries=max_retries,
        rdzv_port=rdzv_port,
    )
