"""Building blocks shared by the HyTRec layers."""

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from torchrec_hytrec.ops.buckets import gap_buckets
from torchrec_hytrec.ops.jagged_attention import JaggedLayout, causal_window_starts


@dataclass
class SequenceContext:
    """Everything the layers of one forward pass read about the batch, computed once.

    Built once per batch from HSTU's jagged ``(offsets, max_len)`` and the timestamps
    (:meth:`from_jagged`) and passed to every layer. Its :class:`JaggedLayout` copies the offsets
    to the host once and keeps what is derived from them (lengths, ``max_len``, positions, the
    kernels' plans); the causal window starts are kept per window here. On a GPU each layer
    planning for itself would wait for the device again, so a forward pass would synchronise in
    proportion to its depth.

    A streaming step is the special case of a batch with one event per user
    (``offsets = arange(B + 1)``) whose ``positions`` count the user's earlier events; it plans
    nothing, so its layout never copies anything to the host.

    Args:
        layout: the batch's offsets and what is planned from them.
        positions: ``[T]`` int64 index of each event inside its user's history.
        timestamps: ``[T]`` int64 event times in seconds.
        gaps: ``[T]`` fp32 seconds since the user's previous event (``0`` for the first).
        elapsed: optional ``[T]`` fp32 seconds from the user's last event to its request
            time; TADN readouts decay over it (DESIGN §3.7). ``None`` reads at the last event.

    Example::

        >>> import torch
        >>> ctx = SequenceContext.from_jagged(torch.tensor([0, 3, 7]), torch.tensor([0, 5, 9, 0, 1, 30, 31]))
        >>> ctx.positions.tolist(), ctx.gaps.tolist()
        ([0, 1, 2, 0, 1, 2, 3], [0.0, 5.0, 4.0, 0.0, 1.0, 29.0, 1.0])
        >>> ctx.window_starts(2).tolist()
        [0, 0, 1, 0, 0, 1, 2]
    """

    layout: JaggedLayout
    positions: torch.Tensor
    timestamps: torch.Tensor
    gaps: torch.Tensor
    elapsed: Optional[torch.Tensor] = None
    _window_starts: Dict[Tuple[int, Optional[float]], torch.Tensor] = field(
        default_factory=dict, init=False, repr=False
    )
    _gap_buckets: Dict[Tuple[int, float], torch.Tensor] = field(default_factory=dict, init=False, repr=False)

    @classmethod
    def from_jagged(
        cls, offsets: torch.Tensor, timestamps: torch.Tensor, max_len: Optional[int] = None
    ) -> "SequenceContext":
        """The context of a jagged batch.

        Args:
            offsets: ``[B + 1]`` int64 start of every user's events.
            timestamps: ``[sum(n)]`` int64 event times in seconds.
            max_len: optional bound on every user's length (see :class:`JaggedLayout`).

        Returns:
            The batch's context; the offsets are checked and copied to the host.
        """
        layout = JaggedLayout(offsets, max_len, num_events=timestamps.shape[0])
        if layout.num_events != timestamps.shape[0]:
            raise ValueError(
                f"offsets must run from 0 to sum(n) = {timestamps.shape[0]}, got 0..{layout.num_events}"
            )
        positions = layout.positions
        # A gather, not a concatenation of slices: torch.export would bound T by the slices' checks.
        previous = timestamps[(torch.arange(timestamps.shape[0], device=timestamps.device) - 1).clamp(min=0)]
        gaps = torch.where(positions > 0, timestamps - previous, torch.zeros_like(timestamps))
        return cls(layout=layout, positions=positions, timestamps=timestamps, gaps=gaps.float())

    @property
    def offsets(self) -> torch.Tensor:
        """``[B + 1]`` int64 start of every user's events."""
        return self.layout.offsets

    def prefixes(self, lengths: torch.Tensor) -> Tuple["SequenceContext", torch.Tensor]:
        """The context of each user's first ``lengths[b]`` events, and the rows they are here.

        Args:
            lengths: ``[B]`` int64 on the host, each at most its user's length.

        Returns:
            ``(context, rows)``: the prefixes' context (same positions, times and gaps; its layout
            holds the host copy, so it reads nothing back) and ``[sum(lengths)]`` their rows in
            this batch, user by user.
        """
        if bool((lengths > self.layout.host_lengths).any()):
            raise ValueError("prefixes: a prefix is longer than its user's history")
        host_offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
        total = int(host_offsets[-1])
        device = self.offsets.device
        offsets = host_offsets.to(device)
        starts = self.offsets[:-1] - offsets[:-1]
        rows = torch.repeat_interleave(starts, lengths.to(device), output_size=total)
        rows += torch.arange(total, device=device)
        context = SequenceContext(
            layout=JaggedLayout(offsets, num_events=total, host_offsets=host_offsets),
            positions=self.positions[rows],
            timestamps=self.timestamps[rows],
            gaps=self.gaps[rows],
            elapsed=None if self.elapsed is None else self.elapsed[rows],
        )
        return context, rows

    def gap_buckets(self, num_buckets: int, scale: float) -> torch.Tensor:
        """:func:`~torchrec_hytrec.ops.buckets.gap_buckets` of the batch's gaps, computed once per
        ``(num_buckets, scale)``: the input and every TADN layer embed the same buckets."""
        key = (num_buckets, scale)
        if key not in self._gap_buckets:
            self._gap_buckets[key] = gap_buckets(self.gaps, num_buckets, scale)
        return self._gap_buckets[key]

    def window_starts(self, window: int, window_seconds: Optional[float] = None) -> torch.Tensor:
        """:func:`~torchrec_hytrec.ops.jagged_attention.causal_window_starts` of the batch, computed
        once per ``(window, window_seconds)``."""
        key = (window, window_seconds)
        if key not in self._window_starts:
            self._window_starts[key] = causal_window_starts(
                offsets=self.offsets,
                timestamps=self.timestamps,
                window=window,
                window_seconds=window_seconds,
                layout=self.layout,
            )
        return self._window_starts[key]


def checked_context(
    values: torch.Tensor, offsets: torch.Tensor, timestamps: torch.Tensor, max_len: Optional[int]
) -> SequenceContext:
    """The context of an encoder's jagged inputs, once they are checked against each other.

    Args:
        values: ``[sum(n), d]`` event embeddings.
        offsets: ``[B + 1]`` int64 start of every user's events.
        timestamps: ``[sum(n)]`` int64 event times, non-decreasing within each user.
        max_len: optional bound on every user's length.

    Returns:
        The batch's :class:`SequenceContext`. While compiling or exporting, where the values
        cannot be read, only the shapes are checked.
    """
    if values.dim() != 2 or timestamps.shape != values.shape[:1]:
        raise ValueError(
            f"values must be [sum(n), d] and timestamps [sum(n)], "
            f"got {tuple(values.shape)} and {tuple(timestamps.shape)}"
        )
    ctx = SequenceContext.from_jagged(offsets, timestamps, max_len)  # checks the offsets on the host
    if torch.compiler.is_compiling():
        return ctx
    # A decrease at a user's first row is only the boundary between two users. One read of the
    # device; the error path may read more.
    backwards = (timestamps[1:] < timestamps[:-1]) & (ctx.positions[1:] > 0)
    if bool(backwards.any()):
        row = int(backwards.nonzero()[0]) + 1
        raise ValueError(
            f"timestamps must be non-decreasing within each user: user {int(ctx.layout.users[row])}, "
            f"event {int(ctx.positions[row])} (row {row}) at {int(timestamps[row])} "
            f"follows {int(timestamps[row - 1])}"
        )
    return ctx


class SwiGLU(nn.Module):
    """Pre-norm SwiGLU feed-forward block with a residual connection.

    Args:
        dim: input and output width.
        hidden_dim: hidden width.
        dropout: dropout on the block's output before the residual sum.

    Example::

        >>> import torch
        >>> SwiGLU(64, 128)(torch.randn(10, 64)).shape
        torch.Size([10, 64])
    """

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(dim)
        self.gate_up = nn.Linear(dim, 2 * hidden_dim, bias=False)
        self.down = nn.Linear(hidden_dim, dim, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(self.norm(x)).chunk(2, dim=-1)
        return x + self.dropout(self.down(F.silu(gate) * up))


class RotaryEmbedding(nn.Module):
    """Rotary position embedding of the event index inside each user's sequence.

    Scores of rotated queries and keys depend only on ``i - j``, so a layer using it is
    causal-consistent: event ``i``'s output never depends on the sequence length or on later
    events, and the streamed form (positions counted from the first event) matches the full
    forward.

    Args:
        head_dim: channels per head (even).
        base: frequency base.

    Example::

        >>> import torch
        >>> rope = RotaryEmbedding(32)
        >>> q = rope(torch.randn(10, 2, 32), torch.arange(10))
        >>> q.shape
        torch.Size([10, 2, 32])
    """

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotates ``x`` ``[T, ..., D]`` (e.g. ``[T, H, D]`` or stacked queries and keys
        ``[T, 2, H, D]``) by the angles of ``positions`` ``[T]``."""
        angles = (positions.float()[:, None] * self.inv_freq).flatten()  # [T * D/2]
        # Complex tensors are made flat from fresh copies: the stride checks of complex views (and
        # of views of strided inputs) would otherwise bound T away from 1 in torch.export.
        rotation = torch.polar(torch.ones_like(angles), angles)
        rotation = rotation.view((x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1] // 2,))
        # Each channel pair (x1, x2) as the complex number x1 + i x2, times e^{i angle}: one
        # vectorised product, ~1.8x faster on CPU than real products against swapped pairs.
        flat = x.float().clone(memory_format=torch.contiguous_format).view(-1, 2)
        pairs = torch.view_as_complex(flat).view(x.shape[:-1] + (x.shape[-1] // 2,))
        return torch.view_as_real(pairs * rotation).flatten(-2).to(x.dtype)
