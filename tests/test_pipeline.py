"""TrainPipelineSparseDist drives the sharded models: it pipelines their tables and its losses equal a
plain training loop on the same batches (2 gloo ranks, DistributedModelParallel, SequenceReader)."""

import os
from pathlib import Path
from typing import Callable, List, Tuple

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import free_port
from torch import nn
from torchrec.distributed.embedding import ShardedEmbeddingCollection
from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection

from torchrec_hytrec.data.ranking import (
    NUM_DERIVED_DENSE,
    RECENT_ITEMS_KEY,
    USER_BUCKET_KEY,
    ranking_batch_from_sequences,
)
from torchrec_hytrec.data.reader import ReaderConfig, SequenceReader
from torchrec_hytrec.data.splits import Split
from torchrec_hytrec.models.embeddings import side_feature_rows
from torchrec_hytrec.models.ranking import HyTRecRanker, HyTRecRankerTrain, RankerConfig
from torchrec_hytrec.models.retrieval import HyTRecRetrieval, HyTRecRetrievalTrain, RetrievalConfig
from torchrec_hytrec.models.sharding import shard_model
from torchrec_hytrec.modules import HyTRecConfig, HyTRecEncoder
from torchrec_hytrec.training.loop import make_pipeline, pipeline_outputs, pipelined_modules
from torchrec_hytrec.training.optimizer import OptimizerConfig, apply_sparse_optimizer, make_optimizer

WORLD = 2
DIM = 16
STEPS = 8
OPT = OptimizerConfig(sparse_optimizer="rowwise_adagrad", sparse_lr=0.05, dense_lr=0.003)
USER_BUCKETS = 64


@pytest.fixture(scope="module")
def dataset(synthetic_parquet) -> Path:
    # Row groups of uneven sizes: the ranks' shares differ, the reader pads the shorter one.
    return synthetic_parquet(row_group_size=23, num_users=160, median_length=12, max_length=60, seed=5)


def _encoder() -> HyTRecEncoder:
    return HyTRecEncoder(
        HyTRecConfig.hytrec(embedding_dim=DIM, num_heads=2, short_window=4, long_pattern="TA")
    )


def _reader(path: Path, split: Split, retrieval: RetrievalConfig = None) -> SequenceReader:
    negatives, count = retrieval.reader_negatives() if retrieval is not None else ("none", 0)
    return SequenceReader(
        [path],
        ReaderConfig(max_tokens=160, max_seq_len=40, shuffle=True),
        split=split,
        seed=1,
        negatives=negatives,
        num_negatives=count,
    )


def _retrieval(path: Path, loss: str) -> Tuple[Callable[[], nn.Module], List]:
    plain = _reader(path, Split.TRAIN)
    side = side_feature_rows(plain.info, plain.keys[1:])
    config = RetrievalConfig(loss=loss, num_uniform_negatives=32, num_in_batch_negatives=4096)
    batches = list(_reader(path, Split.TRAIN, config))[:STEPS]

    def build() -> nn.Module:
        model = HyTRecRetrieval(
            config,
            _encoder(),
            num_items=plain.info.num_items,
            side_features=side,
            device=torch.device("meta"),
        )
        return HyTRecRetrievalTrain(model)

    return build, batches


def _ranker(path: Path) -> Tuple[Callable[[], nn.Module], List]:
    reader = _reader(path, Split.TRAIN)
    info = reader.info
    config = RankerConfig(
        num_items=info.num_items,
        embedding_dim=DIM,
        dense_in_features=NUM_DERIVED_DENSE,
        sparse_features={USER_BUCKET_KEY: USER_BUCKETS, RECENT_ITEMS_KEY: info.num_items + 1},
        side_features=side_feature_rows(info, reader.keys[1:]),
    )
    generator = torch.Generator().manual_seed(3)
    batches = [
        ranking_batch_from_sequences(
            b, num_items=info.num_items, num_negatives=3, user_buckets=USER_BUCKETS, generator=generator
        )
        for b in list(reader)[:STEPS]
    ]
    return (lambda: HyTRecRankerTrain(HyTRecRanker(config, _encoder(), device=torch.device("meta")))), batches


def _sharded(build: Callable[[], nn.Module]) -> Tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = build()
    apply_sparse_optimizer(model, OPT)
    model = shard_model(model, "row_wise", device=torch.device("cpu"))
    return model, make_optimizer(model, OPT)


def pipeline_worker(rank: int, port: int, path: Path, case: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    build, batches = _ranker(path) if case == "ranker" else _retrieval(path, case)
    assert len(batches) == STEPS, f"rank {rank}: {len(batches)} batches"

    piped, piped_opt = _sharded(build)
    plain, plain_opt = _sharded(build)
    plain.load_state_dict(piped.state_dict())

    pipeline = make_pipeline(piped, piped_opt, torch.device("cpu"))
    piped_losses = [float(out[0]) for out in pipeline_outputs(pipeline, batches)]
    rewritten = pipelined_modules(pipeline)
    kinds = {type(m) for m in rewritten}
    assert ShardedEmbeddingCollection in kinds, f"the pipeline did not pipeline the sequence tables: {kinds}"
    if case == "ranker":
        assert ShardedEmbeddingBagCollection in kinds, f"pooled tables not pipelined: {kinds}"

    plain_losses = []
    for batch in batches:
        plain_opt.zero_grad()
        loss, _ = plain(batch)
        loss.backward()
        plain_opt.step()
        plain_losses.append(float(loss))
    assert len(piped_losses) == STEPS
    assert plain_losses[-1] != plain_losses[0], "training moved nothing: the comparison would be vacuous"
    torch.testing.assert_close(torch.tensor(piped_losses), torch.tensor(plain_losses), atol=1e-6, rtol=0)

    # Evaluation through the same pipeline (eval mode: forward only) equals plain eval forwards.
    if case != "ranker":
        eval_batches = list(_reader(path, Split.VALID, piped.module.model.config))
        piped.eval()
        plain.eval()
        with torch.no_grad():
            piped_eval = [out.positive_scores for out in pipeline_outputs(pipeline, eval_batches)]
            plain_eval = [plain(b)[1].positive_scores for b in eval_batches]
        torch.testing.assert_close(torch.cat(piped_eval), torch.cat(plain_eval), atol=1e-6, rtol=0)
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("case", ["full", "sampled", "ranker"])
def test_pipeline_pipelines_tables_and_equals_a_plain_loop(dataset: Path, case: str) -> None:
    mp.spawn(pipeline_worker, args=(free_port(), dataset, case), nprocs=WORLD, join=True)
