"""Streaming HyTRec: per-user state, built from a history in one batched pass, advanced one event
at a time, with outputs equal to the full forward.

A :class:`HyTRecStreamState` holds, for a batch of users:

* per TADN layer, the ``[B, H, d_k, d_v]`` recurrent state after each user's latest event;
* per softmax layer, the rotated keys and values of the events it can still attend to: the last
  ``W`` for a windowed layer (the short branch: the last ``K``), in a :class:`KVCache` of fixed
  capacity; every event for a full-causal layer, in a :class:`GrowingKVCache`;
* per HSTU-style layer, the keys, values and times of every event, in a :class:`GrowingKVCache`
  (positions and counts follow from the slots and the user's event count);
* the long branch's outputs at the last ``K`` events (the candidates for the long summary
  ``l_{i-K}``) and their times.

Users of different lengths batch together: every buffer is right-aligned (a user's latest event in
the last slot) and padded on the left with zeros; which slots hold events follows from the user's
event count, so no mask is stored. A fixed capacity keeps the shapes of windowed layers constant,
so one exported step serves every step from the first.

A full-causal cache grows by one event per step. Appending to one tensor would copy the whole
history every step (at 10k events, a 5 MB copy that cost more than the rest of the step), so a
:class:`GrowingKVCache` appends to a short tail and :func:`compact_stream_state` moves the tail
into the large block once it holds ``_TAIL_EVENTS`` events: one copy of the history every
``_TAIL_EVENTS`` steps. Attention reads the block and the tail without joining them.

:func:`prefill` builds the state of a jagged batch of histories in one pass over it: the TADN
states come from the chunked kernel, and each layer is computed only where the state (or a later
layer) reads it, so it costs about one :meth:`HyTRecEncoder.forward_last
<torchrec_hytrec.modules.encoder.HyTRecEncoder.forward_last>`.

Example::

    >>> import torch
    >>> from torchrec_hytrec.modules import HyTRecConfig, HyTRecEncoder
    >>> encoder = HyTRecEncoder(HyTRecConfig.hytrec(embedding_dim=16, short_window=4)).eval()
    >>> values, timestamps = torch.randn(9, 16), torch.arange(9) * 60
    >>> offsets = torch.tensor([0, 3, 8])  # two users: 3 and 5 events; row 8 is user 0's next event
    >>> with torch.no_grad():
    ...     state = prefill(encoder, values[:8], offsets, timestamps[:8])
    ...     out, state = stream_step(encoder, state, values[[8, 8]], timestamps[[8, 8]])
    ...     full = encoder(values[[0, 1, 2, 8]], torch.tensor([0, 4]), timestamps[[0, 1, 2, 8]])
    >>> torch.allclose(out[0], full[-1], atol=1e-5), state.num_events.tolist()
    (True, [4, 6])
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from torchrec_hytrec.modules.attention import SoftmaxAttentionLayer
from torchrec_hytrec.modules.blocks import SequenceContext, checked_context
from torchrec_hytrec.modules.hstu import HSTULayer
from torchrec_hytrec.modules.tadn import TADNLayer
from torchrec_hytrec.ops.hstu_attention import hstu_bias_index, pointwise_attention
from torchrec_hytrec.ops.jagged_attention import JaggedLayout
from torchrec_hytrec.ops.tadn import tadn_step

if TYPE_CHECKING:
    from torchrec_hytrec.modules.encoder import HyTRecEncoder

# Events a full-causal cache's tail holds before compaction moves them into its block: a step copies
# the tail (at d = 64, 128 KiB), compaction copies the history once per this many steps.
_TAIL_EVENTS = 256


@dataclass
class KVCache:
    """Keys and values of the last events of every user, right-aligned.

    Slot ``L - 1`` holds each user's latest event; a user with ``n < L`` events has zeros in its
    first ``L - n`` slots.

    Args:
        keys: ``[B, H, L, D]`` rotated keys.
        values: ``[B, H, L, D]`` values.
        timestamps: ``[B, L]`` int64 event times (for windows measured in seconds).

    Example::

        >>> import torch
        >>> keys = torch.zeros(2, 1, 4, 8)  # 2 users, 1 head, 4 slots of 8 channels
        >>> cache = KVCache(keys, keys.clone(), torch.zeros(2, 4, dtype=torch.long))
        >>> cache.keys.shape[2]
        4
    """

    keys: torch.Tensor
    values: torch.Tensor
    timestamps: torch.Tensor


@dataclass
class GrowingKVCache:
    """A full-causal layer's cache of every event: a large block and a short tail.

    The two read as one right-aligned sequence of slots, block first; steps append to the tail and
    :func:`compact_stream_state` moves the tail into the block.

    Args:
        block: the older events.
        tail: the latest events (every slot holds one).

    Example::

        >>> import torch
        >>> keys = torch.zeros(2, 1, 0, 8)
        >>> empty = KVCache(keys, keys.clone(), torch.zeros(2, 0, dtype=torch.long))
        >>> GrowingKVCache(block=empty, tail=empty).tail.keys.shape[2]
        0
    """

    block: KVCache
    tail: KVCache


@dataclass
class HyTRecStreamState:
    """Everything a batch of streamed users needs to take one more event.

    All users of a state advance together, one event per :func:`stream_step`; they may have seen
    different numbers of events (from :func:`prefill`).

    Args:
        num_events: ``[B]`` int64 events each user has seen so far (a tensor, so that an
            exported step serves every later step).
        last_timestamps: ``[B]`` int64 time of each user's latest event.
        long_states: per long-branch layer, the ``[B, H, d_k, d_v]`` TADN state, the windowed
            softmax layer's :class:`KVCache` (``W`` slots) or the full-causal layer's
            :class:`GrowingKVCache`.
        short_cache: the short branch's :class:`KVCache` of the last ``K`` events.
        recent_long: ``[B, K, d]`` long-branch outputs at the last ``K`` events (``[B, 0, d]``
            without fusion), right-aligned like the caches.
        recent_timestamps: ``[B, K]`` int64 times of those events.

    Example::

        >>> from torchrec_hytrec.modules import HyTRecConfig, HyTRecEncoder
        >>> encoder = HyTRecEncoder(HyTRecConfig.hytrec(embedding_dim=16, short_window=4))
        >>> state = init_stream(encoder, batch_size=3)
        >>> state.num_events.tolist(), state.recent_long.shape
        ([0, 0, 0], torch.Size([3, 4, 16]))
    """

    num_events: torch.Tensor
    last_timestamps: torch.Tensor
    long_states: List[Union[torch.Tensor, KVCache, GrowingKVCache]]
    short_cache: Optional[KVCache]
    recent_long: torch.Tensor
    recent_timestamps: torch.Tensor


# Stream states are pytrees, so an exported stream_step takes and returns them; the names let
# torch.export.save store a program that does, and torch.export.load (weights_only) read back its
# example inputs.
torch.export.register_dataclass(KVCache, serialized_type_name=f"{__name__}.KVCache")
torch.export.register_dataclass(GrowingKVCache, serialized_type_name=f"{__name__}.GrowingKVCache")
torch.export.register_dataclass(HyTRecStreamState, serialized_type_name=f"{__name__}.HyTRecStreamState")
torch.serialization.add_safe_globals([KVCache, GrowingKVCache, HyTRecStreamState])


AttentionLayer = Union[SoftmaxAttentionLayer, HSTULayer]


def _empty_cache(batch_size: int, layer: AttentionLayer, slots: int, device: torch.device) -> KVCache:
    keys = torch.zeros(batch_size, layer.num_heads, slots, layer.head_dim, device=device)
    value_dim = layer.value_dim if isinstance(layer, HSTULayer) else layer.head_dim
    values = torch.zeros(batch_size, layer.num_heads, slots, value_dim, device=device)
    return KVCache(keys, values, torch.zeros(batch_size, slots, dtype=torch.long, device=device))


def _windowed(layer: AttentionLayer) -> bool:
    return isinstance(layer, SoftmaxAttentionLayer) and layer.window is not None


def _layer_cache(
    layer: AttentionLayer, block: KVCache, device: torch.device
) -> Union[KVCache, GrowingKVCache]:
    """A windowed layer's cache is ``block``; a full-causal layer's starts its tail empty."""
    if _windowed(layer):
        return block
    return GrowingKVCache(block=block, tail=_empty_cache(block.keys.shape[0], layer, 0, device))


def init_stream(
    encoder: "HyTRecEncoder", batch_size: int, device: Optional[torch.device] = None
) -> HyTRecStreamState:
    """State of ``batch_size`` users with no events yet.

    Args:
        encoder: the encoder to stream.
        batch_size: users.
        device: where the state lives (the encoder's device by default).

    Returns:
        The empty state; windowed caches already have their full capacity.
    """
    device = device if device is not None else encoder.final_norm.weight.device
    config = encoder.config
    long_states: List[Union[torch.Tensor, KVCache, GrowingKVCache]] = []
    for layer in encoder.long_layers:
        if isinstance(layer, TADNLayer):
            heads, dim = layer.num_heads, layer.head_dim
            long_states.append(torch.zeros(batch_size, heads, dim, dim, device=device))
        else:
            slots = layer.window if _windowed(layer) else 0
            long_states.append(_layer_cache(layer, _empty_cache(batch_size, layer, slots, device), device))
    short_cache = None
    if encoder.short_layer is not None:
        short_cache = _empty_cache(batch_size, encoder.short_layer, config.short_window, device)
    recent = config.short_window if encoder.fusion is not None else 0
    return HyTRecStreamState(
        num_events=torch.zeros(batch_size, dtype=torch.long, device=device),
        last_timestamps=torch.zeros(batch_size, dtype=torch.long, device=device),
        long_states=long_states,
        short_cache=short_cache,
        recent_long=torch.zeros(batch_size, recent, config.embedding_dim, device=device),
        recent_timestamps=torch.zeros(batch_size, recent, dtype=torch.long, device=device),
    )


def _padding(slots: int, num_events: torch.Tensor) -> torch.Tensor:
    """``[B, slots]``: which slots of a right-aligned buffer hold none of the user's events."""
    return torch.arange(slots, device=num_events.device) < (slots - num_events)[:, None]


def _attend(q: torch.Tensor, blocks: Sequence[KVCache], masked: torch.Tensor, scale: float) -> torch.Tensor:
    """Queries ``q`` ``[B, H, S, D]`` over the slots of ``blocks`` read as one sequence, except
    where ``masked`` ``[B, S, L]``; returns ``[B, H, S, D]``."""
    if q.shape[2] > 1:
        (block,) = blocks
        # SDPA never forms the [B, H, S, L] scores, which for S = K queries over long histories
        # would be the largest tensor of a prefill.
        return F.scaled_dot_product_attention(
            q, block.keys, block.values, attn_mask=~masked[:, None], scale=scale
        )
    # One query per user: plain products, as SDPA's CPU kernel costs milliseconds on inputs this
    # small; batched over B * H, as broadcasting matmuls (and views of strided tensors, hence the
    # copy of q) guard on sizes of 1 in torch.export.
    batch, heads, queries, dim = q.shape
    q = q.clone(memory_format=torch.contiguous_format).view(batch * heads, queries, dim)
    scores = [torch.bmm(q, block.keys.reshape(batch * heads, -1, dim).mT) for block in blocks]
    scores = (scores[0] if len(scores) == 1 else torch.cat(scores, dim=-1)).view(batch, heads, queries, -1)
    probs = (scores * scale).masked_fill_(masked[:, None], float("-inf")).softmax(dim=-1)
    parts = probs.view(batch * heads, queries, -1).split([block.keys.shape[2] for block in blocks], dim=-1)
    o = torch.bmm(parts[0], blocks[0].values.reshape(batch * heads, -1, dim))
    for p, block in zip(parts[1:], blocks[1:]):
        o = o.baddbmm_(p, block.values.reshape(batch * heads, -1, dim))
    return o.view(batch, heads, queries, dim)


def _merge(cache: GrowingKVCache) -> GrowingKVCache:
    """The tail moved into the block."""
    block, tail = cache.block, cache.tail
    joined = KVCache(
        keys=torch.cat([block.keys, tail.keys], dim=2),
        values=torch.cat([block.values, tail.values], dim=2),
        timestamps=torch.cat([block.timestamps, tail.timestamps], dim=1),
    )
    empty = KVCache(tail.keys[:, :, :0], tail.values[:, :, :0], tail.timestamps[:, :0])
    return GrowingKVCache(block=joined, tail=empty)


def compact_stream_state(state: HyTRecStreamState, max_tail: int = 0) -> HyTRecStreamState:
    """Moves the tails of the full-causal caches longer than ``max_tail`` into their blocks.

    :func:`stream_step` does this by itself; a driver of an exported step program (which only
    appends, its shapes being symbolic) calls it between steps to keep the per-step copy short.

    Args:
        state: the state; not modified.
        max_tail: tails of at most this many events are left as they are.

    Returns:
        The state with the same events.
    """
    long_states = [
        _merge(s) if isinstance(s, GrowingKVCache) and s.tail.keys.shape[2] > max_tail else s
        for s in state.long_states
    ]
    return HyTRecStreamState(
        num_events=state.num_events,
        last_timestamps=state.last_timestamps,
        long_states=long_states,
        short_cache=state.short_cache,
        recent_long=state.recent_long,
        recent_timestamps=state.recent_timestamps,
    )


def _grow(cache: GrowingKVCache, k: torch.Tensor, v: torch.Tensor, times: torch.Tensor) -> GrowingKVCache:
    """``cache`` with one more event per user (``[B, H, D]`` key and value, ``[B, 1]`` time) in its tail."""
    tail = cache.tail
    tail = KVCache(
        keys=torch.cat([tail.keys, k[:, :, None]], dim=2),
        values=torch.cat([tail.values, v[:, :, None]], dim=2),
        timestamps=torch.cat([tail.timestamps, times], dim=1),
    )
    return GrowingKVCache(block=cache.block, tail=tail)


def _compacted(cache: GrowingKVCache) -> GrowingKVCache:
    """``cache`` with its tail moved into the block once it holds ``_TAIL_EVENTS`` (an exported
    step only appends: its driver compacts)."""
    if not torch.compiler.is_exporting() and cache.tail.keys.shape[2] >= _TAIL_EVENTS:
        return _merge(cache)
    return cache


def _softmax_step(
    layer: SoftmaxAttentionLayer,
    x: torch.Tensor,
    ctx: SequenceContext,
    num_events: torch.Tensor,
    cache: Union[KVCache, GrowingKVCache],
) -> Tuple[torch.Tensor, Union[KVCache, GrowingKVCache]]:
    """One event per user through a softmax layer; ``num_events`` counts the new one."""
    q, k, v = layer.project(x, ctx.positions)
    times = ctx.timestamps[:, None]
    if isinstance(cache, GrowingKVCache):
        cache = _grow(cache, k, v, times)
        blocks = [cache.block, cache.tail]
    else:
        # The oldest slot leaves: the capacity is the window.
        cache = KVCache(
            keys=torch.cat([cache.keys[:, :, 1:], k[:, :, None]], dim=2),
            values=torch.cat([cache.values[:, :, 1:], v[:, :, None]], dim=2),
            timestamps=torch.cat([cache.timestamps[:, 1:], times], dim=1),
        )
        blocks = [cache]
    masked = _padding(sum(block.keys.shape[2] for block in blocks), num_events)
    if layer.window_seconds is not None:
        # Same rule as causal_window_starts: t_j >= t_i - floor(seconds) for integer times.
        masked = masked | (cache.timestamps < times - int(layer.window_seconds))
    o = _attend(q[:, :, None], blocks, masked[:, None], layer.head_dim**-0.5)
    if isinstance(cache, GrowingKVCache):
        cache = _compacted(cache)
    return layer.finish(x, o[:, :, 0]), cache


def _hstu_step(
    layer: HSTULayer, x: torch.Tensor, ctx: SequenceContext, num_events: torch.Tensor, cache: GrowingKVCache
) -> Tuple[torch.Tensor, GrowingKVCache]:
    """One event per user through an HSTU-style layer; ``num_events`` counts the new one."""
    u, q, k, v = layer.project(x)
    cache = _grow(cache, k, v, ctx.timestamps[:, None])
    blocks = [cache.block, cache.tail]
    sizes = [block.keys.shape[2] for block in blocks]
    slots = sum(sizes)
    # Slots read as one right-aligned sequence: the last is the new event.
    distances = (slots - 1 - torch.arange(slots, device=x.device)).split(sizes)
    valid = (~_padding(slots, num_events)).split(sizes, dim=1)
    # Pointwise attention has no normaliser across keys: each block's share simply adds up.
    o = None
    for block, distance, block_valid in zip(blocks, distances, valid):
        index = hstu_bias_index(
            distance=distance[None, None],
            time_gap=(ctx.timestamps[:, None] - block.timestamps)[:, None],
            num_position_buckets=layer.position_bias.shape[0],
            num_time_buckets=layer.time_bias.shape[0],
            bucket_scale=layer.bucket_scale,
        )
        share = pointwise_attention(
            q=q[:, :, None],
            k=block.keys,
            v=block.values,
            bias_index=index,
            valid=block_valid[:, None],
            count=num_events[:, None].float(),
            position_bias=layer.position_bias,
            time_bias=layer.time_bias,
            scale=layer.head_dim**-0.5,
        )
        o = share if o is None else o + share
    assert o is not None
    return layer.finish(x, u, o[:, :, 0]), _compacted(cache)


def stream_step(
    encoder: "HyTRecEncoder", state: HyTRecStreamState, values: torch.Tensor, timestamps: torch.Tensor
) -> Tuple[torch.Tensor, HyTRecStreamState]:
    """Takes one new event per user; equals the full forward's output at that event.

    Args:
        encoder: the streamed encoder.
        state: the users' state (from :func:`init_stream`, :func:`prefill` or a previous step).
        values: ``[B, d]`` embeddings of the new events.
        timestamps: ``[B]`` int64 times of the new events, ``>=`` the previous ones.

    Returns:
        ``(out, new_state)``: ``[B, d]`` user states after the events, and the new state
        (``state`` itself is not modified).
    """
    gaps = torch.where(state.num_events > 0, timestamps - state.last_timestamps, 0)
    if not torch.compiler.is_compiling() and bool((gaps < 0).any()):
        user = int((gaps < 0).nonzero()[0])
        raise ValueError(
            f"stream_step: user {user}'s new event ({int(timestamps[user])}) is earlier than its "
            f"previous one ({int(state.last_timestamps[user])})"
        )
    batch = values.shape[0]
    num_events = state.num_events + 1
    ctx = SequenceContext(
        layout=JaggedLayout(torch.arange(batch + 1, device=values.device)),
        positions=state.num_events,
        timestamps=timestamps,
        gaps=gaps.float(),
    )
    x = encoder._embed(values, ctx)
    long = x
    long_states: List[Union[torch.Tensor, KVCache, GrowingKVCache]] = []
    for layer, layer_state in zip(encoder.long_layers, state.long_states):
        if isinstance(layer, TADNLayer):
            e, q, k, v, log_alpha, beta = layer.project(long, ctx)
            o, layer_state = tadn_step(
                state=layer_state, q=q, k=k, v=v, log_alpha=log_alpha, beta=beta, scale=layer.head_dim**-0.5
            )
            long = layer.finish(long, e, o, ctx.elapsed)
        elif isinstance(layer, HSTULayer):
            long, layer_state = _hstu_step(layer, long, ctx, num_events, layer_state)
        else:
            long, layer_state = _softmax_step(layer, long, ctx, num_events, layer_state)
        long_states.append(layer_state)
    short_cache = None
    recent_long, recent_timestamps = state.recent_long, state.recent_timestamps
    if encoder.short_layer is None:
        out = long
    else:
        assert state.short_cache is not None
        short, short_cache = _softmax_step(encoder.short_layer, x, ctx, num_events, state.short_cache)
        if encoder.fusion is None:
            out = short
        else:
            window = encoder.config.short_window
            window_size = num_events.clamp(max=window)
            if encoder.config.short_window_seconds is not None:
                in_window = ~_padding(window, num_events) & (
                    short_cache.timestamps >= (timestamps - int(encoder.config.short_window_seconds))[:, None]
                )
                window_size = in_window.sum(dim=1)
            # Slot j of `recent_*` holds the event num_events - 1 - window + j; the long summary is
            # the last event before the short window, num_events - 1 - window_size.
            source = window - window_size
            rows = torch.arange(batch, device=values.device)
            out = encoder._fuse(
                short,
                recent_long[rows, source],
                num_events > window_size,
                (timestamps - recent_timestamps[rows, source]).float(),
            )
            recent_long = torch.cat([recent_long[:, 1:], long[:, None]], dim=1)
            recent_timestamps = torch.cat([recent_timestamps[:, 1:], timestamps[:, None]], dim=1)
    new_state = HyTRecStreamState(
        num_events=num_events,
        last_timestamps=timestamps,
        long_states=long_states,
        short_cache=short_cache,
        recent_long=recent_long,
        recent_timestamps=recent_timestamps,
    )
    return encoder.final_norm(out), new_state


@dataclass
class _Suffix:
    """The last ``S`` events of every user of a jagged batch, right-aligned like the caches."""

    rows: torch.Tensor  # [B * S] rows of the batch; slots before a user's first event repeat a real row
    positions: torch.Tensor  # [B, S] position of each slot's event inside its user (0 for padding)
    valid: torch.Tensor  # [B, S] the slot holds one of the user's events


def _suffix(ctx: SequenceContext, size: int) -> _Suffix:
    layout = ctx.layout
    position = layout.lengths[:, None] - size + torch.arange(size, device=layout.offsets.device)
    rows = (layout.offsets[:-1, None] + position.clamp(min=0)).clamp(max=layout.num_events - 1)
    return _Suffix(rows=rows.flatten(), positions=position.clamp(min=0), valid=position >= 0)


def _input_suffix(layer: Union[TADNLayer, AttentionLayer], size: Optional[int]) -> Optional[int]:
    """Events at the end of each user that ``layer`` reads of its input to give its outputs at the
    last ``size`` events (``None``: every event) and its stream state."""
    if size is None or not _windowed(layer):
        return None
    return max(size + layer.window - 1, layer.window)


def _heads(x: torch.Tensor, batch: int) -> torch.Tensor:
    """``[B * S, H, D]`` -> ``[B, H, S, D]``."""
    return x.unflatten(0, (batch, -1)).transpose(1, 2)


def _cache_of(
    keys: torch.Tensor, values: torch.Tensor, timestamps: torch.Tensor, at: _Suffix, slots: int
) -> KVCache:
    """The last ``slots`` slots of ``[B, H, S, D]`` keys and values (and ``[B, S]`` times) held at
    ``at``, zero outside the users' events, as a cache."""
    valid = at.valid[:, at.valid.shape[1] - slots :]

    def last(x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, x.shape[2] - slots :]
        return torch.where(valid[:, None, :, None], x, 0).contiguous()

    times = torch.where(valid, timestamps.view(at.valid.shape)[:, at.valid.shape[1] - slots :], 0)
    return KVCache(keys=last(keys), values=last(values), timestamps=times)


def _prefill_softmax(
    layer: SoftmaxAttentionLayer,
    h: torch.Tensor,
    held: Optional[_Suffix],
    out: Optional[_Suffix],
    ctx: SequenceContext,
) -> Tuple[torch.Tensor, Union[KVCache, GrowingKVCache]]:
    """A softmax layer's outputs at ``out`` (every row if ``None``) and its stream cache, from its
    inputs ``h`` at ``held`` (every row if ``None``)."""
    batch = ctx.layout.num_users
    slots = layer.window if layer.window is not None else ctx.layout.max_len
    if out is None:
        assert held is None, "outputs at every row read inputs at every row"
        at = _suffix(ctx, slots)
        if layer.window is None:
            # The cache holds every event: projected once each, then laid out per user (the padded
            # layout has B * max(n) slots).
            _, k, v = (t[at.rows] for t in layer.project(h, ctx.positions))
        else:
            _, k, v = layer.project(h[at.rows], at.positions.flatten())
        cache = _cache_of(_heads(k, batch), _heads(v, batch), ctx.timestamps[at.rows], at, slots)
        return layer(h, ctx), _layer_cache(layer, cache, h.device)
    queries = out.positions.shape[1]
    if layer.window is None:
        assert held is None, "a full-causal layer reads every row"
        # Projected once per event, then laid out per user: B * max(n) slots (more if fewer than
        # the queries).
        at = _suffix(ctx, max(slots, queries))
        q, k, v = (t[at.rows] for t in layer.project(h, ctx.positions))
        inputs = h[out.rows]
    else:
        if held is None:
            held = _suffix(ctx, _input_suffix(layer, queries))
            h = h[held.rows]
        at = held
        q, k, v = layer.project(h, at.positions.flatten())
        inputs = h.unflatten(0, (batch, -1))[:, at.valid.shape[1] - queries :].flatten(0, 1)
    keys, values, times = _heads(k, batch), _heads(v, batch), ctx.timestamps[at.rows]
    cache = _layer_cache(layer, _cache_of(keys, values, times, at, slots), h.device)
    if queries == 0:  # only the cache is read
        return inputs, cache
    first = at.valid.shape[1] - queries  # slot of the first query
    query_positions, key_positions = at.positions[:, first:, None], at.positions[:, None, :]
    masked = ~at.valid[:, None, :] | (key_positions > query_positions)
    if layer.window is not None:
        masked |= key_positions <= query_positions - layer.window
    # Slots before a user's first event query nothing real; letting them see every slot keeps
    # their (dropped) rows free of the NaN of an empty softmax.
    masked &= at.valid[:, first:, None]
    buffer = KVCache(keys, values, times.view(at.valid.shape))
    o = _attend(_heads(q, batch)[:, :, first:], [buffer], masked, layer.head_dim**-0.5)
    return layer.finish(inputs, o.transpose(1, 2).flatten(0, 1)), cache


def _prefill_hstu(
    layer: HSTULayer, h: torch.Tensor, out: Optional[_Suffix], ctx: SequenceContext
) -> Tuple[torch.Tensor, GrowingKVCache]:
    """An HSTU-style layer's outputs at ``out`` (every row if ``None``) and its stream cache, from
    its inputs ``h`` at every row."""
    batch, slots = ctx.layout.num_users, ctx.layout.max_len
    projected = layer.project(h)
    u, q, k, v = projected
    queries = 0 if out is None else out.positions.shape[1]
    # Projected once per event, then laid out per user: B * max(n) slots (more if fewer than the
    # queries), which the queries read as one padded batch.
    at = _suffix(ctx, max(slots, queries))
    keys, values, times = _heads(k[at.rows], batch), _heads(v[at.rows], batch), ctx.timestamps[at.rows]
    cache = _layer_cache(layer, _cache_of(keys, values, times, at, slots), h.device)
    assert isinstance(cache, GrowingKVCache)
    if out is None:
        return layer.attend(h, projected, ctx), cache
    first = at.valid.shape[1] - queries  # slot of the first query
    query_positions, key_positions = at.positions[:, first:, None], at.positions[:, None, :]
    times = times.view(at.valid.shape)
    index = hstu_bias_index(
        distance=query_positions - key_positions,
        time_gap=times[:, first:, None] - times[:, None, :],
        num_position_buckets=layer.position_bias.shape[0],
        num_time_buckets=layer.time_bias.shape[0],
        bucket_scale=layer.bucket_scale,
    )
    o = pointwise_attention(
        q=_heads(q[at.rows], batch)[:, :, first:],
        k=keys,
        v=values,
        bias_index=index,
        valid=at.valid[:, None, :] & (key_positions <= query_positions),
        count=query_positions[..., 0].float() + 1,
        position_bias=layer.position_bias,
        time_bias=layer.time_bias,
        scale=layer.head_dim**-0.5,
    )
    return layer.finish(h[out.rows], u[out.rows], o.transpose(1, 2).flatten(0, 1)), cache


def prefill(
    encoder: "HyTRecEncoder", values: torch.Tensor, offsets: torch.Tensor, timestamps: torch.Tensor
) -> HyTRecStreamState:
    """The stream state of every user of a jagged batch after its history, in one batched pass.

    Equals :func:`init_stream` followed by one :func:`stream_step` per event (up to rounding),
    for users of any lengths together (zero included).

    Args:
        encoder: the streamed encoder.
        values: ``[sum(n), d]`` event embeddings.
        offsets: ``[B + 1]`` int64 start of every user's events.
        timestamps: ``[sum(n)]`` int64 event times in seconds, non-decreasing per user.

    Returns:
        The users' :class:`HyTRecStreamState`; full-causal caches hold ``max(n)`` slots.
    """
    ctx = checked_context(values, offsets, timestamps, None)
    batch = ctx.layout.num_users
    if ctx.layout.num_events == 0:
        return init_stream(encoder, batch, values.device)
    config = encoder.config
    x = encoder._embed(values, ctx)
    layers = list(encoder.long_layers)
    # Events at the end of each user whose outputs each layer must give (None: every event).
    sizes: List[Optional[int]] = [None] * len(layers)
    if layers:
        sizes[-1] = config.short_window if encoder.fusion is not None else 0
        for i in range(len(layers) - 1, 0, -1):
            sizes[i - 1] = _input_suffix(layers[i], sizes[i])
    h, held = x, None
    long_states: List[Union[torch.Tensor, KVCache, GrowingKVCache]] = []
    for layer, size in zip(layers, sizes):
        out = None if size is None else _suffix(ctx, size)
        if isinstance(layer, TADNLayer):
            h, layer_state = layer.forward_with_state(h, ctx, rows=None if out is None else out.rows)
        elif isinstance(layer, HSTULayer):
            h, layer_state = _prefill_hstu(layer, h, out, ctx)
        else:
            h, layer_state = _prefill_softmax(layer, h, held, out, ctx)
        held = out
        long_states.append(layer_state)
    short_cache = None
    if encoder.short_layer is not None:
        at = _suffix(ctx, config.short_window)
        _, k, v = encoder.short_layer.project(x[at.rows], at.positions.flatten())
        short_cache = _cache_of(
            _heads(k, batch), _heads(v, batch), timestamps[at.rows], at, config.short_window
        )
    recent_long = x.new_zeros(batch, 0, config.embedding_dim)
    recent_timestamps = timestamps.new_zeros(batch, 0)
    if encoder.fusion is not None:
        assert held is not None
        recent_long = torch.where(held.valid[..., None], h.view(batch, -1, config.embedding_dim), 0)
        recent_timestamps = torch.where(held.valid, timestamps[held.rows].view(batch, -1), 0)
    lengths = ctx.layout.lengths
    last = timestamps[(offsets[1:] - 1).clamp(min=0)]
    return HyTRecStreamState(
        num_events=lengths,
        last_timestamps=torch.where(lengths > 0, last, 0),
        long_states=long_states,
        short_cache=short_cache,
        recent_long=recent_long,
        recent_timestamps=recent_timestamps,
    )
