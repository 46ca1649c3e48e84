"""The item table and side-feature tables of the sequence models, looked up in one call.

Both the retrieval and the ranking model look up a batch's events (``"item_id"`` plus side
features, aligned event by event) and a second set of item ids — softmax candidates, held-out
targets or ranking candidates — through the *same* item table. Routing the second set through an
extra feature name on the item table's ``EmbeddingConfig`` keeps it one sharded table under
``DistributedModelParallel``: every id, wherever it comes from, is looked up by the rank that owns
its row, and the table's gradient and fused optimizer see every use of every row.
"""

from typing import List, Mapping, NamedTuple

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_hytrec.data.batch import ITEM_KEY

ITEM_TABLE = "item"


def sequence_table_configs(
    *,
    num_items: int,
    embedding_dim: int,
    side_features: Mapping[str, int],
    extra_item_feature: str,
    init_std: float,
) -> List[EmbeddingConfig]:
    """Tables of a sequence model: the item table (row 0 is padding) and one per side feature.

    Args:
        num_items: item ids are ``1..num_items``; the table has ``num_items + 1`` rows.
        embedding_dim: width of every table.
        side_features: side-feature key -> number of rows; ids must lie in ``[0, rows)``.
        extra_item_feature: second feature name of the item table (see the module docstring).
        init_std: rows start uniform with this standard deviation. TorchRec's default,
            ``U(+-1/sqrt(rows))``, shrinks with the catalogue and leaves items too faint next to
            the encoder's unit-scale time embeddings to be learned.

    Returns:
        The item table named ``"item"`` first, then one table per side feature named after it.
    """
    if num_items < 1:
        raise ValueError(f"num_items must be >= 1, got {num_items}")
    # Uniform bounds rather than an init_fn: FBGEMM's sharded tables honour only the bounds.
    bound = 3**0.5 * init_std
    init = {"weight_init_min": -bound, "weight_init_max": bound}
    tables = [
        EmbeddingConfig(
            name=ITEM_TABLE,
            embedding_dim=embedding_dim,
            num_embeddings=num_items + 1,
            feature_names=[ITEM_KEY, extra_item_feature],
            **init,
        )
    ]
    for key, rows in side_features.items():
        if key in (ITEM_KEY, extra_item_feature):
            raise ValueError(f"side feature name {key!r} collides with an item feature name")
        tables.append(
            EmbeddingConfig(
                name=key, embedding_dim=embedding_dim, num_embeddings=rows, feature_names=[key], **init
            )
        )
    return tables


def check_ids(ids: torch.Tensor, offsets: torch.Tensor, low: int, high: int, what: str) -> None:
    """Raises ``ValueError`` naming the first user and event whose id is outside ``[low, high]``.

    Args:
        ids: ``[N]`` jagged ids.
        offsets: ``[B + 1]`` start of each user's ids.
        low: smallest valid id.
        high: largest valid id.
        what: what the ids are, for the message.
    """
    bad = (ids < low) | (ids > high)
    if bool(bad.any()):
        first = int(torch.nonzero(bad)[0, 0])
        user = int(torch.searchsorted(offsets, torch.tensor(first, device=offsets.device), right=True)) - 1
        raise ValueError(
            f"{what}: id {int(ids[first])} of batch row {user} (event {first - int(offsets[user])}) "
            f"is outside [{low}, {high}]"
        )


class SequenceLookup(NamedTuple):
    """What :class:`ItemSequenceArch` returns.

    Attributes:
        events: ``[sum(n), d]`` item plus side-feature embeddings of every event: the encoder input.
        items: ``[sum(n), d]`` item-table rows of every event (the softmax's output embeddings).
        extra: ``[M, d]`` item-table rows of the extra ids, in their order.

    Example::

        looked_up = item_arch(batch.features, extra_ids, extra_lengths)
        states = encoder(looked_up.events, batch.offsets(), batch.timestamps)
    """

    events: torch.Tensor
    items: torch.Tensor
    extra: torch.Tensor


class ItemSequenceArch(nn.Module):
    """Embeds a batch's events and a second set of item ids through one ``EmbeddingCollection``.

    An event's embedding is the sum of its item row and its side-feature rows. Ids are checked
    before the lookup: the FBGEMM kernels do not bound-check on every backend.

    Args:
        embedding_collection: built from :func:`sequence_table_configs`.
        num_items: item ids are ``1..num_items``.
        side_features: side-feature key -> number of rows, in the KJT's key order.
        extra_item_feature: the item table's second feature name.

    Example::

        tables = sequence_table_configs(
            num_items=100, embedding_dim=16, side_features={"category": 8},
            extra_item_feature="candidate_item_id", init_std=0.25,
        )
        arch = ItemSequenceArch(EmbeddingCollection(tables=tables), 100, {"category": 8},
                                "candidate_item_id")
        out = arch(features, extra_ids=torch.tensor([5, 7]), extra_lengths=torch.tensor([1, 1]))
        out.events.shape  # [sum(n), 16]
    """

    def __init__(
        self,
        embedding_collection: EmbeddingCollection,
        num_items: int,
        side_features: Mapping[str, int],
        extra_item_feature: str,
    ) -> None:
        super().__init__()
        self.embedding_collection = embedding_collection
        self._num_items = num_items
        self._side_features = dict(side_features)
        self._extra_key = extra_item_feature
        self._keys: List[str] = [ITEM_KEY, *self._side_features]

    def forward(
        self, features: KeyedJaggedTensor, extra_ids: torch.Tensor, extra_lengths: torch.Tensor
    ) -> SequenceLookup:
        """
        Args:
            features: keys ``"item_id"`` then the side features, lengths ``[B]`` per key.
            extra_ids: ``[M]`` item ids to look up besides the events.
            extra_lengths: ``[B]`` how the extra ids are laid out over the batch rows (only their
                sum matters to the lookup; a KJT needs one length per row).

        Returns:
            :class:`SequenceLookup`.
        """
        if features.keys() != self._keys:
            raise ValueError(f"sequence features must have keys {self._keys}, got {features.keys()}")
        offsets = features[ITEM_KEY].offsets()
        check_ids(features[ITEM_KEY].values(), offsets, 1, self._num_items, "item_id")
        for key, rows in self._side_features.items():
            check_ids(features[key].values(), offsets, 0, rows - 1, key)
        extra_offsets = torch.ops.fbgemm.asynchronous_complete_cumsum(extra_lengths)
        check_ids(extra_ids, extra_offsets, 1, self._num_items, self._extra_key)

        kjt = KeyedJaggedTensor(
            keys=[*self._keys, self._extra_key],
            values=torch.cat([features.values(), extra_ids]),
            lengths=torch.cat([features.lengths(), extra_lengths]),
        )
        looked_up = self.embedding_collection(kjt)
        items = looked_up[ITEM_KEY].values()
        events = items
        for key in self._side_features:
            events = events + looked_up[key].values()
        return SequenceLookup(events=events, items=items, extra=looked_up[self._extra_key].values())
