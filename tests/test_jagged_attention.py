import math
from typing import List, Optional

import pytest
import torch

from torchrec_hytrec.ops import jagged_attention
from torchrec_hytrec.ops.jagged_attention import (
    JaggedLayout,
    attention_key_rows,
    causal_attention_at,
    causal_window_starts,
    jagged_causal_attention,
    jagged_positions,
)

LENGTHS = [5, 0, 130, 64, 1, 200]


def _batch(lengths: List[int], seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    total = sum(lengths)
    qkv = [torch.randn(total, 2, 8, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    timestamps = torch.cat(
        [1_000 + torch.cumsum(torch.randint(0, 100, (n,), generator=gen), 0) for n in lengths]
    )
    return offsets, qkv, timestamps


def _dense_reference(q, k, v, offsets, window: Optional[int], starts: Optional[torch.Tensor]) -> torch.Tensor:
    """Every user alone, full score matrix with an explicit mask."""
    outputs = []
    for b in range(offsets.numel() - 1):
        lo, hi = int(offsets[b]), int(offsets[b + 1])
        n = hi - lo
        scores = torch.einsum("ihd,jhd->hij", q[lo:hi], k[lo:hi]) / math.sqrt(q.shape[-1])
        i = torch.arange(n)[:, None]
        j = torch.arange(n)[None, :]
        allowed = j <= i
        if window is not None:
            allowed &= j > i - window
        if starts is not None:
            allowed &= j >= starts[lo:hi, None]
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        outputs.append(torch.einsum("hij,jhd->ihd", probs, v[lo:hi]))
    return torch.cat(outputs)


@pytest.mark.parametrize(
    "window,block_size,seconds",
    [
        (None, 64, None),
        (64, 64, None),
        (10, 4, None),
        (100, 64, None),
        (7, 64, None),
        (300, 32, None),
        (64, 16, 150.0),
    ],
)
@pytest.mark.parametrize("groups", [False, True])
def test_matches_dense_reference_values_and_gradients(
    window, block_size, seconds, groups, monkeypatch
) -> None:
    # Both kernels of a sliding window: the block layout and the band-masked length groups.
    monkeypatch.setattr(jagged_attention, "_groups_cost_less", lambda *args: groups)
    offsets, (q, k, v), timestamps = _batch(LENGTHS)
    starts = None
    if seconds is not None:
        starts = causal_window_starts(
            offsets=offsets, timestamps=timestamps, window=window, window_seconds=seconds
        )
    out = jagged_causal_attention(
        q=q, k=k, v=v, offsets=offsets, window=window, window_starts=starts, block_size=block_size
    )
    ref = _dense_reference(q, k, v, offsets, window, starts)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)


@pytest.mark.parametrize("window,seconds", [(None, None), (64, None), (7, None), (64, 150.0)])
def test_attention_at_chosen_rows_matches_dense_reference(window, seconds) -> None:
    offsets, (q, k, v), timestamps = _batch(LENGTHS, seed=5)
    starts = None
    if seconds is not None:
        starts = causal_window_starts(
            offsets=offsets, timestamps=timestamps, window=window, window_seconds=seconds
        )
    nonempty = offsets[1:] > offsets[:-1]
    rows = torch.cat([offsets[1:][nonempty] - 1, torch.tensor([0, 3, 140, 200])])
    out = causal_attention_at(
        q=q[rows],
        k=k,
        v=v,
        offsets=offsets,
        rows=rows,
        window=window,
        window_starts=starts[rows] if starts is not None else None,
    )
    ref = _dense_reference(q, k, v, offsets, window, starts)[rows]
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)


@pytest.mark.parametrize("window,seconds", [(7, None), (64, 150.0)])
def test_attention_at_rows_reads_only_its_key_rows(window, seconds) -> None:
    offsets, (q, k, v), timestamps = _batch(LENGTHS, seed=6)
    starts = None
    if seconds is not None:
        starts = causal_window_starts(
            offsets=offsets, timestamps=timestamps, window=window, window_seconds=seconds
        )
    rows = torch.tensor([4, 5, 100, 134, 198, 199, 399])
    row_starts = starts[rows] if starts is not None else None
    keys = attention_key_rows(offsets=offsets, rows=rows, window=window, window_starts=row_starts)
    # Every key a window may see, and nothing else: brute force over all rows.
    ref = _dense_reference(q, k, v, offsets, window, starts)
    positions = jagged_positions(offsets)
    user = torch.searchsorted(offsets, torch.arange(offsets[-1]), right=True) - 1
    want = set()
    for i, r in enumerate(rows.tolist()):
        first = max(int(positions[r]) - window + 1, int(row_starts[i]) if starts is not None else 0)
        want |= {j for j in range(r + 1) if user[j] == user[r] and positions[j] >= first}
    assert keys.tolist() == sorted(want)
    # Keys and values held only at those rows give the same outputs.
    out = causal_attention_at(
        q=q[rows],
        k=k[keys],
        v=v[keys],
        offsets=offsets,
        rows=rows,
        window=window,
        window_starts=row_starts,
        key_rows=keys,
    )
    torch.testing.assert_close(out, ref[rows], rtol=0, atol=1e-12)


def test_window_starts_match_brute_force() -> None:
    offsets, _, timestamps = _batch(LENGTHS, seed=3)
    positions = jagged_positions(offsets)
    for window, seconds in [(8, None), (8, 120.0), (50, 0.0), (1000, 300.5)]:
        starts = causal_window_starts(
            offsets=offsets, timestamps=timestamps, window=window, window_seconds=seconds
        )
        for b in range(len(LENGTHS)):
            lo, hi = int(offsets[b]), int(offsets[b + 1])
            for i in range(lo, hi):
                want = next(
                    j - lo
                    for j in range(lo, i + 1)
                    if j > i - window and (seconds is None or timestamps[j] >= timestamps[i] - seconds)
                )
                assert int(starts[i]) == want, (window, seconds, b, i)
        assert bool((starts <= positions).all())


def test_empty_batch_and_bad_arguments() -> None:
    empty = torch.zeros(0, 2, 8)
    offsets = torch.tensor([0, 0])
    assert jagged_causal_attention(q=empty, k=empty, v=empty, offsets=offsets, window=4).shape == (0, 2, 8)
    assert jagged_causal_attention(q=empty, k=empty, v=empty, offsets=offsets).shape == (0, 2, 8)
    q = torch.randn(3, 2, 8)
    with pytest.raises(ValueError, match="window_starts needs a window"):
        jagged_causal_attention(
            q=q, k=q, v=q, offsets=torch.tensor([0, 3]), window_starts=torch.zeros(3, dtype=torch.long)
        )
    with pytest.raises(ValueError, match="window must be >= 1"):
        jagged_causal_attention(q=q, k=q, v=q, offsets=torch.tensor([0, 3]), window=0)


@pytest.mark.parametrize("window", [None, 5, 48])
def test_many_users_one_call_per_length_group(window, monkeypatch) -> None:
    lengths = torch.randint(0, 90, (40,), generator=torch.Generator().manual_seed(7)).tolist() + [1, 2, 3, 4]
    offsets, (q, k, v), _ = _batch(lengths, seed=11)
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    out = jagged_causal_attention(q=q, k=k, v=v, offsets=offsets, window=window, block_size=16)
    # Length groups: one call per ceil(log2(n)) group (n < 90: at most 8); block layout: one call.
    layout = JaggedLayout(offsets)
    groups = window is None or jagged_attention._groups_cost_less(layout, window, min(16, window))
    assert 1 <= len(calls) <= (8 if groups else 1)
    ref = _dense_reference(q, k, v, offsets, window, None)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    grad = torch.randn_like(out)
    for g, w in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)


@pytest.mark.parametrize("window,block_size", [(None, 64), (10, 4)])
def test_a_shared_layout_plans_once_and_changes_nothing(window, block_size, monkeypatch) -> None:
    offsets, (q, k, v), timestamps = _batch(LENGTHS, seed=8)
    alone = jagged_causal_attention(q=q, k=k, v=v, offsets=offsets, window=window, block_size=block_size)
    plans = []
    build = jagged_attention._plan_length_groups if window is None else jagged_attention._plan_window_slots

    def counting(*args):
        plans.append(build(*args))
        return plans[-1]

    monkeypatch.setattr(jagged_attention, build.__name__, counting)
    layout = JaggedLayout(offsets)
    for _ in range(2):
        shared = jagged_causal_attention(
            q=q, k=k, v=v, offsets=offsets, window=window, block_size=block_size, layout=layout
        )
        torch.testing.assert_close(shared, alone, rtol=0, atol=0)
    assert len(plans) == 1
    starts = causal_window_starts(offsets=offsets, timestamps=timestamps, window=8, window_seconds=120.0)
    shared_starts = causal_window_starts(
        offsets=offsets, timestamps=timestamps, window=8, window_seconds=120.0, layout=layout
    )
    assert torch.equal(shared_starts, starts)
    assert torch.equal(layout.positions, jagged_positions(offsets))


def test_short_histories_take_the_length_groups_and_long_ones_the_block_layout() -> None:
    # Beauty-like: many users of about 9 events under a window of 8, where the block layout's
    # per-slot work dominates; two users of 2048 events under a window of 64, where the groups'
    # n^2 scores would be 16x the layout's.
    gen = torch.Generator().manual_seed(0)
    short = (torch.rand(256, generator=gen).log() / math.log(8 / 9)).ceil().clamp(2, 50).long()
    layout = JaggedLayout(torch.cat([torch.zeros(1, dtype=torch.long), short.cumsum(0)]))
    assert layout.max_len > 8 and jagged_attention._groups_cost_less(layout, 8, 8)
    long = JaggedLayout(torch.tensor([0, 2048, 4096]))
    assert not jagged_attention._groups_cost_less(long, 64, 64)
    assert jagged_attention._groups_cost_less(long, 2048, 64)  # no user longer than the window


def test_layout_counts_and_checks() -> None:
    offsets = torch.tensor([0, 5, 5, 12])
    layout = JaggedLayout(offsets)
    assert (layout.num_users, layout.num_events, layout.max_len) == (3, 12, 7)
    assert layout.host_lengths.tolist() == [5, 0, 7] and layout.users.tolist() == [0] * 5 + [2] * 7
    assert JaggedLayout(offsets, max_len=100).max_len == 100
    with pytest.raises(ValueError, match="max_len is 6, but user 2 has 7 events"):
        JaggedLayout(offsets, max_len=6).num_events
    with pytest.raises(ValueError, match="start at 0"):
        JaggedLayout(torch.tensor([1, 3])).num_events
    with pytest.raises(ValueError, match="user 1 has length -2"):
        JaggedLayout(torch.tensor([0, 4, 2])).num_events
    q = torch.randn(12, 2, 8)
    with pytest.raises(ValueError, match="layout must be the JaggedLayout of the offsets"):
        jagged_causal_attention(q=q, k=q, v=q, offsets=offsets.clone(), layout=layout)
