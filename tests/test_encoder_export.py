"""The serving path exported with torch.export: one program for any batch size and history lengths,
equal to eager ``forward_last``; saved and loaded. (The exported stream step: test_streaming.py.)"""

from pathlib import Path

import pytest
import torch
from test_encoder import CONFIGS, K, _batch, _encoder

from torchrec_hytrec.modules.export import export_user_tower

# Each export traces the whole encoder: the slow tier.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

# One user of one event; users around the short window K, past the long window (12) and past the
# TADN chunk (32) together; many users of mixed lengths.
BATCHES = [[1], [K - 1, 1, K + 1, 40, 2 * 32 + 3], [70, 2, 100, 1, 9, 33, K, 5]]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_exported_user_tower_equals_forward_last_for_any_batch(name: str) -> None:
    encoder = _encoder(name)
    with_time = export_user_tower(encoder).module()
    without_time = export_user_tower(encoder, request_time=False).module()
    for seed, lengths in enumerate(BATCHES):
        values, offsets, timestamps = _batch(lengths, seed=seed)
        request_time = timestamps[offsets[1:] - 1] + torch.randint(0, 10 * 86400, (len(lengths),))
        with torch.no_grad():
            want = encoder.forward_last(values, offsets, timestamps, request_time=request_time)
            torch.testing.assert_close(
                with_time(values, offsets, timestamps, request_time), want, rtol=0, atol=1e-5
            )
            want = encoder.forward_last(values, offsets, timestamps)
            torch.testing.assert_close(without_time(values, offsets, timestamps), want, rtol=0, atol=1e-5)


def test_exported_user_tower_saves_and_loads(tmp_path: Path) -> None:
    encoder = _encoder("hytrec_adaptive")
    path = tmp_path / "tower.pt2"
    torch.export.save(export_user_tower(encoder), str(path))
    program = torch.export.load(str(path)).module()
    values, offsets, timestamps = _batch(BATCHES[2], seed=4)
    request_time = timestamps[offsets[1:] - 1] + 3_600
    with torch.no_grad():
        want = encoder.forward_last(values, offsets, timestamps, request_time=request_time)
    torch.testing.assert_close(program(values, offsets, timestamps, request_time), want, rtol=0, atol=1e-5)


class _Forward(torch.nn.Module):
    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, values: torch.Tensor, offsets: torch.Tensor, timestamps: torch.Tensor) -> torch.Tensor:
        return self.encoder(values, offsets, timestamps)


def test_training_form_exports_too() -> None:
    encoder = _encoder("hytrec_windowed")
    values, offsets, timestamps = _batch([3, 9], seed=1)
    users, events = torch.export.Dim("users", min=1), torch.export.Dim("events", min=1)
    with torch.no_grad():
        program = torch.export.export(
            _Forward(encoder),
            (values, offsets, timestamps),
            dynamic_shapes=({0: events}, {0: users + 1}, {0: events}),
            strict=False,
        ).module()
        values, offsets, timestamps = _batch(BATCHES[1], seed=2)
        torch.testing.assert_close(
            program(values, offsets, timestamps), encoder(values, offsets, timestamps), rtol=0, atol=1e-5
        )
