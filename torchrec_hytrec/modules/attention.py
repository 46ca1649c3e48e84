"""The causal softmax-attention layer on jagged sequences, with its streaming KV cache."""

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn as nn
from torch.profiler import record_function

from torchrec_hytrec.modules.blocks import RotaryEmbedding, SequenceContext, SwiGLU
from torchrec_hytrec.modules.config import HyTRecConfig
from torchrec_hytrec.ops.jagged_attention import (
    attention_key_rows,
    causal_attention_at,
    jagged_causal_attention,
)


@dataclass
class KVCache:
    """Keys and values of the events a streamed softmax layer can still attend to.

    Args:
        keys: ``[B, L, H, D]`` rotated keys, oldest first.
        values: ``[B, L, H, D]`` values.
        timestamps: ``[B, L]`` int64 event times (for windows measured in seconds).

    Example::

        cache = layer.init_cache(batch_size=8, device=torch.device("cpu"))
    """

    keys: torch.Tensor
    values: torch.Tensor
    timestamps: torch.Tensor


class SoftmaxAttentionLayer(nn.Module):
    """Pre-norm causal multi-head softmax attention block, then a SwiGLU FFN.

    Positions enter as rotary embeddings of the event index inside the user's sequence, a
    relative encoding: unlike HSTU's positions counted from the end of the sequence, event
    ``i``'s output never depends on how many events follow it, which the per-position
    training form and exact streaming both need. Time enters through the gap-bucket
    embeddings added to the encoder's input.

    Args:
        config: encoder configuration (width, heads, dropout, kernel block size).
        window: ``None`` for full causal attention, ``W`` to attend to the last ``W`` events
            (the current one included).
        window_seconds: additionally restrict the window to events at most this many seconds
            before the current one. Needs ``window``.

    Example::

        layer = SoftmaxAttentionLayer(HyTRecConfig(embedding_dim=32), window=64)
        y = layer(x, SequenceContext.from_jagged(offsets, timestamps))
    """

    def __init__(
        self, config: HyTRecConfig, window: Optional[int] = None, window_seconds: Optional[float] = None
    ) -> None:
        super().__init__()
        if window_seconds is not None and window is None:
            raise ValueError("window_seconds needs an event window (window=...)")
        d = config.embedding_dim
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.window = window
        self.window_seconds = window_seconds
        self.block_size = config.attention_block_size
        self.norm = nn.RMSNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.rope = RotaryEmbedding(config.head_dim, config.rope_base)
        self.out = nn.Linear(d, d, bias=False)
        self.dropout = nn.Dropout(config.dropout)
        self.ffn = SwiGLU(d, round(config.ffn_multiplier * d), config.dropout)

    def _project(
        self, x: torch.Tensor, positions: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # split, not slices: its backward is one concatenation instead of zero-filled copies.
        qk, v = self.qkv(self.norm(x)).unflatten(-1, (3, self.num_heads, self.head_dim)).split([2, 1], dim=1)
        q, k = self.rope(qk, positions).unbind(1)
        return q, k, v.squeeze(1)

    def _finish(self, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        return self.ffn(x + self.dropout(self.out(o.flatten(-2))))

    def _window_starts(self, ctx: SequenceContext) -> Optional[torch.Tensor]:
        if self.window_seconds is None:
            return None
        return ctx.window_starts(self.window, self.window_seconds)

    def input_rows(self, ctx: SequenceContext, rows: torch.Tensor) -> Optional[torch.Tensor]:
        """The rows of its input the layer reads to produce its outputs at ``rows``.

        Args:
            ctx: the batch's per-event facts.
            rows: ``[R]`` int64 rows of the outputs wanted.

        Returns:
            ``[R']`` sorted rows (every event in the windows of ``rows``) for a windowed layer;
            ``None`` (every row) for full causal attention.
        """
        if self.window is None:
            return None
        starts = self._window_starts(ctx)
        return attention_key_rows(
            offsets=ctx.offsets,
            rows=rows,
            window=self.window,
            window_starts=starts[rows] if starts is not None else None,
        )

    def forward(
        self,
        x: torch.Tensor,
        ctx: SequenceContext,
        rows: Optional[torch.Tensor] = None,
        input_rows: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Runs the layer over a jagged batch.

        Args:
            x: ``[T, d]`` inputs, or ``[R', d]`` inputs at ``input_rows`` only.
            ctx: the batch's per-event facts.
            rows: optional ``[R]`` rows to compute the output at (e.g. each user's last event);
                all rows if ``None``.
            input_rows: the sorted rows ``x`` holds when it is not the whole batch (at least
                :meth:`input_rows` of ``rows``); needs ``rows``.

        Returns:
            ``[T, d]`` outputs, or ``[R, d]`` with ``rows``.
        """
        if input_rows is not None and rows is None:
            raise ValueError("input_rows needs rows: outputs at every row read every input row")
        q, k, v = self._project(x, ctx.positions if input_rows is None else ctx.positions[input_rows])
        starts = self._window_starts(ctx)
        with record_function("## hytrec_softmax_attention ##"):
            if rows is None:
                o = jagged_causal_attention(
                    q=q,
                    k=k,
                    v=v,
                    offsets=ctx.offsets,
                    window=self.window,
                    window_starts=starts,
                    block_size=self.block_size,
                    layout=ctx.layout,
                )
            else:
                local = rows if input_rows is None else torch.searchsorted(input_rows, rows)
                o = causal_attention_at(
                    q=q[local],
                    k=k,
                    v=v,
                    offsets=ctx.offsets,
                    rows=rows,
                    window=self.window,
                    window_starts=starts[rows] if starts is not None else None,
                    key_rows=input_rows,
                )
                x = x[local]
        return self._finish(x, o)

    def init_cache(self, batch_size: int, device: torch.device) -> KVCache:
        """Empty cache of ``batch_size`` streamed users."""
        empty = torch.zeros(batch_size, 0, self.num_heads, self.head_dim, device=device)
        return KVCache(
            keys=empty, values=empty, timestamps=torch.zeros(batch_size, 0, dtype=torch.long, device=device)
        )

    def step(self, x: torch.Tensor, ctx: SequenceContext, cache: KVCache) -> Tuple[torch.Tensor, KVCache]:
        """Advances every streamed user by one event.

        The cache keeps at most ``window`` events, so a windowed layer's step costs
        ``O(W d)`` whatever the history length.

        Args:
            x: ``[B, d]`` inputs of the new events.
            ctx: facts of the new events (one per user).
            cache: the users' cache before the events.

        Returns:
            ``(y, new_cache)``: ``[B, d]`` outputs and the cache including the new events.
        """
        q, k, v = self._project(x, ctx.positions)
        keep = slice(-self.window, None) if self.window is not None else slice(None)
        cache = KVCache(
            keys=torch.cat([cache.keys, k[:, None]], dim=1)[:, keep],
            values=torch.cat([cache.values, v[:, None]], dim=1)[:, keep],
            timestamps=torch.cat([cache.timestamps, ctx.timestamps[:, None]], dim=1)[:, keep],
        )
        # One query per user: plain products, as SDPA's CPU kernel costs milliseconds on inputs this small.
        scores = torch.einsum("bhd,blhd->bhl", q, cache.keys) * self.head_dim**-0.5
        if self.window_seconds is not None:
            # Same rule as causal_window_starts: t_j >= t_i - floor(seconds) for integer times.
            outside = cache.timestamps < (ctx.timestamps - int(self.window_seconds))[:, None]
            scores = scores.masked_fill(outside[:, None, :], float("-inf"))
        o = torch.einsum("bhl,blhd->bhd", scores.softmax(dim=-1), cache.values)
        return self._finish(x, o), cache
