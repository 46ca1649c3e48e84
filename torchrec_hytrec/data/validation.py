"""Validation of decoded behaviour sequences: every rule of the layout in ``data/schema.py``.

Checks are vectorised over all events and refuse rather than repair: a Parquet file is the
canonical, already-sorted form. Every problem raises :class:`DataValidationError` naming the file
and the first row / user at fault (:func:`row_location`).
"""

import numpy as np

from torchrec_hytrec.data.schema import (
    ITEM_IDS,
    TIMESTAMPS,
    DataValidationError,
    SequenceDatasetInfo,
    Sequences,
)


def row_location(source: str, user_ids: np.ndarray, row: int, first_row: int) -> str:
    """``"<source>: row <n> (user <id>)"``: how every :class:`DataValidationError` names a row.

    Args:
        source: file name.
        user_ids: user ids of the rows at hand.
        row: the row among them.
        first_row: row number of their first row in the file.

    Example::

        >>> import numpy as np
        >>> row_location("train.parquet", np.array([7, 9]), 1, first_row=1024)
        'train.parquet: row 1025 (user 9)'
    """
    return f"{source}: row {first_row + row} (user {int(user_ids[row])})"


def check_unique_users(user_ids: np.ndarray, source: str, first_row: int = 0) -> None:
    """Refuses a user on several rows: each user is one row, its events grouped in it.

    Raises:
        DataValidationError: naming the user and the first two rows holding it.
    """
    order = np.argsort(user_ids, kind="stable")
    ranked = user_ids[order]
    dup = np.flatnonzero(ranked[1:] == ranked[:-1])
    if dup.size:
        rows = np.flatnonzero(user_ids == ranked[dup[0]])[:2] + first_row
        raise DataValidationError(
            f"{source}: user {int(ranked[dup[0]])} appears in rows {int(rows[0])} and {int(rows[1])} "
            "(each user must be one row)"
        )


def check_sequences(seqs: Sequences, info: SequenceDatasetInfo, source: str, first_row: int = 0) -> None:
    """Validates decoded sequences against ``info``, vectorised over all events.

    Timestamps out of order are refused (with the user and position) rather than sorted: a
    Parquet file is the canonical, already-sorted form, and the converters sort interaction
    logs stably before writing.

    Args:
        seqs: the rows to check.
        info: the dataset facts (catalogue and feature cardinalities).
        source: file name used in error messages.
        first_row: row number of ``seqs``' first row in the file, for error messages.

    Raises:
        DataValidationError: naming ``source`` and the first offending row and user.
    """
    n = seqs.num_events
    for name, arr in [(ITEM_IDS, seqs.item_ids), (TIMESTAMPS, seqs.timestamps)] + list(seqs.features.items()):
        if arr.shape != (n,):
            raise DataValidationError(f"{source}: column {name!r} has {arr.shape[0]} values, expected {n}")
    missing = set(info.feature_cardinalities) - set(seqs.features)
    if missing:
        raise DataValidationError(f"{source}: missing side-feature columns {sorted(missing)}")
    bad = np.flatnonzero(seqs.user_ids < 0)
    if bad.size:
        raise DataValidationError(
            f"{row_location(source, seqs.user_ids, bad[0], first_row)}: negative user_id"
        )
    check_unique_users(seqs.user_ids, source, first_row)
    lengths = seqs.lengths
    bad = np.flatnonzero(lengths <= 0)
    if bad.size:
        raise DataValidationError(f"{row_location(source, seqs.user_ids, bad[0], first_row)}: empty sequence")

    def fail_at_event(event: int, what: str) -> None:
        row = int(np.searchsorted(seqs.offsets, event, side="right") - 1)
        pos = event - int(seqs.offsets[row])
        raise DataValidationError(
            f"{row_location(source, seqs.user_ids, row, first_row)}, position {pos}: {what}"
        )

    ranges = [(ITEM_IDS, seqs.item_ids, info.num_items)] + [
        (name, seqs.features[name], card) for name, card in info.feature_cardinalities.items()
    ]
    for name, arr, high in ranges:
        bad = np.flatnonzero((arr < 1) | (arr > high))
        if bad.size:
            fail_at_event(int(bad[0]), f"{name} value {int(arr[bad[0]])} outside [1, {high}]")
    ts = seqs.timestamps
    bad = np.flatnonzero(ts < 0)
    if bad.size:
        fail_at_event(int(bad[0]), f"negative timestamp {int(ts[bad[0]])}")
    decreasing = ts[1:] < ts[:-1]
    # A decrease across two users is fine: only compare events of the same user.
    decreasing[seqs.offsets[1:-1] - 1] = False
    bad = np.flatnonzero(decreasing)
    if bad.size:
        e = int(bad[0]) + 1
        fail_at_event(e, f"timestamps out of order ({int(ts[e - 1])} then {int(ts[e])})")
