"""``torch.export`` programs of a trained encoder for serving: the user tower and the stream step.

* :func:`export_user_tower`: every user's representation after its latest event
  (:meth:`~torchrec_hytrec.modules.encoder.HyTRecEncoder.forward_last`), optionally read at a
  request time, as one program for any batch size and any history lengths;
* :func:`export_stream_step`: one new event per streamed user
  (:func:`~torchrec_hytrec.modules.streaming.stream_step`), for any batch size and, for
  full-causal softmax and HSTU-style layers, any cache length;
* :func:`compile_stream_step`: that program compiled ahead of time with AOTInductor. An eager step
  is a few hundred tiny ops whose dispatch costs more than their arithmetic (about 2 ms on these
  CPUs, whatever the history); compiled, one step after 10k events took 0.26 ms (windowed long
  attention) and 0.7 ms (full causal), against ~150 ms for a ``forward_last`` recompute
  (``benchmarks/bench_encoder.py --stream-only --aoti``).

Both build their example inputs and ``dynamic_shapes`` themselves, with every dynamic size at
least 2 in the examples (``torch.export`` specialises sizes 0 and 1 of an example), and trace with
sizes treated "size-obliviously" (``backed_size_oblivious``): otherwise incidental checks, such as
whether a slice ``offsets[1:]`` is contiguous, would bound the programs to two users or more. The
programs serve one user with one event too.

The jagged kernels appear in the programs as ``hytrec::*`` custom ops (see
:mod:`torchrec_hytrec.ops.jagged_attention` for why; the HSTU-style kernels of
:mod:`torchrec_hytrec.ops.hstu_attention` likewise), so a process that loads a saved
program imports ``torchrec_hytrec.modules`` (or ``torchrec_hytrec.ops``) first, which registers
them. A loaded program is the eager code's equal: the ops run the same kernels.

Example::

    >>> import torch
    >>> from torchrec_hytrec.modules import HyTRecConfig, HyTRecEncoder
    >>> encoder = HyTRecEncoder(HyTRecConfig.hytrec(embedding_dim=16, short_window=4)).eval()
    >>> program = export_user_tower(encoder)
    >>> offsets = torch.tensor([0, 1, 6, 30])
    >>> values, timestamps = torch.randn(30, 16), torch.arange(30) * 60
    >>> request_time = timestamps[offsets[1:] - 1] + 3600
    >>> with torch.no_grad():
    ...     want = encoder.forward_last(values, offsets, timestamps, request_time=request_time)
    >>> torch.allclose(program.module()(values, offsets, timestamps, request_time), want, atol=1e-5)
    True
"""

import dataclasses
from typing import Any, Callable, ContextManager, Dict, Optional, Tuple

import torch
import torch.fx.experimental._config
import torch.nn as nn
from torch.export import Dim, ExportedProgram

from torchrec_hytrec.modules.encoder import HyTRecEncoder
from torchrec_hytrec.modules.streaming import GrowingKVCache, HyTRecStreamState

UserTowerInputs = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]


class UserTower(nn.Module):
    """The serving form of an encoder: ``forward_last`` as a module's ``forward``.

    Args:
        encoder: the encoder (in eval mode for serving).

    Example::

        >>> import torch
        >>> from torchrec_hytrec.modules import HyTRecConfig, HyTRecEncoder
        >>> tower = UserTower(HyTRecEncoder(HyTRecConfig.hytrec(embedding_dim=16)).eval())
        >>> tower(torch.randn(5, 16), torch.tensor([0, 2, 5]), torch.arange(5)).shape
        torch.Size([2, 16])
    """

    def __init__(self, encoder: HyTRecEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(
        self,
        values: torch.Tensor,
        offsets: torch.Tensor,
        timestamps: torch.Tensor,
        request_time: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """``[B, d]`` user states (see :meth:`HyTRecEncoder.forward_last`)."""
        return self.encoder.forward_last(values, offsets, timestamps, request_time=request_time)


class StreamStep(nn.Module):
    """One stream step of an encoder as a module's ``forward``.

    Args:
        encoder: the streamed encoder.

    Example::

        >>> import torch
        >>> from torchrec_hytrec.modules import HyTRecConfig, HyTRecEncoder
        >>> encoder = HyTRecEncoder(HyTRecConfig.hytrec(embedding_dim=16)).eval()
        >>> out, state = StreamStep(encoder)(encoder.init_stream(2), torch.randn(2, 16), torch.tensor([5, 9]))
        >>> out.shape, state.num_events.tolist()
        (torch.Size([2, 16]), [1, 1])
    """

    def __init__(self, encoder: HyTRecEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(
        self, state: HyTRecStreamState, values: torch.Tensor, timestamps: torch.Tensor
    ) -> Tuple[torch.Tensor, HyTRecStreamState]:
        """``(out, new_state)`` (see :meth:`HyTRecEncoder.stream_step`)."""
        return self.encoder.stream_step(state, values, timestamps)


def _size_oblivious() -> ContextManager[None]:
    return torch.fx.experimental._config.patch(backed_size_oblivious=True)


def _example_history(encoder: HyTRecEncoder, lengths: Tuple[int, ...]) -> Tuple[torch.Tensor, ...]:
    device = encoder.final_norm.weight.device
    generator = torch.Generator().manual_seed(0)
    total = sum(lengths)
    values = torch.randn(total, encoder.config.embedding_dim, generator=generator).to(device)
    offsets = torch.tensor((0, *lengths)).cumsum(0).to(device)
    timestamps = (torch.arange(total) * 600).to(device)
    return values, offsets, timestamps


def user_tower_dynamic_shapes(request_time: bool = True) -> Dict[str, Any]:
    """``dynamic_shapes`` of :class:`UserTower`'s inputs: the number of users and of events.

    Args:
        request_time: whether the program takes a request time.

    Returns:
        The spec, by argument name.
    """
    users, events = Dim("users", min=1), Dim("events", min=1)
    shapes: Dict[str, Any] = {"values": {0: events}, "offsets": {0: users + 1}, "timestamps": {0: events}}
    if request_time:
        shapes["request_time"] = {0: users}
    return shapes


def export_user_tower(
    encoder: HyTRecEncoder, example_inputs: Optional[UserTowerInputs] = None, *, request_time: bool = True
) -> ExportedProgram:
    """Exports the encoder's serving path (:class:`UserTower`) for any batch size and lengths.

    Args:
        encoder: the encoder, in eval mode (dropout is traced as it is).
        example_inputs: ``(values, offsets, timestamps, request_time)`` to trace with (at least 2
            users, at least 2 events; ``request_time`` is ignored without ``request_time``); a
            small batch made up here by default.
        request_time: whether the program takes a ``[B]`` request time (its 4th input).

    Returns:
        The program: ``program.module()(values, offsets, timestamps[, request_time])`` gives
        ``[B, d]``; ``torch.export.save`` / ``torch.export.load`` store and reload it.
    """
    if example_inputs is None:
        values, offsets, timestamps = _example_history(encoder, (3, 7))
        example_inputs = (values, offsets, timestamps, timestamps[offsets[1:] - 1] + 60)
    inputs = tuple(example_inputs) if request_time else tuple(example_inputs[:3])
    with torch.no_grad(), _size_oblivious():
        return torch.export.export(
            UserTower(encoder), inputs, dynamic_shapes=user_tower_dynamic_shapes(request_time), strict=False
        )


def stream_step_dynamic_shapes(
    state: HyTRecStreamState, values: torch.Tensor, timestamps: torch.Tensor
) -> Dict[str, Any]:
    """``dynamic_shapes`` of :class:`StreamStep`'s inputs: the batch size everywhere, and the
    block and tail lengths of every full-causal cache (windowed caches have fixed capacities).

    Args:
        state: the example state the program is traced with.
        values: the example ``[B, d]`` new events.
        timestamps: the example ``[B]`` times.

    Returns:
        The spec, by argument name; a dataclass's spec lists its fields' specs, as
        ``torch.export`` reads them.
    """
    batch = Dim("batch", min=1)
    lengths: Dict[int, Dict[int, Dim]] = {}  # id of a cache tensor -> its dynamic dims
    for i, layer_state in enumerate(state.long_states):
        if isinstance(layer_state, GrowingKVCache):
            for part, cache in (("block", layer_state.block), ("tail", layer_state.tail)):
                length = Dim(f"layer{i}_{part}", min=0)
                lengths[id(cache.keys)] = lengths[id(cache.values)] = {0: batch, 2: length}
                lengths[id(cache.timestamps)] = {0: batch, 1: length}

    def spec(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return lengths.get(id(x), {0: batch})
        if dataclasses.is_dataclass(x):
            # A registered dataclass's pytree children are its fields that are not None.
            children = (getattr(x, field.name) for field in dataclasses.fields(x))
            return [spec(child) for child in children if child is not None]
        return [spec(item) for item in x]

    return {"state": spec(state), "values": {0: batch}, "timestamps": {0: batch}}


def export_stream_step(encoder: HyTRecEncoder) -> ExportedProgram:
    """Exports :func:`~torchrec_hytrec.modules.streaming.stream_step` for any batch size and
    cache length.

    The program only appends to the full-causal caches' tails: call
    :func:`~torchrec_hytrec.modules.streaming.compact_stream_state` between steps now and then to
    keep them short.

    Args:
        encoder: the encoder, in eval mode.

    Returns:
        The program; ``program.module()(state, values, timestamps)`` gives ``(out, new_state)``.
    """
    values, offsets, timestamps = _example_history(encoder, (3, 7))
    with torch.no_grad():
        state = encoder.prefill(values, offsets, timestamps)
        # Two steps, so that the tails too have a size export does not specialise.
        step_values, step_times = values[:2], timestamps[-2:] + torch.tensor([60, 120], device=values.device)
        for _ in range(2):
            _, state = encoder.stream_step(state, step_values, step_times)
            step_times = step_times + 60
        example = (state, step_values, step_times)
    with torch.no_grad(), _size_oblivious():
        return torch.export.export(
            StreamStep(encoder), example, dynamic_shapes=stream_step_dynamic_shapes(*example), strict=False
        )


def compile_stream_step(encoder: HyTRecEncoder, package_path: str) -> Callable[..., Any]:
    """:func:`export_stream_step` compiled with AOTInductor into a package at ``package_path``.

    Compiling takes about a minute on 2 CPU cores and needs a C++ compiler; a server loads the
    package again with ``torch._inductor.aoti_load_package(package_path)``.

    Args:
        encoder: the encoder, in eval mode.
        package_path: where the ``.pt2`` package is written.

    Returns:
        The loaded step: ``step(state, values, timestamps)`` gives ``(out, new_state)``, equal to
        :meth:`HyTRecEncoder.stream_step`. Like the exported program it only appends to the
        full-causal caches' tails (see :func:`export_stream_step`).
    """
    import torch._inductor  # only here: importing the compiler takes a second

    path = torch._inductor.aoti_compile_and_package(export_stream_step(encoder), package_path=package_path)
    return torch._inductor.aoti_load_package(path)
