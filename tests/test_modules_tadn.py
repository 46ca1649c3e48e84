import math

import pytest
import torch
import torch.nn.functional as F

from torchrec_hytrec.modules import HyTRecConfig, RotaryEmbedding, SequenceContext, TADNLayer
from torchrec_hytrec.ops.jagged_attention import JaggedLayout
from torchrec_hytrec.ops.tadn import naive_recurrent_tadn
from torchrec_hytrec.ops.tadn.chunk import fitted_chunk_size

CONFIG = HyTRecConfig(embedding_dim=8, num_heads=2, gate_gap_dim=4)
YEAR = 365 * 86400


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_time_constants_log_spaced_from_an_hour_to_a_year() -> None:
    layer = TADNLayer(HyTRecConfig(num_heads=4))
    torch.testing.assert_close(
        layer.log_time_constant.exp(),
        torch.logspace(math.log10(3600), math.log10(YEAR), 4),
        rtol=1e-5,
        atol=0,
    )


def test_gates_match_hand_computation_on_three_events() -> None:
    torch.manual_seed(0)
    layer = TADNLayer(CONFIG)
    # Second gap: 30 s; third: 400 days, so tau of the hour head is exp(-9600) (log space only).
    timestamps = torch.tensor([1_000, 1_030, 1_030 + 400 * 86400])
    ctx = SequenceContext.from_jagged(torch.tensor([0, 3]), timestamps)
    e = torch.randn(3, 8)
    log_g, log_alpha, beta = layer.temporal_gates(e, ctx)

    gaps = [0.0, 30.0, 400.0 * 86400]
    weight = layer.gates.weight.tolist()
    bias = layer.gates.bias.tolist()
    phi_table = layer.gap_embedding.weight.tolist()
    time_constants = [math.exp(t) for t in layer.log_time_constant.tolist()]
    for i in range(3):
        bucket = min(int(2.0 * math.log1p(gaps[i])), CONFIG.num_gap_buckets - 1)
        features = e[i].tolist() + phi_table[bucket]
        for h in range(2):
            gate_logit = sum(w * f for w, f in zip(weight[h], features)) + bias[h]
            beta_logit = sum(w * f for w, f in zip(weight[2 + h], features)) + bias[2 + h]
            want_log_g = math.log(_sigmoid(gate_logit))
            assert math.isclose(log_g[i, h].item(), want_log_g, rel_tol=1e-5, abs_tol=1e-6)
            want_log_alpha = -gaps[i] / time_constants[h] + want_log_g
            assert math.isclose(log_alpha[i, h].item(), want_log_alpha, rel_tol=1e-5, abs_tol=1e-6)
            assert math.isclose(beta[i, h].item(), _sigmoid(beta_logit), rel_tol=1e-5, abs_tol=1e-6)
    assert log_alpha[2, 0].item() < -9000
    assert bool(torch.isfinite(layer(torch.randn(3, 8), ctx)).all())


def test_request_time_readout_decays_the_final_state() -> None:
    """DESIGN §3.7: a query at t* >= t_n reads exp(-(t* - t_n) / T_h) S_n^T q."""
    torch.manual_seed(1)
    layer = TADNLayer(CONFIG).eval()
    n = 6
    x = torch.randn(n, 8)
    offsets = torch.tensor([0, n])
    ctx = SequenceContext.from_jagged(offsets, torch.arange(n) * 600)
    readouts = []
    layer.head_norm.register_forward_pre_hook(lambda module, args: readouts.append(args[0]))
    elapsed = 2.5 * 3600.0
    ctx.elapsed = torch.full((n,), elapsed)
    layer(x, ctx)

    e = layer.norm(x)
    q, k, v = layer.qkv(e).unflatten(-1, (3, 2, 4)).unbind(-3)
    q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    _, log_alpha, beta = layer.temporal_gates(e, ctx)
    _, state = naive_recurrent_tadn(
        q=q, k=k, v=v, log_alpha=log_alpha, beta=beta, offsets=offsets, output_final_state=True
    )
    decay = torch.exp(-elapsed / layer.log_time_constant.exp())
    want = decay[:, None] * torch.einsum("hkv,hk->hv", state[0], q[-1]) / 2.0
    torch.testing.assert_close(readouts[0][-1], want, rtol=1e-4, atol=1e-6)
    # The hour head has forgotten more than the year head.
    assert decay[0] < decay[1]


def test_rotary_scores_depend_only_on_relative_position() -> None:
    rope = RotaryEmbedding(16)
    q, k = torch.randn(1, 2, 16), torch.randn(1, 2, 16)

    def score(i: int, j: int) -> torch.Tensor:
        return (rope(q, torch.tensor([i])) * rope(k, torch.tensor([j]))).sum(-1)

    torch.testing.assert_close(score(7, 3), score(9_007, 9_003), rtol=1e-3, atol=1e-4)
    assert not torch.allclose(score(7, 3), score(7, 4))


def test_rotary_rotates_each_channel_pair_by_its_angle() -> None:
    rope = RotaryEmbedding(8, base=100.0)
    x = torch.randn(5, 2, 3, 8)  # stacked [T, 2, H, D] queries and keys
    positions = torch.tensor([0, 1, 4, 9, 1_000])
    got = rope(x, positions)
    tol = dict(rtol=1e-4, atol=2e-4)  # fp32 angles of up to 1e3 rad
    for t, p in enumerate(positions.tolist()):
        for i in range(4):
            angle = p * 100.0 ** (-2 * i / 8)
            c, s = math.cos(angle), math.sin(angle)
            x1, x2 = x[t, ..., 2 * i], x[t, ..., 2 * i + 1]
            torch.testing.assert_close(got[t, ..., 2 * i], c * x1 - s * x2, **tol)
            torch.testing.assert_close(got[t, ..., 2 * i + 1], s * x1 + c * x2, **tol)


def test_chunk_size_shrinks_for_short_users_only() -> None:
    layer = TADNLayer(HyTRecConfig(embedding_dim=16, tadn_chunk_size=64))

    def chunk_size(*lengths: int) -> int:
        return fitted_chunk_size(JaggedLayout(torch.tensor([0, *lengths]).cumsum(0)), layer.chunk_size, 16)

    assert chunk_size(9, 12, 3) == 16
    assert chunk_size(20, 25) == 32
    assert chunk_size(10_000, *[100] * 99) == 64
    assert chunk_size(0) == 16


@pytest.mark.parametrize("time_decay, temporal_gate", [(False, True), (True, False), (False, False)])
def test_ablations_remove_exactly_their_time_inputs(time_decay: bool, temporal_gate: bool) -> None:
    config = HyTRecConfig(embedding_dim=32, tadn_time_decay=time_decay, tadn_temporal_gate=temporal_gate)
    torch.manual_seed(0)
    layer = TADNLayer(config).eval()
    assert (layer.log_time_constant is not None) == time_decay
    assert (layer.gap_embedding is not None) == temporal_gate
    offsets, x = torch.tensor([0, 5, 12]), torch.randn(12, 32)
    times = torch.cumsum(torch.randint(60, 86400, (12,)), 0)
    with torch.no_grad():
        y = layer(x, SequenceContext.from_jagged(offsets, times))
        # The same events at other times: only a layer with some time input changes.
        y_shifted = layer(x, SequenceContext.from_jagged(offsets, times * 7))
        # A request time after the last event: only the time decay fades the readout.
        ctx = SequenceContext.from_jagged(offsets, times)
        ctx.elapsed = torch.full((12,), 86400.0)
        y_later = layer(x, ctx)
    assert torch.equal(y, y_shifted) == (not time_decay and not temporal_gate)
    assert torch.equal(y, y_later) == (not time_decay)
