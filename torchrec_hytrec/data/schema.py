"""The Parquet layout of behaviour sequences, its metadata, its errors and in-memory form.

One row per user::

    user_id     int64
    item_ids    list<int64>   item ids in [1, num_items]; 0 is reserved for padding
    timestamps  list<int64>   event times in ``time_unit``, non-decreasing within the row
    <feature>   list<int64>   optional side features aligned with item_ids, ids in [1, cardinality]

The Arrow schema metadata key ``torchrec_hytrec`` holds a JSON :class:`SequenceDatasetInfo`
(catalogue size, side-feature cardinalities, time unit, counts). Embedding tables therefore have
``num_items + 1`` rows (and ``cardinality + 1`` for a feature) so that id 0 can stay padding.

This file is the contract between the data files and the models (which size their tables from
:class:`SequenceDatasetInfo`); it holds no I/O. The rules are checked by ``data/validation.py``,
files are read and written by ``data/parquet.py``.
"""

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Union

import numpy as np
import pyarrow as pa

USER_ID = "user_id"
ITEM_IDS = "item_ids"
TIMESTAMPS = "timestamps"
METADATA_KEY = b"torchrec_hytrec"
FORMAT_VERSION = 1
# Seconds per unit: batches always carry seconds (see ``SequenceBatch``).
TIME_UNITS: Dict[str, int] = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}
DEFAULT_ROW_GROUP_SIZE = 1024
# The converter saves each id mapping as ``<output stem>.<column>.map.parquet`` (columns ``id``,
# ``raw``) next to its output; readers given a directory skip these.
MAPPING_SUFFIX = ".map.parquet"
MAPPING_COLUMNS = ["id", "raw"]

PathLike = Union[str, Path]


class DataValidationError(ValueError):
    """Raised for any malformed input; the message names the file and the row / user."""


class DataWriteError(OSError):
    """Raised when an output file cannot be written (e.g. a full disk); the message names it."""


@dataclass(frozen=True)
class SequenceDatasetInfo:
    """Dataset facts stored in the Parquet file metadata.

    Args:
        num_items: catalogue size; item ids lie in ``[1, num_items]``.
        feature_cardinalities: side-feature name to cardinality (ids in ``[1, cardinality]``),
            in column order.
        time_unit: unit of the stored timestamps, one of ``s``, ``ms``, ``us``, ``ns``.
        num_users: rows in the file (filled in by
            :func:`~torchrec_hytrec.data.parquet.write_sequences`).
        num_events: events in the file (filled in by ``write_sequences``).
        source: free-form provenance, e.g. the converter and input file.

    Example::

        from torchrec_hytrec.data.parquet import read_info, write_sequences

        info = SequenceDatasetInfo(num_items=12101, feature_cardinalities={"category": 40})
        write_sequences("beauty.parquet", sequences, info)
        assert read_info("beauty.parquet").num_items == 12101
    """

    num_items: int
    feature_cardinalities: Dict[str, int] = field(default_factory=dict)
    time_unit: str = "s"
    num_users: int = 0
    num_events: int = 0
    source: str = ""

    def __post_init__(self) -> None:
        if self.num_items < 1:
            raise DataValidationError(f"num_items must be >= 1, got {self.num_items}")
        if self.time_unit not in TIME_UNITS:
            raise DataValidationError(
                f"time_unit must be one of {sorted(TIME_UNITS)}, got {self.time_unit!r}"
            )
        for name, card in self.feature_cardinalities.items():
            if name in (USER_ID, ITEM_IDS, TIMESTAMPS) or card < 1:
                raise DataValidationError(f"bad side feature {name!r} with cardinality {card}")
        if self.num_users < 0 or self.num_events < 0:
            raise DataValidationError(
                f"negative counts: num_users {self.num_users}, num_events {self.num_events}"
            )

    @property
    def feature_names(self) -> List[str]:
        return list(self.feature_cardinalities)

    def to_json(self) -> str:
        return json.dumps({"format_version": FORMAT_VERSION, **dataclasses.asdict(self)})

    @classmethod
    def from_json(cls, text: Union[str, bytes], source: str) -> "SequenceDatasetInfo":
        """Parses :meth:`to_json`'s output (bytes as UTF-8), naming ``source`` in every error."""
        try:
            raw = json.loads(text)
            version = raw.pop("format_version")
        except (ValueError, KeyError, AttributeError, TypeError) as e:
            raise DataValidationError(f"{source}: unreadable {METADATA_KEY.decode()} metadata: {e!r}")
        if version != FORMAT_VERSION:
            raise DataValidationError(f"{source}: format_version {version}, expected {FORMAT_VERSION}")
        try:
            return cls(**raw)
        except (TypeError, DataValidationError) as e:
            raise DataValidationError(f"{source}: bad {METADATA_KEY.decode()} metadata: {e}")


@dataclass
class Sequences:
    """Users' event sequences as flat numpy arrays (the in-memory form of one file or row group).

    Args:
        user_ids: ``[U]`` int64.
        offsets: ``[U + 1]`` int64 start of each user's events.
        item_ids: ``[N]`` int64.
        timestamps: ``[N]`` int64, in the dataset's ``time_unit``.
        features: side-feature name to ``[N]`` int64 values aligned with ``item_ids``.

    Example::

        seqs = Sequences(
            user_ids=np.array([7]), offsets=np.array([0, 2]),
            item_ids=np.array([3, 1]), timestamps=np.array([10, 25]), features={},
        )
    """

    user_ids: np.ndarray
    offsets: np.ndarray
    item_ids: np.ndarray
    timestamps: np.ndarray
    features: Dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def num_users(self) -> int:
        return self.user_ids.shape[0]

    @property
    def num_events(self) -> int:
        return int(self.offsets[-1])

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def rows(self, start: int, stop: int) -> "Sequences":
        """Users ``[start, stop)`` with offsets rebased to 0."""
        lo, hi = self.offsets[start], self.offsets[stop]
        return Sequences(
            user_ids=self.user_ids[start:stop],
            offsets=self.offsets[start : stop + 1] - lo,
            item_ids=self.item_ids[lo:hi],
            timestamps=self.timestamps[lo:hi],
            features={k: v[lo:hi] for k, v in self.features.items()},
        )


def arrow_schema(info: SequenceDatasetInfo) -> pa.Schema:
    """The Arrow schema of a sequence file, with ``info`` in its metadata."""
    fields = [pa.field(USER_ID, pa.int64(), nullable=False)] + [
        pa.field(name, pa.list_(pa.int64()), nullable=False)
        for name in [ITEM_IDS, TIMESTAMPS] + info.feature_names
    ]
    return pa.schema(fields, metadata={METADATA_KEY: info.to_json()})
