"""The item table and side-feature tables of the sequence models.

Both models look up a batch's events (``"item_id"`` plus side features, aligned event by event)
and other item ids — held-out targets, softmax candidates, ranking candidates — through the
*same* item table: each extra set of ids is another feature name on the item table's
``EmbeddingConfig``. Under ``DistributedModelParallel`` it stays one sharded table: every id is
looked up by the rank that owns its row, and the table's gradient and fused optimizer see every
use of every row. All of them arrive in the batch's one ``KeyedJaggedTensor``, which is what lets
``TrainPipelineSparseDist`` distribute the lookup of the next batch ahead of time.
"""

from typing import Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.sparse.jagged_tensor import JaggedTensor

from torchrec_hytrec.data.batch import ITEM_KEY
from torchrec_hytrec.data.schema import SequenceDatasetInfo

ITEM_TABLE = "item"


def sequence_table_configs(
    *,
    num_items: int,
    embedding_dim: int,
    side_features: Mapping[str, int],
    extra_item_features: Sequence[str],
    init_std: float,
) -> List[EmbeddingConfig]:
    """Tables of a sequence model: the item table (row 0 is padding) and one per side feature.

    Args:
        num_items: item ids are ``1..num_items``; the table has ``num_items + 1`` rows.
        embedding_dim: width of every table.
        side_features: side-feature key -> number of rows; ids must lie in ``[0, rows)``.
        extra_item_features: further feature names of the item table (see the module docstring).
        init_std: rows start uniform with this standard deviation. TorchRec's default,
            ``U(+-1/sqrt(rows))``, shrinks with the catalogue and leaves items too faint next to
            the encoder's unit-scale time embeddings to be learned.

    Returns:
        The item table named ``"item"`` first, then one table per side feature named after it.

    Example::

        >>> from torchrec_hytrec.models.embeddings import sequence_table_configs
        >>> tables = sequence_table_configs(num_items=100, embedding_dim=8, side_features={"cat": 5},
        ...                                 extra_item_features=["target_item_id"], init_std=0.3)
        >>> [(t.name, t.num_embeddings, t.feature_names) for t in tables]
        [('item', 101, ['item_id', 'target_item_id']), ('cat', 5, ['cat'])]
    """
    if num_items < 1:
        raise ValueError(f"num_items must be >= 1, got {num_items}")
    # Uniform bounds rather than an init_fn: FBGEMM's sharded tables honour only the bounds.
    bound = 3**0.5 * init_std
    init = {"weight_init_min": -bound, "weight_init_max": bound}
    item_features = [ITEM_KEY, *extra_item_features]
    tables = [
        EmbeddingConfig(
            name=ITEM_TABLE,
            embedding_dim=embedding_dim,
            num_embeddings=num_items + 1,
            feature_names=item_features,
            **init,
        )
    ]
    for key, rows in side_features.items():
        if key in item_features:
            raise ValueError(f"side feature name {key!r} collides with an item feature name")
        tables.append(
            EmbeddingConfig(
                name=key, embedding_dim=embedding_dim, num_embeddings=rows, feature_names=[key], **init
            )
        )
    return tables


def sequence_embedding_collection(
    *,
    num_items: int,
    embedding_dim: int,
    side_features: Mapping[str, int],
    extra_item_features: Sequence[str],
    init_std: float,
    device: Optional[torch.device] = None,
) -> EmbeddingCollection:
    """The ``EmbeddingCollection`` of :func:`sequence_table_configs` (what the models build when
    no collection is injected)."""
    tables = sequence_table_configs(
        num_items=num_items,
        embedding_dim=embedding_dim,
        side_features=side_features,
        extra_item_features=extra_item_features,
        init_std=init_std,
    )
    return EmbeddingCollection(tables=tables, device=device)


def check_sequence_collection(collection: nn.Module, embedding_dim: int, features: Sequence[str]) -> None:
    """Raises ``ValueError`` unless ``collection`` looks up every name of ``features`` at
    ``embedding_dim`` (an injected collection must serve the batch's keys)."""
    configs = collection.embedding_configs()
    served = {name: config.embedding_dim for config in configs for name in config.feature_names}
    missing = [f for f in features if f not in served]
    if missing:
        raise ValueError(f"embedding collection has no table for features {missing} (has {sorted(served)})")
    wrong = {f: served[f] for f in features if served[f] != embedding_dim}
    if wrong:
        raise ValueError(f"features {wrong} have embedding_dim != {embedding_dim}")


def event_embeddings(embeddings: Dict[str, JaggedTensor], side_features: Sequence[str]) -> torch.Tensor:
    """``[sum(n), d]``: each event's item row plus its side-feature rows (the encoder input)."""
    events = embeddings[ITEM_KEY].values()
    for key in side_features:
        events = events + embeddings[key].values()
    return events


def side_feature_rows(info: SequenceDatasetInfo, names: Sequence[str]) -> Dict[str, int]:
    """Table rows of each side feature: its ids are ``1..cardinality`` in the data, 0 is padding,
    as for items, so a table holds ``cardinality + 1`` rows (the one place the two meet)."""
    return {name: info.feature_cardinalities[name] + 1 for name in names}
