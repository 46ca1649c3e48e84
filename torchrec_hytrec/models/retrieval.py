"""Retrieval: item/side-feature ``EmbeddingCollection`` -> ``HyTRecEncoder`` -> next-item softmax.

Public API (stable; ``torchrec_hytrec.train`` builds on it):

- :class:`RetrievalConfig`: tables, loss and sampling settings.
- :class:`HyTRecRetrieval` ``(config, encoder, device=None)``; ``forward(batch: SequenceBatch)``
  returns ``(loss, aux)``, the contract of TorchRec's train pipelines (``TrainPipelineBase``
  drives it; ``TrainPipelineSparseDist`` cannot, as it fx-traces ``forward`` and needs the
  table input to be a field of the batch, while this forward branches on the batch kind and
  appends the softmax candidates to the KJT itself):

  * a training batch (``batch.targets`` all ``-1``): every position but a user's last predicts the
    next event; ``aux = {"num_positions": [1]}``.
  * an evaluation batch (``batch.targets`` the held-out items): the encoder's last state, read at
    the request time ``batch.target_timestamps`` when given, predicts the target;
    ``aux = {"query": [B, d], "target_score": [B]}``, what
    :class:`torchrec_hytrec.models.evaluation.RetrievalEvaluator` ranks against the catalogue.

Scores are dot products ``user . item``; item id 0 is padding and never scored.
"""

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingCollection

from torchrec_hytrec.data.batch import ITEM_KEY, SequenceBatch
from torchrec_hytrec.models.embeddings import ItemSequenceArch, sequence_table_configs
from torchrec_hytrec.models.losses import full_softmax_loss, sampled_softmax_loss

# Feature name of the item table's second input: softmax candidates and held-out targets.
SCORED_ITEM_KEY = "scored_item_id"


@dataclass
class RetrievalConfig:
    """Settings of :class:`HyTRecRetrieval`.

    Args:
        num_items: item ids are ``1..num_items`` (0 is padding).
        embedding_dim: table width; must equal the encoder's ``embedding_dim``.
        side_features: side-feature key -> number of rows, in the batch KJT's key order after
            ``"item_id"``; each side embedding is added to the item embedding.
        loss: ``"full"``: softmax over the whole catalogue (looks up every item each step: for
            catalogues that fit); ``"sampled"``: in-batch plus uniform negatives, logQ-corrected.
        num_uniform_negatives: items drawn uniformly per batch for ``"sampled"``.
        num_in_batch_negatives: most in-batch positives shared as candidates for ``"sampled"``.
        temperature: logits are ``user . item / temperature``.
        embedding_init_std: standard deviation of the initial table rows; ``None`` gives
            ``embedding_dim ** -0.5`` (unit-norm rows).
        use_request_time: read evaluation users at ``batch.target_timestamps`` (the encoder decays
            its state over the gap since the last event) rather than at their last event.

    Example::

        config = RetrievalConfig(num_items=12101, embedding_dim=64, loss="full")
    """

    num_items: int
    embedding_dim: int
    side_features: Dict[str, int] = field(default_factory=dict)
    loss: str = "sampled"
    num_uniform_negatives: int = 256
    num_in_batch_negatives: int = 2048
    temperature: float = 1.0
    embedding_init_std: Optional[float] = None
    use_request_time: bool = True

    def __post_init__(self) -> None:
        if self.loss not in ("full", "sampled"):
            raise ValueError(f"RetrievalConfig.loss must be 'full' or 'sampled', got {self.loss!r}")
        if self.temperature <= 0:
            raise ValueError(f"RetrievalConfig.temperature must be > 0, got {self.temperature}")


class HyTRecRetrieval(nn.Module):
    """Next-item retrieval with a HyTRec encoder over sharded item and side-feature tables.

    Args:
        config: tables and loss settings.
        encoder: ``HyTRecEncoder`` (or any module with its ``forward(values, offsets,
            timestamps) -> [sum(n), d]`` and ``forward_last(values, offsets, timestamps,
            request_time=None) -> [B, d]``).
        device: where the tables are built; ``torch.device("meta")`` defers allocation to
            ``DistributedModelParallel``.

    Example::

        model = HyTRecRetrieval(
            RetrievalConfig(num_items=1000, embedding_dim=64, loss="full"),
            HyTRecEncoder(HyTRecConfig.hytrec(embedding_dim=64)),
        )
        loss, aux = model(train_batch)
        loss.backward()
    """

    def __init__(
        self, config: RetrievalConfig, encoder: nn.Module, device: Optional[torch.device] = None
    ) -> None:
        super().__init__()
        encoder_dim = getattr(getattr(encoder, "config", None), "embedding_dim", config.embedding_dim)
        if encoder_dim != config.embedding_dim:
            raise ValueError(
                f"encoder embedding_dim {encoder_dim} != RetrievalConfig.embedding_dim {config.embedding_dim}"
            )
        self.config = config
        tables = sequence_table_configs(
            num_items=config.num_items,
            embedding_dim=config.embedding_dim,
            side_features=config.side_features,
            extra_item_feature=SCORED_ITEM_KEY,
            init_std=config.embedding_init_std or config.embedding_dim**-0.5,
        )
        self.sequence_arch = ItemSequenceArch(
            EmbeddingCollection(tables=tables, device=device),
            config.num_items,
            config.side_features,
            SCORED_ITEM_KEY,
        )
        self.encoder = encoder

    @property
    def embedding_collection(self) -> nn.Module:
        """The (possibly sharded) collection holding the item table ``"item"``."""
        return self.sequence_arch.embedding_collection

    def _candidate_pool(self, device: torch.device) -> torch.Tensor:
        if self.config.loss == "full":
            return torch.arange(1, self.config.num_items + 1, device=device)
        return torch.randint(
            1, self.config.num_items + 1, (self.config.num_uniform_negatives,), device=device
        )

    def _loss(
        self,
        query: torch.Tensor,
        positive_ids: torch.Tensor,
        positive_emb: torch.Tensor,
        pool_ids: torch.Tensor,
        pool_emb: torch.Tensor,
    ) -> torch.Tensor:
        if self.config.loss == "full":
            return full_softmax_loss(
                query=query,
                catalogue=pool_emb,
                positive_ids=positive_ids,
                temperature=self.config.temperature,
            )
        return sampled_softmax_loss(
            query=query,
            positive_ids=positive_ids,
            positive_emb=positive_emb,
            uniform_ids=pool_ids,
            uniform_emb=pool_emb,
            num_items=self.config.num_items,
            num_in_batch=self.config.num_in_batch_negatives,
            temperature=self.config.temperature,
        )

    def forward(self, batch: SequenceBatch) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """
        Args:
            batch: a training batch (``targets`` all ``-1``) or an evaluation batch (``targets``
                the held-out items, every user with at least one event).

        Returns:
            ``(loss, aux)``; see the module docstring.
        """
        offsets = batch.offsets()
        lengths = offsets[1:] - offsets[:-1]
        is_eval = bool((batch.targets >= 0).any())
        if is_eval and bool((batch.targets < 0).any()):
            raise ValueError("batch mixes training rows (target -1) and evaluation rows")
        pool_ids = self._candidate_pool(offsets.device)
        extra_lengths = torch.zeros_like(lengths)
        extra_lengths[-1] = pool_ids.numel()
        if is_eval:
            empty = torch.nonzero(lengths == 0).flatten()
            if empty.numel():
                raise ValueError(
                    f"evaluation users without history: user_ids {batch.user_ids[empty].tolist()}"
                )
            extra_ids = torch.cat([batch.targets, pool_ids])
            extra_lengths = extra_lengths + 1
        else:
            extra_ids = pool_ids
        looked_up = self.sequence_arch(batch.features, extra_ids, extra_lengths)

        if is_eval:
            request_time = self._request_time(batch)
            query = self.encoder.forward_last(
                looked_up.events, offsets, batch.timestamps, request_time=request_time
            )
            positive_emb = looked_up.extra[: batch.batch_size]
            loss = self._loss(
                query, batch.targets, positive_emb, pool_ids, looked_up.extra[batch.batch_size :]
            )
            target_score = (query * positive_emb).sum(-1)
            return loss, {"query": query.detach(), "target_score": target_score.detach()}

        states = self.encoder(looked_up.events, offsets, batch.timestamps)
        # Every event but a user's last is a query; its target is the next event.
        is_query = torch.ones(states.shape[0], dtype=torch.bool, device=states.device)
        is_query[offsets[1:][lengths > 0] - 1] = False
        query_idx = torch.nonzero(is_query).flatten()
        if query_idx.numel() == 0:
            raise ValueError("training batch has no user with 2 or more events: nothing to predict")
        positive_ids = batch.features[ITEM_KEY].values()[query_idx + 1]
        loss = self._loss(
            states[query_idx], positive_ids, looked_up.items[query_idx + 1], pool_ids, looked_up.extra
        )
        return loss, {"num_positions": torch.tensor([query_idx.numel()], device=states.device)}

    def _request_time(self, batch: SequenceBatch) -> Optional[torch.Tensor]:
        if not self.config.use_request_time:
            return None
        known = batch.target_timestamps >= 0
        if bool(known.all()):
            return batch.target_timestamps
        if bool(known.any()):
            raise ValueError(
                f"target_timestamps known for some users only; unknown for user_ids "
                f"{batch.user_ids[~known].tolist()}"
            )
        return None
