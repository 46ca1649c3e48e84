"""Short histories: what HyTRec costs where linear attention has nothing to win.

Two measurements, each with the presets as trained (``HyTRecConfig.hytrec`` against
``HyTRecConfig.sasrec_like``: same width, 4 long layers; HyTRec adds its short branch and fusion),
timed in turns by the functions of ``bench_encoder.py``:

* a Beauty-like batch: ``--users`` users with geometric lengths of mean ``--mean-length``
  (clipped to ``[2, 50]``, as the Beauty preprocessing caps histories at 50), one training step
  (per-position forward, loss, backward, AdamW), for the default ``K = 64`` (which covers every
  history, so the long stack has nothing to do) and for ``quality.py``'s Beauty recipe ``K = 8``;
* the single-user break-even: the training step of one user of ``n`` events for ``n`` in
  ``--lengths``, and the smallest ``n`` from which HyTRec's median step is at most the
  all-softmax encoder's.

Times are min/median/max over ``--repeats``; the load average is printed before and after.

``--busy N`` measures something else: HyTRec's training step on the same inputs on 1 thread and on
``--threads`` threads in turns, with N other processes spinning (one core each; 0: none), so
users on shared cores can see which thread count to give a training process.

    python benchmarks/bench_short.py             # about two minutes on 2 cores
    python benchmarks/bench_short.py --quick     # seconds
    python benchmarks/bench_short.py --busy 2 --lengths 2048
"""

import argparse
import dataclasses
from typing import List, Optional

import numpy as np
import torch
from bench_encoder import make_batch, measure, parameter_count, step_fns
from timing import busy_loops, load_average, threads_against_one

from torchrec_hytrec.modules import HyTRecConfig
from torchrec_hytrec.training import configure_cpu_allocator


def beauty_like_lengths(users: int, mean_length: float, seed: int) -> List[int]:
    """Geometric lengths of mean ``mean_length``, clipped to ``[2, 50]``."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.geometric(1.0 / mean_length, size=users), 2, 50).tolist()


def shared_cores(args: argparse.Namespace, config: HyTRecConfig, lengths: List[int]) -> None:
    """HyTRec's training step on 1 and on ``args.threads`` threads beside ``args.busy`` busy loops,
    on the Beauty-like batch and on one user of each of ``args.lengths``."""
    print(f"beside {args.busy} busy loops (a process each): HyTRec training step, K={config.short_window}")
    batches = {f"beauty-like batch ({len(lengths)} users)": lengths}
    batches.update({f"one user of {n:>5} events": [n] for n in args.lengths})
    with busy_loops(args.busy):
        for name, batch_lengths in batches.items():
            _, train = step_fns({"hytrec": config}, make_batch(batch_lengths, args.dim, seed=0))
            compared = threads_against_one(train["hytrec"], args.threads, args.repeats, torch.device("cpu"))
            print(f"{name}: {compared}")
    print(f"load average at the end: {load_average()}")


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--users", type=int, default=256)
    parser.add_argument("--mean-length", type=float, default=9.0)
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 256, 384, 512, 768, 1024, 2048])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a smoke run")
    parser.add_argument("--busy", type=int, help="HyTRec on 1 against --threads threads beside N busy loops")
    args = parser.parse_args(argv)
    if args.quick:
        args.users, args.lengths, args.repeats = 32, [64, 256], 2
    torch.set_num_threads(args.threads)
    configure_cpu_allocator()
    configs = {
        "hytrec": HyTRecConfig.hytrec(embedding_dim=args.dim, num_heads=args.heads),
        "sasrec_like": HyTRecConfig.sasrec_like(embedding_dim=args.dim, num_heads=args.heads),
    }
    print(f"threads={args.threads} dim={args.dim} heads={args.heads} load average={load_average()}")
    print("parameters: " + ", ".join(f"{name} {parameter_count(c):,}" for name, c in configs.items()))
    print("training step ms, min/median/max; ratio = hytrec median / sasrec_like median")

    lengths = beauty_like_lengths(args.users, args.mean_length, seed=0)
    if args.busy is not None:
        shared_cores(args, dataclasses.replace(configs["hytrec"], short_window=8), lengths)
        return
    # The default K = 64 covers every Beauty-like history, so nothing reads HyTRec's long stack;
    # the Beauty recipe of quality.py (K = 8) gives it work.
    recipe = {**configs, "hytrec_k8": dataclasses.replace(configs["hytrec"], short_window=8)}
    results = measure(recipe, make_batch(lengths, args.dim, seed=0), args.repeats)
    sa = results["sasrec_like"]["train"]
    for name in ("hytrec", "hytrec_k8"):
        hy = results[name]["train"]
        print(
            f"beauty-like batch ({args.users} users, mean length {np.mean(lengths):.1f}, "
            f"{sum(lengths)} events), K={recipe[name].short_window}: {name} {hy}  sasrec_like {sa}  "
            f"ratio {hy.median / sa.median:.2f}"
        )

    break_even = None
    for n in args.lengths:
        results = measure(configs, make_batch([n], args.dim, seed=n), args.repeats)
        hy, sa = results["hytrec"]["train"], results["sasrec_like"]["train"]
        ratio = hy.median / sa.median
        print(f"one user of {n:>5} events: hytrec {hy}  sasrec_like {sa}  ratio {ratio:.2f}")
        if ratio <= 1 and break_even is None:
            break_even = n
        elif ratio > 1:
            break_even = None
    found = f"{break_even} events" if break_even is not None else f"above {args.lengths[-1]} events"
    print(f"single-user break-even (hytrec step <= sasrec_like step from here on): {found}")
    print(f"load average at the end: {load_average()}")


if __name__ == "__main__":
    main()
