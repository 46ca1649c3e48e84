"""torchrec-hytrec: HyTRec long-sequence encoders as a TorchRec extension.

The names a user composes are importable from here; ``torchrec_hytrec.ops`` and
``torchrec_hytrec.modules`` load without TorchRec, so the top-level names resolve lazily (a
machine without TorchRec can still ``from torchrec_hytrec import HyTRecEncoder``).

Example::

    >>> import torchrec_hytrec
    >>> torchrec_hytrec.HyTRecConfig.hytrec(embedding_dim=32).long_pattern
    'TTTA'
"""

import importlib
from typing import Any, Dict

from torchrec_hytrec.version import __version__

_EXPORTS: Dict[str, str] = {
    "HyTRecConfig": "torchrec_hytrec.modules.config",
    "HyTRecEncoder": "torchrec_hytrec.modules.encoder",
    "HyTRecRetrieval": "torchrec_hytrec.models.retrieval",
    "HyTRecRetrievalTrain": "torchrec_hytrec.models.retrieval",
    "RetrievalConfig": "torchrec_hytrec.models.retrieval",
    "HyTRecRanker": "torchrec_hytrec.models.ranking",
    "HyTRecRankerTrain": "torchrec_hytrec.models.ranking",
    "RankerConfig": "torchrec_hytrec.models.ranking",
    "SequenceBatch": "torchrec_hytrec.data.batch",
    "RankingBatch": "torchrec_hytrec.data.ranking",
    "SequenceReader": "torchrec_hytrec.data.reader",
    "ReaderConfig": "torchrec_hytrec.data.reader",
    "shard_model": "torchrec_hytrec.models.sharding",
    "make_optimizer": "torchrec_hytrec.training.optimizer",
    "OptimizerConfig": "torchrec_hytrec.training.optimizer",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'torchrec_hytrec' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list:
    return sorted(__all__)
