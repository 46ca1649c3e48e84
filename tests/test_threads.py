"""The thread count of a training process, and the warning when other processes share its cores."""

import logging
import os

import pytest
import torch

from torchrec_hytrec.training.distributed import configure_threads, shared_cores_warning


@pytest.fixture
def machine(monkeypatch):
    """A machine of ``cores`` cores whose last-minute load average is ``load``."""

    def set_machine(cores: int, load: float) -> None:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
        monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))

    threads = torch.get_num_threads()
    yield set_machine
    torch.set_num_threads(threads)


def test_threads_beyond_the_idle_cores_are_named(machine) -> None:
    machine(cores=2, load=1.3)
    warning = shared_cores_warning(threads=2, local_processes=1)
    assert warning is not None
    for part in ("1.3 of this machine's 2 cores", "1 process(es) x 2 intra-op threads", "OMP_NUM_THREADS=1"):
        assert part in warning, warning


@pytest.mark.parametrize(
    "cores, load, threads, processes",
    [
        (2, 1.3, 1, 1),  # a single thread has no partner to wait for
        (2, 0.2, 2, 1),  # an idle machine
        (16, 4.0, 4, 2),  # 8 threads fit the 12 idle cores
    ],
)
def test_no_warning_where_the_threads_fit(
    machine, cores: int, load: float, threads: int, processes: int
) -> None:
    machine(cores=cores, load=load)
    assert shared_cores_warning(threads=threads, local_processes=processes) is None


def test_configure_threads_logs_the_warning(machine, monkeypatch, caplog) -> None:
    machine(cores=2, load=1.0)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    with caplog.at_level(logging.WARNING, logger="torchrec_hytrec.training.distributed"):
        assert configure_threads() == 2
    assert [r.getMessage() for r in caplog.records] == [shared_cores_warning(2, 1)]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    caplog.clear()
    assert configure_threads() == 1 and not caplog.records
