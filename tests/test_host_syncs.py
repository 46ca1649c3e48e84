"""Host synchronisations of an encoder call: a fixed number per batch, whatever the depth.

On a GPU the host waits for the device whenever it reads a device tensor's value (``int(t)``,
``bool(t)``, ``.item()``, ``.tolist()``, a copy to the CPU) and whenever an op's output shape depends
on the data (``nonzero``, ``unique``, boolean indexing, ``repeat_interleave`` without
``output_size``). Nothing waits on CPU, so the inputs are marked as device tensors instead:
:class:`_OnDevice` is a tensor subclass that every op passes on to its outputs, except a copy to the
CPU, where host data starts. Only those events on marked tensors are counted, so reading the host
copy of the offsets is free, as it is on a GPU; patching ``Tensor.__int__`` and friends for every
tensor would count the host-side planning too.

Not seen: copies from the host to the device, which also wait on a GPU (from pageable memory). The
only one is the TADN chunk plan's, made on the host once per batch and chunk size (the other plans
are built on the device from the host's counts), so it does not grow with the depth either; the
index tensors it copies are never read back.
"""

from collections import Counter
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from torchrec_hytrec.modules import HyTRecConfig, HyTRecEncoder

pytestmark = pytest.mark.usefixtures("one_thread")

aten = torch.ops.aten
# Ops whose output shape is read back from the device.
_DATA_DEPENDENT = {
    aten.nonzero.default,
    aten._unique.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
    aten.masked_select.default,
    aten.bincount.default,
}
_BOOL_INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default}
_ACTIVE: List["_SyncCounter"] = []


class _OnDevice(torch.Tensor):
    """Stands for a tensor on the accelerator: ops on it return ``_OnDevice`` tensors, and a copy of
    it to the CPU (counted) returns a plain one."""

    @classmethod
    def __torch_function__(
        cls, func: Callable, types: Tuple, args: Tuple = (), kwargs: Optional[Dict] = None
    ) -> Any:
        kwargs = kwargs or {}
        to_host = False
        if _ACTIVE and args and isinstance(args[0], _OnDevice):
            # Reads that run no op, so the dispatch mode cannot see them.
            if func in (torch.Tensor.tolist, torch.Tensor.numpy):
                _ACTIVE[-1].counts[func.__name__] += 1
            to_host = func is torch.Tensor.cpu or (
                func is torch.Tensor.to
                and torch._C._nn._parse_to(*args[1:], **kwargs)[0] == torch.device("cpu")
            )
            if to_host:
                _ACTIVE[-1].counts["copy to host"] += 1
        out = super().__torch_function__(func, types, args, kwargs)
        return out.as_subclass(torch.Tensor) if to_host else out


class _SyncCounter(TorchDispatchMode):
    """Counts, by kind, what would make the host wait for the device while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter = Counter()

    def __enter__(self) -> "_SyncCounter":
        _ACTIVE.append(self)
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        _ACTIVE.pop()
        super().__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __torch_dispatch__(
        self, func: Any, types: Tuple, args: Tuple = (), kwargs: Optional[Dict] = None
    ) -> Any:
        kwargs = kwargs or {}
        if any(isinstance(x, _OnDevice) for x in tree_leaves((args, kwargs))):
            # int(), bool(), float(), .item() and __index__ all read through _local_scalar_dense.
            if func is aten._local_scalar_dense.default:
                self.counts["scalar read"] += 1
            elif func in _DATA_DEPENDENT:
                self.counts[func.__name__] += 1
            elif func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
                self.counts["repeat_interleave"] += 1
            elif func in _BOOL_INDEXING and any(
                isinstance(i, _OnDevice) and i.dtype == torch.bool for i in tree_leaves(args[1])
            ):
                self.counts["boolean indexing"] += 1
        return func(*args, **kwargs)


def _on_device(x: torch.Tensor) -> torch.Tensor:
    return x.as_subclass(_OnDevice)


def test_the_counter_sees_every_kind_of_sync_and_nothing_else() -> None:
    x = _on_device(torch.tensor([3, 0, 5]))
    syncs = [
        lambda: int(x[0]),
        lambda: bool(x.any()),
        lambda: float(x.sum()),
        lambda: x.max().item(),
        lambda: torch.arange(10)[: x[0]],
        lambda: x.tolist(),
        lambda: x.cpu(),
        lambda: x.to("cpu", torch.int32),
        lambda: x.nonzero(),
        lambda: torch.unique(x),
        lambda: x[x > 0],
        lambda: torch.repeat_interleave(x, x),
    ]
    for i, sync in enumerate(syncs):
        with _SyncCounter() as counter:
            sync()
        assert counter.total == 1, (i, counter.counts)
    with _SyncCounter() as counter:
        host = x.cpu()
        int(host[0]), host.tolist(), host.nonzero()  # the host copy reads freely
        torch.repeat_interleave(x, x, output_size=8), x.float() * 2, x.to(torch.int32), x[host > 0]
        int(torch.tensor(4))  # an unmarked tensor is a host tensor
    assert counter.counts == Counter({"copy to host": 1}), counter.counts


def _config(name: str, depth: int) -> HyTRecConfig:
    """The configuration ``name`` with ``depth`` long layers; HyTRec's repeat "TTTA" (depth 2: "TA")."""
    if name == "sasrec_like":
        return HyTRecConfig.sasrec_like(num_layers=depth, embedding_dim=32)
    if name == "pure_linear":
        return HyTRecConfig.pure_linear(num_layers=depth, embedding_dim=32)
    if name == "hstu_like":
        return HyTRecConfig.hstu_like(num_layers=depth, embedding_dim=32)
    pattern = "TA" if depth == 2 else "TTTA" * (depth // 4)
    windows = {
        "hytrec": {},
        "hytrec_windowed": {"long_attention_window": 16},
        "hytrec_adaptive": {"short_window_seconds": 7200.0},
    }[name]
    return HyTRecConfig.hytrec(embedding_dim=32, short_window=8, long_pattern=pattern, **windows)


# Syncs measured, (forward, forward_last). Both: the offsets' copy to the host and the check of the
# timestamps' order (the adaptive window's time span, once read back, now stays a tensor).
# forward_last, for each layer it computes at chosen rows only (the stack's last, the short
# branch): 1 to size their windows, 2 more to find the input rows of a windowed layer (the short
# branch included). Before the batch context, at depths 2 / 4 / 8: hytrec 31 / 35 / 62 and
# 14 / 18 / 45, sasrec_like 47 / 89 / 173 and 28 / 70 / 154, pure_linear 9 / 13 / 21 and
# 10 / 14 / 22. Not listed: windowed_softmax, whose forward_last grows with depth by design (a run of
# windowed layers finds the input rows of each one: 6 / 12 / 24 at depths 2 / 4 / 8, forward 2).
BOUNDS = {
    "hytrec": (2, 6),
    "hytrec_windowed": (2, 8),
    "hytrec_adaptive": (2, 6),
    "sasrec_like": (2, 3),
    "pure_linear": (2, 2),
    "hstu_like": (2, 3),
}


def _batch() -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    lengths = [3, 1, 70, 9, 150, 33]
    offsets = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    values = torch.randn(sum(lengths), 32, generator=gen)
    gaps = [torch.randint(0, 5_000, (n,), generator=gen) for n in lengths]
    timestamps = torch.cat([1_000 + torch.cumsum(g, 0) for g in gaps])
    return values, offsets, timestamps


def _count(call: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> Tuple[Counter, torch.Tensor]:
    """Syncs of ``call`` on device-marked ``inputs``, and its output."""
    marked = [_on_device(x) for x in inputs]
    with _SyncCounter() as counter:
        out = call(*marked)
    return counter.counts, out.as_subclass(torch.Tensor)


@pytest.mark.parametrize("name", list(BOUNDS))
def test_syncs_per_call_do_not_grow_with_depth(name: str) -> None:
    values, offsets, timestamps = _batch()
    request_time = timestamps[offsets[1:] - 1] + 3_600
    totals: Dict[str, List[int]] = {"forward": [], "forward_last": [], "forward_last at t*": []}
    for depth in (2, 4, 8):
        torch.manual_seed(0)
        encoder = HyTRecEncoder(_config(name, depth))
        assert len(encoder.long_layers) == depth
        runs = [
            ("forward", True, encoder, (values, offsets, timestamps)),
            ("forward_last", False, encoder.forward_last, (values, offsets, timestamps)),
            ("forward_last at t*", False, encoder.forward_last, (values, offsets, timestamps, request_time)),
        ]
        for kind, training, call, inputs in runs:
            encoder.train(training)
            counts, out = _count(call, *inputs)
            # The counted run is the real one.
            torch.testing.assert_close(out, call(*inputs), rtol=0, atol=0)
            print(f"{name} depth {depth} {kind}: {sum(counts.values())} {dict(counts)}")
            totals[kind].append(sum(counts.values()))
    print(name, totals)
    forward_bound, last_bound = BOUNDS[name]
    for kind, bound in (("forward", forward_bound), ("forward_last", last_bound)):
        assert len(set(totals[kind])) == 1 and totals[kind][0] <= bound, (kind, totals)
    # The request time adds its own check, nothing per layer.
    assert totals["forward_last at t*"] == [t + 1 for t in totals["forward_last"]], totals
