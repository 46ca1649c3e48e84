"""The TADN layer: temporal-aware gated delta-rule linear attention (DESIGN §3)."""

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import record_function

from torchrec_hytrec.modules.blocks import SequenceContext, SwiGLU
from torchrec_hytrec.modules.config import HyTRecConfig
from torchrec_hytrec.ops.tadn import chunk_tadn

# Gates start near 1 so that, before training, forgetting is driven by the time gaps.
_GATE_BIAS_INIT = 5.0
# Smallest chunk picked for short users: below it the per-chunk overheads outweigh the padding saved.
_MIN_CHUNK_SIZE = 16


class TADNLayer(nn.Module):
    """Pre-norm TADN block: gated delta-rule attention with time-gap decay, then a SwiGLU FFN.

    For event ``i`` with normalised input ``e_i`` and gap ``Delta_i`` to the previous event,
    per head ``h``::

        q, k, v   = W_q e, W_k e, W_v e             (q, k L2-normalised per head)
        log tau   = -Delta_i / T_h,                 T_h = exp(theta_h)
        g         = sigmoid(w_h^T [e_i; phi(Delta_i)] + b_h)
        log alpha = log tau + logsigmoid(...)       (always in log space)
        beta      = sigmoid(u_h^T [e_i; phi(Delta_i)] + c_h)
        S_i       = alpha (I - beta k k^T) S_{i-1} + beta k v^T,   o_i = S_i^T q / sqrt(d_k)
        y         = x + W_o(RMSNorm(o) * SiLU(W_z e))

    With a request time ``t*`` (``ctx.elapsed = t* - t_last``) every readout is multiplied per
    head by ``exp(-(t* - t_last) / T_h)``: the state read at ``t*`` has decayed for the
    elapsed time (DESIGN §3.7); ``t* = t_last`` gives the training form exactly.

    Streaming (:mod:`torchrec_hytrec.modules.streaming`) continues from the per-user states
    :meth:`forward_with_state` returns, one event at a time, through :meth:`project` and
    :meth:`finish`.

    Args:
        config: encoder configuration (width, heads, gap buckets, time-constant range).

    Example::

        >>> import torch
        >>> layer = TADNLayer(HyTRecConfig(embedding_dim=32))
        >>> ctx = SequenceContext.from_jagged(torch.tensor([0, 3, 7]), torch.arange(7) * 600)
        >>> y, state = layer.forward_with_state(torch.randn(7, 32), ctx)
        >>> y.shape, state.shape
        (torch.Size([7, 32]), torch.Size([2, 2, 16, 16]))
    """

    def __init__(self, config: HyTRecConfig) -> None:
        super().__init__()
        d, heads = config.embedding_dim, config.num_heads
        self.num_heads = heads
        self.head_dim = config.head_dim
        self.num_gap_buckets = config.num_gap_buckets
        self.gap_bucket_scale = config.gap_bucket_scale
        self.chunk_size = config.tadn_chunk_size
        self.norm = nn.RMSNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.gap_embedding: Optional[nn.Embedding] = None
        gap_dim = 0
        if config.tadn_temporal_gate:
            self.gap_embedding = nn.Embedding(config.num_gap_buckets, config.gate_gap_dim)
            gap_dim = config.gate_gap_dim
        # One projection of [e; phi(gap)] gives the gate and write-strength logits of all heads.
        self.gates = nn.Linear(d + gap_dim, 2 * heads)
        with torch.no_grad():
            self.gates.bias[:heads].fill_(_GATE_BIAS_INIT)
            self.gates.bias[heads:].zero_()
        self.log_time_constant: Optional[nn.Parameter] = None
        if config.tadn_time_decay:
            low, high = config.time_constant_range
            self.log_time_constant = nn.Parameter(torch.linspace(math.log(low), math.log(high), heads))
        self.output_gate = nn.Linear(d, d, bias=False)
        self.head_norm = nn.RMSNorm(self.head_dim)
        # The norm lifts readouts of RMS ~1e-2 (unit q and k, 1/sqrt(d_k) scale) to 1. At unit weight
        # every TADN block would start by adding an O(1) branch to item rows of RMS d^-1/2 and by
        # amplifying its gradients ~100x: a 4-layer TADN stack then barely trains (Beauty: popularity
        # level after 10 epochs). Starting at the embeddings' scale d^-1/2 lets the stack train.
        nn.init.constant_(self.head_norm.weight, d**-0.5)
        self.out = nn.Linear(d, d, bias=False)
        self.dropout = nn.Dropout(config.dropout)
        self.ffn = SwiGLU(d, round(config.ffn_multiplier * d), config.dropout)

    def temporal_gates(
        self, e: torch.Tensor, ctx: SequenceContext
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gates of every event and head.

        Args:
            e: ``[T, d]`` normalised layer inputs.
            ctx: the batch's per-event facts (gaps).

        Returns:
            ``(log_g, log_alpha, beta)``, each ``[T, H]`` fp32: the log of the learned gate,
            the fused log decay ``-Delta / T_h + log_g`` (``log_g`` without the time decay) and
            the write strength.
        """
        if self.gap_embedding is not None:
            phi = self.gap_embedding(ctx.gap_buckets(self.num_gap_buckets, self.gap_bucket_scale))
            e = torch.cat([e, phi.to(e.dtype)], dim=-1)
        gate_logit, beta_logit = self.gates(e).float().chunk(2, dim=-1)
        # -softplus(-x) is logsigmoid(x); F.logsigmoid's CPU kernel costs milliseconds on tiny
        # streaming inputs.
        log_g = -F.softplus(-gate_logit)
        if self.log_time_constant is None:
            return log_g, log_g, torch.sigmoid(beta_logit)
        log_tau = -ctx.gaps[:, None] / self.log_time_constant.exp()
        return log_g, log_tau + log_g, torch.sigmoid(beta_logit)

    def project(
        self, x: torch.Tensor, ctx: SequenceContext
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(e, q, k, v, log_alpha, beta)`` of inputs ``x`` ``[T, d]``: the normalised input, the
        ``[T, H, D]`` queries, keys and values and the ``[T, H]`` fp32 gates."""
        e = self.norm(x)
        # split, not slices: its backward is one concatenation instead of zero-filled copies.
        qk, v = self.qkv(e).unflatten(-1, (3, self.num_heads, self.head_dim)).split([2, 1], dim=1)
        # Queries and keys in one call: 3x faster than normalising the two strided views apart.
        q, k = F.normalize(qk, dim=-1).unbind(1)
        _, log_alpha, beta = self.temporal_gates(e, ctx)
        return e, q, k, v.squeeze(1), log_alpha, beta

    def finish(
        self, x: torch.Tensor, e: torch.Tensor, o: torch.Tensor, elapsed: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """The block's output from its input ``x``, ``e`` (:meth:`project`), the readouts ``o``
        ``[T, H, D]`` and the optional ``[T]`` seconds from the last event to the request time."""
        if elapsed is not None and self.log_time_constant is not None:
            o = o * torch.exp(-elapsed[:, None] / self.log_time_constant.exp())[..., None]
        y = self.head_norm(o.to(x.dtype)).flatten(-2) * F.silu(self.output_gate(e))
        return self.ffn(x + self.dropout(self.out(y)))

    def forward(
        self, x: torch.Tensor, ctx: SequenceContext, rows: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Runs the layer over a jagged batch.

        Args:
            x: ``[T, d]`` inputs.
            ctx: the batch's per-event facts.
            rows: optional ``[R]`` rows to compute the output at; all rows if ``None`` (the
                recurrence still runs over every event).

        Returns:
            ``[T, d]`` outputs, or ``[R, d]`` with ``rows``.
        """
        return self.forward_with_state(x, ctx, rows)[0]

    def forward_with_state(
        self, x: torch.Tensor, ctx: SequenceContext, rows: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward`, and every user's recurrent state after its last event.

        Returns:
            ``(y, state)``: the outputs and the ``[B, H, d_k, d_v]`` fp32 states, what a stream
            continues from.
        """
        e, q, k, v, log_alpha, beta = self.project(x, ctx)
        with record_function("## hytrec_tadn ##"):
            o, state = chunk_tadn(
                q=q,
                k=k,
                v=v,
                log_alpha=log_alpha,
                beta=beta,
                offsets=ctx.offsets,
                output_final_state=True,
                chunk_size=self.chunk_size,
                min_chunk_size=_MIN_CHUNK_SIZE,
                layout=ctx.layout,
            )
        assert state is not None
        elapsed = ctx.elapsed
        if rows is not None:
            x, e, o = x[rows], e[rows], o[rows]
            elapsed = elapsed[rows] if elapsed is not None else None
        return self.finish(x, e, o, elapsed), state

    def input_rows(self, ctx: SequenceContext, rows: torch.Tensor) -> Optional[torch.Tensor]:
        """``None``: the recurrence reads every event's input, whichever outputs are wanted."""
        return None
