"""Retrieval and ranking models on TorchRec tables with a HyTRec sequence encoder.

* ``retrieval``: :class:`HyTRecRetrieval` (batch -> user representations and scores),
  :class:`HyTRecRetrievalTrain` (adds the softmax loss), :class:`RetrievalConfig`.
* ``evaluation``: full-catalogue HR@K / NDCG@K / MRR, sharded-table aware.
* ``ranking``: :class:`HyTRecRanker` (batch -> logits), :class:`HyTRecRankerTrain` (adds BCE),
  :class:`RankerConfig`, AUC / NE.
* ``sharding``: :func:`shard_model`, :func:`apply_sparse_optimizer`, :func:`make_optimizer`.
* ``embeddings`` and ``losses``: the shared item-table configs and the softmax losses.
"""

from torchrec_hytrec.models.evaluation import RetrievalEvaluator, RetrievalMetrics
from torchrec_hytrec.models.ranking import (
    HyTRecRanker,
    HyTRecRankerTrain,
    RankerConfig,
    ranking_metric_inputs,
    ranking_metric_module,
)
from torchrec_hytrec.models.retrieval import (
    HyTRecRetrieval,
    HyTRecRetrievalTrain,
    RetrievalConfig,
    RetrievalOutput,
    RetrievalTrainOutput,
)
from torchrec_hytrec.models.sharding import (
    OptimizerConfig,
    apply_sparse_optimizer,
    make_optimizer,
    shard_model,
)

__all__ = [
    "HyTRecRanker",
    "HyTRecRankerTrain",
    "HyTRecRetrieval",
    "HyTRecRetrievalTrain",
    "OptimizerConfig",
    "RankerConfig",
    "RetrievalConfig",
    "RetrievalEvaluator",
    "RetrievalMetrics",
    "RetrievalOutput",
    "RetrievalTrainOutput",
    "apply_sparse_optimizer",
    "make_optimizer",
    "ranking_metric_inputs",
    "ranking_metric_module",
    "shard_model",
]
