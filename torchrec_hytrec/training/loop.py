"""The training loop and the evaluation loop, on TorchRec's ``TrainPipelineSparseDist``.

One pipeline serves both: in ``model.train()`` mode ``progress`` runs forward, backward and the
optimizer step; in ``model.eval()`` mode only the forward. Either way the sharded lookups' input
distribution of batch ``i + 1`` overlaps the compute of batch ``i``. ``python -m
torchrec_hytrec.train`` (retrieval) and ``examples/train_ranker.py`` (ranking) both run these.

Every rank must hold the same number of batches, as each step is a collective:
``SequenceReader`` pads the shorter shares with zero-weight batches.
"""

from typing import Callable, Iterable, Iterator, List, Optional, TypeVar

import torch
from torch import nn
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

from torchrec_hytrec.training.distributed import mute_fx_tracing_notice

Out = TypeVar("Out")


def make_pipeline(
    model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device
) -> TrainPipelineSparseDist:
    """``TrainPipelineSparseDist(model, optimizer, device)`` for a sharded train wrapper.

    Args:
        model: ``DistributedModelParallel`` around ``HyTRecRetrievalTrain`` or ``HyTRecRankerTrain``
            (whose outputs are ``(loss, outputs)`` with the batch's detached loss first and its
            weights in ``outputs.weights`` or as the last element).
        optimizer: from :func:`~torchrec_hytrec.training.optimizer.make_optimizer`.
        device: the compute device.
    """
    mute_fx_tracing_notice()
    return TrainPipelineSparseDist(model, optimizer, device)


def pipeline_outputs(pipeline: TrainPipelineSparseDist, batches: Iterable[Out]) -> Iterator[Out]:
    """Runs ``pipeline.progress`` over ``batches`` and yields each step's outputs, in batch order."""
    it = iter(batches)
    while True:
        try:
            yield pipeline.progress(it)
        except StopIteration:
            return


def pipelined_modules(pipeline: TrainPipelineSparseDist) -> List[nn.Module]:
    """The sharded modules whose input distribution the pipeline runs ahead.

    TorchRec falls back to running a module unpipelined, without an error, when it cannot trace
    where the module's input comes from; this is how to check that it did not.
    """
    return list(pipeline._pipelined_modules)


def batch_weight(outputs: object) -> float:
    """Total weight of a step's batch: 0 for the reader's padding batches."""
    weights = outputs.weights if hasattr(outputs, "weights") else outputs[-1]  # type: ignore[index]
    return float(weights.sum())


def train_epoch(
    pipeline: TrainPipelineSparseDist,
    model: nn.Module,
    batches: Iterable[object],
    on_step: Optional[Callable[[object], None]] = None,
) -> List[float]:
    """One pass of training steps over ``batches``.

    Args:
        pipeline: from :func:`make_pipeline` over ``model``.
        model: the pipelined model (put in training mode).
        batches: this rank's batches.
        on_step: called with every step's outputs, after its optimizer step.

    Returns:
        The losses of the real (non-padding) batches, in order.
    """
    model.train()
    losses = []
    for outputs in pipeline_outputs(pipeline, batches):
        if batch_weight(outputs) > 0:
            losses.append(float(outputs[0]))  # type: ignore[index]
        if on_step is not None:
            on_step(outputs)
    return losses


def evaluation_outputs(
    pipeline: TrainPipelineSparseDist, model: nn.Module, batches: Iterable[Out]
) -> Iterator[Out]:
    """The evaluation loop: every batch's outputs in evaluation mode, without gradients; the model
    is back in training mode afterwards."""
    model.eval()
    try:
        with torch.no_grad():
            yield from pipeline_outputs(pipeline, batches)
    finally:
        model.train()
