import pytest
import torch

from torchrec_hytrec.modules import HyTRecConfig, HyTRecEncoder, HyTRecStreamState


class _StreamStep(torch.nn.Module):
    def __init__(self, encoder: HyTRecEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, state: HyTRecStreamState, values: torch.Tensor, timestamps: torch.Tensor):
        return self.encoder.stream_step(state, values, timestamps)


@pytest.mark.parametrize("seconds", [None, 600.0])
def test_exported_stream_step_serves_every_later_step(seconds) -> None:
    """Once every window is full the state's shapes stop changing, so one exported program
    takes all later events (full-causal layers grow their cache and would need a dynamic dim)."""
    torch.manual_seed(0)
    config = HyTRecConfig.hytrec(
        embedding_dim=32, short_window=8, short_window_seconds=seconds, long_attention_window=16
    )
    encoder = HyTRecEncoder(config).eval()
    users, warmup, steps = 3, 20, 4
    values = torch.randn(warmup + steps, users, 32)
    timestamps = 1_000 + torch.cumsum(torch.randint(0, 400, (warmup + steps, users)), 0)
    state = encoder.init_stream(users)
    with torch.no_grad():
        for i in range(warmup):
            _, state = encoder.stream_step(state, values[i], timestamps[i])
        program = torch.export.export(
            _StreamStep(encoder), (state, values[warmup], timestamps[warmup]), strict=False
        )
        exported_state = state
        for i in range(warmup, warmup + steps):
            want, state = encoder.stream_step(state, values[i], timestamps[i])
            got, exported_state = program.module()(exported_state, values[i], timestamps[i])
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert exported_state.num_events.tolist() == [warmup + steps] * users
