"""Process-group set-up from torchrun's environment: the one place that picks device and backend."""

import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.fx

from torchrec_hytrec.training.cpu_allocator import configure_cpu_allocator

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job.

    Args:
        rank: global rank.
        world_size: number of processes.
        local_rank: rank on this node (selects the GPU).
        device: ``cuda:<local_rank>`` when CUDA is available, else ``cpu``.
        backend: ``nccl`` with CUDA, ``gloo`` on CPU.

    Example::

        env = init_distributed()
        model = DistributedModelParallel(model, device=env.device)
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistEnv:
    """Joins the job torchrun/TorchX started (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_*``).

    Run without torchrun, the process forms a group of one with an in-memory store, so the
    same sharded code path (DistributedModelParallel, collectives) runs unchanged.

    On CPU it also sets up the allocator (:func:`configure_cpu_allocator`).

    Returns:
        The process's :class:`DistEnv`; the default process group is initialised.
    """
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs are visible; "
                "launch at most one process per GPU (-j NxG with G <= GPUs per host)"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
        configure_cpu_allocator()
    mute_fx_tracing_notice()
    if not dist.is_initialized():
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True):
            # torchelastic (torch 2.13) keeps one agent TCP store across worker restarts, so a
            # restarted worker can read the address a killed worker published and fail to
            # connect: namespace the group's keys by attempt.
            store = dist.TCPStore(
                os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False
            )
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            dist.init_process_group(
                backend, store=dist.PrefixStore(f"attempt_{attempt}", store), rank=rank, world_size=world_size
            )
        elif "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, rank=rank, world_size=world_size)
        elif world_size == 1:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        else:
            raise RuntimeError(f"WORLD_SIZE={world_size} but MASTER_ADDR is not set; launch with torchrun")
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=device, backend=backend)


def configure_threads() -> int:
    """Shares the machine's cores out between the local processes of the job (``OMP_NUM_THREADS``
    wins when set); returns this process's intra-op thread count.

    Logs :func:`shared_cores_warning` when other processes already keep the cores busy.
    """
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    threads = int(os.environ.get("OMP_NUM_THREADS", "0")) or (os.cpu_count() or 1) // local_processes
    torch.set_num_threads(max(1, threads))
    warning = shared_cores_warning(torch.get_num_threads(), local_processes)
    if warning is not None:
        logger.warning(warning)
    return torch.get_num_threads()


def shared_cores_warning(threads: int, local_processes: int) -> Optional[str]:
    """Why this job's threads are too many for the cores other processes leave it, or ``None``.

    Under OpenMP's default wait policy a thread spins at every barrier of a parallel op; when
    another process holds one of the cores, the partner a spinning thread waits for is
    descheduled, and a threaded training step can run many times slower than a single-threaded
    one (``benchmarks/bench_short.py --busy 1`` measures it). The 1-minute load average is what
    other processes kept busy before this job started.

    Args:
        threads: intra-op threads of each of this job's processes on the machine.
        local_processes: the job's processes on the machine.

    Returns:
        The warning to log, naming the load, the cores and the threads, or ``None`` when the
        threads are single or fit the idle cores.

    Example::

        >>> shared_cores_warning(threads=1, local_processes=2) is None
        True
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    busy = os.getloadavg()[0]
    if threads <= 1 or busy < 0.5 or threads * local_processes <= cores - busy:
        return None
    return (
        f"other processes kept {busy:.1f} of this machine's {cores} cores busy over the last minute "
        f"(load average) and this job runs {local_processes} process(es) x {threads} intra-op threads: "
        "on shared cores a threaded step can run many times slower than a single-threaded one "
        "(OpenMP threads spin-wait for descheduled partners); give the job dedicated cores or "
        "set OMP_NUM_THREADS=1"
    )


def mute_fx_tracing_notice() -> None:
    """Uses up torch.fx's once-per-process notice about ``is_fx_tracing`` with its logger silenced."""
    # TorchRec's KeyedJaggedTensor (and the pipeline's tracer) ask torch.fx whether it is tracing; torch then
    # logs, once per process, advice about which of its own APIs to call instead: nothing a user
    # of ours can act on. The notice is an lru-cached function: running it once with its logger
    # silenced uses up its one time.
    notice = getattr(torch.fx._symbolic_trace, "is_fx_tracing_warning", None)
    if notice is None:
        return
    fx_logger = logging.getLogger(torch.fx._symbolic_trace.__name__)
    level = fx_logger.level
    fx_logger.setLevel(logging.ERROR)
    try:
        notice()
    finally:
        fx_logger.setLevel(level)
