"""What every benchmark here shares: timing in turns, the spread of the repeats, the load, and the
machine's physical FLOP/s ceiling.

The benchmarks run on shared machines, so each one prints the load average next to its figures
and times its candidates in turns (one call of each per round): a change of load then hits all
of them alike and their ratios stay meaningful. A throughput above what the cores can physically
do is a bug in the measurement (an asynchronous call not waited for, a cached result), and is
refused rather than printed.
"""

import contextlib
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional

import torch

# Upper bound of a server CPU's boost clock over the nominal one /proc/cpuinfo reports.
_BOOST_HEADROOM = 1.75


@dataclass(frozen=True)
class Spread:
    """Min / median / max of repeated timings, in milliseconds.

    Example::

        >>> s = Spread.of([3.0, 1.0, 2.0])
        >>> s.median, str(s)
        (2.0, '1.00/2.00/3.00')
    """

    min: float
    median: float
    max: float

    @classmethod
    def of(cls, times: List[float]) -> "Spread":
        return cls(min(times), statistics.median(times), max(times))

    def __str__(self) -> str:
        return f"{self.min:.2f}/{self.median:.2f}/{self.max:.2f}"


def time_in_turns(
    fns: Dict[str, Callable[[], object]], repeats: Dict[str, int], device: torch.device
) -> Dict[str, Spread]:
    """Wall time in ms of each function over its repeats, after one warm-up call each, the
    functions taking turns (one call of each per round)."""
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for round_ in range(max(repeats.values())):
        for name, fn in fns.items():
            if round_ >= repeats[name]:
                continue
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: Spread.of(t) for name, t in times.items()}


def threads_against_one(step: Callable[[], object], threads: int, repeats: int, device: torch.device) -> str:
    """``step`` on 1 and on ``threads`` intra-op threads, in turns: both spreads, the ratio of the
    medians and whether the threaded one is no slower. Leaves ``threads`` set."""

    def on(count: int) -> Callable[[], object]:
        def run() -> object:
            torch.set_num_threads(count)
            return step()

        return run

    times = time_in_turns({1: on(1), threads: on(threads)}, {1: repeats, threads: repeats}, device)
    torch.set_num_threads(threads)
    one, many = times[1], times[threads]
    verdict = "no slower" if many.median <= one.median else "SLOWER"
    return (
        f"1 thread {one} ms, {threads} threads {many} ms, ratio of medians {many.median / one.median:.2f} "
        f"({threads} threads {verdict})"
    )


def memory_kib() -> Dict[str, int]:
    """``VmHWM`` (peak resident set) and ``VmRSS`` of this process, in KiB (Linux)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(value.split()[0])
    return out


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, as ``uptime`` prints them."""
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def _cpu_facts() -> Dict[str, str]:
    facts: Dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() not in facts:
                    facts[key.strip()] = value.strip()
                if not line.strip() and facts:
                    break
    except OSError:
        pass
    return facts


def cpu_peak_gflops(threads: int) -> Optional[float]:
    """An upper bound of the fp32 GFLOP/s ``threads`` cores can do, ``None`` where unknown.

    Cores x fp32 flops per cycle x the nominal clock x a boost headroom. Flops per cycle: 16 without
    FMA; with FMA, two FMA pipes of 256 bits (32) on AMD before Zen 5 (family 25 and lower, where
    AVX-512 is double-pumped) and on AVX2-only parts; 64 with AVX-512 elsewhere.
    """
    facts = _cpu_facts()
    try:
        mhz = float(facts["cpu MHz"])
    except (KeyError, ValueError):
        return None
    flags = set(facts.get("flags", "").split())
    if "fma" not in flags:
        per_cycle = 16
    elif "avx512f" in flags and not (
        facts.get("vendor_id") == "AuthenticAMD" and int(facts.get("cpu family", "0")) <= 25
    ):
        per_cycle = 64
    else:
        per_cycle = 32
    cores = min(threads, os.cpu_count() or threads)
    return cores * per_cycle * mhz * 1e-3 * _BOOST_HEADROOM


def checked_gflops(flops: float, ms: float, threads: int, device: torch.device) -> float:
    """``flops`` done in ``ms`` as GFLOP/s; raises if that is above the CPU's physical ceiling."""
    gflops = flops / ms / 1e6
    peak = cpu_peak_gflops(threads) if device.type == "cpu" else None
    if peak is not None and gflops > peak:
        raise RuntimeError(
            f"measured {gflops:.0f} GFLOP/s on {threads} thread(s), above this CPU's physical ceiling of "
            f"{peak:.0f}: the measurement is wrong"
        )
    return gflops


@contextlib.contextmanager
def busy_loops(count: int) -> Iterator[None]:
    """``count`` other processes, each spinning on one core, while the body runs: the load of a
    machine whose cores are shared (they are separate processes, so the scheduler treats them as
    it would another job)."""
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        time.sleep(0.5)  # let them start spinning
        yield
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()
