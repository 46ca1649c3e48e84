"""The HSTU-style layer (the ``"H"`` of ``long_pattern``): a baseline of the same code as HyTRec."""

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import record_function

from torchrec_hytrec.modules.blocks import SequenceContext
from torchrec_hytrec.modules.config import HyTRecConfig
from torchrec_hytrec.ops.hstu_attention import hstu_attention_at, jagged_hstu_attention

# Standard deviation of the initial relative biases, as HSTU initialises them.
_BIAS_INIT_STD = 0.02


def hstu_value_width(config: HyTRecConfig) -> int:
    """Width ``m d`` of the layer's values and gate ``U``, chosen for parameter parity.

    A :class:`~torchrec_hytrec.modules.attention.SoftmaxAttentionLayer` holds ``4 d^2`` attention
    weights (queries, keys, values, output) and ``3 f d^2`` in its SwiGLU (``f`` the
    ``ffn_multiplier``); an HSTU layer holds ``(2 d + 2 m d) d`` in its one input projection and
    ``m d^2`` in its output, ``2 d^2 + 3 m d^2``. ``m = f + 2/3`` makes them equal; the width is
    rounded to a multiple of the heads. Beside them the layer has its bias tables (``2 * 40 * H``
    at the default buckets) and one more norm: within 0.5% of the softmax layer at the default
    configuration, 3.4% at ``d = 32``.

    Args:
        config: the encoder's configuration.

    Returns:
        The width of ``U`` and of the values (all heads together).

    Example::

        >>> hstu_value_width(HyTRecConfig(embedding_dim=64, num_heads=2, ffn_multiplier=2.0))
        170
    """
    heads = config.num_heads
    return heads * max(1, round((config.ffn_multiplier + 2 / 3) * config.embedding_dim / heads))


class HSTULayer(nn.Module):
    """HSTU's sequential transduction unit (Zhai et al., ICML 2024) on jagged sequences.

    For inputs ``x`` ``[T, d]``::

        U, V, Q, K = split(silu(f1(norm(x))))
        A          = pointwise attention of Q, K, V (below)
        y          = x + dropout(f2(norm(A) * U))

    per head, ``A_i = sum_{j <= i} silu(q_i . k_j / sqrt(D) + b_pos[bucket(i - j)] +
    b_time[bucket(t_i - t_j)]) v_j / (i + 1)``
    (:func:`~torchrec_hytrec.ops.hstu_attention.jagged_hstu_attention`, which says why it divides
    by ``i + 1`` rather than HSTU's constant maximum length). The biases are learned per head over
    the same logarithmic buckets as the encoder's gap embeddings. HSTU has no separate feed-forward
    block: the gate ``U`` and the wide values take its place, their width set by
    :func:`hstu_value_width` so that the layer has the weights of a softmax layer of the same
    configuration. Norms are RMSNorms (HSTU uses LayerNorms), like every other layer here. The
    attention is full causal: ``long_attention_window`` does not apply to it.

    Streaming (:mod:`torchrec_hytrec.modules.streaming`) keeps the keys, values and times of every
    event and runs one event at a time through :meth:`project` and :meth:`finish`.

    Args:
        config: encoder configuration (width, heads, dropout, gap buckets, ``ffn_multiplier``).

    Example::

        >>> import torch
        >>> layer = HSTULayer(HyTRecConfig(embedding_dim=32))
        >>> ctx = SequenceContext.from_jagged(torch.tensor([0, 3, 7]), torch.arange(7) * 600)
        >>> x = torch.randn(7, 32)
        >>> y = layer(x, ctx)
        >>> y.shape, torch.allclose(layer(x, ctx, rows=torch.tensor([2, 6])), y[[2, 6]], atol=1e-6)
        (torch.Size([7, 32]), True)
    """

    def __init__(self, config: HyTRecConfig) -> None:
        super().__init__()
        d, heads = config.embedding_dim, config.num_heads
        self.num_heads = heads
        self.head_dim = config.head_dim
        width = hstu_value_width(config)
        self.value_dim = width // heads
        self.bucket_scale = config.gap_bucket_scale
        self.norm = nn.RMSNorm(d)
        self.uvqk = nn.Linear(d, 2 * width + 2 * d, bias=False)
        self.position_bias = nn.Parameter(torch.randn(config.num_gap_buckets, heads) * _BIAS_INIT_STD)
        self.time_bias = nn.Parameter(torch.randn(config.num_gap_buckets, heads) * _BIAS_INIT_STD)
        self.attention_norm = nn.RMSNorm(width)
        self.out = nn.Linear(width, d, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def project(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(u, q, k, v)`` of inputs ``x`` ``[T, d]``: the ``[T, m d]`` gate, the ``[T, H, D]``
        queries and keys and the ``[T, H, m d / H]`` values."""
        width = self.value_dim * self.num_heads
        d = self.num_heads * self.head_dim
        u, v, q, k = F.silu(self.uvqk(self.norm(x))).split([width, width, d, d], dim=-1)
        heads = (self.num_heads, -1)
        return u, q.unflatten(-1, heads), k.unflatten(-1, heads), v.unflatten(-1, heads)

    def finish(self, x: torch.Tensor, u: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """The block's output from its input ``x``, gate ``u`` and attention output ``o``
        ``[T, H, m d / H]``."""
        return x + self.dropout(self.out(self.attention_norm(o.flatten(-2)) * u))

    def attend(
        self,
        x: torch.Tensor,
        projected: Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
        ctx: SequenceContext,
        rows: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """The block's outputs at ``rows`` (every row if ``None``) from its inputs ``x`` ``[T, d]``
        and their :meth:`project`-ions (which a stream prefill also keeps)."""
        u, q, k, v = projected
        tables = dict(
            position_bias=self.position_bias, time_bias=self.time_bias, bucket_scale=self.bucket_scale
        )
        with record_function("## hytrec_hstu_attention ##"):
            if rows is None:
                o = jagged_hstu_attention(
                    q=q, k=k, v=v, offsets=ctx.offsets, timestamps=ctx.timestamps, layout=ctx.layout, **tables
                )
            else:
                o = hstu_attention_at(
                    q=q[rows], k=k, v=v, offsets=ctx.offsets, rows=rows, timestamps=ctx.timestamps, **tables
                )
                x, u = x[rows], u[rows]
        return self.finish(x, u, o)

    def forward(
        self, x: torch.Tensor, ctx: SequenceContext, rows: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Runs the layer over a jagged batch.

        Args:
            x: ``[T, d]`` inputs.
            ctx: the batch's per-event facts (offsets, timestamps).
            rows: optional ``[R]`` rows to compute the output at; all rows if ``None``.

        Returns:
            ``[T, d]`` outputs, or ``[R, d]`` with ``rows``.
        """
        return self.attend(x, self.project(x), ctx, rows)

    def input_rows(self, ctx: SequenceContext, rows: torch.Tensor) -> Optional[torch.Tensor]:
        """``None``: full causal attention reads every event's input, whichever outputs are wanted."""
        return None
