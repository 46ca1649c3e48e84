"""Leave-one-out splits (the SASRec protocol), computed from sequence lengths alone.

For a user with ``n >= MIN_EVAL_LENGTH`` (3) events ``e_0 .. e_{n-1}``:

* train: input ``e_0 .. e_{n-3}``; its targets are the next events inside that input;
* valid: input ``e_0 .. e_{n-3}``, target ``e_{n-2}``;
* test:  input ``e_0 .. e_{n-2}``, target ``e_{n-1}``.

So no evaluation target is ever an input of the split it is evaluated in, and the training
split never contains either held-out event. Users shorter than 3 events have no evaluation
targets; as in SASRec, their whole sequence goes to training (where a 1-event sequence still
yields no next-event pair and is skipped by the reader, which counts it).
"""

import enum
from typing import Tuple

import numpy as np

MIN_EVAL_LENGTH = 3


class Split(str, enum.Enum):
    """Which part of the leave-one-out protocol a reader serves.

    Example::

        end, target = split_positions(lengths, Split.TEST)
    """

    TRAIN = "train"
    VALID = "valid"
    TEST = "test"


def split_positions(lengths: np.ndarray, split: Split) -> Tuple[np.ndarray, np.ndarray]:
    """Per-user input length and target position for ``split``.

    Args:
        lengths: ``[U]`` events per user.
        split: the split.

    Returns:
        ``(input_end, target)``: the user's input is events ``[0, input_end)``; ``target`` is
        the held-out event's position (``-1`` for training). ``input_end == 0`` means the user
        has no row in this split.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    evaluable = lengths >= MIN_EVAL_LENGTH
    split = Split(split)
    if split is Split.TRAIN:
        return np.where(evaluable, lengths - 2, lengths), np.full_like(lengths, -1)
    held_out = lengths - (2 if split is Split.VALID else 1)
    return np.where(evaluable, held_out, 0), np.where(evaluable, held_out, -1)
