"""The causal softmax-attention layer on jagged sequences."""

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


class SoftmaxAttentionLayer(nn.Module):
    """Pre-norm causal multi-head softmax attention block, then a SwiGLU FFN.

    Positions enter as rotary embeddings of the event index inside the user's sequence, a
    relative encoding: unlike HSTU's positions counted from the end of the sequence, event
    ``i``'s output never depends on how many events follow it, which the per-position
    training form and exact streaming both need. Time enters through the gap-bucket
    embeddings added to the encoder's input.

    Streaming (:mod:`torchrec_hytrec.modules.streaming`) keeps the keys and values of the events
    a layer can still attend to and runs one event at a time through :meth:`project` and
    :meth:`finish`.

    Args:
        config: encoder configuration (width, heads, dropout, kernel block size).
        window: ``None`` for full causal attention, ``W`` to attend to the last ``W`` events
            (the current one included).
        window_seconds: additionally restrict the window to events at most this many seconds
            before the current one. Needs ``window``.

    Example::

        >>> import torch
        >>> layer = SoftmaxAttentionLayer(HyTRecConfig(embedding_dim=32), window=64)
        >>> ctx = SequenceContext.from_jagged(torch.tensor([0, 3, 7]), torch.arange(7) * 600)
        >>> layer(torch.randn(7, 32), ctx).shape
        torch.Size([7, 32])
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

    def project(
        self, x: torch.Tensor, positions: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[T, H, D]`` rotated queries and keys, and values, of inputs ``x`` ``[T, d]`` at
        ``positions`` ``[T]``."""
        # split, not slices: its backward is one concatenation instead of zero-filled copies.
        qk, v = self.qkv(self.norm(x)).unflatten(-1, (3, self.num_heads, self.head_dim)).split([2, 1], dim=1)
        q, k = self.rope(qk, positions).unbind(1)
        return q, k, v.squeeze(1)

    def finish(self, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """The block's output from its input ``x`` ``[T, d]`` and attention output ``o`` ``[T, H, D]``."""
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
        q, k, v = self.project(x, ctx.positions if input_rows is None else ctx.positions[input_rows])
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
        return self.finish(x, o)
