"""Streaming: prefill against replaying the stream, users of different lengths in one state, the
exported step against eager, compaction of full-causal caches."""

import shutil
import time
from typing import Dict, List, Tuple

import pytest
import torch
from test_encoder import CONFIGS, D, K, _batch, _encoder

from torchrec_hytrec.modules import GrowingKVCache, HyTRecStreamState, KVCache, streaming
from torchrec_hytrec.modules.export import compile_stream_step, export_stream_step

pytestmark = pytest.mark.usefixtures("one_thread")

# Users of a prefilled batch: none, one event, around the short window K, past the long window
# (12) and past the TADN chunk (32).
LENGTHS = [0, 1, K - 1, K, K + 1, 40, 70]
NEW_EVENTS = 4


def _histories_and_new_events(
    lengths: List[int], seed: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(values, offsets, timestamps, history, new)`` of users with ``lengths`` events then
    ``NEW_EVENTS`` more: ``history`` the rows of the histories, ``new[i]`` the rows of every
    user's ``i``-th new event."""
    values, offsets, timestamps = _batch([n + NEW_EVENTS for n in lengths], seed=seed)
    starts = offsets[:-1].tolist()
    history = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, lengths)])
    new = torch.stack([torch.arange(s + n, s + n + NEW_EVENTS) for s, n in zip(starts, lengths)], dim=1)
    return values, offsets, timestamps, history, new


def _offsets(lengths: List[int]) -> torch.Tensor:
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())


def _cache_events(cache, user: int, count: int) -> Dict[str, torch.Tensor]:
    """The last ``count`` events of ``user`` in a cache (the slots before are padding)."""
    if isinstance(cache, GrowingKVCache):
        block, tail = cache.block, cache.tail
        cache = KVCache(
            keys=torch.cat([block.keys, tail.keys], dim=2),
            values=torch.cat([block.values, tail.values], dim=2),
            timestamps=torch.cat([block.timestamps, tail.timestamps], dim=1),
        )
    slots = cache.keys.shape[2]
    count = min(count, slots)
    padding = slots - count
    assert not cache.keys[user, :, :padding].any(), "padding slots hold zeros"
    return {
        "keys": cache.keys[user, :, padding:],
        "values": cache.values[user, :, padding:],
        "timestamps": cache.timestamps[user, padding:],
    }


def _assert_user_states_equal(batched: HyTRecStreamState, user: int, alone: HyTRecStreamState) -> None:
    """User ``user`` of ``batched`` holds what ``alone`` (a one-user state) holds."""
    n = int(alone.num_events[0])
    assert int(batched.num_events[user]) == n
    assert int(batched.last_timestamps[user]) == int(alone.last_timestamps[0])
    for mine, theirs in zip(batched.long_states, alone.long_states):
        if isinstance(mine, torch.Tensor):
            torch.testing.assert_close(mine[user], theirs[0], rtol=1e-4, atol=1e-5)
            continue
        got, want = _cache_events(mine, user, n), _cache_events(theirs, 0, n)
        for field in ("keys", "values"):
            torch.testing.assert_close(got[field], want[field], rtol=1e-4, atol=1e-5)
        assert torch.equal(got["timestamps"], want["timestamps"])
    if alone.short_cache is not None:
        got, want = _cache_events(batched.short_cache, user, n), _cache_events(alone.short_cache, 0, n)
        torch.testing.assert_close(got["keys"], want["keys"], rtol=1e-4, atol=1e-5)
        assert torch.equal(got["timestamps"], want["timestamps"])
    recent = min(n, alone.recent_long.shape[1])
    slots = alone.recent_long.shape[1]
    torch.testing.assert_close(
        batched.recent_long[user, slots - recent :],
        alone.recent_long[0, slots - recent :],
        rtol=1e-4,
        atol=1e-5,
    )
    assert torch.equal(
        batched.recent_timestamps[user, slots - recent :], alone.recent_timestamps[0, slots - recent :]
    )


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_equals_replaying_the_stream_and_streams_on(name: str) -> None:
    encoder = _encoder(name)
    values, offsets, timestamps, history, new = _histories_and_new_events(LENGTHS, seed=3)
    with torch.no_grad():
        full = encoder(values, offsets, timestamps)
        state = encoder.prefill(values[history], _offsets(LENGTHS), timestamps[history])
        for user, n in enumerate(LENGTHS):
            alone = encoder.init_stream(1)
            rows = history[int(_offsets(LENGTHS)[user]) :][:n]
            for row in rows.tolist():
                _, alone = encoder.stream_step(alone, values[row : row + 1], timestamps[row : row + 1])
            _assert_user_states_equal(state, user, alone)
        # The users, of different lengths, take their next events together.
        for i in range(NEW_EVENTS):
            out, state = encoder.stream_step(state, values[new[i]], timestamps[new[i]])
            torch.testing.assert_close(out, full[new[i]], rtol=1e-4, atol=2e-5, msg=f"new event {i}")
    assert state.num_events.tolist() == [n + NEW_EVENTS for n in LENGTHS]


def test_prefill_is_one_pass_of_about_forward_last_cost() -> None:
    """At most 2x ``forward_last`` on the same batch (best of interleaved runs, so that a busy spell
    of the shared machine slows both alike)."""
    encoder = _encoder("hytrec")
    lengths = [2_000, 700, 50, 1_200, 9]
    values, offsets, timestamps = _batch(lengths, seed=6)
    times: Dict[str, List[float]] = {"prefill": [], "forward_last": []}
    calls = {
        "prefill": lambda: encoder.prefill(values, offsets, timestamps),
        "forward_last": lambda: encoder.forward_last(values, offsets, timestamps),
    }
    with torch.no_grad():
        for _ in range(4):
            for kind, call in calls.items():
                start = time.perf_counter()
                call()
                times[kind].append(time.perf_counter() - start)
    ratio = min(times["prefill"][1:]) / min(times["forward_last"][1:])
    assert ratio <= 2.0, (ratio, times)


def test_full_causal_tails_are_compacted() -> None:
    encoder = _encoder("sasrec_like")
    values, offsets, timestamps = _batch([600], seed=2)
    with torch.no_grad():
        state = encoder.prefill(values[:100], torch.tensor([0, 100]), timestamps[:100])
        for i in range(100, 600):
            out, state = encoder.stream_step(state, values[i : i + 1], timestamps[i : i + 1])
        full = encoder(values, offsets, timestamps)
    torch.testing.assert_close(out, full[-1:], rtol=1e-4, atol=2e-5)
    for cache in state.long_states:
        assert cache.tail.keys.shape[2] < streaming._TAIL_EVENTS
        assert cache.block.keys.shape[2] + cache.tail.keys.shape[2] == 600
    compact = streaming.compact_stream_state(state)
    assert all(c.tail.keys.shape[2] == 0 and c.block.keys.shape[2] == 600 for c in compact.long_states)
    with torch.no_grad():
        more, _ = encoder.stream_step(compact, values[-1:], timestamps[-1:] + 60)
        same, _ = encoder.stream_step(state, values[-1:], timestamps[-1:] + 60)
    torch.testing.assert_close(more, same, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.slow
def test_exported_step_serves_every_batch_size_and_cache_length(name: str) -> None:
    """One program, exported once, takes states of any batch size (one user included) and, for
    full-causal layers, any block and tail lengths; it equals eager step after step."""
    encoder = _encoder(name)
    program = export_stream_step(encoder).module()
    for lengths in ([1], [0, 30, 7], [K + 1, 3, 70, 12, 1]):
        values, offsets, timestamps, history, new = _histories_and_new_events(lengths, seed=len(lengths))
        with torch.no_grad():
            state = encoder.prefill(values[history], _offsets(lengths), timestamps[history])
            exported = state
            for i in range(NEW_EVENTS):
                want, state = encoder.stream_step(state, values[new[i]], timestamps[new[i]])
                got, exported = program(exported, values[new[i]], timestamps[new[i]])
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
                if i == 1:  # the driver of a program compacts now and then
                    exported = streaming.compact_stream_state(exported)
        assert exported.num_events.tolist() == state.num_events.tolist()


@pytest.mark.slow
def test_exported_step_saves_and_loads(tmp_path) -> None:
    encoder = _encoder("hytrec")
    path = tmp_path / "step.pt2"
    torch.export.save(export_stream_step(encoder), str(path))
    program = torch.export.load(str(path)).module()
    values, offsets, timestamps, history, new = _histories_and_new_events([5, 20], seed=1)
    with torch.no_grad():
        state = encoder.prefill(values[history], _offsets([5, 20]), timestamps[history])
        want, _ = encoder.stream_step(state, values[new[0]], timestamps[new[0]])
        got, loaded_state = program(state, values[new[0]], timestamps[new[0]])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert isinstance(loaded_state, HyTRecStreamState)


def test_prefill_of_no_events_is_the_empty_state() -> None:
    encoder = _encoder("hytrec")
    state = encoder.prefill(
        torch.zeros(0, D), torch.zeros(3, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    )
    empty = encoder.init_stream(2)
    assert [x.shape for x in torch.utils._pytree.tree_leaves(state)] == [
        x.shape for x in torch.utils._pytree.tree_leaves(empty)
    ]


def test_prefill_checks_its_inputs() -> None:
    encoder = _encoder("hytrec")
    values, offsets, timestamps = _batch([5, 6], seed=7)
    timestamps[8] = timestamps[7] - 1
    with pytest.raises(ValueError, match=r"user 1, event 3 \(row 8\)"):
        encoder.prefill(values, offsets, timestamps)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="AOTInductor needs a C++ compiler")
def test_compiled_step_equals_eager(tmp_path) -> None:
    encoder = _encoder("hytrec")
    step = compile_stream_step(encoder, str(tmp_path / "step.pt2"))
    values, offsets, timestamps, history, new = _histories_and_new_events([1, 40, K], seed=5)
    with torch.no_grad():
        state = encoder.prefill(values[history], _offsets([1, 40, K]), timestamps[history])
        compiled = state
        for i in range(NEW_EVENTS):
            want, state = encoder.stream_step(state, values[new[i]], timestamps[new[i]])
            got, compiled = step(compiled, values[new[i]], timestamps[new[i]])
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
