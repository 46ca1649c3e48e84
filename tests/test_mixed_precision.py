"""The encoder, its kernels and the models under torch.autocast (bf16 on CPU; bf16 and fp16 on CUDA).

Tolerance: an autocast output ``a`` of a reference ``b`` (fp32, no autocast) passes when
``max|a - b| / max|b| < 2e-2``: bf16 keeps 8 bits of mantissa (a relative step of 2^-8 = 4e-3 per
rounding), and the encoder's outputs pass through a few roundings in a row.
"""

from typing import List

import pytest
import torch
from helpers import NUM_ITEMS, SIDE, make_batch
from test_encoder import CONFIGS, _batch, _encoder
from test_models_ranking import USER_BUCKETS, make_ranker
from test_models_retrieval import make_retrieval

from torchrec_hytrec.data.ranking import ranking_batch_from_sequences
from torchrec_hytrec.ops.tadn import chunk_tadn, tadn_step

pytestmark = pytest.mark.usefixtures("one_thread")

TOLERANCE = 2e-2
LENGTHS = [1, 9, 40, 130]
DEVICES = [("cpu", torch.bfloat16)]
if torch.cuda.is_available():
    DEVICES += [("cuda", torch.bfloat16), ("cuda", torch.float16)]


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().float(), want.detach().float()
    assert bool(torch.isfinite(got).all()), "non-finite values"
    return float((got - want).abs().max() / want.abs().max())


@pytest.mark.parametrize("device, dtype", DEVICES)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_encoder_under_autocast_is_within_low_precision_tolerance(
    name: str, device: str, dtype: torch.dtype
) -> None:
    encoder = _encoder(name).to(device)
    values, offsets, timestamps = (x.to(device) for x in _batch(LENGTHS, seed=1))
    request_time = timestamps[offsets[1:] - 1] + 3_600
    with torch.no_grad():
        want = (
            encoder(values, offsets, timestamps),
            encoder.forward_last(values, offsets, timestamps, request_time),
        )
        with torch.autocast(device, dtype=dtype):
            got = (
                encoder(values, offsets, timestamps),
                encoder.forward_last(values, offsets, timestamps, request_time),
            )
    errors = [_relative_error(g, w) for g, w in zip(got, want)]
    assert max(errors) < TOLERANCE, errors


@pytest.mark.parametrize("device, dtype", DEVICES)
def test_gradients_under_autocast_flow_and_are_finite(device: str, dtype: torch.dtype) -> None:
    encoder = _encoder("hytrec_windowed").to(device).train()
    values, offsets, timestamps = (x.to(device) for x in _batch(LENGTHS, seed=2))
    values.requires_grad_(True)
    with torch.autocast(device, dtype=dtype):
        loss = encoder(values, offsets, timestamps).float().square().mean()
    loss.backward()
    for name, param in encoder.named_parameters():
        assert param.grad is not None and bool(torch.isfinite(param.grad).all()), name
        assert float(param.grad.abs().sum()) > 0, name
    assert bool(torch.isfinite(values.grad).all())


def test_tadn_kernels_keep_fp32_under_autocast() -> None:
    """Autocast changes nothing inside the kernels: fp32 inputs give the fp32 results exactly,
    bf16 inputs (what autocast's projections make) come back in bf16 with an fp32 state."""
    gen = torch.Generator().manual_seed(0)
    T, H, D = 150, 2, 16
    q, k = (torch.nn.functional.normalize(torch.randn(T, H, D, generator=gen), dim=-1) for _ in range(2))
    inputs = dict(
        q=q,
        k=k,
        v=torch.randn(T, H, D, generator=gen),
        log_alpha=-torch.rand(T, H, generator=gen),
        beta=torch.rand(T, H, generator=gen),
        offsets=torch.tensor([0, 50, 150]),
    )
    leaves = {n: x.clone().requires_grad_(x.is_floating_point()) for n, x in inputs.items()}
    want, want_state = chunk_tadn(**leaves, output_final_state=True)
    want_grads = torch.autograd.grad(want.sum() + want_state.sum(), [leaves[n] for n in ("q", "k", "v")])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, state = chunk_tadn(**leaves, output_final_state=True)
        grads = torch.autograd.grad(got.sum() + state.sum(), [leaves[n] for n in ("q", "k", "v")])
        low, low_state = chunk_tadn(
            **{n: x.bfloat16() if x.is_floating_point() else x for n, x in inputs.items()},
            output_final_state=True,
        )
        step_out, step_state = tadn_step(
            state=want_state,
            q=q[[49, 149]],
            k=k[[49, 149]],
            v=inputs["v"][[49, 149]],
            log_alpha=inputs["log_alpha"][[49, 149]],
            beta=inputs["beta"][[49, 149]],
            scale=0.25,
        )
    assert torch.equal(got, want) and torch.equal(state, want_state)
    assert all(torch.equal(g, w) for g, w in zip(grads, want_grads))
    assert low.dtype == torch.bfloat16 and low_state.dtype == torch.float32
    assert _relative_error(low, want) < TOLERANCE and _relative_error(low_state, want_state) < TOLERANCE
    assert step_out.dtype == step_state.dtype == torch.float32


def _train(model: torch.nn.Module, batches: List[object], steps: int) -> List[float]:
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    losses = []
    for step in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = model(batches[step % len(batches)])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    return losses


def test_retrieval_trains_under_autocast() -> None:
    model = make_retrieval("full")
    batches = [make_batch([10] * 8, seed=100 + s) for s in range(4)]
    losses = _train(model, batches, steps=40)
    assert sum(losses[-4:]) < 0.7 * sum(losses[:4]), losses
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        _, outputs = model(make_batch([6, 3, 9], seed=7, evaluation=True))
    assert bool(torch.isfinite(outputs.query).all())


def test_ranker_trains_under_autocast() -> None:
    model = make_ranker()
    generator = torch.Generator().manual_seed(0)
    batches = [
        ranking_batch_from_sequences(
            make_batch([8, 5, 12, 6], seed=s, side_features=SIDE),
            num_items=NUM_ITEMS,
            num_negatives=3,
            user_buckets=USER_BUCKETS,
            generator=generator,
        )
        for s in range(4)
    ]
    losses = _train(model, batches, steps=32)
    assert sum(losses[-4:]) < 0.7 * sum(losses[:4]), losses
