"""Parquet behaviour sequences: schema, splits and the batch reader.

The converters (``torchrec_hytrec.data.convert``) and the synthetic generator
(``torchrec_hytrec.data.synthetic``) are command-line modules, imported from their own paths so
that ``python -m`` runs them cleanly.
"""

from torchrec_hytrec.data.batch import ITEM_KEY, SequenceBatch
from torchrec_hytrec.data.reader import ReaderConfig, ReaderStats, SequenceReader
from torchrec_hytrec.data.schema import (
    DataValidationError,
    SequenceDatasetInfo,
    Sequences,
    read_info,
    read_sequences,
    write_sequences,
)
from torchrec_hytrec.data.splits import Split, split_positions

__all__ = [
    "ITEM_KEY",
    "DataValidationError",
    "ReaderConfig",
    "ReaderStats",
    "SequenceBatch",
    "SequenceDatasetInfo",
    "SequenceReader",
    "Sequences",
    "Split",
    "read_info",
    "read_sequences",
    "split_positions",
    "write_sequences",
]
