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
grouped by user through ``offsets`` ``[B + 1]``. Both paths are planned from a host copy of the
offsets; a :class:`JaggedLayout` shared by the calls of one batch takes that copy once and keeps
the plans.

Export: while ``torch.export`` traces, the offsets hold no values, so no plan can be made. Each
kernel that plans on the host is then traced as a ``torch.library`` custom op (``hytrec::*``)
whose fake implementation gives the output's shape from the inputs' shapes, and whose real one
runs the same eager kernel, planning from the offsets it is given. We keep the host-side plans
instead of rewriting them as tensor programs (or bucketing lengths) because they are what makes
these kernels fast on CPU (length groups of SDPA calls, block layouts sized to the batch), and
because an exported program then computes exactly what eager code computes. The cost: the plans
of an exported program are made once per op call rather than once per batch (on a GPU, one
device read per call). Exported programs are inference programs: the ops have no autograd
formula.
"""

from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, Dict, Hashable, List, Optional, Tuple, TypeVar

import torch
import torch.nn.functional as F

_Plan = TypeVar("_Plan")


class JaggedLayout:
    """The host-side view of a jagged batch's offsets, and the kernel plans built from it.

    On a GPU every read of a device tensor's value on the host (a length, a count that sizes a
    tensor) waits for the device. A layout copies the offsets to the host once, on first use, and
    answers every such question from that copy; each plan a kernel derives from the offsets is built
    once per key and kept. Layers that share one layout therefore read the device back a fixed
    number of times per batch, whatever their number.

    While ``torch.export`` traces, the layout has no host copy (the offsets hold no values): it
    answers only what tensor shapes say (``num_users``, ``num_events`` when given) and what it builds
    with tensor ops (``lengths``, ``users``, ``positions``); the kernels then run as custom ops that
    plan inside (see the module's docstring).

    Args:
        offsets: ``[B + 1]`` int64 start of every user's rows, on the device of the data.
        max_len: optional bound on every user's length (HSTU's ``max_seq_len``), checked against
            the offsets; the longest user's length when ``None``.
        num_events: ``T`` as a tensor's size, for a layout made while exporting (where
            ``offsets[-1]`` cannot be read); ignored otherwise.
        host_offsets: the offsets' host copy when the caller made the offsets from it (then the
            layout reads nothing back from the device).

    Example::

        >>> import torch
        >>> offsets = torch.tensor([0, 3, 7])
        >>> layout = JaggedLayout(offsets)
        >>> q = torch.randn(7, 2, 8)
        >>> jagged_causal_attention(q=q, k=q, v=q, offsets=offsets, layout=layout).shape
        torch.Size([7, 2, 8])
        >>> layout.host_lengths.tolist(), layout.positions.tolist()
        ([3, 4], [0, 1, 2, 0, 1, 2, 3])
    """

    def __init__(
        self,
        offsets: torch.Tensor,
        max_len: Optional[int] = None,
        num_events: Optional[int] = None,
        host_offsets: Optional[torch.Tensor] = None,
    ) -> None:
        self.offsets = offsets
        self._max_len = max_len
        self._plans: Dict[Hashable, Any] = {}
        self._num_events_hint = num_events
        if host_offsets is not None:
            self.__dict__["host_offsets"] = host_offsets  # the cached_property's value

    @classmethod
    def of(cls, offsets: torch.Tensor, layout: Optional["JaggedLayout"]) -> "JaggedLayout":
        """``layout`` when given (it must be the layout of ``offsets``), else a new one of ``offsets``."""
        if layout is None:
            return cls(offsets)
        if layout.offsets is not offsets:
            raise ValueError("layout must be the JaggedLayout of the offsets passed with it")
        return layout

    @cached_property
    def host_offsets(self) -> torch.Tensor:
        """The offsets on the host (the layout's one device-to-host copy), checked."""
        if self.offsets.dim() != 1 or self.offsets.numel() < 1:
            raise ValueError(f"offsets must be a 1-D tensor [B + 1], got shape {tuple(self.offsets.shape)}")
        host = self.offsets.detach().to("cpu", torch.int64)
        if int(host[0]) != 0:
            raise ValueError(f"offsets must start at 0, got offsets[0]={int(host[0])}")
        lengths = host[1:] - host[:-1]
        if bool((lengths < 0).any()):
            bad = int(torch.nonzero(lengths < 0)[0])
            raise ValueError(f"offsets must be non-decreasing; user {bad} has length {int(lengths[bad])}")
        if self._max_len is not None and bool((lengths > self._max_len).any()):
            user = int(lengths.argmax())
            raise ValueError(f"max_len is {self._max_len}, but user {user} has {int(lengths[user])} events")
        return host

    @cached_property
    def host_lengths(self) -> torch.Tensor:
        """``[B]`` int64 events of every user, on the host."""
        return self.host_offsets[1:] - self.host_offsets[:-1]

    @property
    def num_users(self) -> int:
        """``B``, from the offsets' shape."""
        return self.offsets.numel() - 1

    @cached_property
    def num_events(self) -> int:
        """``T = offsets[-1]``, from the host copy (while exporting, the ``num_events`` given)."""
        if torch.compiler.is_exporting() and self._num_events_hint is not None:
            return self._num_events_hint
        return int(self.host_offsets[-1])

    @cached_property
    def max_len(self) -> int:
        """The ``max_len`` given, else the longest user's length (``0`` for a batch of no users)."""
        if self._max_len is not None:
            return self._max_len
        return int(self.host_lengths.max()) if self.num_users else 0

    @cached_property
    def lengths(self) -> torch.Tensor:
        """``[B]`` int64 events of every user, on the offsets' device."""
        return self.offsets[1:] - self.offsets[:-1]

    @cached_property
    def users(self) -> torch.Tensor:
        """``[T]`` int64 user of every row, on the offsets' device."""
        users = torch.arange(self.num_users, device=self.offsets.device)
        return torch.repeat_interleave(users, self.lengths, output_size=self.num_events)

    @cached_property
    def positions(self) -> torch.Tensor:
        """``[T]`` int64 index of every row inside its user's sequence (:func:`jagged_positions`)."""
        return jagged_positions(self.offsets, num_events=self.num_events)

    def plan(self, key: Hashable, build: Callable[[], _Plan]) -> _Plan:
        """The plan kept under ``key``, made by ``build`` on the first request."""
        if key not in self._plans:
            self._plans[key] = build()
        return self._plans[key]


def jagged_positions(offsets: torch.Tensor, num_events: Optional[int] = None) -> torch.Tensor:
    """Index of every event inside its own user's sequence.

    Args:
        offsets: ``[B + 1]`` int64 start of every user's rows.
        num_events: ``offsets[-1]`` when the caller knows it on the host (it is read back from the
            offsets otherwise).

    Returns:
        ``[T]`` int64, ``0`` at each user's first event.
    """
    total = int(offsets[-1]) if num_events is None else num_events
    lengths = offsets[1:] - offsets[:-1]
    starts = torch.repeat_interleave(offsets[:-1], lengths, output_size=total)
    return torch.arange(starts.numel(), device=offsets.device) - starts


def causal_window_starts(
    *,
    offsets: torch.Tensor,
    timestamps: torch.Tensor,
    window: int,
    window_seconds: Optional[float] = None,
    layout: Optional[JaggedLayout] = None,
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
        layout: optional :class:`JaggedLayout` of ``offsets``, whose positions it reuses.

    Returns:
        ``[T]`` int64 local position (``0`` = the user's first event) of the first event in
        each query's window.
    """
    layout = JaggedLayout.of(offsets, layout)
    starts = (layout.positions - window + 1).clamp(min=0)
    total = starts.numel()
    if window_seconds is None or total == 0:
        return starts
    user = layout.users
    # One sorted key for all users: user index in the high part, time since the user's first
    # event in the low part, so a single searchsorted never crosses into another user.
    first_time = timestamps[offsets[:-1].clamp(max=total - 1)]
    relative = timestamps - first_time[user]
    # A tensor, not a host int: no device read, and nothing data-dependent for torch.export.
    span = relative.max() + int(window_seconds) + 2
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
    layout: Optional[JaggedLayout] = None,
) -> torch.Tensor:
    """Causal multi-head softmax attention of every user's events over its own past.

    Two kernels, the same result: users grouped by ``ceil(log2(n))``, each group padded to its
    longest and computed in one SDPA call (a band mask where the group is longer than the
    window), or, for a window over long histories, a layout of query blocks each reading the
    blocks its window spans. A sliding window takes whichever the lengths make cheaper
    (:func:`_groups_cost_less`); a time-bounded one (``window_starts``) the block layout.

    Args:
        q: ``[T, H, D]`` queries.
        k: ``[T, H, D]`` keys.
        v: ``[T, H, D]`` values.
        offsets: ``[B + 1]`` int64 start of every user's rows.
        window: ``None`` for full causal attention; ``W`` to let query ``i`` see only keys
            ``(i - W, i]`` of its user.
        window_starts: optional ``[T]`` local position of the first key each query may see
            (from :func:`causal_window_starts`); narrows ``window`` further. Needs ``window``.
        block_size: queries per block of the block layout.
        scale: score scale, ``D ** -0.5`` by default.
        layout: optional :class:`JaggedLayout` of ``offsets``: its length groups or block layout
            are then planned once and reused by every call that shares it.

    Returns:
        ``[T, H, D]`` attention outputs, in ``q``'s dtype.

    Example::

        >>> import torch
        >>> q = torch.randn(10, 2, 8)
        >>> out = jagged_causal_attention(q=q, k=q, v=q, offsets=torch.tensor([0, 4, 10]), window=3)
        >>> out.shape
        torch.Size([10, 2, 8])
    """
    if torch.compiler.is_exporting():
        return torch.ops.hytrec.jagged_causal_attention(
            q, k, v, offsets, window, window_starts, block_size, scale
        )
    return _jagged_causal_attention(q, k, v, offsets, window, window_starts, block_size, scale, layout)


def _jagged_causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    window: Optional[int],
    window_starts: Optional[torch.Tensor],
    block_size: int,
    scale: Optional[float],
    layout: Optional[JaggedLayout] = None,
) -> torch.Tensor:
    layout = JaggedLayout.of(offsets, layout)
    if window is None:
        if window_starts is not None:
            raise ValueError("window_starts needs a window: full causal attention has no start bound")
        return _grouped_causal(q, k, v, layout, scale)
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    block = min(block_size, window)
    if window_starts is None and layout.plan(
        ("groups_cost_less", window, block), lambda: _groups_cost_less(layout, window, block)
    ):
        return _grouped_causal(q, k, v, layout, scale, window)
    return _windowed_causal(q, k, v, layout, window, window_starts, block, scale)


# What a query slot of the windowed kernel costs besides its scores, in score entries: its slots
# are SDPA batch items of ``block`` queries each, and on short histories (Beauty's, with a short
# window) that per-item work, not the scores, is most of the kernel's time.
_WINDOW_SLOT_OVERHEAD = 512
# The length groups' extra score entries, masked beyond the window, still cost less than the
# windowed kernel's up to this ratio of the two estimates.
_GROUPS_COST_RATIO = 1.5


def _groups_cost_less(layout: JaggedLayout, window: int, block: int) -> bool:
    """Whether the length groups (:func:`_grouped_causal` with a band mask) are the cheaper kernel
    for a sliding window of ``window`` over ``layout``, from the host lengths.

    The groups cost ``L^2`` score entries per user of group length ``L`` (half where ``L`` fits
    in the window: plain causal); the windowed kernel ``block * (before + 1) * block`` per query
    slot, plus :data:`_WINDOW_SLOT_OVERHEAD`. No user longer than the window always takes the
    groups: it is then full causal attention."""
    if layout.max_len <= window:
        return True
    lengths = layout.host_lengths
    longest = 2 ** _length_group(lengths[lengths > 0])
    groups = torch.where(longest <= window, longest * longest // 2, longest * longest).sum()
    before = _blocks_before(window, block)
    query_slots = int(_window_slot_counts(lengths, block, before).sum()) - before
    windowed = query_slots * (block * (before + 1) * block + _WINDOW_SLOT_OVERHEAD)
    return int(groups) <= _GROUPS_COST_RATIO * windowed


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
    if torch.compiler.is_exporting():
        return torch.ops.hytrec.attention_key_rows(offsets, rows, window, window_starts)
    return _attention_key_rows(offsets, rows, window, window_starts)


def _attention_key_rows(
    offsets: torch.Tensor, rows: torch.Tensor, window: int, window_starts: Optional[torch.Tensor]
) -> torch.Tensor:
    # Padding keys repeat their query's own row, which every window holds: no need to drop them
    # (a boolean selection would be one more read of the device).
    keys, _ = _window_keys(offsets, rows, window, window_starts)
    return torch.unique(keys)


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

        >>> import torch
        >>> offsets = torch.tensor([0, 4, 10])
        >>> k = torch.randn(10, 2, 8)
        >>> last = offsets[1:] - 1
        >>> out = causal_attention_at(q=k[last], k=k, v=k, offsets=offsets, rows=last, window=3)
        >>> torch.allclose(out, jagged_causal_attention(q=k, k=k, v=k, offsets=offsets, window=3)[last])
        True
    """
    if torch.compiler.is_exporting():
        return torch.ops.hytrec.causal_attention_at(
            q, k, v, offsets, rows, window, window_starts, key_rows, scale
        )
    return _causal_attention_at(q, k, v, offsets, rows, window, window_starts, key_rows, scale)


def _causal_attention_at(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    rows: torch.Tensor,
    window: Optional[int],
    window_starts: Optional[torch.Tensor],
    key_rows: Optional[torch.Tensor],
    scale: Optional[float],
) -> torch.Tensor:
    keys, valid = _window_keys(offsets, rows, window, window_starts)
    if key_rows is not None:
        keys = torch.searchsorted(key_rows, keys)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.einsum("rhd,rlhd->rhl", q, k[keys]) * scale
    probs = scores.masked_fill(~valid[:, None, :], float("-inf")).softmax(dim=-1)
    return torch.einsum("rhl,rlhd->rhd", probs, v[keys])


@torch.library.custom_op("hytrec::jagged_causal_attention", mutates_args=())
def _jagged_causal_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    window: Optional[int],
    window_starts: Optional[torch.Tensor],
    block_size: int,
    scale: Optional[float],
) -> torch.Tensor:
    """:func:`jagged_causal_attention` as one op of an exported program (plans inside)."""
    return _jagged_causal_attention(q, k, v, offsets, window, window_starts, block_size, scale)


@_jagged_causal_attention_op.register_fake
def _jagged_causal_attention_fake(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: Any
) -> torch.Tensor:
    return q.new_empty(q.shape[:2] + v.shape[2:])


@torch.library.custom_op("hytrec::causal_attention_at", mutates_args=())
def _causal_attention_at_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    rows: torch.Tensor,
    window: Optional[int],
    window_starts: Optional[torch.Tensor],
    key_rows: Optional[torch.Tensor],
    scale: Optional[float],
) -> torch.Tensor:
    """:func:`causal_attention_at` as one op of an exported program (its window span is read inside)."""
    return _causal_attention_at(q, k, v, offsets, rows, window, window_starts, key_rows, scale)


@_causal_attention_at_op.register_fake
def _causal_attention_at_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: Any) -> torch.Tensor:
    return q.new_empty(q.shape[:2] + v.shape[2:])


@torch.library.custom_op("hytrec::attention_key_rows", mutates_args=())
def _attention_key_rows_op(
    offsets: torch.Tensor, rows: torch.Tensor, window: int, window_starts: Optional[torch.Tensor]
) -> torch.Tensor:
    """:func:`attention_key_rows` as one op of an exported program."""
    return _attention_key_rows(offsets, rows, window, window_starts)


@_attention_key_rows_op.register_fake
def _attention_key_rows_fake(offsets: torch.Tensor, rows: torch.Tensor, *args: Any) -> torch.Tensor:
    # As many rows as the windows hold, known only when the program runs.
    return rows.new_empty(torch.library.get_ctx().new_dynamic_size())


@dataclass
class LengthGroup:
    """The users of one ``ceil(log2(n))`` group, padded to the group's longest."""

    num_users: int
    longest: int
    # [num_users * longest] row read at every padded position (row 0 for padding).
    rows: torch.Tensor
    # The padded positions holding real rows, in order.
    keep: torch.Tensor


@dataclass
class LengthGroups:
    """A batch's users grouped by ``ceil(log2(n))`` (users without events in none)."""

    groups: List[LengthGroup]
    # [T] row of every kept output, group after group.
    rows: torch.Tensor


def length_groups(layout: JaggedLayout) -> LengthGroups:
    """The ``ceil(log2(n))`` length groups of ``layout``'s users, planned once per layout: every
    kernel that pads users to their group's longest (full causal softmax, HSTU-style attention)
    shares the one plan.

    Args:
        layout: the batch's layout.

    Returns:
        The groups, in increasing length, and the row of every kept output.
    """
    return layout.plan(("length_groups",), lambda: _plan_length_groups(layout))


def _length_group(lengths: torch.Tensor) -> torch.Tensor:
    """``ceil(log2(n))`` of every length (``0`` for ``n = 1``), ``-1`` for empty users.

    ``frexp``'s exponent of ``n - 1`` is exact, so the host and the device agree on every group.
    """
    return torch.where(lengths > 0, torch.frexp((lengths - 1).double()).exponent.long(), -1)


def _plan_length_groups(layout: JaggedLayout) -> LengthGroups:
    """Sizes come from the host copy, index tensors are built on the device: no copy either way."""
    host_lengths, lengths = layout.host_lengths, layout.lengths
    host_group = _length_group(host_lengths)
    # Users by group, each group in user order (as nonzero(group == g) lists them), on both sides.
    host_order = torch.argsort(host_group, stable=True)
    order = torch.argsort(_length_group(lengths), stable=True)
    start = int((host_group < 0).sum())
    groups = []
    for count in torch.bincount(host_group[host_group >= 0]).tolist():
        if count == 0:
            continue
        n_host = host_lengths[host_order[start : start + count]]
        users = order[start : start + count]
        start += count
        longest = int(n_host.max())
        span = torch.arange(longest, device=lengths.device)
        valid = span < lengths[users, None]
        # Padding rows read row 0; causality keeps them out of every real row's keys, and their
        # own outputs are dropped, so no gradient reaches row 0 through them.
        rows = torch.where(valid, layout.offsets[users, None] + span, 0).flatten()
        keep = torch.nonzero_static(valid.flatten(), size=int(n_host.sum())).flatten()
        groups.append(LengthGroup(num_users=count, longest=longest, rows=rows, keep=keep))
    kept = torch.cat([group.rows.index_select(0, group.keep) for group in groups])
    return LengthGroups(groups=groups, rows=kept)


def _empty_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The output of a batch of no events, still a function of ``q``, ``k`` and ``v``: its backward
    reaches their projections (the encoder runs a stack nothing reads on no events, for DDP)."""
    return q * 0 + (k.sum() + v.sum()) * 0


def _grouped_causal(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: JaggedLayout,
    scale: Optional[float],
    window: Optional[int] = None,
) -> torch.Tensor:
    """Causal attention by length groups; with ``window``, the groups longer than it take a band
    mask (keys ``(i - window, i]``)."""
    T, H, D = q.shape
    if T == 0:
        return _empty_attention(q, k, v)
    # Users are grouped by ceil(log2(n)) and every group is padded to its longest user: one SDPA
    # call per group (a few dozen at most, instead of one per user, which costs more than the
    # attention itself on batches of short histories), and padding at most 4x sum n^2 of work.
    plan = length_groups(layout)
    flat_q, flat_k, flat_v = (x.reshape(T, H * D) for x in (q, k, v))
    outputs = []
    for group in plan.groups:

        def gather(x: torch.Tensor) -> torch.Tensor:
            # [G, H, L, D]; 4-D inputs, as SDPA sends 3-D ones to its quadratic-memory math path on CPU.
            return x.index_select(0, group.rows).view(group.num_users, group.longest, H, D).transpose(1, 2)

        band = None
        if window is not None and group.longest > window:
            span = torch.arange(group.longest, device=q.device)
            behind = span[:, None] - span
            band = (behind >= 0) & (behind < window)
        queries, keys, values = gather(flat_q), gather(flat_k), gather(flat_v)
        o = F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=band, is_causal=band is None, scale=scale
        )
        outputs.append(o.transpose(1, 2).reshape(-1, H, D).index_select(0, group.keep))
    return q.new_empty(q.shape).index_copy(0, plan.rows, torch.cat(outputs))


@dataclass
class _WindowSlots:
    """The windowed kernel's layout: every user gets ``before`` zero slots of ``block`` rows, then
    its own blocks."""

    num_slots: int
    # [T] row of every event in the padded [num_slots * block] layout.
    rows: torch.Tensor
    # [num_slots - before] key column of local position 0, for every query slot.
    first_key: torch.Tensor


def _blocks_before(window: int, block: int) -> int:
    """Key blocks of the block layout preceding each query block: those its window can reach."""
    return -(-window // block)


def _window_slot_counts(lengths: torch.Tensor, block: int, before: int) -> torch.Tensor:
    """Slots of every user in the block layout: its ``before`` zero slots, then its own blocks."""
    return (lengths + block - 1) // block + before


def _plan_window_slots(layout: JaggedLayout, before: int, block: int) -> _WindowSlots:
    device = layout.offsets.device
    num_slots = int(_window_slot_counts(layout.host_lengths, block, before).sum())
    slots = _window_slot_counts(layout.lengths, block, before)
    slot_base = torch.cumsum(slots, 0) - slots
    rows = (slot_base[layout.users] + before) * block + layout.positions
    # Local block index of each query slot (< 0 for padding slots).
    users = torch.arange(layout.num_users, device=device)
    slot_user = torch.repeat_interleave(users, slots, output_size=num_slots)
    local_block = (torch.arange(num_slots, device=device) - slot_base[slot_user] - before)[before:]
    return _WindowSlots(num_slots=num_slots, rows=rows, first_key=(before - local_block) * block)


def _windowed_causal(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: JaggedLayout,
    window: int,
    window_starts: Optional[torch.Tensor],
    block: int,
    scale: Optional[float],
) -> torch.Tensor:
    T, H, D = q.shape
    if T == 0:
        return _empty_attention(q, k, v)
    device = q.device
    before = _blocks_before(window, block)
    # Query slot s finds its keys in slots s - before .. s, so the keys of all query slots are
    # windows of `before + 1` consecutive slots of one tensor (`unfold`): no gather, and a cheap backward.
    plan = layout.plan(("window_slots", before, block), lambda: _plan_window_slots(layout, before, block))
    num_slots, rows = plan.num_slots, plan.rows

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
    # Keys with a negative local position are padding, as are keys before the query's window start.
    if window_starts is None:
        threshold = plan.first_key[:, None].expand(num_queries, block)
    else:
        starts = torch.zeros(num_slots * block, dtype=torch.long, device=device).index_copy(
            0, rows, window_starts
        )
        threshold = plan.first_key[:, None] + starts.view(num_slots, block)[before:]
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
