"""Parquet behaviour sequences: schema, converters, synthetic data, splits and the batch reader."""

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
from torchrec_hytrec.data.synthetic import SyntheticConfig, SyntheticData, generate

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
    "SyntheticConfig",
    "SyntheticData",
    "generate",
    "read_info",
    "read_sequences",
    "split_positions",
    "write_sequences",
]
