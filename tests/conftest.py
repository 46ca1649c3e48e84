"""Shared fixtures. Builders used inside spawned workers (module-level functions) live in
``tests/helpers.py``, importable by every test module."""

from pathlib import Path
from typing import Callable

import pytest
import torch

from torchrec_hytrec.data.parquet import write_sequences
from torchrec_hytrec.data.synthetic import SyntheticConfig, generate


@pytest.fixture(scope="session")
def synthetic_parquet(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``synthetic_parquet(row_group_size=..., **SyntheticConfig fields) -> Path``: a seeded synthetic
    dataset written once per distinct argument set for the whole session."""
    made = {}

    def make(row_group_size: int = 16, **fields: object) -> Path:
        key = (row_group_size, tuple(sorted(fields.items())))
        if key not in made:
            data = generate(SyntheticConfig(**fields))
            path = tmp_path_factory.mktemp("synthetic") / "sequences.parquet"
            write_sequences(path, data.sequences, data.info, row_group_size=row_group_size)
            made[key] = path
        return made[key]

    return make


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: streaming and small kernels run many tiny ops, and on
    shared cores each would wait for a second thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
