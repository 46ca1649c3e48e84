"""Retrieval and ranking models on TorchRec tables with a HyTRec sequence encoder.

* ``retrieval``: :class:`HyTRecRetrieval` (batch -> user representations and scores),
  :class:`HyTRecRetrievalTrain` (adds the softmax loss), :class:`RetrievalConfig`.
* ``evaluation``: full-catalogue HR@K / NDCG@K / MRR, sharded-table aware.
* ``serving``: :func:`~torchrec_hytrec.models.serving.retrieve_topk`, top-K over the catalogue.
* ``item_table``: walking the (sharded) item table, shared by ``evaluation`` and ``serving``.
* ``ranking``: :class:`HyTRecRanker` (batch -> logits), :class:`HyTRecRankerTrain` (adds BCE),
  :class:`RankerConfig`, AUC / NE.
* ``sharding``: :func:`shard_model` (the optimizers are ``torchrec_hytrec.training.optimizer``).
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
from torchrec_hytrec.models.sharding import shard_model

__all__ = [
    "HyTRecRanker",
    "HyTRecRankerTrain",
    "HyTRecRetrieval",
    "HyTRecRetrievalTrain",
    "RankerConfig",
    "RetrievalConfig",
    "RetrievalEvaluator",
    "RetrievalMetrics",
    "RetrievalOutput",
    "RetrievalTrainOutput",
    "ranking_metric_inputs",
    "ranking_metric_module",
    "shard_model",
]
