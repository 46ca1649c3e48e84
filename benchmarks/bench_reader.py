"""Events per second read from Parquet into SequenceBatch es on one core.

    python benchmarks/bench_reader.py [--num-users 5200] [--repeats 5] [--negatives uniform --num-negatives N]

Generates the "long" synthetic dataset (>= 5M events, histories up to 12k), writes it to a
temporary directory, then times full passes of :class:`SequenceReader` over the train split with
torch and Arrow both limited to one thread. Prints the median of ``--repeats`` passes.
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import torch

from torchrec_hytrec.data.parquet import write_sequences
from torchrec_hytrec.data.reader import NEGATIVES, ReaderConfig, SequenceReader
from torchrec_hytrec.data.synthetic import SyntheticConfig, generate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-users", type=int, default=5200)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--max-tokens", type=int, default=65_536)
    p.add_argument("--max-seq-len", type=int, default=16_384)
    p.add_argument("--row-group-size", type=int, default=256)
    p.add_argument("--shuffle", action="store_true")
    p.add_argument("--negatives", choices=NEGATIVES, default="none", help="softmax candidates per batch")
    p.add_argument("--num-negatives", type=int, default=0, help="candidates with --negatives uniform")
    args = p.parse_args()
    torch.set_num_threads(1)
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)

    t0 = time.perf_counter()
    data = generate(SyntheticConfig.long(num_users=args.num_users))
    t_gen = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "long.parquet"
        t0 = time.perf_counter()
        info = write_sequences(path, data.sequences, data.info, row_group_size=args.row_group_size)
        t_write = time.perf_counter() - t0
        print(
            f"dataset: {info.num_users} users, {info.num_events} events, longest "
            f"{int(data.sequences.lengths.max())}; generated in {t_gen:.2f} s "
            f"({info.num_events / t_gen / 1e6:.2f} M events/s), written in {t_write:.2f} s, "
            f"{path.stat().st_size / 2**20:.0f} MiB"
        )
        reader = SequenceReader(
            [path],
            ReaderConfig(max_tokens=args.max_tokens, max_seq_len=args.max_seq_len, shuffle=args.shuffle),
            negatives=args.negatives,
            num_negatives=args.num_negatives,
        )
        rates = []
        for epoch in range(args.repeats):
            reader.set_epoch(epoch)
            events = batches = 0
            t0 = time.perf_counter()
            for batch in reader:
                events += batch.timestamps.numel()
                batches += 1
            rates.append(events / (time.perf_counter() - t0))
        print(
            f"reader (train split, 1 thread, max_tokens={args.max_tokens}, shuffle={args.shuffle}, "
            f"negatives={args.negatives}): "
            f"{events} events in {batches} batches per pass; "
            f"median {statistics.median(rates) / 1e6:.2f} M events/s over {args.repeats} passes "
            f"(min {min(rates) / 1e6:.2f}, max {max(rates) / 1e6:.2f}); target >= 1 M events/s"
        )


if __name__ == "__main__":
    main()
