"""Walking the (possibly sharded) item table: what full-catalogue evaluation and top-K serving share.

Both score every catalogue item against a batch of user states. With the item table row-wise
(or table-wise) sharded by ``DistributedModelParallel`` no rank holds the catalogue, so each rank
scores the queries of all ranks (:func:`all_gather_rows`) against its own rows
(:func:`item_table_shards`), one bounded block of rows at a time (:func:`row_blocks`), and the
caller merges the per-rank results: counts above a target in
:func:`~torchrec_hytrec.models.evaluation.catalogue_ranks`, per-shard top-K in
:func:`~torchrec_hytrec.models.serving.retrieve_topk`.
"""

import warnings
from typing import Iterator, List, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.distributed.model_parallel import DistributedModelParallel

from torchrec_hytrec.models.embeddings import ITEM_TABLE

# Item rows scored per matmul: bounds the [users, rows] score block for large catalogues.
_BLOCK_ROWS = 65_536


def item_collection(model: nn.Module) -> nn.Module:
    """The (possibly sharded) collection holding table ``"item"`` of a retrieval model, given the
    model, its train wrapper, or ``DistributedModelParallel`` around either."""
    if isinstance(model, DistributedModelParallel):
        model = model.module
    model = getattr(model, "model", model)  # HyTRecRetrievalTrain -> HyTRecRetrieval
    return getattr(model, "embedding_collection", model)


def item_table_shards(embedding_collection: nn.Module) -> Tuple[List[Tuple[int, torch.Tensor]], bool]:
    """The item-table rows this rank holds.

    Args:
        embedding_collection: an ``EmbeddingCollection`` or its sharded form, with table ``"item"``.

    Returns:
        ``([(first_row, rows [R, d]), ...], sharded)``: every local block of whole rows, and
        whether the table is split over ranks (a ``ShardedTensor``) rather than held whole.

    Example::

        >>> import torch
        >>> from torchrec.modules.embedding_configs import EmbeddingConfig
        >>> from torchrec.modules.embedding_modules import EmbeddingCollection
        >>> table = EmbeddingConfig(name="item", embedding_dim=4, num_embeddings=10,
        ...                         feature_names=["item_id"])
        >>> shards, sharded = item_table_shards(EmbeddingCollection(tables=[table]))
        >>> [(row0, tuple(rows.shape)) for row0, rows in shards], sharded
        ([(0, (10, 4))], False)
    """
    weight = embedding_collection.state_dict()[f"embeddings.{ITEM_TABLE}.weight"]
    if not isinstance(weight, ShardedTensor):
        return [(0, weight)], False
    with warnings.catch_warnings():
        # TorchRec 1.9's sharded tables are ShardedTensors; their deprecation notice is TorchRec's to act on.
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*ShardedTensor")
        return _whole_row_shards(weight), True


def _whole_row_shards(weight: ShardedTensor) -> List[Tuple[int, torch.Tensor]]:
    dim = weight.size(1)
    shards = []
    for shard in weight.local_shards():
        row, col = shard.metadata.shard_offsets
        if col != 0 or shard.tensor.size(1) != dim:
            raise ValueError(
                "scoring the catalogue needs whole item rows per shard: column-wise sharding is not supported"
            )
        shards.append((row, shard.tensor))
    return shards


def row_blocks(shards: List[Tuple[int, torch.Tensor]]) -> Iterator[Tuple[int, torch.Tensor]]:
    """``(first_row, rows)`` of every block of at most 65,536 rows of ``shards``, in order."""
    for row0, weight in shards:
        for start in range(0, weight.shape[0], _BLOCK_ROWS):
            yield row0 + start, weight[start : start + _BLOCK_ROWS]


def all_gather_rows(t: torch.Tensor, group: dist.ProcessGroup) -> Tuple[torch.Tensor, List[int]]:
    """Concatenates every rank's ``t`` along dim 0 (sizes may differ); returns it and the sizes."""
    world = dist.get_world_size(group)
    size = torch.tensor([t.shape[0]], dtype=torch.long, device=t.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    counts = [int(s) for s in sizes]
    padded = t.new_zeros((max(counts), *t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[:c] for p, c in zip(parts, counts)]), counts
