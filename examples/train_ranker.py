"""Train the DLRM-style HyTRecRanker on ranking rows derived from synthetic behaviour sequences.

Each user's real next item is the positive and ``--negatives`` uniformly sampled items are the
negatives (``ranking_batch_from_sequences``); training rows come from the leave-one-out training
split, evaluation rows from the validation split. The stack is the production one: Parquet
sequences read by ``SequenceReader``, tables sharded by ``DistributedModelParallel`` with fused
row-wise Adagrad applied in the backward, AdamW for dense parameters, AUC and NE from
``torchrec.metrics``, and TorchRec's ``TrainPipelineSparseDist`` overlapping the tables' input
distribution with compute. Run alone it forms a process group of one; under ``torchrun`` it shards
over the ranks (the reader gives every rank the same number of batches, padding with zero-weight
ones)::

    python examples/train_ranker.py                     # about a minute on 2 CPU cores
    torchrun --nproc-per-node 2 examples/train_ranker.py
"""

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import torch
import torch.distributed as dist
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

from torchrec_hytrec.data.parquet import write_sequences
from torchrec_hytrec.data.ranking import (
    NUM_DERIVED_DENSE,
    RECENT_ITEMS_KEY,
    USER_BUCKET_KEY,
    RankingBatch,
    ranking_batch_from_sequences,
)
from torchrec_hytrec.data.reader import ReaderConfig, SequenceReader
from torchrec_hytrec.data.splits import Split
from torchrec_hytrec.data.synthetic import SyntheticConfig, generate
from torchrec_hytrec.models.embeddings import side_feature_rows
from torchrec_hytrec.models.ranking import (
    HyTRecRanker,
    HyTRecRankerTrain,
    RankerConfig,
    ranking_metric_inputs,
    ranking_metric_module,
)
from torchrec_hytrec.models.sharding import shard_model
from torchrec_hytrec.modules import HyTRecConfig, HyTRecEncoder
from torchrec_hytrec.training.distributed import init_distributed
from torchrec_hytrec.training.loop import evaluation_outputs, make_pipeline, train_epoch
from torchrec_hytrec.training.optimizer import OptimizerConfig, apply_sparse_optimizer, make_optimizer


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--users", type=int, default=800, help="synthetic users")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--embedding-dim", type=int, default=32)
    p.add_argument("--max-seq-len", type=int, default=64, help="most recent events kept per user")
    p.add_argument("--max-tokens", type=int, default=4096, help="most history events per sequence batch")
    p.add_argument("--negatives", type=int, default=4, help="sampled negatives per positive")
    p.add_argument("--user-buckets", type=int, default=512)
    p.add_argument("--sparse-lr", type=float, default=0.1)
    p.add_argument("--dense-lr", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--workdir", type=Path, default=None, help="where the Parquet file goes (a temp dir if unset)"
    )
    return p


def _ranking_batches(
    reader: SequenceReader, args: argparse.Namespace, num_items: int, seed: int
) -> Iterable[RankingBatch]:
    generator = torch.Generator().manual_seed(seed)
    for batch in reader:
        rows = ranking_batch_from_sequences(
            batch,
            num_items=num_items,
            num_negatives=args.negatives,
            user_buckets=args.user_buckets,
            generator=generator,
        )
        yield rows


def _evaluate(
    pipeline: TrainPipelineSparseDist,
    model: torch.nn.Module,
    batches: Iterable[RankingBatch],
    world_size: int,
    rank: int,
) -> Dict[str, float]:
    """Validation AUC / NE over every rank's rows, on every rank."""
    metrics = None
    for outputs in evaluation_outputs(pipeline, model, batches):
        if metrics is None:
            rows = outputs[1].numel()
            metrics = ranking_metric_module(batch_size=rows, world_size=world_size, rank=rank)
        metrics.update(ranking_metric_inputs(outputs))
    # TorchRec reduces the metrics onto rank 0 only; every rank returns them.
    result = [{k: float(v) for k, v in metrics.compute().items()} if metrics is not None else {}]
    dist.broadcast_object_list(result, src=0)
    return {"auc": result[0]["auc-ctr|window_auc"], "ne": result[0]["ne-ctr|window_ne"]}


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, float]]:
    """Trains and returns the validation AUC/NE before training and after every epoch."""
    args = _parser().parse_args(argv)
    owns_group = not dist.is_initialized()
    env = init_distributed()
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        path = workdir / f"synthetic_rank{env.rank}.parquet"
        data = generate(SyntheticConfig(num_users=args.users, seed=args.seed))
        info = write_sequences(
            path, data.sequences, data.info, row_group_size=max(1, args.users // (4 * env.world_size))
        )
        batching = ReaderConfig(max_tokens=args.max_tokens, max_seq_len=args.max_seq_len)
        train_reader = SequenceReader(
            [path], dataclasses.replace(batching, shuffle=True), split=Split.TRAIN, seed=args.seed
        )
        valid_reader = SequenceReader([path], batching, split=Split.VALID)

        d = args.embedding_dim
        config = RankerConfig(
            num_items=info.num_items,
            embedding_dim=d,
            dense_in_features=NUM_DERIVED_DENSE,
            sparse_features={USER_BUCKET_KEY: args.user_buckets, RECENT_ITEMS_KEY: info.num_items + 1},
            side_features=side_feature_rows(info, list(info.feature_cardinalities)),
        )
        encoder = HyTRecEncoder(
            HyTRecConfig.hytrec(embedding_dim=d, num_heads=2, short_window=16, long_pattern="TTA")
        )
        model = HyTRecRankerTrain(HyTRecRanker(config, encoder, device=torch.device("meta")))
        optimizer_config = OptimizerConfig(sparse_lr=args.sparse_lr, dense_lr=args.dense_lr)
        apply_sparse_optimizer(model, optimizer_config)
        model = shard_model(model, "auto", device=env.device)
        optimizer = make_optimizer(model, optimizer_config)
        pipeline = make_pipeline(model, optimizer, env.device)

        def valid() -> Dict[str, float]:
            # The same negatives at every evaluation: the figures are comparable.
            return _evaluate(
                pipeline,
                model,
                _ranking_batches(valid_reader, args, info.num_items, 1),
                env.world_size,
                env.rank,
            )

        history = [valid()]
        if env.is_main:
            print(f"epoch 0  valid auc {history[0]['auc']:.4f}  ne {history[0]['ne']:.4f}", flush=True)
        for epoch in range(1, args.epochs + 1):
            start = time.perf_counter()
            train_reader.set_epoch(epoch)
            losses = train_epoch(
                pipeline, model, _ranking_batches(train_reader, args, info.num_items, 1000 + epoch)
            )
            history.append(valid())
            if env.is_main:
                print(
                    f"epoch {epoch}  train bce {sum(losses) / len(losses):.4f}  "
                    f"valid auc {history[-1]['auc']:.4f}  "
                    f"ne {history[-1]['ne']:.4f}  ({time.perf_counter() - start:.1f}s)",
                    flush=True,
                )
    if owns_group:
        dist.destroy_process_group()
    return history


if __name__ == "__main__":
    main()
