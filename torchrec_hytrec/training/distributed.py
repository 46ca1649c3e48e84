"""Process-group set-up from torchrun's environment: the one place that picks device and backend."""

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.fx

from torchrec_hytrec.training.cpu_allocator import configure_cpu_allocator


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
    wins when set); returns this process's intra-op thread count."""
    threads = int(os.environ.get("OMP_NUM_THREADS", "0")) or (os.cpu_count() or 1) // int(
        os.environ.get("LOCAL_WORLD_SIZE", "1")
    )
    torch.set_num_threads(max(1, threads))
    return torch.get_num_threads()


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
