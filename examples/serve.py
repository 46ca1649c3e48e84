"""Serve a HyTRec retrieval model: export the user tower, load it in a fresh process, retrieve top-K.

1. Builds a ``HyTRecRetrieval`` model (``--checkpoint``: a ``state_dict`` saved with ``torch.save``
   of a model built with the same flags; random weights otherwise) and exports its user tower, the
   encoder's serving path ``forward_last`` read at the request time, with
   ``torchrec_hytrec.modules.export.export_user_tower``: one program for every batch size and
   history length. It saves the program with ``torch.export.save``, and the encoder's weights and
   the item table next to it.
2. Starts a fresh Python process (``--serve``), which loads the program with ``torch.export.load``
   (after importing ``torchrec_hytrec.modules``, which registers the ``hytrec::`` kernels the
   program calls), rebuilds the eager encoder from the saved weights, and for every batch of
   ``--users`` users with ``--history`` events each looks the events' item rows up in the table,
   runs the eager encoder and the exported program, and retrieves each user's top ``--k`` items
   with ``retrieve_topk``. It prints p50/p99 latency of both and checks that their top-K agree.

The item table is held whole here (``retrieve_topk(query, [(0, rows)], k)``). With a row-wise
sharded table (``DistributedModelParallel``), every rank passes its own blocks of rows
(``item_table_shards(model.embedding_collection)``) and the process group: each rank scores its
rows for every rank's users and the per-rank top-K are merged with an all-gather.

    python examples/serve.py                                  # about a minute on 2 idle CPU cores
    python examples/serve.py --repeats 50 --users 1 8 64 --history 100 1000 10000
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Tuple

import torch

from torchrec_hytrec.models.item_table import item_table_shards
from torchrec_hytrec.models.retrieval import HyTRecRetrieval, RetrievalConfig
from torchrec_hytrec.models.serving import retrieve_topk
from torchrec_hytrec.modules import HyTRecConfig, HyTRecEncoder
from torchrec_hytrec.modules.config import PRESETS
from torchrec_hytrec.modules.export import export_user_tower
from torchrec_hytrec.training import configure_cpu_allocator


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num-items", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--preset", default="hytrec", choices=list(PRESETS))
    parser.add_argument("--checkpoint", help="state_dict of a HyTRecRetrieval built with these flags")
    parser.add_argument("--users", type=int, nargs="+", default=[1, 64], help="batch sizes")
    parser.add_argument("--history", type=int, nargs="+", default=[1_000, 10_000], help="events per user")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per batch")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of the server")
    parser.add_argument("--workdir", help="where the program is saved (a temporary directory by default)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args()


def encoder_config(args: argparse.Namespace) -> HyTRecConfig:
    return getattr(HyTRecConfig, args.preset)(embedding_dim=args.dim)


def export(args: argparse.Namespace, workdir: Path) -> None:
    """Builds the model, exports its user tower and saves what the server loads."""
    torch.manual_seed(0)
    model = HyTRecRetrieval(
        RetrievalConfig(loss="full"), HyTRecEncoder(encoder_config(args)), num_items=args.num_items
    )
    if args.checkpoint:
        model.load_state_dict(torch.load(args.checkpoint, weights_only=True))
    encoder = model.encoder.eval()
    start = time.perf_counter()
    program = export_user_tower(encoder)
    print(f"exported the user tower in {time.perf_counter() - start:.1f} s", flush=True)
    torch.export.save(program, str(workdir / "user_tower.pt2"))
    shards, _ = item_table_shards(model.embedding_collection)
    torch.save({"encoder": encoder.state_dict(), "items": shards[0][1].detach()}, workdir / "weights.pt")


def histories(users: int, length: int, num_items: int, seed: int) -> Tuple[torch.Tensor, ...]:
    """``(item_ids, offsets, timestamps, request_time)`` of ``users`` users of ``length`` events:
    minutes within sessions, days between, the request an hour after the last event."""
    gen = torch.Generator().manual_seed(seed)
    items = torch.randint(1, num_items + 1, (users * length,), generator=gen)
    gaps = torch.where(
        torch.rand(users, length, generator=gen) < 0.1,
        torch.randint(3_600, 30 * 86_400, (users, length), generator=gen),
        torch.randint(1, 600, (users, length), generator=gen),
    )
    timestamps = 1_600_000_000 + gaps.cumsum(1)
    offsets = torch.arange(users + 1) * length
    return items, offsets, timestamps.flatten(), timestamps[:, -1] + 3_600


def percentiles(seconds: List[float]) -> str:
    ms = sorted(s * 1e3 for s in seconds)
    p99 = ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]
    return f"p50 {statistics.median(ms):8.2f} ms  p99 {p99:8.2f} ms"


def serve(args: argparse.Namespace, workdir: Path) -> None:
    """The fresh process: loads the program and the weights, times and checks both paths."""
    torch.set_num_threads(args.threads)
    configure_cpu_allocator()  # as the training entry point: freed tensor memory is kept for reuse
    program = torch.export.load(str(workdir / "user_tower.pt2")).module()
    weights = torch.load(workdir / "weights.pt", weights_only=True)
    encoder = HyTRecEncoder(encoder_config(args)).eval()
    encoder.load_state_dict(weights["encoder"])
    item_rows = [(0, weights["items"])]
    towers = {"eager": encoder.forward_last, "exported": program}
    all_equal = True
    with torch.inference_mode():
        for tower in towers.values():  # a warm-up call of each
            tower(weights["items"][:5], torch.tensor([0, 2, 5]), torch.arange(5), torch.tensor([1, 4]))
        for length in args.history:
            for users in args.users:
                items, offsets, timestamps, request_time = histories(
                    users, length, args.num_items, users + length
                )
                times: Dict[str, List[float]] = {name: [] for name in towers}
                top = {}
                for _ in range(args.repeats):
                    for name, tower in towers.items():
                        start = time.perf_counter()
                        # What the EmbeddingCollection's lookup of the items gives, from the whole table.
                        query = tower(weights["items"][items], offsets, timestamps, request_time)
                        _, top[name] = retrieve_topk(query, item_rows, args.k)
                        times[name].append(time.perf_counter() - start)
                same = torch.equal(top["eager"], top["exported"])
                all_equal &= same
                for name in towers:
                    print(
                        f"{users:>4} users x {length:>6} events  {name:>8}: {percentiles(times[name])}",
                        flush=True,
                    )
                print(
                    f"{users:>4} users x {length:>6} events  top-{args.k} of user 0: "
                    f"{top['exported'][0].tolist()}"
                    f"{'' if same else '  (eager differs!)'}",
                    flush=True,
                )
    print(f"top-{args.k} of the exported program equals eager's: {all_equal}")
    if not all_equal:
        sys.exit(1)


def main() -> None:
    args = parse_args()
    if args.serve:
        serve(args, Path(args.workdir))
        return
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        export(args, workdir)
        # A fresh interpreter, as a server would be: nothing of the exporting process carries over.
        command = [sys.executable, __file__, *sys.argv[1:], "--serve", "--workdir", str(workdir)]
        subprocess.run(command, check=True)


if __name__ == "__main__":
    main()
