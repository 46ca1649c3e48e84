"""Logarithmic buckets of time gaps and distances, shared by the encoder's gap embeddings
(:mod:`torchrec_hytrec.modules`) and the relative biases of the HSTU-style kernel
(:mod:`torchrec_hytrec.ops.hstu_attention`)."""

import torch


def gap_buckets(gaps: torch.Tensor, num_buckets: int, scale: float) -> torch.Tensor:
    """Bucket of a time gap: ``floor(scale * log1p(gap))``, clamped to ``num_buckets - 1``.

    Args:
        gaps: seconds (or any non-negative distance), any shape; negative values fall in bucket 0.
        num_buckets: number of buckets.
        scale: buckets per unit of ``log1p(gap)``.

    Returns:
        int64 buckets of ``gaps``' shape.

    Example::

        >>> import torch
        >>> gap_buckets(torch.tensor([0, 1, 60, 86400, 10**9]), num_buckets=40, scale=2.0).tolist()
        [0, 1, 8, 22, 39]
    """
    # In place after the first (fresh) result: the HSTU-style kernel buckets every pair of events,
    # where each pass over the pairs counts. Clamping before the truncation is the same for gaps >= 0.
    buckets = gaps.float().clamp(min=0)
    return torch.log1p_(buckets).mul_(scale).clamp_(max=num_buckets - 1).long()
