"""TorchRec's ``TrainPipelineSparseDist`` around our train wrappers, and what it pipelined.

One pipeline serves training and evaluation: in ``model.train()`` mode ``progress`` runs forward,
backward and the optimizer step; in ``model.eval()`` mode only the forward. Either way the sharded
lookups' input distribution of batch ``i + 1`` overlaps the compute of batch ``i``.
"""

from typing import Iterable, Iterator, List, TypeVar

import torch
from torch import nn
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

Out = TypeVar("Out")


def make_pipeline(model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> TrainPipelineSparseDist:
    """``TrainPipelineSparseDist(model, optimizer, device)`` for a sharded train wrapper.

    Args:
        model: ``DistributedModelParallel`` around ``HyTRecRetrievalTrain`` or ``HyTRecRankerTrain``.
        optimizer: from :func:`~torchrec_hytrec.models.sharding.make_optimizer`.
        device: the compute device.
    """
    return TrainPipelineSparseDist(model, optimizer, device)


def pipeline_outputs(pipeline: TrainPipelineSparseDist, batches: Iterable[Out]) -> Iterator[Out]:
    """Runs ``pipeline.progress`` over ``batches`` and yields each step's outputs, in batch order.

    Every rank must hold the same number of batches (``SequenceReader`` pads with zero-weight
    batches): each step is a collective.
    """
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
