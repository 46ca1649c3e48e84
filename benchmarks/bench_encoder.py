"""HyTRecEncoder against three baselines of the same width and depth, on CPU.

The encoders (:func:`encoder_configs`) all have HyTRec's structure: 4 long layers, the short
softmax branch over the last ``K`` events and the fusion gate. They differ only in their long
layers: HyTRec's ``TTTA`` with windowed (``W``) or full causal softmax layers, and the baselines
``all_softmax`` (``AAAA``, full causal), ``windowed_softmax`` (``AAAA``, each layer over the last
``W`` events, the same ``W`` as HyTRec's) and ``hstu_like`` (``HHHH``, HSTU-style pointwise
attention with relative position and time biases, parameter-matched to a softmax layer). They are
the presets of those names with the short branch kept (``use_short_branch=True``), so that only
the long layers differ; each encoder's parameter count is printed.

For every history length ``n`` and two batches (one user of ``n`` events; a mixed batch of that
user plus users with log-uniform lengths in ``[5, n]``) it measures, for each encoder:

* inference latency: ``forward_last`` under ``no_grad`` in eval mode;
* training step time: per-position forward, mean-square loss, backward and an AdamW step;
* peak memory of each: the rise of the process's peak resident set (``VmHWM``, reset through
  ``/proc/self/clear_refs``) over its resident set before the call, in a child process whose
  glibc returns every large block to the OS when freed (``MALLOC_MMAP_THRESHOLD_``), so each
  call starts from a clean slate.

Times are taken with the allocator set up as the training entry point sets it
(:func:`~torchrec_hytrec.training.configure_cpu_allocator`): with glibc's default, every
intermediate tensor is page-faulted in afresh on each call, which on small VMs costs more than
the arithmetic.

For the single-user batch it also profiles the all-softmax encoder once and reports the share of
its time spent inside the softmax-attention kernels (``scaled_dot_product_attention``, forward and
backward) and the bound that share puts on any encoder of the same width and depth that keeps the
rest of the work (projections, norms, FFNs, short branch, fusion): ``total / (total - attention)``
is the speed-up it would get if its long-branch attention cost nothing (Amdahl's law).

Then the streaming cost of one new event for a user with ``n_stream`` events against a full
``forward_last`` recompute of ``n_stream + 1`` events, both on one intra-op thread under
``torch.inference_mode`` (as a serving process runs them). The state is built by ``prefill``, which
equals streaming the history event by event (``tests/test_streaming.py``); its time is reported
against ``forward_last`` on the same history. Steps and recomputes take turns, so that a busy spell
of the shared machine slows both alike; the step's min/median/max and the load average are printed.
With ``--aoti`` the exported step is also compiled with AOTInductor (``compile_stream_step``; about
a minute per encoder), timed the same way and checked against the eager step's outputs.

All encoders are compared within one run; every time is printed as min/median/max over
``--repeats`` runs after a warm-up, the encoders taking turns run by run, and the load average is
printed at the start and the end. Speed-ups are the baseline's median time over the encoder's
(``> 1``: faster than that baseline), each printed with the name of its baseline.

    python benchmarks/bench_encoder.py            # full run (tens of minutes on 2 cores)
    python benchmarks/bench_encoder.py --quick    # seconds
"""

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Tuple

import torch
from timing import Spread, load_average, memory_kib, time_in_turns

from torchrec_hytrec.modules import HyTRecConfig, HyTRecEncoder
from torchrec_hytrec.training import configure_cpu_allocator

Batch = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]
# The encoders of encoder_configs that the speed-ups are measured against.
BASELINES = ("all_softmax", "windowed_softmax", "hstu_like")
# Timed streaming steps per run; each one is cheap.
_STREAM_STEPS = 50


def make_batch(lengths: List[int], dim: int, seed: int) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(sum(lengths), dim, generator=gen)
    times = []
    for n in lengths:
        session = torch.randint(1, 600, (n,), generator=gen)
        days = torch.randint(3600, 30 * 86400, (n,), generator=gen)
        gaps = torch.where(torch.rand(n, generator=gen) < 0.1, days, session)
        times.append(1_600_000_000 + torch.cumsum(gaps, 0))
    offsets = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    return values, offsets, torch.cat(times)


def mixed_lengths(n: int, users: int, seed: int) -> List[int]:
    """One user of ``n`` events and ``users - 1`` with log-uniform lengths in ``[5, n]``."""
    gen = torch.Generator().manual_seed(seed)
    log_lengths = torch.empty(users - 1).uniform_(math.log(5), math.log(n), generator=gen)
    return [n] + log_lengths.exp().long().tolist()


def peak_memory_mib(fn: Callable[[], object]) -> float:
    """Rise of peak RSS over current RSS while ``fn`` runs."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    before = memory_kib()["VmRSS"]
    fn()
    return (memory_kib()["VmHWM"] - before) / 1024


def step_fns(
    configs: Dict[str, HyTRecConfig], batch: Batch
) -> Tuple[Dict[str, Callable[[], None]], Dict[str, Callable[[], None]]]:
    """Per encoder, an inference call and a training step on ``batch``."""
    values, offsets, timestamps = batch
    infer, train = {}, {}
    for name, config in configs.items():
        torch.manual_seed(0)
        encoder = HyTRecEncoder(config)
        optimizer = torch.optim.AdamW(encoder.parameters(), lr=1e-4)

        def infer_fn(encoder: HyTRecEncoder = encoder) -> None:
            encoder.eval()
            with torch.no_grad():
                encoder.forward_last(values, offsets, timestamps)

        def train_fn(encoder: HyTRecEncoder = encoder, optimizer: torch.optim.Optimizer = optimizer) -> None:
            encoder.train()
            optimizer.zero_grad(set_to_none=True)
            encoder(values, offsets, timestamps).square().mean().backward()
            optimizer.step()

        infer[name], train[name] = infer_fn, train_fn
    return infer, train


def measure(configs: Dict[str, HyTRecConfig], batch: Batch, repeats: int) -> Dict[str, Dict[str, Spread]]:
    """Milliseconds (min/median/max) of every encoder's inference (``"infer"``) and training step
    (``"train"``) on ``batch``, the encoders taking turns."""
    infer, train = step_fns(configs, batch)
    cpu = torch.device("cpu")
    infer_ms = time_in_turns(infer, {name: repeats for name in infer}, cpu)
    train_ms = time_in_turns(train, {name: repeats for name in train}, cpu)
    return {name: {"infer": infer_ms[name], "train": train_ms[name]} for name in configs}


def speedups(results: Dict[str, Dict[str, Spread]], name: str, kind: str) -> Dict[str, float]:
    """Every baseline's median ``kind`` (``"infer"`` or ``"train"``) time over encoder ``name``'s."""
    mine = results[name][kind].median
    return {base: results[base][kind].median / mine for base in BASELINES if base in results}


def describe_speedups(results: Dict[str, Dict[str, Spread]], name: str) -> str:
    """One line: ``name``'s inference and training speed-ups, each naming its baseline."""
    parts = []
    for kind in ("infer", "train"):
        ratios = ", ".join(f"{x:.2f}x vs {base}" for base, x in speedups(results, name, kind).items())
        parts.append(f"{kind} {ratios}")
    return f"{name} speed-up (baseline median / its median): " + "; ".join(parts)


def parameter_count(config: HyTRecConfig) -> int:
    """Parameters of the encoder of ``config``."""
    return sum(p.numel() for p in HyTRecEncoder(config).parameters())


def measure_memory(args: argparse.Namespace, n: int, kind: str) -> Dict[str, Dict[str, float]]:
    """Peak MiB of every encoder's inference and training step, from a child process
    (``--memory-of``) started with glibc unmapping large blocks when freed."""
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--memory-of",
        str(n),
        kind,
        "--dim",
        str(args.dim),
        "--heads",
        str(args.heads),
        "--window",
        str(args.window),
        "--mixed-users",
        str(args.mixed_users),
        "--threads",
        str(args.threads),
    ]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.splitlines()[-1])


def _memory_child(args: argparse.Namespace, n: int, kind: str) -> None:
    infer, train = step_fns(encoder_configs(args.dim, args.heads, args.window), _batch(args, n, kind))
    for fn in (*infer.values(), *train.values()):
        fn()  # one-time allocations (optimizer state) are not the step's
    print(
        json.dumps(
            {
                name: {"infer_mib": peak_memory_mib(infer[name]), "train_mib": peak_memory_mib(train[name])}
                for name in infer
            }
        )
    )


def _batch(args: argparse.Namespace, n: int, kind: str) -> Batch:
    lengths = [n] if kind == "single" else mixed_lengths(n, args.mixed_users, seed=n)
    return make_batch(lengths, args.dim, seed=n)


def attention_share(config: HyTRecConfig, batch: Batch) -> Dict[str, float]:
    """Share of one training step and of one inference of the encoder spent in softmax-attention
    kernels, from the profiler's self times (its small per-op overhead counts as non-attention
    work, so the share is slightly understated)."""
    from torch.profiler import profile

    values, offsets, timestamps = batch
    torch.manual_seed(0)
    encoder = HyTRecEncoder(config)

    def train_step() -> None:
        encoder.train()
        encoder.zero_grad(set_to_none=True)
        encoder(values, offsets, timestamps).square().mean().backward()

    def infer() -> None:
        encoder.eval()
        with torch.no_grad():
            encoder.forward_last(values, offsets, timestamps)

    shares = {}
    for name, fn in (("train", train_step), ("infer", infer)):
        fn()
        with profile() as prof:
            fn()
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        attention = sum(e.self_cpu_time_total for e in events if "scaled_dot_product" in e.key)
        shares[name] = attention / total
    return shares


def stream_vs_recompute(
    config: HyTRecConfig, n: int, repeats: int, compiled: bool = False
) -> Dict[str, float]:
    """Seconds of one stream step after ``n`` events (min, median, max over ``repeats`` runs of
    ``_STREAM_STEPS`` steps), of the ``forward_last`` recompute over ``n + 1`` events (median) and of
    ``prefill`` and ``forward_last`` over the ``n`` events (medians), on one thread.

    With ``compiled``, also the step of the AOTInductor-compiled exported program
    (``compiled_min_s`` ...) on the same events, checked against eager's outputs; its driver compacts
    the full-causal caches between runs.
    """
    from torchrec_hytrec.modules.export import compile_stream_step
    from torchrec_hytrec.modules.streaming import compact_stream_state

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    encoder = HyTRecEncoder(config).eval()
    steps_needed = (repeats + 1) * _STREAM_STEPS + 1
    values, offsets, timestamps = make_batch([n + steps_needed], config.embedding_dim, seed=7)
    history = (values[:n], torch.tensor([0, n]), timestamps[:n])
    full = (values[: n + 1], torch.tensor([0, n + 1]), timestamps[: n + 1])
    steppers = {"eager": encoder.stream_step}
    if compiled:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            steppers["compiled"] = compile_stream_step(encoder, os.path.join(tmp, "step.pt2"))
    times: Dict[str, List[float]] = {"recompute": [], "prefill": [], "forward_last": []}
    times.update({name: [] for name in steppers})
    with torch.inference_mode():
        state = encoder.prefill(*history)
        states = {name: state for name in steppers}
        encoder.forward_last(*full)  # warm-up
        for run in range(repeats + 1):
            for kind, call, inputs in (
                ("recompute", encoder.forward_last, full),
                ("prefill", encoder.prefill, history),
                ("forward_last", encoder.forward_last, history),
            ):
                start = time.perf_counter()
                call(*inputs)
                times[kind].append(time.perf_counter() - start)
            first = n + run * _STREAM_STEPS
            outputs: Dict[str, List[torch.Tensor]] = {}
            for name, step in steppers.items():
                outputs[name] = []
                for row in range(first, first + _STREAM_STEPS):
                    start = time.perf_counter()
                    out, states[name] = step(states[name], values[row : row + 1], timestamps[row : row + 1])
                    times[name].append(time.perf_counter() - start)
                    outputs[name].append(out)
            if compiled:
                torch.testing.assert_close(outputs["compiled"], outputs["eager"], rtol=1e-4, atol=1e-5)
                states["compiled"] = compact_stream_state(states["compiled"])
    torch.set_num_threads(threads)
    # The first run of each is a warm-up.
    result = {kind: statistics.median(t[1:]) for kind, t in times.items() if kind not in steppers}
    for name in steppers:
        timed = times[name][_STREAM_STEPS:]
        prefix = "step" if name == "eager" else name
        result.update(
            {
                f"{prefix}_min_s": min(timed),
                f"{prefix}_median_s": statistics.median(timed),
                f"{prefix}_max_s": max(timed),
            }
        )
    return result


def describe_stream(name: str, r: Dict[str, float]) -> str:
    """One line of :func:`stream_vs_recompute`'s results."""
    line = (
        f"{name:>16}: stream {r['step_median_s'] * 1e3:.2f} ms, recompute {r['recompute'] * 1e3:.1f} ms, "
        f"stream/recompute = 1/{r['recompute'] / r['step_median_s']:.0f} (step min/median/max "
        f"{r['step_min_s'] * 1e3:.2f}/{r['step_median_s'] * 1e3:.2f}/{r['step_max_s'] * 1e3:.2f} ms); "
        f"prefill {r['prefill'] * 1e3:.1f} ms = {r['prefill'] / r['forward_last']:.2f}x forward_last"
    )
    if "compiled_median_s" in r:
        line += (
            f"; AOTInductor step min/median/max {r['compiled_min_s'] * 1e3:.2f}/"
            f"{r['compiled_median_s'] * 1e3:.2f}/{r['compiled_max_s'] * 1e3:.2f} ms "
            f"= 1/{r['recompute'] / r['compiled_median_s']:.0f}"
        )
    return line


def encoder_configs(dim: int, heads: int, window: int) -> Dict[str, HyTRecConfig]:
    """HyTRec with windowed and with full causal long-branch attention, and the baselines
    (:data:`BASELINES`) of the same width and depth: 4 long layers + short branch + fusion each,
    the baselines being the presets of their names with the short branch kept."""
    base = HyTRecConfig.hytrec(embedding_dim=dim, num_heads=heads)
    same = {"num_layers": len(base.long_pattern), "embedding_dim": dim, "num_heads": heads}
    kept = {"use_short_branch": True, "short_window": base.short_window}
    return {
        "hytrec_windowed": dataclasses.replace(base, long_attention_window=window),
        "hytrec_full": base,
        "all_softmax": HyTRecConfig.sasrec_like(**same, **kept),
        "windowed_softmax": HyTRecConfig.windowed_softmax(window=window, **same, **kept),
        "hstu_like": HyTRecConfig.hstu_like(**same, **kept),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a smoke run")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1_000, 4_000, 10_000, 16_000])
    parser.add_argument("--mixed-users", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument(
        "--window", type=int, default=256, help="long-branch softmax window W of the windowed variant"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--stream-length", type=int, default=10_000)
    parser.add_argument(
        "--aoti", action="store_true", help="also time the AOTInductor-compiled exported step"
    )
    parser.add_argument("--stream-only", action="store_true", help="only the streaming comparison")
    parser.add_argument("--memory-of", nargs=2, metavar=("N", "KIND"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.lengths, args.mixed_users, args.repeats, args.stream_length = [300], 4, 2, 300
    if args.stream_only:
        args.lengths = []
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.memory_of:
        _memory_child(args, int(args.memory_of[0]), args.memory_of[1])
        return
    configure_cpu_allocator()

    configs = encoder_configs(args.dim, args.heads, args.window)
    base = configs["hytrec_full"]
    print(
        f"torch {torch.__version__}, {args.threads} threads, d={args.dim}, heads={args.heads}, "
        f"K={base.short_window}, pattern {base.long_pattern}, W={args.window}, "
        f"times in ms as min/median/max of {args.repeats}; load average {load_average()} at the start"
    )
    params = {name: parameter_count(config) for name, config in configs.items()}
    print("parameters: " + ", ".join(f"{name} {count:,}" for name, count in params.items()))
    header = (
        f"{'n':>6} {'batch':>6} {'events':>7} {'encoder':>16} {'params':>8} {'infer ms':>20} "
        f"{'train ms':>20} {'inf MiB':>8} {'trn MiB':>8}"
    )
    print(header)
    for n in args.lengths:
        for kind in ("single", "mixed"):
            batch = _batch(args, n, kind)
            results = measure(configs, batch, args.repeats)
            memory = measure_memory(args, n, kind)
            for name, r in results.items():
                mib = memory[name]
                print(
                    f"{n:>6} {kind:>6} {batch[0].shape[0]:>7} {name:>16} {params[name]:>8} "
                    f"{str(r['infer']):>20} {str(r['train']):>20} "
                    f"{mib['infer_mib']:>8.1f} {mib['train_mib']:>8.1f}",
                    flush=True,
                )
            for name in ("hytrec_windowed", "hytrec_full"):
                print(f"{'':>22}{describe_speedups(results, name)}", flush=True)

    print(
        "\nall-softmax encoder, one user: share of time in attention kernels -> Amdahl bound on the speed-up"
    )
    for n in args.lengths:
        shares = attention_share(configs["all_softmax"], make_batch([n], args.dim, seed=n))
        print(
            f"{n:>6}: train {shares['train']:.0%} -> at most {1 / (1 - shares['train']):.2f}x, "
            f"infer {shares['infer']:.0%} -> at most {1 / (1 - shares['infer']):.2f}x",
            flush=True,
        )

    print(
        f"\nstreaming one event after {args.stream_length} vs forward_last recompute "
        f"(1 thread, inference mode), load average {load_average()}"
    )
    for name in ("hytrec_windowed", "hytrec_full"):
        result = stream_vs_recompute(configs[name], args.stream_length, args.repeats, compiled=args.aoti)
        print(describe_stream(name, result), flush=True)
    print(f"load average {load_average()} at the end")


if __name__ == "__main__":
    main()
