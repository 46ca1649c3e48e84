"""HSTU-style pointwise attention over jagged (variable-length) sequences.

The attention of HSTU ("Actions Speak Louder than Words", Zhai et al., ICML 2024): per head
``h``, query ``i`` reads the causal keys ``j <= i`` of its user through a SiLU instead of a
softmax, with learned biases of the relative position and of the time gap::

    o_i = sum_j silu(scale * q_i . k_j + b_pos[bucket(i - j)] + b_time[bucket(t_i - t_j)]) v_j / (i + 1)

``bucket`` is :func:`~torchrec_hytrec.ops.buckets.gap_buckets` (``floor(s * log1p(x))``,
clamped), the same for positions and times. One difference from HSTU: it divides by the number of
keys each query sees, ``i + 1``, where HSTU divides by a constant maximum length. Event ``i``'s
output then depends neither on later events nor on the batch it came in, which the per-position
training form, :meth:`~torchrec_hytrec.modules.encoder.HyTRecEncoder.forward_last` and exact
streaming all need.

Like the full causal softmax kernel (:mod:`~torchrec_hytrec.ops.jagged_attention`), users are
grouped by ``ceil(log2(n))`` and padded to their group's longest (that module's plan, shared
through :func:`~torchrec_hytrec.ops.jagged_attention.length_groups`), so products are batched
over the users of a group. Each group is cut into blocks of queries, and a block is computed only
against the keys up to its own end (causality halves the work); a block's user count and query
count are sized so that its score tensors stay near ``_TILE_ELEMENTS``. The backward recomputes
the scores block by block instead of saving them: memory stays bounded by a few blocks and the
inputs, whatever the length (at 16k events saved scores would take gigabytes).

Tensors follow the package's jagged convention: ``[T, H, D]`` rows grouped by user through
``offsets`` ``[B + 1]``; values may be wider than queries and keys (``[T, H, D_v]``). The kernels
turn autocast off and compute in fp32, returning the queries' dtype. Export: as in
:mod:`~torchrec_hytrec.ops.jagged_attention`, while ``torch.export`` traces, the two kernels that
plan on the host run as ``hytrec::*`` custom ops (inference only).
"""

from typing import Any, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F

from torchrec_hytrec.ops.buckets import gap_buckets
from torchrec_hytrec.ops.jagged_attention import JaggedLayout, LengthGroup, _window_keys, length_groups

# Elements of one tile's [users, H, queries, keys] scores: 16 MiB in fp32, about five such tensors
# live at once in the backward. Forward and backward at 8k events, 2 cores: 2^20 2.0 s, 2^22 1.6 s,
# 2^24 3.6 s (tiles past the caches).
_TILE_ELEMENTS = 1 << 22
# Fewest queries per block, so that groups of many long users do not loop over single queries.
_MIN_BLOCK = 32


def hstu_bias_index(
    *,
    distance: torch.Tensor,
    time_gap: torch.Tensor,
    num_position_buckets: int,
    num_time_buckets: int,
    bucket_scale: float,
) -> torch.Tensor:
    """Row of every query-key pair in the joint bias table (position bucket major, time bucket minor).

    Args:
        distance: ``i - j`` of every pair (broadcastable against ``time_gap``).
        time_gap: ``t_i - t_j`` seconds of every pair.
        num_position_buckets: rows of the position-bias table.
        num_time_buckets: rows of the time-bias table.
        bucket_scale: buckets per unit of ``log1p`` (:func:`~torchrec_hytrec.ops.buckets.gap_buckets`).

    Returns:
        int64 rows, of the broadcast shape of ``distance`` and ``time_gap``.
    """
    position = gap_buckets(distance, num_position_buckets, bucket_scale)
    return position * num_time_buckets + gap_buckets(time_gap, num_time_buckets, bucket_scale)


def _joint_table(position_bias: torch.Tensor, time_bias: torch.Tensor) -> torch.Tensor:
    """``[H, P * N]``: ``b_pos[p] + b_time[n]`` at row ``p * N + n``, heads first so that a gather
    gives each head's biases as one contiguous block."""
    return (position_bias[:, None] + time_bias[None]).flatten(0, 1).t().contiguous()


def _bmm(a: torch.Tensor, b: torch.Tensor, *, ta: bool = False, tb: bool = False) -> torch.Tensor:
    """``a @ b`` (``a^T``, ``b^T`` with ``ta``, ``tb``) over equal leading dims, as one ``bmm`` on
    views. The leading dims are flattened before transposing: ``matmul``, and views of transposed
    tensors, would guard on sizes of 1 in ``torch.export``."""
    a3, b3 = a.flatten(0, -3), b.flatten(0, -3)
    out = torch.bmm(a3.transpose(1, 2) if ta else a3, b3.transpose(1, 2) if tb else b3)
    return out.unflatten(0, a.shape[:-2])


def _scores(q: torch.Tensor, k: torch.Tensor, table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``[N, H, Lq, Lk]`` pre-activation scores of (scaled) ``q`` ``[N, H, Lq, D]`` and ``k``
    ``[N, H, Lk, D]`` with the biases of ``index`` ``[N, Lq, Lk]`` from the joint ``table``."""
    return _bmm(q, k, tb=True).add_(table[:, index].movedim(0, -3))


def _masked_(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``x`` ``[N, H, Lq, Lk]`` zeroed in place outside ``valid``, which covers its last keys."""
    x[..., x.shape[-1] - valid.shape[-1] :].masked_fill_(~valid.unsqueeze(-3), 0.0)
    return x


def pointwise_attention(
    *,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias_index: torch.Tensor,
    valid: torch.Tensor,
    count: torch.Tensor,
    position_bias: torch.Tensor,
    time_bias: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """HSTU's attention of dense blocks of queries over keys, differentiable by autograd.

    The core of every path (the jagged kernel's blocks, :func:`hstu_attention_at`, streaming):
    ``o = (silu(scale * q k^T + bias) * valid) v / count``.

    Args:
        q: ``[N, H, Lq, D]`` queries.
        k: ``[N, H, Lk, D]`` keys.
        v: ``[N, H, Lk, D_v]`` values.
        bias_index: ``[N, Lq, Lk]`` joint bias rows (:func:`hstu_bias_index`).
        valid: ``[N, Lq, L]`` bool (broadcastable), which pairs of the last ``L`` keys count; every
            earlier key counts for every query (a block of queries below the diagonal needs a mask
            on its diagonal part only).
        count: ``[N, Lq]`` keys each query is normalised by (broadcastable).
        position_bias: ``[P, H]`` bias of every position bucket.
        time_bias: ``[N_t, H]`` bias of every time bucket.
        scale: factor of the dot products.

    Returns:
        ``[N, H, Lq, D_v]``.

    Example::

        >>> import torch
        >>> q, k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 6)
        >>> index = torch.zeros(1, 3, 5, dtype=torch.long)
        >>> valid = torch.ones(1, 3, 5, dtype=torch.bool)
        >>> zero = torch.zeros(4, 2)
        >>> o = pointwise_attention(
        ...     q=q, k=k, v=v, bias_index=index, valid=valid, count=torch.full((1, 3), 5.0),
        ...     position_bias=zero, time_bias=zero, scale=0.5,
        ... )
        >>> torch.allclose(o, torch.nn.functional.silu(0.5 * q @ k.mT) @ v / 5)
        True
    """
    scores = _scores(q * scale, k, _joint_table(position_bias, time_bias), bias_index)
    # In place on silu's output: its backward reads only its input.
    weights = _masked_(F.silu(scores), valid)
    return _bmm(weights, v) / count.unsqueeze(-2).unsqueeze(-1)


def jagged_hstu_attention(
    *,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    timestamps: torch.Tensor,
    position_bias: torch.Tensor,
    time_bias: torch.Tensor,
    bucket_scale: float,
    scale: Optional[float] = None,
    layout: Optional[JaggedLayout] = None,
) -> torch.Tensor:
    """HSTU-style causal pointwise attention of every user's events over its own past.

    Args:
        q: ``[T, H, D]`` queries.
        k: ``[T, H, D]`` keys.
        v: ``[T, H, D_v]`` values.
        offsets: ``[B + 1]`` int64 start of every user's rows.
        timestamps: ``[T]`` int64 event times in seconds, non-decreasing within each user.
        position_bias: ``[P, H]`` learned bias of every bucket of ``i - j``.
        time_bias: ``[N_t, H]`` learned bias of every bucket of ``t_i - t_j``.
        bucket_scale: buckets per unit of ``log1p`` of the distance or the gap.
        scale: factor of the dot products, ``D ** -0.5`` by default.
        layout: optional :class:`~torchrec_hytrec.ops.jagged_attention.JaggedLayout` of
            ``offsets``, whose length groups it shares with the other kernels of the batch.

    Returns:
        ``[T, H, D_v]`` attention outputs, in ``q``'s dtype; differentiable in ``q``, ``k``,
        ``v`` and both bias tables.

    Example::

        >>> import torch
        >>> q = torch.randn(7, 2, 8)
        >>> bias = torch.zeros(40, 2)
        >>> out = jagged_hstu_attention(
        ...     q=q, k=q, v=q, offsets=torch.tensor([0, 3, 7]), timestamps=torch.arange(7) * 60,
        ...     position_bias=bias, time_bias=bias, bucket_scale=2.0,
        ... )
        >>> out.shape
        torch.Size([7, 2, 8])
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if torch.compiler.is_exporting():
        return torch.ops.hytrec.jagged_hstu_attention(
            q, k, v, offsets, timestamps, position_bias, time_bias, bucket_scale, scale
        )
    return _jagged_hstu_attention(
        q, k, v, offsets, timestamps, position_bias, time_bias, bucket_scale, scale, layout
    )


def _jagged_hstu_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    timestamps: torch.Tensor,
    position_bias: torch.Tensor,
    time_bias: torch.Tensor,
    bucket_scale: float,
    scale: float,
    layout: Optional[JaggedLayout] = None,
) -> torch.Tensor:
    layout = JaggedLayout.of(offsets, layout)
    dtype = _compute_dtype(q)
    with torch.autocast(q.device.type, enabled=False):
        inputs = (x.to(dtype) for x in (q, k, v, position_bias, time_bias))
        out = _JaggedHSTUAttention.apply(*inputs, timestamps, layout, bucket_scale, scale)
    return out.to(q.dtype)


def _compute_dtype(q: torch.Tensor) -> torch.dtype:
    """fp32, or fp64 for fp64 inputs (the tests' references)."""
    return torch.promote_types(q.dtype, torch.float32)


def _padded(x: torch.Tensor, group: LengthGroup) -> torch.Tensor:
    """``[T, H, D]`` rows of a group's users as ``[G, H, L, D]``, zeros at the padding: a padded
    output gradient must be zero there, or the padding queries would pass it to real keys."""
    T, H, D = x.shape
    real = x.reshape(T, H * D).index_select(0, group.rows.index_select(0, group.keep))
    padded = x.new_zeros(group.num_users * group.longest, H * D).index_copy_(0, group.keep, real)
    return padded.view(group.num_users, group.longest, H, D).transpose(1, 2).contiguous()


def _kept(x: torch.Tensor, group: LengthGroup) -> torch.Tensor:
    """``[G, H, L, D]`` back to the group's real rows, ``[sum(n), H, D]`` in plan order."""
    return x.transpose(1, 2).reshape(-1, x.shape[1], x.shape[3]).index_select(0, group.keep)


def _tiles(group: LengthGroup, heads: int) -> Iterator[Tuple[slice, int, int]]:
    """``(users, start, end)`` of every tile of a group: the queries ``start..end - 1`` of some of
    its users, which read the keys ``0..end - 1``."""
    longest = group.longest
    block = min(longest, max(_MIN_BLOCK, _TILE_ELEMENTS // (group.num_users * heads * longest)))
    users = max(1, _TILE_ELEMENTS // (heads * block * longest))
    for first in range(0, group.num_users, users):
        for start in range(0, longest, block):
            yield slice(first, first + users), start, min(start + block, longest)


def _tile_pairs(
    times: torch.Tensor, start: int, end: int, position_buckets: int, time_buckets: int, bucket_scale: float
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(bias_index [G, S, E], valid [1, S, S], count [1, S])`` of queries ``start..end - 1``
    over keys ``0..end - 1``, from the users' ``[G, L]`` padded times; ``valid`` covers the
    diagonal keys ``start..end - 1`` (the earlier ones are all seen)."""
    query = torch.arange(start, end, device=times.device)
    distance = query[:, None] - torch.arange(end, device=times.device)
    index = hstu_bias_index(
        distance=distance,
        time_gap=times[:, start:end, None] - times[:, None, :end],
        num_position_buckets=position_buckets,
        num_time_buckets=time_buckets,
        bucket_scale=bucket_scale,
    )
    # Real queries never reach the padding keys after their user's last event, and padding queries
    # (outputs dropped, zero gradients) harm nothing: causality is the only mask needed.
    return index, (distance[:, start:] >= 0)[None], (query + 1).float()[None]


class _JaggedHSTUAttention(torch.autograd.Function):
    """The jagged kernel with a backward that recomputes each tile's scores."""

    @staticmethod
    def forward(
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        position_bias: torch.Tensor,
        time_bias: torch.Tensor,
        timestamps: torch.Tensor,
        layout: JaggedLayout,
        bucket_scale: float,
        scale: float,
    ) -> torch.Tensor:
        ctx.save_for_backward(q, k, v, position_bias, time_bias, timestamps)
        ctx.layout, ctx.bucket_scale, ctx.scale = layout, bucket_scale, scale
        T, H, _ = q.shape
        if T == 0:
            return v.new_zeros(v.shape)
        plan = length_groups(layout)
        outputs = []
        for group in plan.groups:
            qg, kg, vg = (_padded(x, group) for x in (q, k, v))
            times = timestamps.index_select(0, group.rows).view(group.num_users, group.longest)
            og = vg.new_empty(vg.shape)
            for users, start, end in _tiles(group, H):
                index, valid, count = _tile_pairs(
                    times[users], start, end, position_bias.shape[0], time_bias.shape[0], bucket_scale
                )
                og[users, :, start:end] = pointwise_attention(
                    q=qg[users, :, start:end],
                    k=kg[users, :, :end],
                    v=vg[users, :, :end],
                    bias_index=index,
                    valid=valid,
                    count=count,
                    position_bias=position_bias,
                    time_bias=time_bias,
                    scale=scale,
                )
            outputs.append(_kept(og, group))
        return v.new_empty(v.shape).index_copy(0, plan.rows, torch.cat(outputs))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        q, k, v, position_bias, time_bias, timestamps = ctx.saved_tensors
        with torch.autocast(q.device.type, enabled=False):
            grads = _backward(
                grad.to(q.dtype),
                q,
                k,
                v,
                position_bias,
                time_bias,
                timestamps,
                ctx.layout,
                ctx.bucket_scale,
                ctx.scale,
            )
        return (*grads, None, None, None, None)


def _backward(
    grad: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    position_bias: torch.Tensor,
    time_bias: torch.Tensor,
    timestamps: torch.Tensor,
    layout: JaggedLayout,
    bucket_scale: float,
    scale: float,
) -> Tuple[torch.Tensor, ...]:
    """Gradients of ``q``, ``k``, ``v``, ``position_bias`` and ``time_bias``. With ``w = silu(s)``
    on valid pairs (0 elsewhere) and ``g = dO / count``: ``dv = w^T g``, ``ds = (g v^T) silu'(s)``,
    ``dq = scale ds k``, ``dk = scale ds^T q``, and each bias row sums ``ds`` over its pairs."""
    T, H, _ = q.shape
    P, N = position_bias.shape[0], time_bias.shape[0]
    table = _joint_table(position_bias, time_bias)
    table_grad = torch.zeros_like(table)
    if T == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), *_split(table_grad, P, N)
    plan = length_groups(layout)
    dq_parts, dk_parts, dv_parts = [], [], []
    for group in plan.groups:
        qg, kg, vg, gg = (_padded(x, group) for x in (q, k, v, grad))
        times = timestamps.index_select(0, group.rows).view(group.num_users, group.longest)
        dq, dk, dv = torch.zeros_like(qg), torch.zeros_like(kg), torch.zeros_like(vg)
        for users, start, end in _tiles(group, H):
            index, valid, count = _tile_pairs(times[users], start, end, P, N, bucket_scale)
            q_tile, k_tile, v_tile = qg[users, :, start:end], kg[users, :, :end], vg[users, :, :end]
            s = _scores(q_tile * scale, k_tile, table, index)
            sig = torch.sigmoid(s)
            g = gg[users, :, start:end] / count.unsqueeze(-2).unsqueeze(-1)
            # In place, tile-sized buffers being the memory that matters: s becomes w = silu(s),
            # then 1 - w, and sig becomes silu'(s) = sig (1 - w) + w = sig (1 - w) - (1 - w) + 1.
            silu = _masked_(s.mul_(sig), valid)
            dv[users, :, :end] += _bmm(silu, g, ta=True)
            one_minus = silu.neg_().add_(1.0)
            ds = sig.mul_(one_minus).sub_(one_minus).add_(1.0).mul_(_bmm(g, v_tile, tb=True))
            _masked_(ds, valid)
            dq[users, :, start:end] = _bmm(ds, k_tile).mul_(scale)
            dk[users, :, :end] += _bmm(ds, q_tile, ta=True).mul_(scale)
            table_grad.index_add_(1, index.flatten(), ds.movedim(-3, 0).reshape(H, -1))
        dq_parts.append(_kept(dq, group))
        dk_parts.append(_kept(dk, group))
        dv_parts.append(_kept(dv, group))

    def scattered(parts: List[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        return like.new_empty(like.shape).index_copy(0, plan.rows, torch.cat(parts))

    return scattered(dq_parts, q), scattered(dk_parts, k), scattered(dv_parts, v), *_split(table_grad, P, N)


def _split(table_grad: torch.Tensor, positions: int, times: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The gradients of the position and time tables from that of the joint ``[H, P * N]`` table."""
    per_pair = table_grad.view(-1, positions, times)
    return per_pair.sum(2).t(), per_pair.sum(1).t()


def hstu_attention_at(
    *,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    rows: torch.Tensor,
    timestamps: torch.Tensor,
    position_bias: torch.Tensor,
    time_bias: torch.Tensor,
    bucket_scale: float,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """HSTU-style attention of a few chosen events (e.g. every user's last one) over their pasts.

    Same result as :func:`jagged_hstu_attention` at ``rows``, at a cost of ``len(rows) * L``
    (``L`` the longest history among them).

    Args:
        q: ``[R, H, D]`` queries of the chosen events.
        k: ``[T, H, D]`` keys of every event.
        v: ``[T, H, D_v]`` values of every event.
        offsets: ``[B + 1]`` int64 start of every user's rows.
        rows: ``[R]`` int64 rows of the chosen events.
        timestamps: ``[T]`` int64 event times in seconds.
        position_bias: ``[P, H]`` bias of every position bucket.
        time_bias: ``[N_t, H]`` bias of every time bucket.
        bucket_scale: buckets per unit of ``log1p``.
        scale: factor of the dot products, ``D ** -0.5`` by default.

    Returns:
        ``[R, H, D_v]`` attention outputs, in ``q``'s dtype.

    Example::

        >>> import torch
        >>> offsets, k, bias = torch.tensor([0, 3, 7]), torch.randn(7, 2, 8), torch.randn(40, 2)
        >>> batch = dict(offsets=offsets, timestamps=torch.arange(7) * 60)
        >>> tables = dict(position_bias=bias, time_bias=bias, bucket_scale=2.0)
        >>> last = offsets[1:] - 1
        >>> out = hstu_attention_at(q=k[last], k=k, v=k, rows=last, **batch, **tables)
        >>> full = jagged_hstu_attention(q=k, k=k, v=k, **batch, **tables)
        >>> torch.allclose(out, full[last], atol=1e-6)
        True
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if torch.compiler.is_exporting():
        return torch.ops.hytrec.hstu_attention_at(
            q, k, v, offsets, rows, timestamps, position_bias, time_bias, bucket_scale, scale
        )
    return _hstu_attention_at(
        q, k, v, offsets, rows, timestamps, position_bias, time_bias, bucket_scale, scale
    )


def _hstu_attention_at(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    rows: torch.Tensor,
    timestamps: torch.Tensor,
    position_bias: torch.Tensor,
    time_bias: torch.Tensor,
    bucket_scale: float,
    scale: float,
) -> torch.Tensor:
    keys, valid = _window_keys(offsets, rows, None, None)
    count = valid.sum(dim=1)
    # keys[:, l] is the event count - 1 - l places before the query.
    distance = count[:, None] - 1 - torch.arange(keys.shape[1], device=keys.device)
    index = hstu_bias_index(
        distance=distance[:, None],
        time_gap=(timestamps[rows][:, None] - timestamps[keys])[:, None],
        num_position_buckets=position_bias.shape[0],
        num_time_buckets=time_bias.shape[0],
        bucket_scale=bucket_scale,
    )
    dtype = _compute_dtype(q)
    with torch.autocast(q.device.type, enabled=False):
        o = pointwise_attention(
            q=q.to(dtype)[:, :, None],
            k=k.to(dtype)[keys].transpose(1, 2),
            v=v.to(dtype)[keys].transpose(1, 2),
            bias_index=index,
            valid=valid[:, None],
            count=count.to(dtype)[:, None],
            position_bias=position_bias.to(dtype),
            time_bias=time_bias.to(dtype),
            scale=scale,
        )
    return o[:, :, 0].to(q.dtype)


@torch.library.custom_op("hytrec::jagged_hstu_attention", mutates_args=())
def _jagged_hstu_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    timestamps: torch.Tensor,
    position_bias: torch.Tensor,
    time_bias: torch.Tensor,
    bucket_scale: float,
    scale: float,
) -> torch.Tensor:
    """:func:`jagged_hstu_attention` as one op of an exported program (plans inside)."""
    return _jagged_hstu_attention(q, k, v, offsets, timestamps, position_bias, time_bias, bucket_scale, scale)


@_jagged_hstu_attention_op.register_fake
def _jagged_hstu_attention_fake(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: Any
) -> torch.Tensor:
    return q.new_empty(q.shape[:2] + v.shape[2:])


@torch.library.custom_op("hytrec::hstu_attention_at", mutates_args=())
def _hstu_attention_at_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    rows: torch.Tensor,
    timestamps: torch.Tensor,
    position_bias: torch.Tensor,
    time_bias: torch.Tensor,
    bucket_scale: float,
    scale: float,
) -> torch.Tensor:
    """:func:`hstu_attention_at` as one op of an exported program (its history span is read inside)."""
    return _hstu_attention_at(
        q, k, v, offsets, rows, timestamps, position_bias, time_bias, bucket_scale, scale
    )


@_hstu_attention_at_op.register_fake
def _hstu_attention_at_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: Any) -> torch.Tensor:
    return q.new_empty(q.shape[:2] + v.shape[2:])
