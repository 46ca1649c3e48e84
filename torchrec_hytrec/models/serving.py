"""Top-K retrieval over the whole catalogue, for serving a retrieval model's user states.

:func:`retrieve_topk` scores the queries against the item table one block of rows at a time and
keeps a running top-K; over a row-wise (or table-wise) sharded table every rank scores all
ranks' queries against its own rows and the per-rank top-K are merged with an all-gather, so the
result equals that of the whole table. ``examples/serve.py`` runs it behind an exported user
tower (``torchrec_hytrec.modules.export``).
"""

from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from torchrec_hytrec.models.item_table import all_gather_rows, row_blocks


def retrieve_topk(
    query: torch.Tensor,
    shards: List[Tuple[int, torch.Tensor]],
    k: int,
    process_group: Optional[dist.ProcessGroup] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` items of the catalogue for each query: per-shard top-``k``, then merged.

    Args:
        query: ``[B, d]`` user states of this rank.
        shards: this rank's item rows, from
            :func:`~torchrec_hytrec.models.item_table.item_table_shards`.
        k: items to return.
        process_group: the group the table is split over (collective), ``None`` for a whole table.

    Returns:
        ``(scores [B, k], item_ids [B, k])`` best first; padding id 0 is never returned.

    Example::

        >>> import torch
        >>> rows = torch.tensor([[9.0, 9.0], [1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])  # row 0 pads
        >>> scores, ids = retrieve_topk(torch.tensor([[1.0, 0.5]]), [(0, rows)], k=2)
        >>> ids.tolist(), scores.tolist()
        ([[3, 1]], [[3.0, 1.0]])
    """
    first, batch = 0, query.shape[0]
    if process_group is not None:
        gathered, counts = all_gather_rows(query, process_group)
        first, query = sum(counts[: dist.get_rank(process_group)]), gathered
    best_scores = query.new_full((query.shape[0], k), float("-inf"))
    best_ids = torch.full((query.shape[0], k), -1, dtype=torch.long, device=query.device)
    for row0, weight in row_blocks(shards):
        scores = query @ weight.t().to(query.dtype)
        if row0 == 0:
            scores[:, 0] = float("-inf")
        s, i = scores.topk(min(k, scores.shape[1]), dim=1)
        best_scores, picked = torch.cat([best_scores, s], 1).topk(k, dim=1)
        best_ids = torch.cat([best_ids, i + row0], 1).gather(1, picked)
    if process_group is not None:
        world = dist.get_world_size(process_group)
        all_scores = [torch.empty_like(best_scores) for _ in range(world)]
        all_ids = [torch.empty_like(best_ids) for _ in range(world)]
        dist.all_gather(all_scores, best_scores, group=process_group)
        dist.all_gather(all_ids, best_ids, group=process_group)
        best_scores, picked = torch.cat(all_scores, 1).topk(k, dim=1)
        best_ids = torch.cat(all_ids, 1).gather(1, picked)
    return best_scores[first : first + batch], best_ids[first : first + batch]
