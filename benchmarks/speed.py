"""Speed against history length: HyTRec and its baselines, and the streaming update.

For one user of ``n`` events, ``n`` from 100 to 16k, it measures training throughput (events per
second of a per-position forward, backward and AdamW step) and inference latency
(``forward_last``), for HyTRec with windowed and with full causal long-branch attention and for
the baselines of the same width and depth: all-softmax, windowed softmax (HyTRec's ``W``) and
HSTU-style (the encoders of ``bench_encoder.py``, timed by its functions: min/median/max,
encoders taking turns; their parameter counts are printed). Every speed-up names its baseline.
Then the cost of streaming one new event after ``n`` against a full recompute (both on one
thread). The load average is recorded at the start and the end. Results go to ``--out``:
``speed.json``, ``speed.md`` and ``speed_curves.png``.

    python benchmarks/speed.py                # about 10 minutes on 2 cores
    python benchmarks/speed.py --quick        # seconds
"""

import argparse
import dataclasses
import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List

import torch
from bench_encoder import (
    BASELINES,
    encoder_configs,
    make_batch,
    measure,
    parameter_count,
    speedups,
    stream_vs_recompute,
)
from timing import load_average

from torchrec_hytrec.training import configure_cpu_allocator

ROOT = Path(__file__).resolve().parents[1]


def plot(rows: List[Dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (train_ax, infer_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name in dict.fromkeys(r["encoder"] for r in rows):
        mine = [r for r in rows if r["encoder"] == name]
        n = [r["n"] for r in mine]
        train_ax.plot(n, [r["train_events_per_s"] for r in mine], marker="o", label=name)
        infer_ax.plot(n, [r["infer_ms"]["median"] for r in mine], marker="o", label=name)
    train_ax.set(
        xscale="log",
        yscale="log",
        xlabel="history length n (one user)",
        ylabel="training events/s",
        title="training throughput",
    )
    infer_ax.set(
        xscale="log",
        yscale="log",
        xlabel="history length n (one user)",
        ylabel="ms",
        title="inference latency (forward_last)",
    )
    for ax in (train_ax, infer_ax):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[100, 300, 1_000, 3_000, 10_000, 16_000])
    p.add_argument("--stream-lengths", type=int, nargs="+", default=[1_000, 10_000])
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "docs" / "results"))
    p.add_argument("--quick", action="store_true", help="tiny sizes, a smoke run")
    args = p.parse_args()
    if args.quick:
        args.lengths, args.stream_lengths, args.repeats = [100, 300], [100], 1
    torch.set_num_threads(args.threads)
    configure_cpu_allocator()  # as the training entry point runs
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = datetime.now(timezone.utc)
    load_at_start = os.getloadavg()
    print(f"load average {load_average()} at the start", flush=True)
    configs = encoder_configs(args.dim, args.heads, args.window)
    params = {name: parameter_count(config) for name, config in configs.items()}
    print("parameters: " + ", ".join(f"{name} {count:,}" for name, count in params.items()), flush=True)

    rows: List[Dict[str, Any]] = []
    for n in args.lengths:
        results = measure(configs, make_batch([n], args.dim, seed=n), args.repeats)
        for name, r in results.items():
            train, infer = r["train"], r["infer"]
            rows.append(
                {
                    "encoder": name,
                    "params": params[name],
                    "n": n,
                    "train_events_per_s": n / train.median * 1e3,
                    "train_ms": dataclasses.asdict(train),
                    "infer_ms": dataclasses.asdict(infer),
                    "train_x_vs": speedups(results, name, "train"),
                    "infer_x_vs": speedups(results, name, "infer"),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    streams: List[Dict[str, Any]] = []
    for n in args.stream_lengths:
        for name in ("hytrec_windowed", "hytrec_full"):
            r = stream_vs_recompute(configs[name], n, args.repeats)
            streams.append(
                {
                    "encoder": name,
                    "n": n,
                    "stream_ms": r["step_median_s"] * 1e3,
                    "stream_min_ms": r["step_min_s"] * 1e3,
                    "stream_max_ms": r["step_max_s"] * 1e3,
                    "recompute_ms": r["recompute"] * 1e3,
                    "recompute_over_stream": r["recompute"] / r["step_median_s"],
                    "prefill_over_forward_last": r["prefill"] / r["forward_last"],
                    "load_average": os.getloadavg(),
                }
            )
            print(json.dumps(streams[-1]), flush=True)

    load_at_end = os.getloadavg()
    print(f"load average {load_average()} at the end", flush=True)
    loads = {"load_average_start": load_at_start, "load_average_end": load_at_end}
    (out / "speed.json").write_text(
        json.dumps({"curves": rows, "streaming": streams, "params": params, **loads}, indent=1)
    )
    plot(rows, out / "speed_curves.png")

    def ms(stats: Dict[str, float]) -> str:
        return " / ".join(f"{stats[key]:.1f}" for key in ("min", "median", "max"))

    def ratios(row: Dict[str, Any], kind: str) -> str:
        return " / ".join(f"{row[f'{kind}_x_vs'][base]:.2f}x" for base in BASELINES)

    lines = [
        f"Command: `python benchmarks/speed.py {' '.join(sys.argv[1:])}`  ",
        f"Started {started:%Y-%m-%d %H:%M} UTC; torch {torch.__version__}, {args.threads} thread(s), "
        f"d={args.dim}, {args.heads} heads, pattern {configs['hytrec_full'].long_pattern}, "
        f"K={configs['hytrec_full'].short_window}, "
        f"W={args.window}; min / median / max of {args.repeats}; load average "
        f"{', '.join(f'{x:.2f}' for x in load_at_start)} at the start, "
        f"{', '.join(f'{x:.2f}' for x in load_at_end)} at the end.  ",
        "Every encoder has 4 long layers, the short branch and the fusion; parameters: "
        + ", ".join(f"{name} {count:,}" for name, count in params.items())
        + ". Speed-ups are the baseline's median time over the encoder's, against "
        + " / ".join(BASELINES)
        + " in that order.",
        "",
        "| n | encoder | training events/s | train ms | inference ms "
        f"| train speed-up vs {' / '.join(BASELINES)} | inference speed-up vs {' / '.join(BASELINES)} |",
        "|---|---|---|---|---|---|---|",
        *(
            f"| {r['n']} | {r['encoder']} | {r['train_events_per_s']:.0f} | {ms(r['train_ms'])} | "
            f"{ms(r['infer_ms'])} | {ratios(r, 'train')} | {ratios(r, 'infer')} |"
            for r in rows
        ),
        "",
        "Streaming one new event after n events against a full `forward_last` recompute (one thread, "
        "inference mode; the state from `prefill`):",
        "",
        "| n | encoder | stream ms (min / median / max) | recompute ms | recompute / stream "
        "| prefill / forward_last | load average |",
        "|---|---|---|---|---|---|---|",
        *(
            f"| {s['n']} | {s['encoder']} | {s['stream_min_ms']:.2f} / {s['stream_ms']:.2f} / "
            f"{s['stream_max_ms']:.2f} | {s['recompute_ms']:.1f} | {s['recompute_over_stream']:.0f} | "
            f"{s['prefill_over_forward_last']:.2f} | {', '.join(f'{x:.2f}' for x in s['load_average'])} |"
            for s in streams
        ),
        "",
        "![speed curves](speed_curves.png)",
        "",
    ]
    (out / "speed.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
