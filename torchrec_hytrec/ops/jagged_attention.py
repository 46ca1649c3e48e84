"""Causal softmax attention over jagged (variable-length) sequences.

Two paths, both exact:

* full causal attention groups users by ``ceil(log2(n))`` and runs one causal
  ``scaled_dot_product_attention`` per group, every user padded to its group's longest: the
  cost follows ``sum_b n_b^2`` (at most 4x it) with a few dozen calls at most, never
  ``B * max(n)^2`` nor one call per user;
* windowed causal attention (query ``i`` sees keys ``(i - W, i]``) cuts every user into
  blocks of ``block_size`` queries, preceded by ``ceil(W / block_size)`` padding blocks; each
  block attends to itself and to the blocks before it under a mask, all blocks of all users in
  a single SDPA call. Blocks never straddle two users, so the cost follows
  ``sum_b (ceil(n_b / C) + ceil(W / C)) * C * (W + C)``.

Tensors follow the jagged convention of the rest of the package: ``[T, H, D]`` rows
grouped by user through ``offsets`` ``[B + 1]``.
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F


def jagged_positions(offsets: torch.Tensor) -> torch.Tensor:
    """Index of every event inside its own user's sequence.

    Args:
        offsets: ``[B + 1]`` int64 start of every user's rows.

    Returns:
        ``[T]`` int64, ``0`` at each user's first event.
    """
    lengths = offsets[1:] - offsets[:-1]
    starts = torch.repeat_interleave(offsets[:-1], lengths, output_size=int(offsets[-1]))
    return torch.arange(starts.numel(), device=offsets.device) - starts


def causal_window_starts(
    *,
    offsets: torch.Tensor,
    timestamps: torch.Tensor,
    window: int,
    window_seconds: Optional[float] = None,
) -> torch.Tensor:
    """Position of the first event each query may see under a causal window.

    Event ``j`` of a user is in the window of event ``i`` when ``i - window < j <= i`` and,
    if ``window_seconds`` is set, ``t_j >= t_i - window_seconds`` (the events of the last
    ``window_seconds`` seconds, capped at ``window`` events).

    Args:
        offsets: ``[B + 1]`` int64 start of every user's rows.
        timestamps: ``[T]`` int64 seconds, non-decreasing within each user.
        window: most events a window holds.
        window_seconds: optional time span of the window.

    Returns:
        ``[T]`` int64 local position (``0`` = the user's first event) of the first event in
        each query's window.
    """
    positions = jagged_positions(offsets)
    starts = (positions - window + 1).clamp(min=0)
    total = starts.numel()
    if window_seconds is None or total == 0:
        return starts
    lengths = offsets[1:] - offsets[:-1]
    user = torch.repeat_interleave(
        torch.arange(lengths.numel(), device=offsets.device), lengths, output_size=total
    )
    # One sorted key for all users: user index in the high part, time since the user's first
    # event in the low part, so a single searchsorted never crosses into another user.
    first_time = timestamps[offsets[:-1].clamp(max=total - 1)]
    relative = timestamps - first_time[user]
    span = int(relative.max()) + int(window_seconds) + 2
    key = user * span + relative
    # t_j >= t_i - s  <=>  t_j >= t_i - floor(s) for integer times.
    first = torch.searchsorted(key, key - int(window_seconds), right=False)
    time_starts = first - offsets[:-1][user]
    return torch.maximum(starts, time_starts)


def jagged_causal_attention(
    *,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    window: Optional[int] = None,
    window_starts: Optional[torch.Tensor] = None,
    block_size: int = 64,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Causal multi-head softmax attention of every user's events over its own past.

    Args:
        q: ``[T, H, D]`` queries.
        k: ``[T, H, D]`` keys.
        v: ``[T, H, D]`` values.
        offsets: ``[B + 1]`` int64 start of every user's rows.
        window: ``None`` for full causal attention; ``W`` to let query ``i`` see only keys
            ``(i - W, i]`` of its user.
        window_starts: optional ``[T]`` local position of the first key each query may see
            (from :func:`causal_window_starts`); narrows ``window`` further. Needs ``window``.
        block_size: queries per block of the windowed path.
        scale: score scale, ``D ** -0.5`` by default.

    Returns:
        ``[T, H, D]`` attention outputs, in ``q``'s dtype.

    Example::

        out = jagged_causal_attention(q=q, k=k, v=v, offsets=offsets, window=64)
    """
    if window is None:
        if window_starts is not None:
            raise ValueError("window_starts needs a window: full causal attention has no start bound")
        return _full_causal(q, k, v, offsets, scale)
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    return _windowed_causal(q, k, v, offsets, window, window_starts, min(block_size, window), scale)


def _window_keys(
    offsets: torch.Tensor, rows: torch.Tensor, window: Optional[int], window_starts: Optional[torch.Tensor]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(keys, valid)``, both ``[R, L]``: the rows each of ``rows`` attends to, oldest first,
    padded with the query's own row where ``valid`` is false."""
    user = torch.searchsorted(offsets, rows, right=True) - 1
    position = rows - offsets[user]
    first = (position - window + 1).clamp(min=0) if window is not None else torch.zeros_like(position)
    if window_starts is not None:
        first = torch.maximum(first, window_starts)
    count = position - first + 1
    span = torch.arange(int(count.max()) if rows.numel() else 0, device=rows.device)
    valid = span < count[:, None]
    keys = torch.where(valid, rows[:, None] - count[:, None] + 1 + span, rows[:, None])
    return keys, valid


def attention_key_rows(
    *,
    offsets: torch.Tensor,
    rows: torch.Tensor,
    window: int,
    window_starts: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Every row the causal windows of ``rows`` read, sorted: what a windowed layer needs of its
    input to produce its outputs at ``rows`` (the rows themselves included).

    Args:
        offsets: ``[B + 1]`` int64 start of every user's rows.
        rows: ``[R]`` int64 rows of the queries.
        window: keys ``(i - W, i]`` of query ``i``.
        window_starts: optional ``[R]`` local position of the first key each query may see.

    Returns:
        ``[R']`` int64 sorted distinct rows, at most ``R * W``.
    """
    keys, valid = _window_keys(offsets, rows, window, window_starts)
    return torch.unique(keys[valid])


def causal_attention_at(
    *,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    rows: torch.Tensor,
    window: Optional[int] = None,
    window_starts: Optional[torch.Tensor] = None,
    key_rows: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Causal attention of a few chosen events (e.g. every user's last one) over their pasts.

    Same result as :func:`jagged_causal_attention` at ``rows``, at a cost of
    ``len(rows) * L`` (``L`` the longest window among them) instead of all queries.

    Args:
        q: ``[R, H, D]`` queries of the chosen events.
        k: ``[T, H, D]`` keys of every event, or of the events ``key_rows`` names.
        v: values, laid out as ``k``.
        offsets: ``[B + 1]`` int64 start of every user's rows.
        rows: ``[R]`` int64 rows of the chosen events.
        window: ``None`` for full causal attention, ``W`` for keys ``(i - W, i]``.
        window_starts: optional ``[R]`` local position of the first key each chosen event may
            see (from :func:`causal_window_starts`).
        key_rows: optional sorted rows that ``k`` and ``v`` hold (e.g. from
            :func:`attention_key_rows`); they must include every key the windows read.
        scale: score scale, ``D ** -0.5`` by default.

    Returns:
        ``[R, H, D]`` attention outputs.

    Example::

        last = offsets[1:] - 1
        out = causal_attention_at(q=q[last], k=k, v=v, offsets=offsets, rows=last, window=64)
    """
    keys, valid = _window_keys(offsets, rows, window, window_starts)
    if key_rows is not None:
        keys = torch.searchsorted(key_rows, keys)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.einsum("rhd,rlhd->rhl", q, k[keys]) * scale
    probs = scores.masked_fill(~valid[:, None, :], float("-inf")).softmax(dim=-1)
    return torch.einsum("rhl,rlhd->rhd", probs, v[keys])


def _full_causal(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor, scale: Optional[float]
) -> torch.Tensor:
    T, H, D = q.shape
    lengths = offsets[1:] - offsets[:-1]
    if T == 0:
        return q.new_zeros(q.shape)
    # Users are grouped by ceil(log2(n)) and every group is padded to its longest user: one SDPA
    # call per group (a few dozen at most, instead of one per user, which costs more than the
    # attention itself on batches of short histories), and padding at most 4x sum n^2 of work.
    group = torch.where(lengths > 1, torch.log2((lengths - 1).clamp(min=1).double()).floor().long() + 1, 0)
    group = torch.where(lengths > 0, group, -1)
    flat_q, flat_k, flat_v = (x.reshape(T, H * D) for x in (q, k, v))
    outputs, rows_out = [], []
    for g in torch.unique(group[group >= 0]).tolist():
        users = torch.nonzero(group == g).flatten()
        n = lengths[users]
        longest = int(n.max())
        span = torch.arange(longest, device=q.device)
        valid = span < n[:, None]
        # Padding rows read row 0; causality keeps them out of every real row's keys, and their
        # own outputs are dropped, so no gradient reaches row 0 through them.
        rows = torch.where(valid, offsets[users, None] + span, 0).flatten()

        def gather(x: torch.Tensor) -> torch.Tensor:
            # [G, H, L, D]; 4-D inputs, as SDPA sends 3-D ones to its quadratic-memory math path on CPU.
            return x.index_select(0, rows).view(users.numel(), longest, H, D).transpose(1, 2)

        o = F.scaled_dot_product_attention(gather(flat_q), gather(flat_k), gather(flat_v), is_causal=True, scale=scale)
        keep = torch.nonzero(valid.flatten()).flatten()
        outputs.append(o.transpose(1, 2).reshape(-1, H, D).index_select(0, keep))
        rows_out.append(rows.index_select(0, keep))
    return q.new_empty(q.shape).index_copy(0, torch.cat(rows_out), torch.cat(outputs))


def _windowed_causal(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    window: int,
    window_starts: Optional[torch.Tensor],
    block: int,
    scale: Optional[float],
) -> torch.Tensor:
    T, H, D = q.shape
    if T == 0:
        return q.new_zeros(q.shape)
    device = q.device
    before = -(-window // block)  # key blocks preceding each query block
    lengths = offsets[1:] - offsets[:-1]
    num_users = lengths.numel()
    # Layout: every user gets `before` zero slots of `block` rows, then its own blocks. Query
    # slot s then finds its keys in slots s - before .. s, so the keys of all query slots are
    # windows of `before + 1` consecutive slots of one tensor (`unfold`): no gather, and a cheap backward.
    slots = (lengths + block - 1) // block + before
    slot_base = torch.cumsum(slots, 0) - slots
    num_slots = int(slots.sum())
    user = torch.repeat_interleave(torch.arange(num_users, device=device), lengths, output_size=T)
    rows = (slot_base[user] + before) * block + jagged_positions(offsets)

    def pad(x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(num_slots * block, H, D).index_copy(0, rows, x).view(num_slots, block, H, D)

    num_queries = num_slots - before  # query slots: all but the first `before` (padding slots included)
    kp, vp = pad(k), pad(v)
    queries = pad(q)[before:]
    # [N, before + 1, block, H, D] windows of consecutive slots, as [N, (before + 1) * block, H, D].
    keys = kp.unfold(0, before + 1, 1).permute(0, 4, 1, 2, 3).flatten(1, 2)
    values = vp.unfold(0, before + 1, 1).permute(0, 4, 1, 2, 3).flatten(1, 2)

    # Key column j of query row i sits at relative position j - before * block - i.
    span = (before + 1) * block
    i = torch.arange(block, device=device)[:, None]
    j = torch.arange(span, device=device)
    relative = j - before * block - i
    band = (relative <= 0) & (relative > -window)
    # Local block index of each query slot (< 0 for padding slots); keys with a negative local
    # position are padding, as are keys before the query's window start.
    slot_user = torch.repeat_interleave(torch.arange(num_users, device=device), slots, output_size=num_slots)
    local_block = (torch.arange(num_slots, device=device) - slot_base[slot_user] - before)[before:]
    first_key = (before - local_block) * block  # column of local position 0
    if window_starts is None:
        threshold = first_key[:, None].expand(num_queries, block)
    else:
        starts = torch.zeros(num_slots * block, dtype=torch.long, device=device).index_copy(0, rows, window_starts)
        threshold = first_key[:, None] + starts.view(num_slots, block)[before:]
    # The diagonal is always allowed, so padding query rows (outputs dropped) never have an
    # empty row, whose NaN would leak into the gradients.
    mask = (band & (j >= threshold[:, :, None])) | (relative == 0)
    out = F.scaled_dot_product_attention(
        queries.transpose(1, 2),
        keys.transpose(1, 2),
        values.transpose(1, 2),
        attn_mask=mask[:, None],
        scale=scale,
    )
    return out.transpose(1, 2).reshape(num_queries * block, H, D).index_select(0, rows - before * block)
