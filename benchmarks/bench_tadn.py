"""Speed of the chunked TADN kernel against the step-by-step reference and causal softmax attention.

Prints, for sequence lengths n (2 heads, head dim 64 by default): forward and forward+backward
milliseconds (medians of repeats) of ``chunk_tadn``, ``naive_recurrent_tadn`` (up to
``--max-ref-len``) and ``scaled_dot_product_attention(is_causal=True)`` on the same q, k, v shapes;
the ratios between them; ``chunk_tadn``'s achieved GFLOP/s (matmul and triangular-solve flops of its
algorithm, see :func:`chunk_tadn_flops`) next to a 2048x2048 fp32 matmul measured in the same run;
and a jagged batch (one user of 10k events + 99 users of 100) against one sequence of the same
total number of events.

    python benchmarks/bench_tadn.py                 # the full table
    python benchmarks/bench_tadn.py --quick         # n in {1k, 2k}, fewer repeats
    python benchmarks/bench_tadn.py --lengths 8192 16384 --chunk-size 128
    python benchmarks/bench_tadn.py --busy 2 --lengths 4096 16384   # on cores other processes use

``--busy N`` measures something else: with N other processes spinning (one core each; 0: none), the
fwd+bwd of ``chunk_tadn`` on 1 thread and on ``--threads`` threads in turns, and whether the
threaded kernel is still no slower than the single-threaded one.
"""

import argparse
import os
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from timing import busy_loops, checked_gflops, load_average, threads_against_one, time_in_turns

from torchrec_hytrec.modules.config import HyTRecConfig
from torchrec_hytrec.ops.tadn import chunk_tadn, naive_recurrent_tadn
from torchrec_hytrec.training import configure_cpu_allocator


def chunk_tadn_flops(
    lengths: Sequence[int], heads: int, dk: int, dv: int, chunk_size: int, backward: bool
) -> float:
    """Matmul and triangular-solve flops of ``chunk_tadn`` (elementwise work not counted).

    Counts the products of ``chunk.py`` per chunk and head (a multiply-add is 2 flops; a unit
    triangular solve with ``r`` right-hand sides costs ``C**2 * r``).
    """
    C, K, V = chunk_size, dk, dv
    chunks = sum((n + C - 1) // C for n in lengths) * heads
    # kk, solve, M, R, state step, qk, P W, P U, Qeff S
    fwd = 2 * C * C * K + C * C * (K + V) + 2 * C * K * K + 2 * C * K * V + 2 * K * K * V
    fwd += 2 * C * C * K + 2 * C * C * K + 2 * C * C * V + 2 * C * K * V
    if not backward:
        return float(chunks * fwd)
    # recompute kk, qk, M, Qeff; Qeff^T dO; reverse step; dQeff, dM, dP, dU, dW, dKd;
    # transposed solve, dA; dQ, dK (two products).
    bwd = 2 * C * C * K * 3 + 2 * C * K * K + 2 * C * K * V + 2 * K * K * V
    bwd += 2 * C * K * V + 2 * K * K * V + 2 * C * C * (K + V) + 2 * (C * C * V + C * K * V)
    bwd += 2 * (C * C * K + C * K * K) + 2 * (C * K * V + C * K * K)
    bwd += C * C * (K + V) + 2 * C * C * (K + V)
    bwd += 2 * C * C * K + 2 * 2 * C * C * K
    return float(chunks * (fwd + bwd))


def tadn_inputs(
    lengths: Sequence[int], heads: int, dim: int, device: torch.device, seed: int = 0
) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device)

    return {
        "q": F.normalize(rnd(T, heads, dim), dim=-1),
        "k": F.normalize(rnd(T, heads, dim), dim=-1),
        "v": rnd(T, heads, dim),
        "log_alpha": F.logsigmoid(rnd(T, heads) + 3.0),
        "beta": torch.sigmoid(rnd(T, heads)),
        "offsets": torch.tensor([0, *lengths], device=device).cumsum(0),
    }


def tadn_step_fn(
    op: Callable[..., object], inputs: Dict[str, torch.Tensor], backward: bool, **kwargs: object
) -> Callable[[], object]:
    leaves = {
        name: x.clone().requires_grad_(backward) if name != "offsets" else x for name, x in inputs.items()
    }

    def run() -> object:
        if not backward:
            with torch.no_grad():
                return op(**leaves, **kwargs)
        o, _ = op(**leaves, **kwargs)
        o.sum().backward()
        return o

    return run


def sdpa_step_fn(n: int, heads: int, dim: int, device: torch.device, backward: bool) -> Callable[[], object]:
    q, k, v = (torch.randn(1, heads, n, dim, device=device, requires_grad=backward) for _ in range(3))

    def run() -> object:
        if not backward:
            with torch.no_grad():
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        o.sum().backward()
        return o

    return run


def shared_cores(args: argparse.Namespace, device: torch.device) -> None:
    """fwd+bwd on 1 and on ``args.threads`` threads, in turns, beside ``args.busy`` busy loops."""
    print(
        f"beside {args.busy} busy loops (a process each): chunk_tadn fwd+bwd on 1 and {args.threads} threads"
    )
    with busy_loops(args.busy):
        for n in args.lengths:
            inputs = tadn_inputs([n], args.heads, args.dim, device)
            step = tadn_step_fn(chunk_tadn, inputs, True, chunk_size=args.chunk_size)
            print(f"{n:>6} events: {threads_against_one(step, args.threads, args.repeats, device)}")
    print(f"load average at the end: {load_average()}")


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--quick", action="store_true", help="n in {1k, 2k}, 3 repeats, small jagged batch")
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=HyTRecConfig().tadn_chunk_size)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--ref-repeats", type=int, default=3)
    parser.add_argument("--max-ref-len", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--busy", type=int, default=None, help="time 1 against --threads threads beside N busy loops"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.lengths, args.repeats, args.ref_repeats, args.max_ref_len = [1024, 2048], 3, 1, 1024
    torch.set_num_threads(args.threads)
    configure_cpu_allocator()  # as the training entry point runs
    device = torch.device(args.device)
    H, D, C = args.heads, args.dim, args.chunk_size
    threads = torch.get_num_threads()
    print(
        f"device={device} threads={threads} heads={H} dim={D} chunk={C} torch={torch.__version__} "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')} load average={load_average()}"
    )
    print("times: min/median/max ms over the repeats; ratios and GFLOP/s from the medians")
    if args.busy is not None:
        shared_cores(args, device)
        return

    a = torch.randn(2048, 2048, device=device)
    mm = time_in_turns({"mm": lambda: a @ a}, {"mm": args.repeats}, device)["mm"]
    mm_gflops = checked_gflops(2 * 2048**3, mm.median, threads, device)
    print(f"2048x2048 matmul: {mm} ms = {mm_gflops:.0f} GFLOP/s")

    header = (
        f"{'n':>6} {'pass':>8} {'chunk ms':>22} {'ref ms':>9} {'sdpa ms':>24} "
        f"{'ref/chunk':>9} {'sdpa/chunk':>10} {'GFLOP/s':>8} {'%mm':>5}"
    )
    print(header)
    chunk_ms: Dict[tuple, float] = {}
    for n in args.lengths:
        inputs = tadn_inputs([n], H, D, device)
        for backward in (False, True):
            name = "fwd+bwd" if backward else "fwd"
            fns = {
                "chunk": tadn_step_fn(chunk_tadn, inputs, backward, chunk_size=C),
                "sdpa": sdpa_step_fn(n, H, D, device, backward),
            }
            repeats = {"chunk": args.repeats, "sdpa": args.repeats}
            if n <= args.max_ref_len:
                fns["ref"] = tadn_step_fn(naive_recurrent_tadn, inputs, backward)
                repeats["ref"] = args.ref_repeats
            times = time_in_turns(fns, repeats, device)
            ms, sdpa = times["chunk"].median, times["sdpa"].median
            ref = times["ref"].median if "ref" in times else float("nan")
            chunk_ms[(n, backward)] = ms
            gflops = checked_gflops(chunk_tadn_flops([n], H, D, D, C, backward), ms, threads, device)
            print(
                f"{n:>6} {name:>8} {str(times['chunk']):>22} {ref:>9.1f} {str(times['sdpa']):>24} "
                f"{ref / ms:>9.1f} {sdpa / ms:>10.2f} {gflops:>8.1f} {100 * gflops / mm_gflops:>4.0f}%"
            )
    for lo, hi in zip(args.lengths, args.lengths[1:]):
        if hi == 2 * lo:
            print(
                f"time({hi})/time({lo}): fwd {chunk_ms[(hi, False)] / chunk_ms[(lo, False)]:.2f}, "
                f"fwd+bwd {chunk_ms[(hi, True)] / chunk_ms[(lo, True)]:.2f}"
            )

    long_len, short_len, shorts = (2000, 100, 19) if args.quick else (10000, 100, 99)
    jagged = [long_len] + [short_len] * shorts
    total = sum(jagged)
    for backward in (False, True):
        name = "fwd+bwd" if backward else "fwd"
        times = time_in_turns(
            {
                "jagged": tadn_step_fn(chunk_tadn, tadn_inputs(jagged, H, D, device), backward, chunk_size=C),
                "one": tadn_step_fn(chunk_tadn, tadn_inputs([total], H, D, device), backward, chunk_size=C),
            },
            {"jagged": args.repeats, "one": args.repeats},
            device,
        )
        jag, one = times["jagged"], times["one"]
        print(
            f"jagged 1x{long_len} + {shorts}x{short_len} vs one sequence of {total}, {name}: "
            f"{jag} ms vs {one} ms, ratio of medians {jag.median / one.median:.2f}"
        )
    print(f"load average at the end: {load_average()}")


if __name__ == "__main__":
    main()
