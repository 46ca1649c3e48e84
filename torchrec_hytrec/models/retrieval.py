"""Retrieval: item/side-feature ``EmbeddingCollection`` -> ``HyTRecEncoder`` -> next-item softmax.

Split the way TorchRec's ``DLRM`` / ``DLRMTrain`` are:

- :class:`HyTRecRetrieval` maps a :class:`~torchrec_hytrec.data.batch.SequenceBatch` to user
  representations and their scores against items (:class:`RetrievalOutput`). In training mode
  (``model.train()``) every event but a user's last is a query whose positive is the next event;
  in evaluation mode (``model.eval()``) each user's last event, read at the request time
  ``batch.target_timestamps``, is the query and the held-out target the positive.
- :class:`HyTRecRetrievalTrain` adds the loss (full or sampled softmax, with in-batch negatives)
  and returns ``(loss, RetrievalTrainOutput)``, the contract of TorchRec's train pipelines.

``TrainPipelineSparseDist`` drives the wrapper: its forward reads the table input straight from
``batch.features`` (so the sharded lookup of the next batch is distributed while this one
computes) and everything after the lookup runs in submodules without tables, which the pipeline's
tracer treats as leaves. Uniform negatives and the catalogue are put into the batch by the reader
(``SequenceReader(negatives=...)``) for the same reason: a sharded table's input must be a batch field.

Scores are dot products ``user . item``; the temperature belongs to the loss. Item id 0 is padding.
"""

from dataclasses import dataclass
from typing import Dict, List, Mapping, NamedTuple, Optional, Tuple

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.sparse.jagged_tensor import JaggedTensor

from torchrec_hytrec.data.batch import CANDIDATE_KEY, ITEM_KEY, TARGET_KEY, SequenceBatch, training_queries
from torchrec_hytrec.models.embeddings import (
    check_sequence_collection,
    event_embeddings,
    sequence_embedding_collection,
)
from torchrec_hytrec.models.losses import full_softmax_loss, sampled_softmax_loss

LOSSES = ("full", "sampled")


@dataclass
class RetrievalConfig:
    """Settings of :class:`HyTRecRetrieval` and :class:`HyTRecRetrievalTrain` (the tables' sizes
    are the dataset's, given to the model; their width is the encoder's).

    Args:
        loss: ``"full"``: softmax over the whole catalogue (the batch carries every item as
            candidates: for catalogues that fit); ``"sampled"``: in-batch plus the batch's uniform
            negatives, logQ-corrected.
        num_uniform_negatives: uniform negatives per batch for ``"sampled"`` (drawn by the reader).
        num_in_batch_negatives: most in-batch positives shared as candidates for ``"sampled"``.
        temperature: logits are ``user . item / temperature``.
        embedding_init_std: standard deviation of the initial table rows; ``None`` gives
            ``embedding_dim ** -0.5`` (unit-norm rows).
        use_request_time: read evaluation users at ``batch.target_timestamps`` (the encoder decays
            its state over the gap since the last event) rather than at their last event.

    Example::

        >>> from torchrec_hytrec import RetrievalConfig
        >>> config = RetrievalConfig(loss="full")
        >>> config.reader_negatives()
        ('catalogue', 0)
    """

    loss: str = "sampled"
    num_uniform_negatives: int = 256
    num_in_batch_negatives: int = 2048
    temperature: float = 1.0
    embedding_init_std: Optional[float] = None
    use_request_time: bool = True

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"RetrievalConfig.loss must be one of {LOSSES}, got {self.loss!r}")
        if self.temperature <= 0:
            raise ValueError(f"RetrievalConfig.temperature must be > 0, got {self.temperature}")
        if self.loss == "sampled" and (self.num_uniform_negatives < 1 or self.num_in_batch_negatives < 0):
            raise ValueError(
                "RetrievalConfig: sampled softmax needs num_uniform_negatives >= 1 and "
                f"num_in_batch_negatives >= 0, got {self.num_uniform_negatives} and "
                f"{self.num_in_batch_negatives}"
            )

    def reader_negatives(self) -> Tuple[str, int]:
        """``(negatives, num_negatives)`` of the ``SequenceReader`` whose batches this loss reads."""
        if self.loss == "full":
            return "catalogue", 0
        return "uniform", self.num_uniform_negatives


class RetrievalOutput(NamedTuple):
    """What :class:`HyTRecRetrieval` maps a batch to; ``Q`` queries, ``M`` shared candidates.

    Attributes:
        query: ``[Q, d]`` user representations.
        query_user: ``[Q]`` batch row (user) of each query.
        weights: ``[Q]`` weight of each query (its user's; 0 in padding batches).
        positive_ids: ``[Q]`` the item each query should retrieve.
        positive_emb: ``[Q, d]`` its item row.
        positive_scores: ``[Q]`` ``query . positive``.
        candidate_ids: ``[M]`` the batch's shared candidates (uniform negatives or the catalogue).
        candidate_emb: ``[M, d]`` their item rows.
    """

    query: torch.Tensor
    query_user: torch.Tensor
    weights: torch.Tensor
    positive_ids: torch.Tensor
    positive_emb: torch.Tensor
    positive_scores: torch.Tensor
    candidate_ids: torch.Tensor
    candidate_emb: torch.Tensor

    def candidate_scores(self) -> torch.Tensor:
        """``[Q, M]`` ``query . candidate``."""
        return self.query @ self.candidate_emb.t()


class RetrievalUserTower(nn.Module):
    """Everything of :class:`HyTRecRetrieval` after the table lookup: no tables, so TorchRec's
    pipeline tracer treats it as a leaf and it may branch on the training mode.

    Args:
        encoder: ``HyTRecEncoder`` (or a module with its ``forward`` and ``forward_last``).
        side_features: side-feature keys, added to the item rows.
        use_request_time: see :class:`RetrievalConfig`.

    Example::

        >>> import torch
        >>> from torchrec_hytrec import HyTRecConfig, HyTRecEncoder
        >>> from torchrec_hytrec.models.retrieval import RetrievalUserTower
        >>> tower = RetrievalUserTower(HyTRecEncoder(HyTRecConfig.hytrec(embedding_dim=8, num_heads=2)), [])
        >>> isinstance(tower, torch.nn.Module)
        True
    """

    def __init__(self, encoder: nn.Module, side_features: List[str], use_request_time: bool = True) -> None:
        super().__init__()
        self.encoder = encoder
        self._side_features = list(side_features)
        self._use_request_time = use_request_time

    def forward(self, embeddings: Dict[str, JaggedTensor], batch: SequenceBatch) -> RetrievalOutput:
        """
        Args:
            embeddings: the collection's output for ``batch.features``.
            batch: the batch (training or evaluation, as the mode says).

        Returns:
            :class:`RetrievalOutput`.
        """
        offsets = batch.offsets()
        lengths = offsets[1:] - offsets[:-1]
        events = event_embeddings(embeddings, self._side_features)
        items = embeddings[ITEM_KEY].values()
        candidate_ids = batch.candidates
        candidate_emb = embeddings[CANDIDATE_KEY].values()
        if self.training:
            states = self.encoder(events, offsets, batch.timestamps)
            query_rows, query_user = training_queries(offsets, batch.context_lengths)
            if query_rows.numel() == 0:
                raise ValueError("training batch has no user with 2 or more events: nothing to predict")
            query = states[query_rows]
            positive_ids = batch.item_ids[query_rows + 1]
            positive_emb = items[query_rows + 1]
        else:
            targets = embeddings[TARGET_KEY]
            if targets.values().shape[0] != lengths.numel():
                raise ValueError(
                    f"evaluation batch needs one target_item_id per user, got {targets.values().shape[0]} "
                    f"for {lengths.numel()} users (a training batch in eval mode?)"
                )
            request_time = batch.target_timestamps if self._use_request_time else None
            query = self.encoder.forward_last(events, offsets, batch.timestamps, request_time=request_time)
            query_user = torch.arange(lengths.numel(), device=offsets.device)
            positive_ids = batch.targets
            positive_emb = targets.values()
        return RetrievalOutput(
            query=query,
            query_user=query_user,
            weights=batch.weights[query_user],
            positive_ids=positive_ids,
            positive_emb=positive_emb,
            positive_scores=(query * positive_emb).sum(-1),
            candidate_ids=candidate_ids,
            candidate_emb=candidate_emb,
        )


class HyTRecRetrieval(nn.Module):
    """Next-item retrieval with a HyTRec encoder over (shardable) item and side-feature tables.

    Args:
        config: loss and reading settings.
        encoder: ``HyTRecEncoder``; the tables have its ``embedding_dim``.
        num_items: item ids are ``1..num_items`` (0 is padding).
        side_features: side-feature key -> table rows, in the batch KJT's key order after
            ``"item_id"``; each side embedding is added to the item embedding.
        embedding_collection: the tables, injected; built from
            :func:`~torchrec_hytrec.models.embeddings.sequence_table_configs` when ``None``. It must
            look up ``"item_id"``, ``"target_item_id"``, ``"candidate_item_id"`` and the side features.
        device: where the tables are built when not injected; ``torch.device("meta")`` defers
            allocation to ``DistributedModelParallel``.

    Example::

        >>> import torch
        >>> from torchrec_hytrec import HyTRecConfig, HyTRecEncoder, HyTRecRetrieval, RetrievalConfig
        >>> model = HyTRecRetrieval(
        ...     RetrievalConfig(loss="full"),
        ...     HyTRecEncoder(HyTRecConfig.hytrec(embedding_dim=16, num_heads=2)),
        ...     num_items=1000,
        ...     device=torch.device("meta"),
        ... )
        >>> model.embedding_collection.embeddings["item"].weight.shape
        torch.Size([1001, 16])
    """

    def __init__(
        self,
        config: RetrievalConfig,
        encoder: nn.Module,
        *,
        num_items: int,
        side_features: Optional[Mapping[str, int]] = None,
        embedding_collection: Optional[EmbeddingCollection] = None,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        dim = encoder.config.embedding_dim
        self.config = config
        self.num_items = num_items
        side_features = dict(side_features or {})
        side = list(side_features)
        if embedding_collection is None:
            embedding_collection = sequence_embedding_collection(
                num_items=num_items,
                embedding_dim=dim,
                side_features=side_features,
                extra_item_features=[TARGET_KEY, CANDIDATE_KEY],
                init_std=config.embedding_init_std or dim**-0.5,
                device=device,
            )
        check_sequence_collection(embedding_collection, dim, [ITEM_KEY, TARGET_KEY, CANDIDATE_KEY, *side])
        self.embedding_collection = embedding_collection
        self.user_tower = RetrievalUserTower(encoder, side, config.use_request_time)

    @property
    def encoder(self) -> nn.Module:
        return self.user_tower.encoder

    def forward(self, batch: SequenceBatch) -> RetrievalOutput:
        """
        Args:
            batch: a training batch in training mode, an evaluation batch in evaluation mode.

        Returns:
            :class:`RetrievalOutput`.
        """
        return self.user_tower(self.embedding_collection(batch.features), batch)


class RetrievalTrainOutput(NamedTuple):
    """Detached outputs of :class:`HyTRecRetrievalTrain`, what evaluation and logging read.

    Attributes:
        loss: the batch's loss.
        query: ``[Q, d]`` user representations.
        weights: ``[Q]`` query weights (0 for padding).
        positive_ids: ``[Q]`` positives (the held-out targets in evaluation mode).
        positive_scores: ``[Q]`` ``query . positive``.
        lengths: ``[B]`` events of every user (row) of the batch.
        history_lengths: ``[B]`` events of each row's user up to the row's end, older events the
            row does not hold included (what history-length buckets count).
        seen_ids: the items each user has interacted with, grouped by row, the events an
            evaluation row was cut to exclude included (for rankings that remove seen items).
        seen_lengths: ``[B]`` items of each row in ``seen_ids``.
    """

    loss: torch.Tensor
    query: torch.Tensor
    weights: torch.Tensor
    positive_ids: torch.Tensor
    positive_scores: torch.Tensor
    lengths: torch.Tensor
    history_lengths: torch.Tensor
    seen_ids: torch.Tensor
    seen_lengths: torch.Tensor


class RetrievalLoss(nn.Module):
    """The softmax loss of :class:`RetrievalConfig` on a :class:`RetrievalOutput` (a leaf of the
    pipeline's trace: it samples in-batch negatives and checks shapes in Python).

    Args:
        config: loss settings.
        num_items: catalogue size.

    Example::

        >>> import torch
        >>> from torchrec_hytrec import RetrievalConfig
        >>> from torchrec_hytrec.models.retrieval import RetrievalLoss, RetrievalOutput
        >>> loss = RetrievalLoss(RetrievalConfig(loss="full"), num_items=3)
        >>> q, table = torch.tensor([[1.0, 0.0]]), torch.eye(3, 2)
        >>> out = RetrievalOutput(q, torch.tensor([0]), torch.ones(1), torch.tensor([1]), table[:1],
        ...                       torch.tensor([1.0]), torch.arange(1, 4), table)
        >>> round(float(loss(out)), 4)
        0.5514
    """

    def __init__(self, config: RetrievalConfig, num_items: int) -> None:
        super().__init__()
        self.config = config
        self.num_items = num_items

    def forward(self, output: RetrievalOutput) -> torch.Tensor:
        config = self.config
        if config.loss == "full":
            if output.candidate_ids.shape[0] != self.num_items:
                raise ValueError(
                    f"full softmax needs the whole catalogue ({self.num_items} items) as the batch's "
                    f"candidates, got {output.candidate_ids.shape[0]}: read with "
                    "SequenceReader(negatives='catalogue')"
                )
            return full_softmax_loss(
                scores=output.candidate_scores(),
                positive_ids=output.positive_ids,
                weights=output.weights,
                temperature=config.temperature,
            )
        if output.candidate_ids.shape[0] == 0:
            raise ValueError(
                "sampled softmax needs uniform negatives in the batch: SequenceReader(negatives='uniform')"
            )
        return sampled_softmax_loss(
            query=output.query,
            positive_ids=output.positive_ids,
            positive_emb=output.positive_emb,
            uniform_ids=output.candidate_ids,
            uniform_emb=output.candidate_emb,
            weights=output.weights,
            num_items=self.num_items,
            num_in_batch=config.num_in_batch_negatives,
            temperature=config.temperature,
        )


class HyTRecRetrievalTrain(nn.Module):
    """:class:`HyTRecRetrieval` plus its loss: ``forward(batch) -> (loss, RetrievalTrainOutput)``.

    The module TorchRec's ``TrainPipelineSparseDist`` (or ``DistributedModelParallel`` and a plain
    loop) drives; ``train()`` / ``eval()`` select training or evaluation batches' semantics.

    Args:
        model: the core model.

    Example::

        >>> import torch
        >>> from torchrec_hytrec import HyTRecConfig, HyTRecEncoder, HyTRecRetrieval, RetrievalConfig
        >>> from torchrec_hytrec.models.retrieval import HyTRecRetrievalTrain
        >>> config = RetrievalConfig(loss="sampled", num_uniform_negatives=8)
        >>> encoder = HyTRecEncoder(HyTRecConfig.hytrec(embedding_dim=16, num_heads=2))
        >>> train_model = HyTRecRetrievalTrain(HyTRecRetrieval(config, encoder, num_items=50))
        >>> [name for name, _ in train_model.named_children()]
        ['model', 'loss']
    """

    def __init__(self, model: HyTRecRetrieval) -> None:
        super().__init__()
        self.model = model
        self.loss = RetrievalLoss(model.config, model.num_items)

    def forward(self, batch: SequenceBatch) -> Tuple[torch.Tensor, RetrievalTrainOutput]:
        """
        Args:
            batch: a training batch in training mode, an evaluation batch in evaluation mode.

        Returns:
            ``(loss, outputs)``: the weighted mean loss, and :class:`RetrievalTrainOutput`.
        """
        output = self.model(batch)
        loss = self.loss(output)
        offsets = batch.offsets()
        seen_ids, seen_lengths = batch.seen_items()
        return loss, RetrievalTrainOutput(
            loss=loss.detach(),
            query=output.query.detach(),
            weights=output.weights,
            positive_ids=output.positive_ids,
            positive_scores=output.positive_scores.detach(),
            lengths=offsets[1:] - offsets[:-1],
            history_lengths=batch.history_lengths(),
            seen_ids=seen_ids,
            seen_lengths=seen_lengths,
        )
