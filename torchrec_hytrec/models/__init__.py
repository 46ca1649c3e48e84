"""Retrieval and ranking models on TorchRec tables with a HyTRec sequence encoder.

* ``retrieval``: :class:`HyTRecRetrieval`, :class:`RetrievalConfig` (next-item softmax).
* ``evaluation``: full-catalogue HR@K / NDCG@K / MRR, sharded-table aware.
* ``ranking``: :class:`HyTRecRanker`, :class:`RankerConfig`, :class:`RankingBatch`, AUC / NE.
* ``sharding``: :func:`shard_model`, :func:`apply_sparse_optimizer`, :func:`make_optimizer`.
* ``embeddings`` and ``losses``: the shared item-table lookup and the softmax losses.
"""

from torchrec_hytrec.models.evaluation import RetrievalEvaluator, RetrievalMetrics, evaluate
from torchrec_hytrec.models.ranking import HyTRecRanker, RankerConfig, RankingBatch, ranking_metric_module
from torchrec_hytrec.models.retrieval import HyTRecRetrieval, RetrievalConfig
from torchrec_hytrec.models.sharding import (
    OptimizerConfig,
    apply_sparse_optimizer,
    make_optimizer,
    shard_model,
)

__all__ = [
    "HyTRecRanker",
    "HyTRecRetrieval",
    "OptimizerConfig",
    "RankerConfig",
    "RankingBatch",
    "RetrievalConfig",
    "RetrievalEvaluator",
    "RetrievalMetrics",
    "apply_sparse_optimizer",
    "evaluate",
    "make_optimizer",
    "ranking_metric_module",
    "shard_model",
]
