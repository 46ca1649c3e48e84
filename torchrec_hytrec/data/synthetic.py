"""Seeded synthetic behaviour histories with planted, learnable structure.

The catalogue is ``num_clusters`` clusters of ``items_per_cluster`` items each; item
``1 + c * items_per_cluster + r`` is the ``r``-th most popular item of cluster ``c``
(popularity within a cluster is Zipf with exponent ``item_zipf``; clusters themselves are
picked with Zipf exponent ``cluster_zipf``). Each item carries the side feature ``category``
(its cluster + 1).

Planted structure of one user:

* length: log-normal (``median_length``, ``length_sigma``) clipped to
  ``[min_length, max_length]``, so a few users have very long histories;
* sessions: each event starts a new session with probability ``1 / mean_session_length``
  (the first event always does); a session has one *intent* cluster and every event of it
  is drawn from that cluster, except ``noise_prob`` of events drawn from global popularity
  (short bursts of intent);
* stable long-term preference: a *core* cluster followed by a ``core_weight`` share of sessions
  for the user's whole life;
* drift: ``interests_per_user`` further interests form a sliding window over a per-user list of
  clusters; at each session start, with probability ``drift_prob``, the oldest interest becomes
  dormant and a new one enters; other sessions pick a window interest uniformly;
* returns: a session after a long gap revisits a uniformly chosen dormant interest with
  probability ``return_prob`` (when the user has one);
* gaps: log-normal around ``session_gap_s`` (about a minute) inside sessions, around
  ``between_gap_s`` (about a day; hours to days) between sessions, and around ``long_gap_s``
  (months) with probability ``long_gap_prob`` per session start.

:attr:`SyntheticData.event_intent` is the intent cluster each event was drawn from, so tests can
build an oracle for the held-out events (:meth:`SyntheticData.heldout_intent`). Everything is
vectorised over events with numpy: millions of events take seconds.
"""

import argparse
import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from torchrec_hytrec.data.parquet import write_sequences
from torchrec_hytrec.data.schema import DEFAULT_ROW_GROUP_SIZE, SequenceDatasetInfo, Sequences
from torchrec_hytrec.data.splits import Split, split_positions

CATEGORY = "category"
DAY_S = 86_400


@dataclass(frozen=True)
class SyntheticConfig:
    """Parameters of :func:`generate` (see the module docstring for their meaning).

    Args:
        num_users: users to generate.
        num_clusters: item clusters (interests).
        items_per_cluster: items in each cluster.
        median_length: median events per user.
        length_sigma: log-normal shape of the length distribution.
        min_length: shortest history.
        max_length: longest history.
        mean_session_length: mean events per session.
        interests_per_user: drifting interests active at a time (besides the core).
        core_weight: share of sessions that follow the core interest.
        drift_prob: per session, probability that the oldest drifting interest is replaced.
        long_gap_prob: per session, probability that it follows a gap of months.
        return_prob: after a long gap, probability of revisiting a dormant interest.
        noise_prob: per event, probability of an item from global popularity.
        item_zipf: popularity exponent within a cluster.
        cluster_zipf: popularity exponent of clusters.
        session_gap_s: median gap inside a session, seconds.
        between_gap_s: median gap between sessions, seconds.
        long_gap_s: median long gap, seconds.
        start_time: earliest first event, Unix seconds.
        seed: random seed.

    Example::

        data = generate(SyntheticConfig.small())
        write_sequences("synthetic.parquet", data.sequences, data.info)
    """

    num_users: int = 3000
    num_clusters: int = 40
    items_per_cluster: int = 50
    median_length: float = 40.0
    length_sigma: float = 1.2
    min_length: int = 5
    max_length: int = 2000
    mean_session_length: float = 8.0
    interests_per_user: int = 3
    core_weight: float = 0.4
    drift_prob: float = 0.05
    long_gap_prob: float = 0.03
    return_prob: float = 0.7
    noise_prob: float = 0.1
    item_zipf: float = 1.1
    cluster_zipf: float = 0.8
    session_gap_s: float = 60.0
    between_gap_s: float = DAY_S
    long_gap_s: float = 90 * DAY_S
    start_time: int = 1_600_000_000
    seed: int = 0

    @property
    def num_items(self) -> int:
        return self.num_clusters * self.items_per_cluster

    @classmethod
    def small(cls, seed: int = 0) -> "SyntheticConfig":
        """Tests and the default training job: 3k users, 2k items, ~0.25M events, up to 2k long."""
        return cls(seed=seed)

    @classmethod
    def long(cls, seed: int = 0, num_users: int = 5200) -> "SyntheticConfig":
        """Benchmarks: ~1k events per user on average, histories up to 12k (≈5.2M events at 5.2k users)."""
        return cls(
            num_users=num_users,
            num_clusters=200,
            items_per_cluster=100,
            median_length=400.0,
            length_sigma=1.4,
            max_length=12_000,
            seed=seed,
        )


@dataclass
class SyntheticData:
    """Generated sequences with their planted intents.

    Args:
        sequences: the histories, sorted by user id and time.
        info: dataset facts (items, the ``category`` feature).
        event_intent: ``[N]`` cluster each event's session intent was drawn from.
        item_cluster: ``[num_items + 1]`` cluster of each item (``-1`` for padding id 0).

    Example::

        data = generate(SyntheticConfig.small())
        clusters = data.heldout_intent(Split.TEST)
    """

    sequences: Sequences
    info: SequenceDatasetInfo
    event_intent: np.ndarray
    item_cluster: np.ndarray

    def heldout_intent(self, split: Split) -> np.ndarray:
        """``[U]`` planted intent cluster of each user's ``split`` target (``-1`` if none)."""
        _, target = split_positions(self.sequences.lengths, split)
        has = target >= 0
        out = np.full(target.shape, -1, dtype=np.int64)
        out[has] = self.event_intent[self.sequences.offsets[:-1][has] + target[has]]
        return out


def _zipf_cdf(n: int, exponent: float) -> np.ndarray:
    weights = 1.0 / np.arange(1, n + 1) ** exponent
    cdf = np.cumsum(weights)
    return cdf / cdf[-1]


def _draw(rng: np.random.Generator, cdf: np.ndarray, size: int) -> np.ndarray:
    # min() guards the float round-off where a draw lands exactly on the last cdf value.
    return np.minimum(np.searchsorted(cdf, rng.random(size), side="right"), cdf.size - 1)


def _per_user_cumsum(values: np.ndarray, group_starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Inclusive cumulative sum restarted at each group (groups contiguous, given by starts)."""
    total = np.cumsum(values)
    before = np.r_[0, total][group_starts]
    return total - np.repeat(before, counts)


def generate(config: SyntheticConfig) -> SyntheticData:
    """Generates users' histories as described in the module docstring.

    Args:
        config: the generator parameters (seeded).

    Returns:
        The sequences, dataset info and planted intents.
    """
    c = config
    rng = np.random.default_rng(c.seed)
    lengths = np.exp(rng.normal(np.log(c.median_length), c.length_sigma, c.num_users))
    lengths = np.clip(np.rint(lengths), c.min_length, c.max_length).astype(np.int64)
    offsets = np.r_[0, np.cumsum(lengths)].astype(np.int64)
    num_events = int(offsets[-1])
    user_starts = offsets[:-1]
    event_user = np.repeat(np.arange(c.num_users), lengths)

    # Sessions: flat arrays over all sessions of all users.
    is_start = rng.random(num_events) < 1.0 / c.mean_session_length
    is_start[user_starts] = True
    session_start = np.flatnonzero(is_start)
    event_session = np.cumsum(is_start) - 1
    session_user = event_user[session_start]
    sessions_per_user = np.bincount(session_user, minlength=c.num_users)
    user_first_session = np.r_[0, np.cumsum(sessions_per_user)[:-1]]
    first_session = np.zeros(session_start.size, dtype=bool)
    first_session[user_first_session] = True
    num_sessions = session_start.size

    drift = (rng.random(num_sessions) < c.drift_prob) & ~first_session
    epoch = _per_user_cumsum(drift.astype(np.int64), user_first_session, sessions_per_user)
    long_gap = (rng.random(num_sessions) < c.long_gap_prob) & ~first_session

    # Interests: a core cluster per user and a list of k + (number of drifts) drifting slots.
    cluster_cdf = _zipf_cdf(c.num_clusters, c.cluster_zipf)
    cluster_rank_to_id = rng.permutation(c.num_clusters)
    core = cluster_rank_to_id[_draw(rng, cluster_cdf, c.num_users)]
    slots_per_user = c.interests_per_user + np.bincount(
        session_user, weights=drift, minlength=c.num_users
    ).astype(np.int64)
    slot_offsets = np.r_[0, np.cumsum(slots_per_user)[:-1]]
    slots = cluster_rank_to_id[_draw(rng, cluster_cdf, int(slots_per_user.sum()))]

    u = rng.random(num_sessions)
    window_slot = slot_offsets[session_user] + epoch + rng.integers(0, c.interests_per_user, num_sessions)
    dormant_slot = slot_offsets[session_user] + np.floor(rng.random(num_sessions) * epoch).astype(np.int64)
    returning = long_gap & (epoch > 0) & (rng.random(num_sessions) < c.return_prob)
    intent = np.where(u < c.core_weight, core[session_user], slots[window_slot])
    intent = np.where(returning, slots[dormant_slot], intent)

    # Items: the session's intent cluster, or global popularity for noise events.
    event_intent = intent[event_session]
    noise = rng.random(num_events) < c.noise_prob
    cluster = np.where(noise, cluster_rank_to_id[_draw(rng, cluster_cdf, num_events)], event_intent)
    rank = _draw(rng, _zipf_cdf(c.items_per_cluster, c.item_zipf), num_events)
    items = 1 + cluster * c.items_per_cluster + rank

    # Gaps: 0 before a user's first event; log-normal inside / between sessions / long.
    gaps = np.exp(rng.normal(np.log(c.session_gap_s), 1.0, num_events))
    between = np.exp(rng.normal(np.log(c.between_gap_s), 1.2, num_sessions))
    months = np.exp(rng.normal(np.log(c.long_gap_s), 0.5, num_sessions))
    gaps[session_start] = np.where(long_gap, months, between)
    gaps = np.maximum(np.rint(gaps), 1).astype(np.int64)
    gaps[user_starts] = 0
    first_time = c.start_time + rng.integers(0, 365 * DAY_S, c.num_users)
    timestamps = np.repeat(first_time, lengths) + _per_user_cumsum(gaps, user_starts, lengths)

    item_cluster = np.r_[-1, np.repeat(np.arange(c.num_clusters), c.items_per_cluster)]
    seqs = Sequences(
        user_ids=np.arange(c.num_users, dtype=np.int64),
        offsets=offsets,
        item_ids=items.astype(np.int64),
        timestamps=timestamps.astype(np.int64),
        features={CATEGORY: (cluster + 1).astype(np.int64)},
    )
    info = SequenceDatasetInfo(
        num_items=c.num_items,
        feature_cardinalities={CATEGORY: c.num_clusters},
        num_users=c.num_users,
        num_events=num_events,
        source=f"synthetic {c}",
    )
    return SyntheticData(seqs, info, event_intent.astype(np.int64), item_cluster)


def main(argv: Optional[Sequence[str]] = None) -> SequenceDatasetInfo:
    """``python -m torchrec_hytrec.data.synthetic {small,long} OUT``: writes a synthetic dataset."""
    p = argparse.ArgumentParser(prog="python -m torchrec_hytrec.data.synthetic", description=main.__doc__)
    p.add_argument("config", choices=["small", "long"])
    p.add_argument("output", help="output Parquet file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--row-group-size", type=int, default=DEFAULT_ROW_GROUP_SIZE)
    args = p.parse_args(argv)
    config = getattr(SyntheticConfig, args.config)(seed=args.seed)
    data = generate(config)
    info = write_sequences(args.output, data.sequences, data.info, row_group_size=args.row_group_size)
    print(f"{args.output}: {info.num_users} users, {info.num_items} items, {info.num_events} events")
    return info


if __name__ == "__main__":
    main()


def cached_synthetic_dataset(
    config: SyntheticConfig, cache_dir: Path, row_group_size: int, *, write: bool = True
) -> Path:
    """The path of ``config``'s dataset under ``cache_dir``, generated once per generator config.

    Args:
        config: the generator's settings (part of the file name's hash).
        cache_dir: where datasets are kept.
        row_group_size: users per row group (part of the hash: ranks share row groups out).
        write: generate the file if it is missing (one process of a job does; the others wait at a
            barrier, then read it).

    Returns:
        The Parquet file's path.
    """
    key = json.dumps({**dataclasses.asdict(config), "row_group_size": row_group_size}, sort_keys=True)
    path = Path(cache_dir) / f"synthetic-{hashlib.sha1(key.encode()).hexdigest()[:12]}.parquet"
    if write and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        data = generate(config)
        # Written aside and renamed: a job killed mid-write never leaves a truncated cache entry.
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        write_sequences(tmp, data.sequences, data.info, row_group_size=row_group_size)
        os.replace(tmp, path)
        print(
            f"synthetic dataset: {path} ({data.info.num_users} users, {data.info.num_items} items, "
            f"{data.info.num_events} events)",
            flush=True,
        )
    return path
