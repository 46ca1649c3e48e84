"""Step-by-step reference of the temporal-aware gated delta rule (the oracle).

    S_i = alpha_i (I - beta_i k_i k_i^T) S_{i-1} + beta_i k_i v_i^T,    o_i = scale * S_i^T q_i

evaluated one event at a time in fp32 (fp64 for fp64 inputs, so tests can use it as a
high-precision reference), separately for every user of a jagged batch.
It is slow on purpose: it is what every fast path is tested against.
"""

from typing import Optional, Tuple

import torch


def tadn_step(
    *,
    state: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_alpha: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One event of the recurrence for a batch of independent states (fp32, or fp64 for fp64 inputs).

    This is both the oracle's inner step and the streaming update of a served user.

    Args:
        state: ``[N, H, K, V]`` states before the event.
        q: ``[N, H, K]`` query of the event.
        k: ``[N, H, K]`` key of the event.
        v: ``[N, H, V]`` value of the event.
        log_alpha: ``[N, H]`` log decay of the event.
        beta: ``[N, H]`` write strength of the event.
        scale: readout scale.

    Returns:
        ``(o, new_state)`` with ``o`` ``[N, H, V]`` fp32 (fp64 for fp64 inputs).
    """
    if torch.is_autocast_enabled(q.device.type):
        # The state and the decays stay in fp32, whatever autocast would make of the products.
        with torch.autocast(q.device.type, enabled=False):
            return tadn_step(state=state, q=q, k=k, v=v, log_alpha=log_alpha, beta=beta, scale=scale)
    dtype = torch.promote_types(q.dtype, torch.float32)
    N, H, K, V = state.shape

    def rows(x: torch.Tensor, *shape: int) -> torch.Tensor:
        # Copied, then viewed: torch.export guards a reshape (or contiguous()) of a strided view on
        # N != 1, which would keep an exported step from serving a single user.
        x = x if x.dtype == dtype else x.to(dtype)
        return x.clone(memory_format=torch.contiguous_format).view(N * H, *shape)

    # Batched products over the N * H states: einsum and broadcasting matmuls cost more in dispatch
    # than the arithmetic on streaming's single events, and guard on sizes of 1 in torch.export.
    state = (state if state.dtype == dtype else state.to(dtype)).reshape(N * H, K, V)
    k = rows(k, 1, K)
    alpha = rows(log_alpha, 1, 1).exp()
    # alpha (I - beta k k^T) S + beta k v^T  =  alpha S + (beta k) (v - alpha k^T S)^T
    innovation = rows(v, 1, V) - alpha * torch.bmm(k, state)
    state = torch.baddbmm(alpha * state, (rows(beta, 1, 1) * k).mT, innovation)
    o = torch.bmm(rows(q, 1, K), state).mul_(scale)
    return o.view(N, H, V), state.view(N, H, K, V)


def naive_recurrent_tadn(
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
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Reference recurrence of TADN over a jagged batch.

    Args:
        q: queries ``[T, H, K]`` (``T`` = total events of the batch), L2-normalised per head.
        k: keys ``[T, H, K]``, L2-normalised per head.
        v: values ``[T, H, V]``.
        log_alpha: log of the fused decay ``[T, H]``, ``<= 0``.
        beta: write strength ``[T, H]`` in ``[0, 1]``.
        offsets: ``[B + 1]`` start of every user's events; user ``b`` owns rows
            ``offsets[b]:offsets[b + 1]``.
        initial_state: optional ``[B, H, K, V]`` state each user starts from (zeros if absent).
        output_final_state: also return every user's state after its last event.
        scale: readout scale, ``K ** -0.5`` by default.

    Returns:
        ``(o, final_state)``: ``o`` is ``[T, H, V]`` in ``q``'s dtype; ``final_state`` is
        ``[B, H, K, V]`` fp32 (fp64 for fp64 inputs), or ``None`` unless ``output_final_state``.
    """
    T, H, K = q.shape
    V = v.shape[-1]
    B = offsets.numel() - 1
    scale = K**-0.5 if scale is None else scale
    dtype = torch.promote_types(q.dtype, torch.float32)
    bounds = offsets.tolist()
    outputs = []
    finals = []
    for b in range(B):
        if initial_state is None:
            state = q.new_zeros(H, K, V, dtype=dtype)
        else:
            state = initial_state[b].to(dtype)
        state = state[None]
        for i in range(bounds[b], bounds[b + 1]):
            o_i, state = tadn_step(
                state=state,
                q=q[i : i + 1],
                k=k[i : i + 1],
                v=v[i : i + 1],
                log_alpha=log_alpha[i : i + 1],
                beta=beta[i : i + 1],
                scale=scale,
            )
            outputs.append(o_i[0])
        finals.append(state[0])
    o = torch.stack(outputs) if outputs else q.new_zeros(0, H, V, dtype=dtype)
    final_state = torch.stack(finals) if output_final_state else None
    return o.to(q.dtype), final_state
