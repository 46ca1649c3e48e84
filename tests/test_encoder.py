import dataclasses
import math
from typing import List, Tuple

import pytest
import torch
from torch.utils._pytree import tree_leaves

from torchrec_hytrec.modules import (
    HSTULayer,
    HyTRecConfig,
    HyTRecEncoder,
    SequenceContext,
    SoftmaxAttentionLayer,
    TADNLayer,
    gap_buckets,
)

pytestmark = pytest.mark.usefixtures("one_thread")

D = 32
K = 8
CONFIGS = {
    "hytrec": HyTRecConfig.hytrec(embedding_dim=D, short_window=K),
    "hytrec_windowed": HyTRecConfig.hytrec(embedding_dim=D, short_window=K, long_attention_window=12),
    "hytrec_adaptive": HyTRecConfig.hytrec(
        embedding_dim=D, short_window=K, short_window_seconds=3 * 3600.0, long_pattern="TATA"
    ),
    "sasrec_like": HyTRecConfig.sasrec_like(embedding_dim=D),
    "windowed_softmax": HyTRecConfig.windowed_softmax(embedding_dim=D, window=12),
    "hstu_like": HyTRecConfig.hstu_like(embedding_dim=D),
    "pure_linear": HyTRecConfig.pure_linear(embedding_dim=D),
}


def _encoder(name: str, seed: int = 0) -> HyTRecEncoder:
    torch.manual_seed(seed)
    return HyTRecEncoder(CONFIGS[name]).eval()


def _timestamps(n: int, gen: torch.Generator) -> torch.Tensor:
    """Sessions of seconds-to-minutes gaps separated by gaps of hours to a year."""
    short = torch.randint(1, 600, (n,), generator=gen)
    long = torch.randint(3600, 365 * 86400, (n,), generator=gen)
    gaps = torch.where(torch.rand(n, generator=gen) < 0.15, long, short)
    gaps[torch.rand(n, generator=gen) < 0.05] = 0  # simultaneous events
    return 1_600_000_000 + torch.cumsum(gaps, 0)


def _batch(lengths: List[int], seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    values = torch.randn(sum(lengths), D, generator=gen)
    timestamps = torch.cat([_timestamps(n, gen) for n in lengths])
    return values, offsets, timestamps


def _mhsa_last(layer: SoftmaxAttentionLayer, x: torch.Tensor) -> torch.Tensor:
    """Plain softmax attention block of the last row of ``x`` over all rows, positions from 0."""
    heads, head_dim = layer.num_heads, layer.head_dim
    q, k, v = layer.qkv(layer.norm(x)).unflatten(-1, (3, heads, head_dim)).unbind(-3)
    positions = torch.arange(x.shape[0])
    q, k = layer.rope(q, positions), layer.rope(k, positions)
    probs = (torch.einsum("hd,jhd->hj", q[-1], k) / math.sqrt(head_dim)).softmax(-1)
    o = torch.einsum("hj,jhd->hd", probs, v)
    return layer.ffn(x[-1] + layer.out(o.flatten()))


def _paper_split(encoder: HyTRecEncoder, values: torch.Tensor, timestamps: torch.Tensor) -> torch.Tensor:
    """The paper's form for one user: MHSA over the short window, hybrid stack over the rest."""
    config = encoder.config
    n = values.shape[0]
    ctx = SequenceContext.from_jagged(torch.tensor([0, n]), timestamps)
    x = values + encoder.gap_embedding(gap_buckets(ctx.gaps, config.num_gap_buckets, config.gap_bucket_scale))
    short_len = min(n, config.short_window)
    if config.short_window_seconds is not None:
        recent = int((timestamps >= timestamps[-1] - config.short_window_seconds).sum())
        short_len = min(short_len, recent)
    short = _mhsa_last(encoder.short_layer, x[n - short_len :])
    long_len = n - short_len
    if long_len == 0:
        long = encoder.empty_long
        bucket = torch.tensor(config.num_gap_buckets)
    else:
        long = x[:long_len]
        long_ctx = SequenceContext.from_jagged(torch.tensor([0, long_len]), timestamps[:long_len])
        for layer in encoder.long_layers:
            long = layer(long, long_ctx)
        long = long[-1]
        gap = (timestamps[-1] - timestamps[long_len - 1]).float()
        bucket = gap_buckets(gap, config.num_gap_buckets, config.gap_bucket_scale)
    fusion = encoder.fusion
    gamma = torch.sigmoid(fusion.gate(torch.cat([short, long, fusion.gap_embedding(bucket)])))
    return encoder.final_norm(gamma * short + (1 - gamma) * long)


@pytest.mark.parametrize("name", ["hytrec", "hytrec_windowed", "hytrec_adaptive"])
def test_last_position_equals_the_papers_split(name: str) -> None:
    encoder = _encoder(name)
    lengths = [K - 3, K, K + 1, 3 * K + 5, 60]
    values, offsets, timestamps = _batch(lengths, seed=1)
    with torch.no_grad():
        last = encoder.forward_last(values, offsets, timestamps)
        for b, n in enumerate(lengths):
            lo, hi = int(offsets[b]), int(offsets[b + 1])
            want = _paper_split(encoder, values[lo:hi], timestamps[lo:hi])
            torch.testing.assert_close(last[b], want, rtol=1e-4, atol=1e-5, msg=f"user {b} with n = {n}")


def test_adaptive_window_is_narrower_than_k_after_a_long_gap() -> None:
    encoder = _encoder("hytrec_adaptive")
    values, _, _ = _batch([2 * K])
    # Last 3 events within 3 hours, the rest days before: the short window holds 3 events.
    timestamps = torch.cat([torch.arange(2 * K - 3) * 86400, (2 * K) * 86400 + torch.arange(3) * 60])
    with torch.no_grad():
        got = encoder.forward_last(values, torch.tensor([0, 2 * K]), timestamps)[0]
        torch.testing.assert_close(got, _paper_split(encoder, values, timestamps), rtol=1e-4, atol=1e-5)
        fixed = HyTRecEncoder(dataclasses.replace(encoder.config, short_window_seconds=None)).eval()
        fixed.load_state_dict(encoder.state_dict())
        assert not torch.allclose(fixed.forward_last(values, torch.tensor([0, 2 * K]), timestamps)[0], got)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_jagged_batch_equals_each_user_alone(name: str) -> None:
    encoder = _encoder(name)
    lengths = [1, 0, 70, K, 23, 150]
    values, offsets, timestamps = _batch(lengths, seed=2)
    with torch.no_grad():
        batched = encoder(values, offsets, timestamps)
        for b, n in enumerate(lengths):
            lo, hi = int(offsets[b]), int(offsets[b + 1])
            alone = encoder(values[lo:hi], torch.tensor([0, n]), timestamps[lo:hi])
            torch.testing.assert_close(batched[lo:hi], alone, rtol=1e-4, atol=2e-5, msg=f"user {b}")
        nonempty = [b for b, n in enumerate(lengths) if n]
        keep = torch.tensor([0] + torch.tensor([lengths[b] for b in nonempty]).cumsum(0).tolist())
        last = encoder.forward_last(values, keep, timestamps)
        torch.testing.assert_close(last, batched[offsets[1:][nonempty] - 1], rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("pattern", ["TAA", "ATA", "A", "AAAA"])
def test_serving_reads_windowed_layers_only_inside_their_windows(pattern: str) -> None:
    # forward_last computes the layers before a run of windowed softmax layers only at the rows
    # those windows read (in "AAAA", until they are over a quarter of the batch: the first layer
    # then computes every row); the result must still be the full forward's last rows.
    config = HyTRecConfig.hytrec(
        embedding_dim=D,
        short_window=K,
        long_pattern=pattern,
        long_attention_window=5,
        short_window_seconds=7200.0,
    )
    torch.manual_seed(3)
    encoder = HyTRecEncoder(config).eval()
    lengths = [1, 4, 5, 6, 40, 97]
    values, offsets, timestamps = _batch(lengths, seed=5)
    with torch.no_grad():
        full = encoder(values, offsets, timestamps)
        last = encoder.forward_last(values, offsets, timestamps)
    torch.testing.assert_close(last, full[offsets[1:] - 1], rtol=1e-4, atol=2e-5)


def _assert_stream_equals_forward(encoder: HyTRecEncoder, n: int, users: int = 2) -> None:
    values, offsets, timestamps = _batch([n] * users, seed=4)
    with torch.no_grad():
        full = encoder(values, offsets, timestamps).view(users, n, D)
        state = encoder.init_stream(users)
        rows = offsets[:-1]
        worst = 0.0
        for i in range(n):
            out, state = encoder.stream_step(state, values[rows + i], timestamps[rows + i])
            worst = max(worst, (out - full[:, i]).abs().max().item())
    assert worst <= 1e-4, worst


@pytest.mark.slow
def test_streaming_equals_full_forward_2k_events() -> None:
    _assert_stream_equals_forward(_encoder("hytrec"), n=2_000)


@pytest.mark.parametrize(
    "name",
    ["hytrec_windowed", "hytrec_adaptive", "sasrec_like", "windowed_softmax", "hstu_like", "pure_linear"],
)
def test_streaming_equals_full_forward(name: str) -> None:
    _assert_stream_equals_forward(_encoder(name), n=150)


def test_streaming_state_is_bounded_by_the_windows() -> None:
    encoder = _encoder("hytrec_windowed")
    values, offsets, timestamps = _batch([40])
    state = encoder.init_stream(1)
    shapes = [x.shape for x in tree_leaves(state)]
    with torch.no_grad():
        for i in range(40):
            _, state = encoder.stream_step(state, values[i : i + 1], timestamps[i : i + 1])
            # Windowed caches have their capacity from the start: the shapes never change.
            assert [x.shape for x in tree_leaves(state)] == shapes
    caches = [s for s in state.long_states if not isinstance(s, torch.Tensor)]
    assert caches and all(c.keys.shape[2] == 12 for c in caches)
    assert state.short_cache.keys.shape[2] == K
    assert state.recent_long.shape[1] == K
    assert state.num_events.tolist() == [40]


def test_request_time_decay() -> None:
    encoder = _encoder("hytrec")
    lengths = [3 * K, K // 2, 50]
    values, offsets, timestamps = _batch(lengths, seed=5)
    last_time = timestamps[offsets[1:] - 1]
    with torch.no_grad():
        plain = encoder.forward_last(values, offsets, timestamps)
        # t* = t_last is exactly the training form.
        torch.testing.assert_close(
            encoder.forward_last(values, offsets, timestamps, request_time=last_time), plain
        )
        later = encoder.forward_last(values, offsets, timestamps, request_time=last_time + 86400)
        # Only users with a long history change: the short branch does not decay.
        assert not torch.allclose(later[0], plain[0]) and not torch.allclose(later[2], plain[2])
        torch.testing.assert_close(later[1], plain[1])
        # Far in the future every TADN readout has decayed to zero.
        forever = encoder.forward_last(values, offsets, timestamps, request_time=last_time + 10**12)
        hooks = [
            layer.head_norm.register_forward_pre_hook(lambda module, args: (torch.zeros_like(args[0]),))
            for layer in encoder.long_layers
            if isinstance(layer, TADNLayer)
        ]
        forgotten = encoder.forward_last(values, offsets, timestamps)
        for hook in hooks:
            hook.remove()
    torch.testing.assert_close(forever, forgotten, rtol=1e-5, atol=1e-6)


def test_training_mode_backward_reaches_every_parameter() -> None:
    torch.manual_seed(0)
    encoder = HyTRecEncoder(dataclasses.replace(CONFIGS["hytrec_windowed"], dropout=0.1)).train()
    values, offsets, timestamps = _batch([K // 2, 40, 3 * K], seed=6)
    values.requires_grad_(True)
    encoder(values, offsets, timestamps).square().mean().backward()
    for name, param in encoder.named_parameters():
        assert param.grad is not None and bool(torch.isfinite(param.grad).all()), name
        assert param.grad.abs().sum() > 0, name
    assert bool(torch.isfinite(values.grad).all())


def test_batch_of_users_within_the_short_window_skips_the_long_stack_exactly() -> None:
    # No event of these users has history before its short window: the long stack's outputs are
    # never read, so it runs on no events, still reached by the backward (zero gradients).
    encoder = _encoder("hytrec").train()
    short, offsets, timestamps = _batch([K, 3, K - 1], seed=7)
    calls: List[int] = []
    hook = encoder.long_layers[0].register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    encoder(short, offsets, timestamps).square().mean().backward()
    hook.remove()
    assert calls == [0]
    for name, param in encoder.named_parameters():
        assert param.grad is not None, name
        if name.startswith("long_layers"):
            assert not param.grad.any(), name
    # The same users next to one whose history exceeds K (the long stack runs): same outputs.
    encoder.eval()
    longer, more_offsets, more_times = _batch([K, 3, K - 1, 3 * K], seed=7)
    with torch.no_grad():
        alone = encoder(short, offsets, timestamps)
        mixed = encoder(
            torch.cat([short, longer[2 * K + 2 :]]),
            torch.cat([offsets, offsets[-1:] + 3 * K]),
            torch.cat([timestamps, more_times[2 * K + 2 :]]),
        )
    torch.testing.assert_close(mixed[: short.shape[0]], alone, rtol=1e-5, atol=1e-6)


def test_training_form_runs_the_long_stack_on_the_prefixes_it_reads_exactly() -> None:
    # The long summary of event i is read at i - K: the stack needs each user's first n - K
    # events only. Against the stack over every event, on outputs and on every gradient (fp64;
    # the chunk plans differ, so gradients agree to rounding, about 1e-11 here).
    lengths = [1, K, K + 1, 3 * K, 40, 0, 5]
    values, offsets, timestamps = _batch(lengths, seed=8)
    results = []
    for prefixes in (True, False):
        encoder = _encoder("hytrec_windowed").double().train()
        if not prefixes:
            encoder._long_prefixes = lambda ctx: None
        calls: List[int] = []
        encoder.long_layers[0].register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
        x = values.double().requires_grad_(True)
        out = encoder(x, offsets, timestamps)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        grads = {name: p.grad for name, p in encoder.named_parameters()}
        results.append((calls, out.detach(), x.grad, grads))
    (calls, out, dx, grads), (all_calls, want, want_dx, want_grads) = results
    assert calls == [sum(max(n - K, 0) for n in lengths)] and all_calls == [sum(lengths)]
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dx, want_dx, rtol=1e-10, atol=1e-12)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, want_grads[name], rtol=1e-8, atol=1e-9, msg=name)


def test_presets() -> None:
    assert CONFIGS["hytrec"].long_pattern == "TTTA" and CONFIGS["hytrec"].use_short_branch
    sasrec = HyTRecEncoder(CONFIGS["sasrec_like"])
    assert all(isinstance(layer, SoftmaxAttentionLayer) for layer in sasrec.long_layers)
    assert sasrec.short_layer is None and sasrec.fusion is None
    linear = HyTRecEncoder(CONFIGS["pure_linear"])
    assert all(isinstance(layer, TADNLayer) for layer in linear.long_layers) and linear.short_layer is None
    local = HyTRecEncoder(CONFIGS["windowed_softmax"])
    assert all(isinstance(layer, SoftmaxAttentionLayer) and layer.window == 12 for layer in local.long_layers)
    assert local.short_layer is None and HyTRecConfig.windowed_softmax().long_attention_window == 256
    hstu = HyTRecEncoder(CONFIGS["hstu_like"])
    assert len(hstu.long_layers) == 4 and all(isinstance(layer, HSTULayer) for layer in hstu.long_layers)
    assert hstu.short_layer is None and hstu.fusion is None
    short_only = HyTRecEncoder(HyTRecConfig(embedding_dim=D, long_pattern=""))
    assert len(short_only.long_layers) == 0 and short_only.fusion is None


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"long_pattern": "TTX"}, "long_pattern"),
        ({"long_pattern": "", "use_short_branch": False}, "long branch"),
        ({"embedding_dim": 30, "num_heads": 4}, "even width"),
        ({"short_window": 0}, "short_window"),
        ({"long_attention_window": 0}, "long_attention_window"),
        ({"long_pattern": "TTH", "long_attention_window": 8}, r"HSTU-style layers \('H'\).*full causal"),
        ({"time_constant_range": (10.0, 1.0)}, "time_constant_range"),
    ],
)
def test_config_errors(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        HyTRecConfig(**kwargs)


def test_max_len_bounds_the_users_and_changes_nothing() -> None:
    encoder = _encoder("hytrec")
    values, offsets, timestamps = _batch([5, 23, 9], seed=8)
    with torch.no_grad():
        for form in (encoder, encoder.forward_last):
            plain = form(values, offsets, timestamps)
            for max_len in (23, 64):
                bounded = form(values, offsets, timestamps, max_len=max_len)
                torch.testing.assert_close(bounded, plain, rtol=0, atol=0)
            with pytest.raises(ValueError, match="max_len is 22, but user 1 has 23 events"):
                form(values, offsets, timestamps, max_len=22)


def test_bad_input_errors_name_the_user_and_event() -> None:
    encoder = _encoder("hytrec")
    values, offsets, timestamps = _batch([5, 6], seed=7)
    timestamps[8] = timestamps[7] - 1
    with pytest.raises(ValueError, match=r"user 1, event 3 \(row 8\)"):
        encoder(values, offsets, timestamps)
    values, offsets, timestamps = _batch([5, 0, 6], seed=7)
    with pytest.raises(ValueError, match="user 1 of the batch has no events"):
        encoder.forward_last(values, offsets, timestamps)
    with pytest.raises(ValueError, match="request_time of user 0"):
        encoder.forward_last(values[:5], offsets[:2], timestamps[:5], request_time=timestamps[4:5] - 1)
    with pytest.raises(ValueError, match="offsets must run from 0"):
        encoder(values, offsets[:2], timestamps)
    state = encoder.init_stream(2)
    _, state = encoder.stream_step(state, values[:2], torch.tensor([100, 100]))
    with pytest.raises(ValueError, match="user 1's new event"):
        encoder.stream_step(state, values[:2], torch.tensor([100, 99]))
