"""Causal softmax attention over jagged (variable-length) sequences.

Two paths, both exact:

* full causal attention runs one ``scaled_dot_product_attention`` per user, so its cost
  follows ``sum_b n_b^2`` rather than ``B * max(n)^2``;
* windowed causal attention (query ``i`` sees keys ``(i - W, i]``) cuts every user into
  blocks of ``block_size`` queries; each block attends to itself and to the
  ``ceil(W / block_size)`` blocks before it under a band mask, and all blocks of all users
  go through a single batched SDPA call. Blocks never straddle two users, so the cost
  follows ``sum_b ceil(n_b / C) * C * (W + C)``.

Tensors follow the jagged convention of the rest of the package: ``[T, H, D]`` rows
grouped by user through ``offsets`` ``[B + 1]``.
"""

from typing import Optional

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


def causal_attention_at(
    *,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    rows: torch.Tensor,
    window: Optional[int] = None,
    window_starts: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Causal attention of a few chosen events (e.g. every user's last one) over their pasts.

    Same result as :func:`jagged_causal_attention` at ``rows``, at a cost of
    ``len(rows) * L`` (``L`` the longest window among them) instead of all queries.

    Args:
        q: ``[R, H, D]`` queries of the chosen events.
        k: ``[T, H, D]`` keys of every event.
        v: ``[T, H, D]`` values of every event.
        offsets: ``[B + 1]`` int64 start of every user's rows.
        rows: ``[R]`` int64 rows of the chosen events.
        window: ``None`` for full causal attention, ``W`` for keys ``(i - W, i]``.
        window_starts: optional ``[R]`` local position of the first key each chosen event may
            see (from :func:`causal_window_starts`).
        scale: score scale, ``D ** -0.5`` by default.

    Returns:
        ``[R, H, D]`` attention outputs.

    Example::

        last = offsets[1:] - 1
        out = causal_attention_at(q=q[last], k=k, v=v, offsets=offsets, rows=last, window=64)
    """
    user = torch.searchsorted(offsets, rows, right=True) - 1
    position = rows - offsets[user]
    first = (position - window + 1).clamp(min=0) if window is not None else torch.zeros_like(position)
    if window_starts is not None:
        first = torch.maximum(first, window_starts)
    count = position - first + 1
    span = torch.arange(int(count.max()) if rows.numel() else 0, device=rows.device)
    valid = span < count[:, None]
    keys_at = torch.where(valid, rows[:, None] - count[:, None] + 1 + span, rows[:, None])
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.einsum("rhd,rlhd->rhl", q, k[keys_at]) * scale
    probs = scores.masked_fill(~valid[:, None, :], float("-inf")).softmax(dim=-1)
    return torch.einsum("rhl,rlhd->rhd", probs, v[keys_at])


def _full_causal(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor, scale: Optional[float]
) -> torch.Tensor:
    # torch.split, not per-user slicing: each slice's backward would allocate a zero gradient
    # of the whole batch, making the backward cost B * T instead of T.
    lengths = (offsets[1:] - offsets[:-1]).tolist()
    outputs = [
        # 4-D inputs: SDPA sends 3-D ones to its quadratic-memory math path on CPU.
        F.scaled_dot_product_attention(
            qu[None].transpose(1, 2),
            ku[None].transpose(1, 2),
            vu[None].transpose(1, 2),
            is_causal=True,
            scale=scale,
        )[0].transpose(0, 1)
        for qu, ku, vu in zip(q.split(lengths), k.split(lengths), v.split(lengths))
        if qu.shape[0] > 0
    ]
    if not outputs:
        return q.new_zeros(q.shape)
    return torch.cat(outputs)


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
    blocks = (lengths + block - 1) // block
    user = torch.repeat_interleave(torch.arange(num_users, device=device), lengths, output_size=T)
    positions = jagged_positions(offsets)

    # Queries live in the real blocks only; keys also get `before` zero blocks ahead of each
    # user, so every query block finds its key blocks at fixed relative slots.
    query_block_base = torch.cumsum(blocks, 0) - blocks
    key_slot_base = query_block_base + before * torch.arange(num_users, device=device)
    num_query_blocks = int(blocks.sum())
    num_key_slots = num_query_blocks + before * num_users
    local_block = positions // block
    row = positions % block
    query_rows = (query_block_base[user] + local_block) * block + row
    key_rows = (key_slot_base[user] + before + local_block) * block + row

    def scatter(x: torch.Tensor, rows: torch.Tensor, slots: int) -> torch.Tensor:
        return x.new_zeros(slots * block, H, D).index_copy(0, rows, x).view(slots, block, H, D)

    qb = scatter(q, query_rows, num_query_blocks)
    kb = scatter(k, key_rows, num_key_slots)
    vb = scatter(v, key_rows, num_key_slots)

    block_user = torch.repeat_interleave(
        torch.arange(num_users, device=device), blocks, output_size=num_query_blocks
    )
    block_index = torch.arange(num_query_blocks, device=device) - query_block_base[block_user]
    first_slot = key_slot_base[block_user] + block_index  # slot of the earliest key block
    span = torch.arange((before + 1) * block, device=device)

    def attend(chosen: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        slots = first_slot[chosen, None] + torch.arange(before + 1, device=device)
        keys = kb[slots].flatten(1, 2)  # [N, (before + 1) * block, H, D]
        values = vb[slots].flatten(1, 2)
        return F.scaled_dot_product_attention(
            qb[chosen].transpose(1, 2),
            keys.transpose(1, 2),
            values.transpose(1, 2),
            attn_mask=mask,
            scale=scale,
        )

    def exact_mask(chosen: torch.Tensor) -> torch.Tensor:
        q_pos = block_index[chosen, None] * block + torch.arange(block, device=device)  # [N, C]
        k_pos = (block_index[chosen, None] - before) * block + span
        lower = (q_pos - window + 1).clamp(min=0)
        if window_starts is not None:
            lower = torch.maximum(lower, start_rows[chosen])
        # The diagonal key is always allowed, so no row is fully masked (padded query rows
        # included, whose outputs are dropped).
        return ((k_pos[:, None, :] <= q_pos[:, :, None]) & (k_pos[:, None, :] >= lower[:, :, None]))[:, None]

    everything = torch.arange(num_query_blocks, device=device)
    if window_starts is not None:
        start_rows = torch.zeros(num_query_blocks * block, dtype=torch.long, device=device)
        start_rows = start_rows.index_copy(0, query_rows, window_starts).view(num_query_blocks, block)
        out = attend(everything, exact_mask(everything))
    else:
        # Past a user's first `before` blocks no key slot is padding, so one band mask,
        # shared by all those blocks, is exact; only the first blocks need their own.
        row = torch.arange(block, device=device)[:, None]
        relative = span[None, :] - before * block
        band = (relative <= row) & (relative > row - window)
        late = block_index >= before
        early, late = everything[~late], everything[late]
        out = qb.new_zeros(num_query_blocks, H, block, D)
        out = out.index_copy(0, late, attend(late, band)).index_copy(
            0, early, attend(early, exact_mask(early))
        )
    return out.transpose(1, 2).reshape(num_query_blocks * block, H, D)[query_rows]
