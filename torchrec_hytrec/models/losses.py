"""Next-item softmax losses: the full catalogue, and sampled softmax with logQ correction.

Sampled softmax scores each query against its positive and a shared candidate set made of
``num_in_batch`` positives of the batch (drawn uniformly from its positions, i.e. from the batch's
empirical item distribution) plus ``num_uniform`` items drawn uniformly from the catalogue. Both
draws favour some items, so every logit is corrected by the log of the item's expected number of
occurrences in the candidate set,

    q(c) = num_in_batch * count_batch(c) / T + num_uniform / num_items,

(Yi et al., "Sampling-bias-corrected neural modeling", RecSys 2019), which makes
``sum_j exp(s_j - log q(c_j))`` an estimate of the full softmax denominator. Candidates that are
the query's own positive item ("accidental hits") are masked.
"""

import torch
import torch.nn.functional as F


def weighted_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum(w * x) / sum(w)``, and ``0`` when every weight is zero (a padding batch: its loss must
    move no weight, yet its step still joins every collective)."""
    total = weights.sum()
    return torch.where(
        total > 0, (weights * values).sum() / total.clamp(min=torch.finfo(weights.dtype).tiny), 0.0
    )


def full_softmax_loss(
    *, scores: torch.Tensor, positive_ids: torch.Tensor, weights: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Cross-entropy over every item of the catalogue.

    Args:
        scores: ``[T, num_items]`` dot products of each query with items ``1..num_items`` in order.
        positive_ids: ``[T]`` the next item of each query, in ``[1, num_items]``.
        weights: ``[T]`` weight of each query.
        temperature: logits are ``scores / temperature``.

    Returns:
        Weighted mean loss (scalar).
    """
    ce = F.cross_entropy(scores.float() / temperature, positive_ids - 1, reduction="none")
    return weighted_mean(ce, weights)


def sampled_softmax_loss(
    *,
    query: torch.Tensor,
    positive_ids: torch.Tensor,
    positive_emb: torch.Tensor,
    uniform_ids: torch.Tensor,
    uniform_emb: torch.Tensor,
    weights: torch.Tensor,
    num_items: int,
    num_in_batch: int,
    temperature: float,
) -> torch.Tensor:
    """Sampled softmax with in-batch and uniform negatives and logQ correction.

    Args:
        query: ``[T, d]`` user states.
        positive_ids: ``[T]`` the next item of each query.
        positive_emb: ``[T, d]`` item rows of ``positive_ids``.
        uniform_ids: ``[M]`` items drawn uniformly from ``[1, num_items]``.
        uniform_emb: ``[M, d]`` their item rows.
        weights: ``[T]`` weight of each query.
        num_items: catalogue size.
        num_in_batch: most in-batch positives used as shared candidates; all ``T`` when
            ``T <= num_in_batch`` (memory is ``T x (num_in_batch + M)`` logits).
        temperature: logits are ``query . item / temperature``.

    Returns:
        Weighted mean loss (scalar).
    """
    num_positions = positive_ids.numel()
    if num_positions > num_in_batch:
        picked = torch.randperm(num_positions, device=positive_ids.device)[:num_in_batch]
        in_batch_ids, in_batch_emb = positive_ids[picked], positive_emb[picked]
    else:
        in_batch_ids, in_batch_emb = positive_ids, positive_emb
    cand_ids = torch.cat([in_batch_ids, uniform_ids])
    cand_emb = torch.cat([in_batch_emb, uniform_emb])

    # Counts of each item among all T positives, looked up for candidates and positives alike.
    uniq, counts = torch.unique(positive_ids, return_counts=True)

    def log_q(ids: torch.Tensor) -> torch.Tensor:
        idx = torch.searchsorted(uniq, ids).clamp(max=uniq.numel() - 1)
        count = torch.where(uniq[idx] == ids, counts[idx], torch.zeros_like(counts[idx]))
        expected = in_batch_ids.numel() * count.double() / num_positions + uniform_ids.numel() / num_items
        return expected.log().float()

    pos_logits = (query * positive_emb).sum(-1).float() / temperature - log_q(positive_ids)
    cand_logits = (query @ cand_emb.t()).float() / temperature - log_q(cand_ids)
    cand_logits = cand_logits.masked_fill(cand_ids.unsqueeze(0) == positive_ids.unsqueeze(1), float("-inf"))
    logits = torch.cat([pos_logits.unsqueeze(1), cand_logits], dim=1)
    ce = F.cross_entropy(logits, torch.zeros_like(positive_ids), reduction="none")
    return weighted_mean(ce, weights)
