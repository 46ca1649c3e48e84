"""Chunkwise TADN over jagged batches, with a hand-written chunked backward.

Every user's events are cut into chunks of ``C`` positions (the last one zero-padded; padding has
``log_alpha = 0`` and ``beta = 0`` so it leaves the state untouched). Inside a chunk, with the
in-chunk cumulative log-gate ``g_i = sum_{j <= i} log_alpha_j`` and
``Gam_ij = exp(g_i - g_j)`` for ``i >= j`` (zero above the diagonal), the delta rule is exact in
WY form (DESIGN.md §3):

    A = strict_lower(diag(beta) K K^T * Gam),   [W | U] = (I + A)^{-1} [diag(beta e^g) K | diag(beta) V]
    P = (Q K^T) * Gam,   Kd = diag(e^{g_C - g}) K
    M = e^{g_C} I - Kd^T W,   R = Kd^T U,   Qeff = diag(e^g) Q - P W
    S_out = M S_in + R,   O = scale * (Qeff S_in + P U)

so the only sequential work is ``S <- M S + R``: one batched matmul per chunk index, over all users
that still have a chunk there. Everything else is a batched product over every chunk of every user
and head at once. The backward mirrors this: one reverse pass ``dS_in = M^T dS_out + Qeff^T dO_s``
and batched per-chunk gradients, recomputing the per-chunk ``C x C`` matrices (``Gam``, ``A``, ``P``)
and keeping only ``[W | U]``, ``(I + A)^{-1}`` (:func:`unit_lower_inverse`), the transitions ``M``
and the chunk-boundary states from the forward.

Numerics: only ``exp`` of non-positive sums of log-gates is ever formed, each sum taken directly
over its own segment (never as a difference of prefix sums), so a finite ``log_alpha`` down to
``-1e4`` gives exact zeros instead of overflow or cancellation. Work is done in fp32 (fp64 when the
inputs are fp64), with autocast turned off around the forward and the backward: under
``torch.autocast`` the batched products would be re-cast to bf16/fp16, where the decays, the
triangular inverses and the state lose the precision they need. Inputs of any dtype
are cast to fp32; the output comes back in the queries' dtype (what autocast gives the projections
that make them), the final state in fp32.

Export: while ``torch.export`` traces there are no offsets to plan from, so :func:`chunk_tadn`
is traced as the custom op ``hytrec::chunk_tadn``, which plans inside (see
:mod:`torchrec_hytrec.ops.jagged_attention`).
"""

import math
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.autograd.function import FunctionCtx, once_differentiable
from torch.profiler import record_function

from torchrec_hytrec.ops.jagged_attention import JaggedLayout


@dataclass
class _JaggedChunks:
    """How a jagged batch maps onto chunks and onto the state pass.

    Users are ranked by chunk count (descending), so the users that still have a chunk at chunk
    index ``c`` are ranks ``0 .. steps[c] - 1``. Chunks are stored chunk-index-major: chunk ``c`` of
    rank ``r`` is row ``chunk_start[c] + r``, so each step of the state pass reads contiguous rows.

    State slots: ``B`` initial-state slots (one per rank), then one slot per chunk holding the state
    after that chunk (chunk row ``j`` -> slot ``B + j``).
    """

    chunk_size: int
    num_chunks: int
    # Per step c (python ints, read by the sequential loop): users active.
    steps: List[int]
    # [T * H] row of every (event, head) in the padded [num_chunks * H * C] layout, and its
    # inverse [num_chunks * H * C]: the (event, head) row feeding each padded row, T * H for padding.
    dest: torch.Tensor
    source: torch.Tensor
    # [num_chunks] slot of the state entering each chunk row.
    enter_slot: torch.Tensor
    # [B] (user order) slot of the user's initial and final state.
    init_slot: torch.Tensor
    final_slot: torch.Tensor


def _exclusive_cumsum(x: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(x, 0) - x


def fitted_chunk_size(layout: JaggedLayout, chunk_size: int, min_chunk_size: int) -> int:
    """``chunk_size``, shrunk for batches of short users.

    Every user is padded to a multiple of the chunk, so a batch of 10-event users at C = 64 would
    spend most of its work on padding; the result is exact for any chunk size. Read from the layout's
    host counts, so it costs no device read.

    Args:
        layout: the batch's layout.
        chunk_size: the largest chunk.
        min_chunk_size: the smallest: below it the per-chunk overheads outweigh the padding saved.

    Returns:
        The power of two at or above the mean length, within ``[min_chunk_size, chunk_size]``.

    Example::

        >>> import torch
        >>> fitted_chunk_size(JaggedLayout(torch.tensor([0, 9, 21, 24])), 64, 16)
        16
        >>> fitted_chunk_size(JaggedLayout(torch.tensor([0, 20, 45])), 64, 16)
        32
    """
    users = max(layout.num_users, 1)
    mean_length = -(-layout.num_events // users)
    fitting = 1 << max(mean_length - 1, 0).bit_length()
    return min(chunk_size, max(min_chunk_size, fitting))


def _plan_chunks(layout: JaggedLayout, num_heads: int, chunk_size: int) -> _JaggedChunks:
    """Built on the host from the layout's copy of the offsets."""
    off, lengths, num_tokens = layout.host_offsets, layout.host_lengths, layout.num_events
    C, H = chunk_size, num_heads
    B = lengths.numel()
    counts = (lengths + C - 1) // C
    order = torch.argsort(counts, descending=True, stable=True)  # rank -> user
    rank = torch.empty(B, dtype=torch.int64)
    rank[order] = torch.arange(B)
    counts_r = counts[order]
    max_chunks = int(counts_r[0]) if B > 0 else 0
    # steps[c] = number of ranks with more than c chunks.
    hist = torch.bincount(counts_r, minlength=max_chunks + 1)
    steps = B - torch.cumsum(hist, 0)[:max_chunks]
    chunk_start = _exclusive_cumsum(steps)
    num_chunks = int(steps.sum())

    user = torch.repeat_interleave(torch.arange(B), lengths)
    pos = torch.arange(num_tokens) - off[:-1][user]
    slot = (chunk_start[pos // C] + rank[user]) * C + pos % C
    dest = (((slot // C * H)[:, None] + torch.arange(H)) * C + (slot % C)[:, None]).reshape(-1)
    source = torch.full((num_chunks * H * C,), num_tokens * H, dtype=torch.int64)
    source[dest] = torch.arange(num_tokens * H)

    # The state entering chunk (c, r) is the initial slot r for c == 0, else the slot after chunk
    # (c - 1, r), i.e. B + chunk_start[c - 1] + r.
    enter_start = torch.cat([torch.zeros(1, dtype=torch.int64), B + chunk_start])[:max_chunks]
    rank_of_row = torch.arange(num_chunks) - torch.repeat_interleave(chunk_start, steps)
    enter_slot = torch.repeat_interleave(enter_start, steps) + rank_of_row
    last_row = chunk_start[(counts - 1).clamp(min=0)] if max_chunks > 0 else counts
    final_slot = torch.where(counts > 0, B + last_row + rank, rank)
    # One copy to the device for all of them: a copy from pageable host memory waits for the device.
    indices = (dest, source, enter_slot, rank, final_slot)
    dest, source, enter_slot, rank, final_slot = (
        torch.cat(indices).to(layout.offsets.device).split([x.numel() for x in indices])
    )
    return _JaggedChunks(
        chunk_size=C,
        num_chunks=num_chunks,
        steps=steps.tolist(),
        dest=dest,
        source=source,
        enter_slot=enter_slot,
        init_slot=rank,
        final_slot=final_slot,
    )


def _to_chunks(x: torch.Tensor, plan: _JaggedChunks, dtype: torch.dtype) -> torch.Tensor:
    """``[T, H, *D]`` -> zero-padded ``[num_chunks * H, C, *D]`` in ``dtype``."""
    H, rest = x.shape[1], x.shape[2:]
    rows = torch.cat([x.reshape(-1, *rest).to(dtype), x.new_zeros(1, *rest, dtype=dtype)])
    return rows.index_select(0, plan.source).view(plan.num_chunks * H, plan.chunk_size, *rest)


def _from_chunks(y: torch.Tensor, plan: _JaggedChunks, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`_to_chunks` (padding dropped), as ``shape`` ``[T, H, *D]`` in ``dtype``."""
    rest = y.shape[2:]
    return y.reshape(-1, *rest).index_select(0, plan.dest).view(shape).to(dtype)


@dataclass
class _Gates:
    """Decay factors of a batch of chunks, all exponents ``<= 0``."""

    decay: torch.Tensor  # Gam [N, C, C], exp(g_i - g_j) for i >= j else 0
    from_start: torch.Tensor  # e^{g} [N, C]
    to_end: torch.Tensor  # e^{g_C - g} [N, C]
    total: torch.Tensor  # e^{g_C} [N]


def _exp_or_zero(x: torch.Tensor, zero: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``exp(x)`` with exact zeros where it would underflow past the smallest normal number, and
    where ``zero`` is set.

    Besides avoiding denormals downstream, this keeps ``exp`` off its slow path: on CPU, ``exp`` of
    ``-inf``, ``-1e4`` or of arguments with denormal results runs 6x to 50x slower than in range.
    The cut sits one unit above ``log(tiny)``: fp32 ``exp(log(tiny))`` rounds to just below
    ``tiny``, a denormal, so clamping there sent every underflowing entry down the slow path
    (30x slower on the ~20% of decay entries that underflow on real time gaps). Results under
    ``e * tiny`` become zeros, as the smaller ones do.
    """
    cut = math.log(torch.finfo(x.dtype).tiny) + 1.0
    underflow = x < cut
    if zero is not None:
        underflow |= zero
    return x.clamp_min(cut).exp_().masked_fill_(underflow, 0.0)


def _gates(log_alpha: torch.Tensor) -> _Gates:
    C = log_alpha.shape[-1]
    ones = torch.ones(C, C, dtype=torch.bool, device=log_alpha.device)
    # Segment sums seg_ij = sum_{j < l <= i} log_alpha_l, summed directly rather than as a
    # difference of prefix sums: after a -1e4 gate the prefix sums are ~-1e4 and their fp32
    # difference would lose the small gates that follow (ulp(1e4) ~ 1e-3). As a product,
    # seg = (L * log_alpha^T) U with L_il = [l <= i], U_lj = [l > j]: the out-of-range terms are
    # exact zeros, and it is one GEMM against a constant matrix.
    upto, after = ones.tril(), ones.tril(-1)
    seg = torch.matmul(upto.to(log_alpha.dtype) * log_alpha[:, None, :], after.to(log_alpha.dtype))
    decay = _exp_or_zero(seg, ~upto)
    from_start = _exp_or_zero(log_alpha.cumsum(-1))
    return _Gates(decay=decay, from_start=from_start, to_end=decay[:, -1], total=from_start[:, -1])


def _transition(kd: torch.Tensor, w: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """``M = e^{g_C} I - Kd^T W``: the chunk's state transition ``[N, K, K]``."""
    m = torch.bmm(kd.mT, w).neg_()
    m.diagonal(dim1=-2, dim2=-1).add_(total[:, None])
    return m


def unit_lower_inverse(a: torch.Tensor) -> torch.Tensor:
    """``(I + tril(a, -1))^{-1}``: the inverse of the unit lower triangular matrices of ``a``.

    Blockwise doubling, as LAPACK's recursive triangular inverse: with the inverses ``T1``, ``T2``
    of the two diagonal blocks of size ``b`` of every block of size ``2b``, the block's inverse has
    ``-T2 A21 T1`` below them. ``log2(C)`` levels of two batched products replace ``C``-step
    substitutions (one small LAPACK call per chunk and head, each a few microseconds of overhead);
    the inverse then serves the forward and, transposed, the backward as plain products.

    Args:
        a: ``[N, C, C]``; only the strict lower part is read.

    Returns:
        ``[N, C, C]`` unit lower triangular inverses.

    Example::

        >>> import torch
        >>> a = torch.randn(3, 6, 6)
        >>> unit = torch.eye(6) + a.tril(-1)
        >>> torch.allclose(unit @ unit_lower_inverse(a), torch.eye(6).expand(3, 6, 6), atol=1e-4)
        True
    """
    N, C, _ = a.shape
    size = 1 << max(C - 1, 0).bit_length()
    if size != C:  # an identity extension keeps the top-left block's inverse exact
        a = F.pad(a, (0, size - C, 0, size - C))
    t = torch.eye(size, dtype=a.dtype, device=a.device).repeat(N, 1, 1)
    b = 1
    while b < size:
        s = 2 * b

        def blocks(x: torch.Tensor) -> torch.Tensor:
            # [N, size / s, s, s] view of the diagonal blocks of size s.
            return x.view(N, size // s, s, size // s, s).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2)

        tb = blocks(t)
        lower = torch.matmul(tb[..., b:, b:], blocks(a)[..., b:, :b])
        tb[..., b:, :b] = torch.matmul(lower, tb[..., :b, :b]).neg_()
        b = s
    return t[:, :C, :C] if size != C else t


def _first_chunks_from_zeros(plan: _JaggedChunks, initial_state: Optional[torch.Tensor]) -> int:
    """Chunk rows at the start of the layout that read no state: the first chunk of every user
    when all users start from zeros (none otherwise). On short histories they are most rows, and
    every product with the entering state or with their transitions can be left out for them."""
    return plan.steps[0] if initial_state is None and plan.steps else 0


def _state_pass(
    plan: _JaggedChunks, m: torch.Tensor, states: torch.Tensor, num_heads: int, transpose: bool, skip: int
) -> None:
    """The only sequential loop, in place on ``states`` ``[(B + num_chunks) * H, K, V]``.

    Forward (``transpose=False``): slot after chunk row j += M_j @ slot entering it. Reverse:
    slot entering chunk row j += M_j^T @ slot after it, for chunk indices in reverse order.
    ``m`` holds the transitions of chunk rows ``skip`` onwards; with ``skip`` set (the first
    chunks, :func:`_first_chunks_from_zeros`) chunk index 0 is left out: forward it would add
    products with zero states, reverse it would only feed the initial states' gradient.
    """
    H = num_heads
    B_H = states.shape[0] - plan.num_chunks * H
    # Per chunk index, views of its transitions and of the states after its chunks, made in one
    # call each: the loop then costs one product per step (slicing per step took half its time).
    sizes = [n * H for n in plan.steps]
    start = 1 if skip else 0
    transitions = (m.mT if transpose else m).split(sizes[start:])  # chunk index c is [c - start]
    afters = states[B_H:].split(sizes)
    order = range(len(sizes) - 1, start - 1, -1) if transpose else range(start, len(sizes))
    with record_function("tadn_state_pass"):
        for c in order:
            # The users with a chunk at index c are the first of those with one at c - 1 (and
            # of the initial slots for c == 0).
            enter = states[: sizes[0]] if c == 0 else afters[c - 1]
            if enter.shape[0] != sizes[c]:
                enter = enter[: sizes[c]]
            if transpose:
                enter.baddbmm_(transitions[c - start], afters[c])
            else:
                afters[c].baddbmm_(transitions[c - start], enter)


def _chunk_matrices(
    qc: torch.Tensor, kc: torch.Tensor, bc: torch.Tensor, gates: _Gates
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(beta K, A, P)``: ``A = (beta K K^T) * Gam`` (only its strict lower part is meaningful) and
    ``P = (Q K^T) * Gam`` (causal), for every chunk at once."""
    bk = bc[:, :, None] * kc
    a = torch.bmm(bk, kc.mT).mul_(gates.decay)
    p = torch.bmm(qc, kc.mT).mul_(gates.decay)
    return bk, a, p


def _effective_queries(
    qc: torch.Tensor, p: torch.Tensor, w: torch.Tensor, from_start: torch.Tensor
) -> torch.Tensor:
    """``Qeff = diag(e^g) Q - P W``: what reads the state entering the chunk."""
    return (from_start[:, :, None] * qc).baddbmm_(p, w, alpha=-1)


class _ChunkTADN(torch.autograd.Function):
    @staticmethod
    def forward(  # pyre-ignore[14]
        ctx: FunctionCtx,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        log_alpha: torch.Tensor,
        beta: torch.Tensor,
        initial_state: Optional[torch.Tensor],
        plan: _JaggedChunks,
        scale: float,
        output_final_state: bool,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        dtype = torch.promote_types(q.dtype, torch.float32)
        H, K, V = q.shape[1], q.shape[2], v.shape[2]
        B = plan.init_slot.numel()
        qc, kc, vc, gc, bc = (_to_chunks(x, plan, dtype) for x in (q, k, v, log_alpha, beta))
        gates = _gates(gc)
        bk, a, p = _chunk_matrices(qc, kc, bc, gates)
        # The inverse reads only A's strict lower part, so A needs no masking.
        rhs = kc.new_empty(*kc.shape[:2], K + V)
        torch.mul(bk, gates.from_start[:, :, None], out=rhs[..., :K])
        torch.mul(vc, bc[:, :, None], out=rhs[..., K:])
        inverse = unit_lower_inverse(a)
        wu = torch.bmm(inverse, rhs)
        w, u = wu[..., :K], wu[..., K:]
        kd = gates.to_end[:, :, None] * kc
        skip = _first_chunks_from_zeros(plan, initial_state)
        first = skip * H  # rows [first:] read a state
        m = _transition(kd[first:], w[first:], gates.total[first:])

        states = q.new_empty((B + plan.num_chunks) * H, K, V, dtype=dtype)
        init = states[: B * H].view(B, H, K, V)
        if initial_state is None:
            init.zero_()
        else:
            init.index_copy_(0, plan.init_slot, initial_state.to(dtype))
        torch.bmm(kd.mT, u, out=states[B * H :])
        _state_pass(plan, m, states, H, transpose=False, skip=skip)

        slots = states.view(B + plan.num_chunks, H, K, V)
        s_in = slots.index_select(0, plan.enter_slot[skip:]).view(-1, K, V)
        qeff = _effective_queries(qc[first:], p[first:], w[first:], gates.from_start[first:])
        o = torch.bmm(p, u)
        o[:first].mul_(scale)
        o[first:].baddbmm_(qeff, s_in, beta=scale, alpha=scale)
        final = slots.index_select(0, plan.final_slot) if output_final_state else None
        # The padded inputs are kept rather than re-gathered: they are the inputs' size.
        ctx.save_for_backward(qc, kc, vc, gc, bc, states, wu, m, inverse)
        ctx.input_meta = [(x.shape, x.dtype) for x in (q, k, v, log_alpha, beta)]
        ctx.num_heads = H
        ctx.skip = skip
        ctx.plan = plan
        ctx.scale = scale
        ctx.initial_dtype = None if initial_state is None else initial_state.dtype
        return _from_chunks(o, plan, q.shape[:2] + v.shape[2:], q.dtype), final

    @staticmethod
    @once_differentiable
    def backward(  # pyre-ignore[14]
        ctx: FunctionCtx, do: torch.Tensor, dfinal: Optional[torch.Tensor]
    ) -> Tuple[Optional[torch.Tensor], ...]:
        # A backward called inside an autocast region would run under it.
        with torch.autocast(do.device.type, enabled=False):
            return _ChunkTADN._backward(ctx, do, dfinal)

    @staticmethod
    def _backward(
        ctx: FunctionCtx, do: torch.Tensor, dfinal: Optional[torch.Tensor]
    ) -> Tuple[Optional[torch.Tensor], ...]:
        qc, kc, vc, gc, bc, states, wu, m, inverse = ctx.saved_tensors
        plan: _JaggedChunks = ctx.plan
        H, K, V = ctx.num_heads, kc.shape[2], vc.shape[2]
        B = plan.init_slot.numel()
        dtype = states.dtype
        skip = ctx.skip
        first = skip * H  # rows [first:] read a state; S_in = 0 before them
        w, u = wu[..., :K], wu[..., K:]
        dos = _to_chunks(do, plan, dtype).mul_(ctx.scale)
        gates = _gates(gc)
        bk, a, p = _chunk_matrices(qc, kc, bc, gates)
        kd = gates.to_end[:, :, None] * kc
        qeff = _effective_queries(qc[first:], p[first:], w[first:], gates.from_start[first:])

        # Reverse state pass: dS_in = M^T dS_out + Qeff^T dO_s.
        dstates = torch.zeros_like(states)
        dslots = dstates.view(B + plan.num_chunks, H, K, V)
        if dfinal is not None:
            dslots.index_copy_(0, plan.final_slot, dfinal.to(dtype))
        dslots.index_add_(0, plan.enter_slot[skip:], torch.bmm(qeff.mT, dos[first:]).view(-1, H, K, V))
        _state_pass(plan, m, dstates, H, transpose=True, skip=skip)
        d_out = dstates[B * H :]  # gradient of the state after every chunk
        slots = states.view(B + plan.num_chunks, H, K, V)
        s_in = slots.index_select(0, plan.enter_slot[skip:]).view(-1, K, V)

        # O = Qeff S_in + P U;  S_out = M S_in + Kd^T U;  M = e^{g_C} I - Kd^T W;  Qeff = e^g Q - P W.
        # Terms with S_in (dQeff, dM) are zero on rows before ``first``.
        dqeff = torch.bmm(dos[first:], s_in.mT)
        dm = torch.bmm(d_out[first:], s_in.mT)
        dp = torch.bmm(dos, u.mT)
        dp[first:].baddbmm_(dqeff, w[first:].mT, alpha=-1)
        du = torch.bmm(p.mT, dos).baddbmm_(kd, d_out)
        dwu = torch.empty_like(wu)
        dwu[:first, :, :K] = 0
        dwu[first:, :, :K] = torch.bmm(p[first:].mT, dqeff).baddbmm_(kd[first:], dm, beta=-1, alpha=-1)
        dwu[..., K:] = du
        dkd = torch.bmm(u, d_out.mT)
        dkd[first:].baddbmm_(w[first:], dm.mT, alpha=-1)

        # [W | U] = (I + A)^{-1} RHS  =>  dRHS = (I + A)^{-T} [dW | dU],  dA = -dRHS [W | U]^T.
        drhs = torch.bmm(inverse.mT, dwu)
        dkbe, dvb = drhs[..., :K], drhs[..., K:]
        neg_da = torch.bmm(drhs, wu.mT).tril_(-1)

        # A = (beta K K^T) * Gam (strict) and P = (Q K^T) * Gam (causal); the gradient w.r.t. the
        # segment sums log Gam_ij is dP * P + dA * A.
        e = (dp * p).addcmul_(neg_da, a, value=-1)
        dg = e.sum(-1) - e.sum(-2)
        dpd = dp.mul_(gates.decay)
        neg_dad = neg_da.mul_(gates.decay)
        dq = torch.bmm(dpd, kc)
        dq[first:].addcmul_(gates.from_start[first:, :, None], dqeff)
        dk = torch.bmm(dpd.mT, qc).baddbmm_(neg_dad.mT, bk, alpha=-1)
        y = torch.bmm(neg_dad, kc)
        dk.addcmul_(bc[:, :, None], y, value=-1)
        dbeta = (y * kc).sum(-1).neg_()

        # RHS = [beta e^g K | beta V];  Kd = e^{g_C - g} K.
        dk.addcmul_((bc * gates.from_start)[:, :, None], dkbe)
        dkbe_k = (dkbe * kc).sum(-1)
        dbeta += gates.from_start * dkbe_k + (dvb * vc).sum(-1)
        d_from_start = bc * dkbe_k
        d_from_start[first:] += (dqeff * qc[first:]).sum(-1)
        dv = bc[:, :, None] * dvb
        dk.addcmul_(gates.to_end[:, :, None], dkd)
        t = (dkd * kc).sum(-1) * gates.to_end
        dg += d_from_start * gates.from_start - t
        dg[:, -1] += t.sum(-1)
        dg[first:, -1] += dm.diagonal(dim1=-2, dim2=-1).sum(-1) * gates.total[first:]
        # The gates are sums of log_alpha: d log_alpha_l = sum over i >= l of dg_i.
        dlog_alpha = dg.flip(-1).cumsum(-1).flip(-1)

        dinit = None
        if ctx.initial_dtype is not None:
            dinit = dslots[:B].index_select(0, plan.init_slot).to(ctx.initial_dtype)
        grads = (dq, dk, dv, dlog_alpha, dbeta)
        return (
            *(_from_chunks(g, plan, *meta) for g, meta in zip(grads, ctx.input_meta)),
            dinit,
            None,
            None,
            None,
        )


def chunk_tadn(
    *,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_alpha: torch.Tensor,
    beta: torch.Tensor,
    offsets: torch.Tensor,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    scale: Optional[float] = None,
    chunk_size: int = 64,
    min_chunk_size: Optional[int] = None,
    layout: Optional[JaggedLayout] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Chunkwise TADN over a jagged batch; same semantics as
    :func:`~torchrec_hytrec.ops.tadn.naive.naive_recurrent_tadn`, differentiable in every tensor
    input through a hand-written chunked backward.

    Each user is padded only up to a multiple of ``chunk_size``, so the cost follows
    ``sum_b ceil(n_b / C) * C`` events; no chunk spans two users and every user starts from its own
    initial state (zeros if absent). Users with no events are allowed (their final state is their
    initial state).

    Args:
        q: queries ``[T, H, K]``, L2-normalised per head by the caller.
        k: keys ``[T, H, K]``, L2-normalised per head by the caller.
        v: values ``[T, H, V]``.
        log_alpha: log decay ``[T, H]``, ``<= 0`` (may be as low as ``-1e4``).
        beta: write strength ``[T, H]`` in ``[0, 1]``.
        offsets: ``[B + 1]`` int64 jagged offsets; user ``b`` owns rows ``offsets[b]:offsets[b+1]``.
        initial_state: optional ``[B, H, K, V]`` starting state of every user.
        output_final_state: also return every user's state after its last event.
        scale: readout scale, ``K ** -0.5`` by default.
        chunk_size: positions per chunk ``C``.
        min_chunk_size: if given, ``C`` shrinks for batches of short users, down to this
            (:func:`fitted_chunk_size`).
        layout: optional :class:`~torchrec_hytrec.ops.jagged_attention.JaggedLayout` of
            ``offsets``: the chunk plan is then made once per ``(chunk_size, H)`` and reused by
            every call that shares it.

    Returns:
        ``(o, final_state)``: ``o`` ``[T, H, V]`` in ``q``'s dtype; ``final_state`` ``[B, H, K, V]``
        in fp32 (fp64 for fp64 inputs), or ``None`` unless ``output_final_state``.

    Example::

        >>> import torch
        >>> from torchrec_hytrec.ops.tadn import naive_recurrent_tadn
        >>> T, H, D = 10, 2, 16
        >>> q = torch.nn.functional.normalize(torch.randn(T, H, D), dim=-1)
        >>> k = torch.nn.functional.normalize(torch.randn(T, H, D), dim=-1)
        >>> v = torch.randn(T, H, D)
        >>> log_alpha, beta = -torch.rand(T, H), torch.rand(T, H)
        >>> inputs = dict(q=q, k=k, v=v, log_alpha=log_alpha, beta=beta, offsets=torch.tensor([0, 3, 10]))
        >>> o, state = chunk_tadn(**inputs, output_final_state=True, chunk_size=4)
        >>> o_ref, state_ref = naive_recurrent_tadn(**inputs, output_final_state=True)
        >>> torch.allclose(o, o_ref, atol=1e-5), state.shape
        (True, torch.Size([2, 2, 16, 16]))
    """
    if q.dim() != 3 or k.shape != q.shape:
        raise ValueError(f"q and k must both be [T, H, K], got {tuple(q.shape)} and {tuple(k.shape)}")
    T, H, K = q.shape
    if v.dim() != 3 or v.shape[:2] != (T, H):
        raise ValueError(f"v must be [T, H, V] = [{T}, {H}, V], got {tuple(v.shape)}")
    for name, x in (("log_alpha", log_alpha), ("beta", beta)):
        if x.shape != (T, H):
            raise ValueError(f"{name} must be [T, H] = [{T}, {H}], got {tuple(x.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    scale = K**-0.5 if scale is None else scale
    if torch.compiler.is_exporting():
        o, final = torch.ops.hytrec.chunk_tadn(
            q, k, v, log_alpha, beta, offsets, initial_state, scale, chunk_size, min_chunk_size
        )
        return o, (final if output_final_state else None)
    return _chunk_tadn(
        q,
        k,
        v,
        log_alpha,
        beta,
        offsets,
        initial_state,
        output_final_state,
        scale,
        chunk_size,
        min_chunk_size,
        layout,
    )


def _chunk_tadn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_alpha: torch.Tensor,
    beta: torch.Tensor,
    offsets: torch.Tensor,
    initial_state: Optional[torch.Tensor],
    output_final_state: bool,
    scale: float,
    chunk_size: int,
    min_chunk_size: Optional[int],
    layout: Optional[JaggedLayout],
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    T, H, K = q.shape
    layout = JaggedLayout.of(offsets, layout)
    if layout.num_events != T:
        raise ValueError(f"offsets must end at the number of events {T}, got offsets[-1]={layout.num_events}")
    if min_chunk_size is not None:
        chunk_size = fitted_chunk_size(layout, chunk_size, min_chunk_size)
    plan = layout.plan(("tadn_chunks", chunk_size, H), lambda: _plan_chunks(layout, H, chunk_size))
    B = layout.num_users
    if initial_state is not None and initial_state.shape != (B, H, K, v.shape[2]):
        raise ValueError(
            f"initial_state must be [B, H, K, V] = [{B}, {H}, {K}, {v.shape[2]}], "
            f"got {tuple(initial_state.shape)}"
        )
    with torch.autocast(q.device.type, enabled=False):
        return _ChunkTADN.apply(q, k, v, log_alpha, beta, initial_state, plan, scale, output_final_state)


@torch.library.custom_op("hytrec::chunk_tadn", mutates_args=())
def _chunk_tadn_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_alpha: torch.Tensor,
    beta: torch.Tensor,
    offsets: torch.Tensor,
    initial_state: Optional[torch.Tensor],
    scale: float,
    chunk_size: int,
    min_chunk_size: Optional[int],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`chunk_tadn` (with the final states) as one op of an exported program (plans inside)."""
    o, final = _chunk_tadn(
        q, k, v, log_alpha, beta, offsets, initial_state, True, scale, chunk_size, min_chunk_size, None
    )
    assert final is not None
    return o, final


@_chunk_tadn_op.register_fake
def _chunk_tadn_fake(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_alpha: torch.Tensor,
    beta: torch.Tensor,
    offsets: torch.Tensor,
    *args: Any,
) -> Tuple[torch.Tensor, torch.Tensor]:
    T, H, K = q.shape
    final = q.new_empty(
        offsets.shape[0] - 1, H, K, v.shape[2], dtype=torch.promote_types(q.dtype, torch.float32)
    )
    return q.new_empty(T, H, v.shape[2]), final
