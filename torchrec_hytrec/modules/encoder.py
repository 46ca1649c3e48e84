"""HyTRecEncoder: short-term softmax window + hybrid long-term stack, fused per position."""

from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from torch.profiler import record_function

from torchrec_hytrec.modules import streaming
from torchrec_hytrec.modules.attention import SoftmaxAttentionLayer
from torchrec_hytrec.modules.blocks import SequenceContext, checked_context, gap_buckets
from torchrec_hytrec.modules.config import HSTU, TADN, HyTRecConfig
from torchrec_hytrec.modules.hstu import HSTULayer
from torchrec_hytrec.modules.streaming import HyTRecStreamState
from torchrec_hytrec.modules.tadn import TADNLayer

# A softmax layer whose outputs are wanted at more than 1 / _DENSE_ROWS of the batch's rows computes
# every row: gathering windows row by row, forward_last of an all-windowed stack (W = 256, 8 users
# of up to 4k events) took 3x as long (737 ms against 245 ms).
_DENSE_ROWS = 4


class LongShortFusion(nn.Module):
    """Per-channel gate between the short-term output and the long-term summary.

    ``h_i = gamma * s_i + (1 - gamma) * l``, ``gamma = sigmoid(W [s_i; l; phi(t_i - t_l)])``,
    where ``t_l`` is the time of the event the long summary was read at; ``phi`` has one extra
    bucket for positions with no long history (``l`` is then a learned "empty" vector).

    Args:
        dim: width of ``s`` and ``l``.
        num_gap_buckets: buckets of ``phi``, plus the "no long history" bucket.
        gap_dim: width of ``phi``.

    Example::

        >>> import torch
        >>> fusion = LongShortFusion(64, num_gap_buckets=40, gap_dim=16)
        >>> fusion(torch.randn(5, 64), torch.randn(5, 64), torch.tensor([0, 3, 39, 40, 7])).shape
        torch.Size([5, 64])
    """

    def __init__(self, dim: int, num_gap_buckets: int, gap_dim: int) -> None:
        super().__init__()
        self.gap_embedding = nn.Embedding(num_gap_buckets + 1, gap_dim)
        self.gate = nn.Linear(2 * dim + gap_dim, dim)

    def forward(self, short: torch.Tensor, long: torch.Tensor, buckets: torch.Tensor) -> torch.Tensor:
        """Fuses ``short`` ``[N, d]`` with ``long`` ``[N, d]``; ``buckets`` ``[N]`` int64."""
        gamma = torch.sigmoid(self.gate(torch.cat([short, long, self.gap_embedding(buckets)], dim=-1)))
        return gamma * short + (1 - gamma) * long


class HyTRecEncoder(nn.Module):
    """HyTRec user-history encoder on jagged TorchRec-style input.

    Training form (every position is a target): for event ``i`` of a user,

    * short branch: one causal softmax block over the window ``(i - K, i]`` (optionally only
      the events of the last ``short_window_seconds``). A single block on purpose: a stack
      of windowed layers would widen the receptive field past ``K`` and blur the paper's
      split between the last ``K`` events and the rest;
    * long branch: the hybrid stack (``long_pattern``) causal over the whole sequence; the
      long summary of ``i`` is the stack's output at the last event before ``i``'s short
      window (``i - K``), a learned "empty" vector when there is none. It depends only on
      events before the short window;
    * fusion gate (:class:`LongShortFusion`), then a final RMSNorm.

    At the last position this is exactly the paper's split (short = MHSA over the last ``K``
    events, long = the hybrid stack over the first ``n - K``). Positions are the relative
    rotary positions of the softmax layers plus gap-bucket embeddings ``phi(Delta)`` added to
    the input (see :class:`SoftmaxAttentionLayer` for why not HSTU's end-relative positions);
    the HSTU-style layers of the ``hstu_like`` baseline (:class:`HSTULayer`) read relative
    position and time-gap biases instead of rotations.

    Serving: :meth:`forward_last` optionally reads at a request time ``t*``: every TADN
    readout is multiplied per head by ``exp(-(t* - t_last) / T_h)`` (``t_last`` = the user's
    latest event), so stale long-term memory fades while softmax layers are unchanged;
    ``t* = t_last`` is exactly the training form. It computes each layer only where the result
    reads it: the last long layer at the long-summary rows, a windowed softmax layer's input
    (and the short branch's) only inside its windows.

    Streaming (:mod:`~torchrec_hytrec.modules.streaming`): :meth:`prefill` builds the per-user
    state of a jagged batch of histories in one pass (about the cost of :meth:`forward_last`),
    :meth:`init_stream` that of users with no events, and :meth:`stream_step` takes one new event
    per user at ``O(d^2 + softmax window)`` cost (full-causal softmax and HSTU-style layers read
    their whole KV cache), with outputs equal to the full forward.

    Host synchronisations: each call builds one :class:`SequenceContext`, which copies the
    offsets to the host once; every layer reads its plans (TADN chunks, softmax length groups
    and block layouts, window starts) from it, so the device is read back a fixed number of
    times per call, whatever the depth (``tests/test_host_syncs.py`` counts them).

    Export: :meth:`forward`, :meth:`forward_last` and :meth:`stream_step` export with
    ``torch.export`` into programs that serve any batch size and history lengths; the jagged
    kernels are then traced as custom ops that plan inside
    (:mod:`~torchrec_hytrec.ops.jagged_attention`). :mod:`~torchrec_hytrec.modules.export`
    builds the programs and their dynamic shapes. An exported program does not check its inputs
    (users without events, timestamps out of order): check them before serving.

    Args:
        config: the encoder's :class:`HyTRecConfig`.

    Example::

        >>> import torch
        >>> encoder = HyTRecEncoder(HyTRecConfig.hytrec(embedding_dim=16, short_window=4)).eval()
        >>> offsets = torch.tensor([0, 3, 10])
        >>> values, timestamps = torch.randn(10, 16), torch.arange(10) * 3600
        >>> with torch.no_grad():
        ...     states = encoder(values, offsets, timestamps)  # every position
        ...     request_time = timestamps[offsets[1:] - 1] + 60
        ...     users = encoder.forward_last(values, offsets, timestamps, request_time=request_time)
        >>> states.shape, users.shape
        (torch.Size([10, 16]), torch.Size([2, 16]))
    """

    def __init__(self, config: HyTRecConfig) -> None:
        super().__init__()
        self.config = config
        d = config.embedding_dim
        self.gap_embedding = nn.Embedding(config.num_gap_buckets, d)
        # Added to item rows of norm ~1: nn.Embedding's unit-variance rows (norm sqrt(d)) would
        # drown item identity at the input, so time starts silent and training scales it up.
        nn.init.zeros_(self.gap_embedding.weight)
        self.input_dropout = nn.Dropout(config.dropout)
        self.long_layers = nn.ModuleList(self._long_layer(kind) for kind in config.long_pattern)
        self.short_layer: Optional[SoftmaxAttentionLayer] = None
        self.fusion: Optional[LongShortFusion] = None
        if config.use_short_branch:
            self.short_layer = SoftmaxAttentionLayer(
                config, window=config.short_window, window_seconds=config.short_window_seconds
            )
            if config.long_pattern:
                self.fusion = LongShortFusion(d, config.num_gap_buckets, config.gate_gap_dim)
                self.empty_long = nn.Parameter(torch.randn(d) * d**-0.5)
        self.final_norm = nn.RMSNorm(d)

    def _long_layer(self, kind: str) -> nn.Module:
        """The long-branch layer of a ``long_pattern`` letter."""
        if kind == TADN:
            return TADNLayer(self.config)
        if kind == HSTU:
            return HSTULayer(self.config)
        return SoftmaxAttentionLayer(self.config, window=self.config.long_attention_window)

    def _buckets(self, gaps: torch.Tensor) -> torch.Tensor:
        return gap_buckets(gaps, self.config.num_gap_buckets, self.config.gap_bucket_scale)

    def _embed(self, values: torch.Tensor, ctx: SequenceContext) -> torch.Tensor:
        buckets = ctx.gap_buckets(self.config.num_gap_buckets, self.config.gap_bucket_scale)
        return self.input_dropout(values + self.gap_embedding(buckets))

    def _fuse(
        self, short: torch.Tensor, long: torch.Tensor, has_long: torch.Tensor, gaps: torch.Tensor
    ) -> torch.Tensor:
        """``long`` holds each row's long summary; rows without ``has_long`` get the empty one."""
        assert self.fusion is not None
        long = torch.where(has_long[:, None], long, self.empty_long.to(long.dtype))
        buckets = torch.where(has_long, self._buckets(gaps), self.config.num_gap_buckets)
        return self.fusion(short, long, buckets)

    def _encode(
        self, values: torch.Tensor, ctx: SequenceContext, rows: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Outputs at ``rows`` (all rows if ``None``). With ``rows``, the last long layer and the
        short branch only compute the events the outputs read, which is what serving needs."""
        x = self._embed(values, ctx)
        out_rows = rows if rows is not None else torch.arange(x.shape[0], device=x.device)
        long_rows = out_rows
        if self.fusion is not None:
            starts = ctx.window_starts(self.config.short_window, self.config.short_window_seconds)[out_rows]
            has_long = starts > 0
            # Row of the last event before each short window.
            long_rows = torch.where(has_long, out_rows - ctx.positions[out_rows] + starts - 1, out_rows)
        with record_function("## hytrec_long_branch ##"):
            prefixes = self._long_prefixes(ctx) if rows is None else None
            if prefixes is not None:
                # Training form: the long stack runs on the events some output's summary reads.
                sub, sub_rows = prefixes
                long = self._long_branch(x[sub_rows], sub, None)
                # Summary row in the prefix batch; the appended zero row stands for "none".
                read = sub.offsets[:-1][ctx.layout.users] + starts - 1
                read = torch.where(has_long, read, sub_rows.shape[0])
                long = torch.cat([long, long.new_zeros(1, long.shape[1])])[read]
            elif self._reads_no_long_summary(ctx):
                # Every event's short window reaches back to its user's first event, so no output
                # reads the long stack. It runs on no events all the same: every parameter then
                # still takes part in the backward, as DDP's static graph expects at every step.
                nothing = SequenceContext.from_jagged(
                    ctx.offsets.new_zeros(ctx.offsets.shape), ctx.timestamps[:0]
                )
                long = (
                    x.new_zeros(out_rows.shape[0], x.shape[1]) + self._long_branch(x[:0], nothing, None).sum()
                )
            else:
                long = self._long_branch(x, ctx, long_rows if rows is not None else None)
                if rows is None:
                    long = long[long_rows]
        if self.short_layer is None:
            return self.final_norm(long)
        with record_function("## hytrec_short_branch ##"):
            if rows is None:
                short = self.short_layer(x, ctx)
            else:
                inputs = self.short_layer.input_rows(ctx, rows)
                short = self.short_layer(x[inputs], ctx, rows=rows, input_rows=inputs)
        if self.fusion is None:
            return self.final_norm(short)
        gaps = (ctx.timestamps[out_rows] - ctx.timestamps[long_rows]).float()
        return self.final_norm(self._fuse(short, long, has_long, gaps))

    def _long_prefixes(self, ctx: SequenceContext) -> Optional[Tuple[SequenceContext, torch.Tensor]]:
        """The events the training form's long summaries read: each user's first ``n - K``
        (the summary of event ``i`` is the stack's output at ``i - K``, and the stack is causal),
        as :meth:`SequenceContext.prefixes`; ``None`` where the windows are not known on the host
        (time-bounded short windows, compiling) and the stack runs on every event.

        On short histories most events are within ``K`` of their user's end (Beauty: about 60% at
        ``K = 8``), so the stack runs on a fraction of the batch."""
        timed_window = self.config.short_window_seconds is not None
        if self.fusion is None or timed_window or torch.compiler.is_compiling():
            return None
        return ctx.prefixes((ctx.layout.host_lengths - self.config.short_window).clamp(min=0))

    def _reads_no_long_summary(self, ctx: SequenceContext) -> bool:
        """Whether no event of the batch has history before its short window (batches of short
        users, e.g. Beauty's), decided from the layout's host copy; never while compiling."""
        return (
            self.fusion is not None
            and self.config.short_window_seconds is None
            and not torch.compiler.is_compiling()
            and ctx.layout.max_len <= self.config.short_window
        )

    def _long_branch(
        self, x: torch.Tensor, ctx: SequenceContext, rows: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """The long stack's outputs at ``rows`` (every row if ``None``).

        With ``rows``, each layer is computed only where the layers after it read it: a windowed
        softmax layer reads its input only inside the windows of its outputs, so the layer
        before it (and any windowed run before that) skips its output path on the other rows.
        A softmax layer computes its rows by gathering a window per row; once those rows are more
        than ``1 / _DENSE_ROWS`` of the batch it computes every row instead (and so do the layers
        before it), its full kernel then costing less (in eager code; an exported program, whose
        row counts are symbolic, always gathers).
        """
        layers = list(self.long_layers)
        out_rows: List[Optional[torch.Tensor]] = [None] * len(layers)
        if rows is not None and layers:
            out_rows[-1] = rows
            for i in range(len(layers) - 1, 0, -1):
                wanted = layers[i].input_rows(ctx, out_rows[i])
                if wanted is None or self._cheaper_at_every_row(layers[i - 1], wanted, x):
                    break
                out_rows[i - 1] = wanted
        held: Optional[torch.Tensor] = None  # the rows x holds, None for all
        for layer, wanted in zip(layers, out_rows):
            if held is None:
                x = layer(x, ctx, rows=wanted)
            else:
                x = layer(x, ctx, rows=wanted, input_rows=held)
            held = wanted
        return x

    @staticmethod
    def _cheaper_at_every_row(layer: nn.Module, rows: torch.Tensor, x: torch.Tensor) -> bool:
        """Whether ``layer`` costs less computed at every row of ``x`` than at ``rows`` (a TADN
        layer never does: its recurrence reads every row either way)."""
        if isinstance(layer, TADNLayer) or torch.compiler.is_compiling():
            return False
        return rows.numel() * _DENSE_ROWS > x.shape[0]

    def forward(
        self,
        values: torch.Tensor,
        offsets: torch.Tensor,
        timestamps: torch.Tensor,
        max_len: Optional[int] = None,
    ) -> torch.Tensor:
        """Per-position user states of a jagged batch.

        Args:
            values: ``[sum(n), d]`` event embeddings (item plus side features).
            offsets: ``[B + 1]`` int64 start of every user's events.
            timestamps: ``[sum(n)]`` int64 event times in seconds, non-decreasing per user.
            max_len: optional bound on every user's length (HSTU's ``max_seq_len``), checked.

        Returns:
            ``[sum(n), d]``: row ``j`` depends only on its user's events up to ``j``.
        """
        return self._encode(values, checked_context(values, offsets, timestamps, max_len))

    def forward_last(
        self,
        values: torch.Tensor,
        offsets: torch.Tensor,
        timestamps: torch.Tensor,
        request_time: Optional[torch.Tensor] = None,
        max_len: Optional[int] = None,
    ) -> torch.Tensor:
        """State of every user after its latest event, optionally read at a request time.

        Args:
            values: ``[sum(n), d]`` event embeddings.
            offsets: ``[B + 1]`` int64 start of every user's events; every user needs one.
            timestamps: ``[sum(n)]`` int64 event times in seconds.
            request_time: optional ``[B]`` int64 time of the request, ``>=`` each user's last
                event; TADN readouts decay by ``exp(-(t* - t_last) / T_h)``.
            max_len: optional bound on every user's length (HSTU's ``max_seq_len``), checked.

        Returns:
            ``[B, d]`` user states.
        """
        ctx = checked_context(values, offsets, timestamps, max_len)
        if not torch.compiler.is_compiling():
            empty = (ctx.layout.host_lengths == 0).nonzero()
            if empty.numel():
                raise ValueError(f"forward_last: user {int(empty[0])} of the batch has no events")
        last = offsets[1:] - 1
        if request_time is not None:
            elapsed = request_time - timestamps[last]
            if not torch.compiler.is_compiling() and bool((elapsed < 0).any()):
                user = int((elapsed < 0).nonzero()[0])
                raise ValueError(
                    f"forward_last: request_time of user {user} ({int(request_time[user])}) is before "
                    f"its last event ({int(timestamps[last[user]])})"
                )
            per_event = torch.repeat_interleave(elapsed, ctx.layout.lengths, output_size=values.shape[0])
            ctx.elapsed = per_event.float()
        return self._encode(values, ctx, rows=last)

    def init_stream(self, batch_size: int, device: Optional[torch.device] = None) -> HyTRecStreamState:
        """Empty streaming state of ``batch_size`` users with no events yet
        (:func:`~torchrec_hytrec.modules.streaming.init_stream`)."""
        return streaming.init_stream(self, batch_size, device)

    def prefill(
        self, values: torch.Tensor, offsets: torch.Tensor, timestamps: torch.Tensor
    ) -> HyTRecStreamState:
        """Streaming state of every user of a jagged batch after its history, in one batched pass
        (:func:`~torchrec_hytrec.modules.streaming.prefill`)."""
        return streaming.prefill(self, values, offsets, timestamps)

    def stream_step(
        self, state: HyTRecStreamState, values: torch.Tensor, timestamps: torch.Tensor
    ) -> Tuple[torch.Tensor, HyTRecStreamState]:
        """Takes one new event per user, ``values`` ``[B, d]`` at ``timestamps`` ``[B]``; returns the
        ``[B, d]`` outputs (equal to the full forward's at those events) and the new state
        (:func:`~torchrec_hytrec.modules.streaming.stream_step`)."""
        return streaming.stream_step(self, state, values, timestamps)
