"""The HSTU-style baseline: its jagged kernel against a dense per-user reference (values and every
gradient), the layer inside the encoder (serving rows, causality, streaming), and its parameter
parity with the softmax layer."""

import math
from typing import List, Tuple

import pytest
import torch
import torch.nn.functional as F
from test_encoder import D, K, _batch

from torchrec_hytrec.modules import HSTULayer, HyTRecConfig, HyTRecEncoder, SoftmaxAttentionLayer
from torchrec_hytrec.ops import hstu_attention
from torchrec_hytrec.ops.buckets import gap_buckets
from torchrec_hytrec.ops.hstu_attention import hstu_attention_at, jagged_hstu_attention
from torchrec_hytrec.ops.jagged_attention import JaggedLayout, jagged_causal_attention

pytestmark = pytest.mark.usefixtures("one_thread")

# Empty users, users of one event, users in one length group and users of several tiles together.
LENGTHS = [5, 0, 1, 130, 64, 1, 200, 3, 33]
HEADS, KEY_DIM, VALUE_DIM = 2, 8, 6
POSITION_BUCKETS, TIME_BUCKETS, BUCKET_SCALE = 40, 30, 2.0


def _inputs(lengths: List[int], seed: int = 0) -> Tuple[torch.Tensor, Tuple[torch.Tensor, ...], torch.Tensor]:
    """``(offsets, (q, k, v, position_bias, time_bias), timestamps)`` in float64, all leaves."""
    gen = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    offsets = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())

    def leaf(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_(True)

    tensors = (
        leaf(total, HEADS, KEY_DIM),
        leaf(total, HEADS, KEY_DIM),
        leaf(total, HEADS, VALUE_DIM),
        leaf(POSITION_BUCKETS, HEADS),
        leaf(TIME_BUCKETS, HEADS),
    )
    gaps = [torch.randint(0, 100_000, (n,), generator=gen) for n in lengths]
    timestamps = torch.cat([1_600_000_000 + torch.cumsum(g, 0) for g in gaps])
    return offsets, tensors, timestamps


def _dense_reference(q, k, v, position_bias, time_bias, offsets, timestamps) -> torch.Tensor:
    """Every user alone: the full score matrix, the biases looked up pair by pair, a causal mask."""
    outputs = []
    for b in range(offsets.numel() - 1):
        lo, hi = int(offsets[b]), int(offsets[b + 1])
        i, j = torch.arange(hi - lo)[:, None], torch.arange(hi - lo)[None, :]
        times = timestamps[lo:hi]
        scores = torch.einsum("ihd,jhd->hij", q[lo:hi], k[lo:hi]) / math.sqrt(q.shape[-1])
        scores = scores + position_bias[gap_buckets(i - j, POSITION_BUCKETS, BUCKET_SCALE)].permute(2, 0, 1)
        gaps = times[:, None] - times[None, :]
        scores = scores + time_bias[gap_buckets(gaps, TIME_BUCKETS, BUCKET_SCALE)].permute(2, 0, 1)
        weights = F.silu(scores) * (j <= i) / (i + 1)
        outputs.append(torch.einsum("hij,jhd->ihd", weights, v[lo:hi]))
    return torch.cat(outputs)


def _kernel(tensors, offsets, timestamps, layout=None) -> torch.Tensor:
    q, k, v, position_bias, time_bias = tensors
    return jagged_hstu_attention(
        q=q,
        k=k,
        v=v,
        offsets=offsets,
        timestamps=timestamps,
        position_bias=position_bias,
        time_bias=time_bias,
        bucket_scale=BUCKET_SCALE,
        layout=layout,
    )


def _assert_values_and_gradients_match(got: torch.Tensor, want: torch.Tensor, leaves) -> None:
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    grad = torch.randn_like(got)
    names = ("q", "k", "v", "position_bias", "time_bias")
    for name, g, w in zip(
        names, torch.autograd.grad(got, leaves, grad), torch.autograd.grad(want, leaves, grad)
    ):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12, msg=f"gradient of {name}")


@pytest.mark.parametrize(
    "tile_elements, min_block",
    [
        (hstu_attention._TILE_ELEMENTS, hstu_attention._MIN_BLOCK),  # one tile per length group
        (3_000, 8),  # blocks of 8 queries, one user per tile: causal skipping and user chunks
        (14_000, 5),  # blocks of 17 and 54 queries (dividing no length), two users per tile
    ],
)
def test_kernel_matches_dense_reference_values_and_gradients(
    tile_elements: int, min_block: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hstu_attention, "_TILE_ELEMENTS", tile_elements)
    monkeypatch.setattr(hstu_attention, "_MIN_BLOCK", min_block)
    offsets, tensors, timestamps = _inputs(LENGTHS)
    got = _kernel(tensors, offsets, timestamps)
    want = _dense_reference(*tensors, offsets, timestamps)
    _assert_values_and_gradients_match(got, want, tensors)


def test_kernel_at_rows_matches_dense_reference() -> None:
    offsets, tensors, timestamps = _inputs(LENGTHS, seed=1)
    q, k, v, position_bias, time_bias = tensors
    # First, middle and last events, a user of one event, repeated rows.
    rows = torch.tensor([0, 4, 5, 6, 100, 199, 6, 300, 400, 436])
    got = hstu_attention_at(
        q=q[rows],
        k=k,
        v=v,
        offsets=offsets,
        rows=rows,
        timestamps=timestamps,
        position_bias=position_bias,
        time_bias=time_bias,
        bucket_scale=BUCKET_SCALE,
    )
    want = _dense_reference(*tensors, offsets, timestamps)[rows]
    _assert_values_and_gradients_match(got, want, tensors)


def test_kernel_of_no_events_and_its_shared_plan() -> None:
    offsets, tensors, timestamps = _inputs([0, 0])
    assert _kernel(tensors, offsets, timestamps).shape == (0, HEADS, VALUE_DIM)
    # The softmax kernel and this one read one length-group plan of a shared layout.
    offsets, tensors, timestamps = _inputs([3, 9, 1])
    layout = JaggedLayout(offsets)
    q, k, v = (x.detach()[..., :6] for x in tensors[:3])
    jagged_causal_attention(q=q, k=k, v=v, offsets=offsets, layout=layout)
    _kernel(tensors, offsets, timestamps, layout=layout)
    assert list(layout._plans) == [("length_groups",)]


def test_kernel_computes_in_fp32_under_autocast() -> None:
    offsets, tensors, timestamps = _inputs([7, 40])
    tensors = tuple(x.detach().float() for x in tensors)
    want = _kernel(tensors, offsets, timestamps)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(_kernel(tensors, offsets, timestamps), want)
        low = _kernel(tuple(x.bfloat16() for x in tensors), offsets, timestamps)
    assert low.dtype == torch.bfloat16
    assert float((low.float() - want).abs().max() / want.abs().max()) < 2e-2


@pytest.mark.parametrize(
    "config",
    [
        HyTRecConfig(),
        HyTRecConfig(embedding_dim=128, num_heads=4, ffn_multiplier=4.0),
        HyTRecConfig(embedding_dim=64, num_heads=2, ffn_multiplier=1.0),
    ],
)
def test_parameter_count_matches_the_softmax_layer(config: HyTRecConfig) -> None:
    """Within 2% from d = 64 up; below, the bias tables (``2 * 40 * H``) weigh more (+3.4% at d = 32)."""

    def count(layer: torch.nn.Module) -> int:
        return sum(p.numel() for p in layer.parameters())

    hstu, softmax = count(HSTULayer(config)), count(SoftmaxAttentionLayer(config))
    assert abs(hstu - softmax) / softmax < 0.02, (hstu, softmax)


def _hstu_encoders() -> List[HyTRecEncoder]:
    """The preset, and HSTU layers inside a hybrid stack with the short branch and fusion."""
    torch.manual_seed(0)
    mixed = HyTRecConfig.hytrec(embedding_dim=D, short_window=K, long_pattern="THAH")
    return [HyTRecEncoder(HyTRecConfig.hstu_like(embedding_dim=D)).eval(), HyTRecEncoder(mixed).eval()]


@pytest.mark.parametrize("index", [0, 1], ids=["hstu_like", "THAH"])
def test_encoder_serving_rows_equal_forward_and_are_causal(index: int) -> None:
    encoder = _hstu_encoders()[index]
    lengths = [1, K - 1, K + 1, 70, 3]
    values, offsets, timestamps = _batch(lengths, seed=3)
    with torch.no_grad():
        full = encoder(values, offsets, timestamps)
        last = encoder.forward_last(values, offsets, timestamps)
        torch.testing.assert_close(last, full[offsets[1:] - 1], rtol=1e-4, atol=2e-5)
        # Later events of user 3 (after its 30th), values and times, change nothing before them.
        cut = int(offsets[3]) + 30
        later = slice(cut, int(offsets[4]))
        changed_values, changed_times = values.clone(), timestamps.clone()
        changed_values[later] = torch.randn(later.stop - cut, D)
        changed_times[later] += 86_400
        changed = encoder(changed_values, offsets, changed_times)
    torch.testing.assert_close(changed[:cut], full[:cut], rtol=0, atol=0)
    torch.testing.assert_close(changed[later.stop :], full[later.stop :], rtol=0, atol=0)
    assert not torch.allclose(changed[later], full[later])


@pytest.mark.parametrize("index", [0, 1], ids=["hstu_like", "THAH"])
def test_encoder_prefill_and_stream_equal_forward(index: int) -> None:
    encoder = _hstu_encoders()[index]
    history, new = [0, 1, K, 40], 3
    values, offsets, timestamps = _batch([n + new for n in history], seed=4)
    starts = offsets[:-1]
    rows = torch.cat([torch.arange(int(s), int(s) + n) for s, n in zip(starts, history)])
    with torch.no_grad():
        full = encoder(values, offsets, timestamps)
        state = encoder.prefill(
            values[rows], torch.tensor([0] + torch.tensor(history).cumsum(0).tolist()), timestamps[rows]
        )
        for i in range(new):
            step = starts + torch.tensor(history) + i
            out, state = encoder.stream_step(state, values[step], timestamps[step])
            torch.testing.assert_close(out, full[step], rtol=1e-4, atol=2e-5, msg=f"new event {i}")


def test_backward_reaches_every_hstu_parameter() -> None:
    torch.manual_seed(0)
    encoder = HyTRecEncoder(HyTRecConfig.hstu_like(embedding_dim=D, num_layers=2, dropout=0.1)).train()
    values, offsets, timestamps = _batch([K // 2, 40, 1], seed=6)
    encoder(values, offsets, timestamps).square().mean().backward()
    for name, param in encoder.named_parameters():
        assert param.grad is not None and bool(torch.isfinite(param.grad).all()), name
        assert param.grad.abs().sum() > 0, name


class _Forward(torch.nn.Module):
    def __init__(self, encoder: HyTRecEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, values: torch.Tensor, offsets: torch.Tensor, timestamps: torch.Tensor) -> torch.Tensor:
        return self.encoder(values, offsets, timestamps)


@pytest.mark.slow
def test_training_form_exports() -> None:
    """The jagged kernel traces as the ``hytrec::jagged_hstu_attention`` op (the serving form and
    the stream step: ``test_encoder_export.py``, ``test_streaming.py``)."""
    encoder = _hstu_encoders()[0]
    values, offsets, timestamps = _batch([3, 9], seed=1)
    users, events = torch.export.Dim("users", min=1), torch.export.Dim("events", min=1)
    with torch.no_grad():
        program = torch.export.export(
            _Forward(encoder),
            (values, offsets, timestamps),
            dynamic_shapes=({0: events}, {0: users + 1}, {0: events}),
            strict=False,
        )
        assert "hytrec.jagged_hstu_attention" in str(program.graph)
        values, offsets, timestamps = _batch([70, 1, 9, 33], seed=2)
        torch.testing.assert_close(
            program.module()(values, offsets, timestamps),
            encoder(values, offsets, timestamps),
            rtol=0,
            atol=1e-5,
        )
