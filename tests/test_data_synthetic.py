"""The synthetic generator: seeding, planted structure, and that the structure is learnable."""

import dataclasses

import numpy as np
import pytest

from torchrec_hytrec.data.parquet import read_sequences
from torchrec_hytrec.data.splits import Split, split_positions
from torchrec_hytrec.data.synthetic import DAY_S, SyntheticConfig, SyntheticData, generate, main
from torchrec_hytrec.data.validation import check_sequences

HOUR_S = 3_600


@pytest.fixture(scope="module")
def small() -> SyntheticData:
    return generate(SyntheticConfig.small())


def test_seeded_and_valid(small: SyntheticData) -> None:
    again = generate(SyntheticConfig.small())
    np.testing.assert_array_equal(small.sequences.item_ids, again.sequences.item_ids)
    np.testing.assert_array_equal(small.sequences.timestamps, again.sequences.timestamps)
    other = generate(SyntheticConfig.small(seed=1))
    assert not np.array_equal(other.sequences.lengths, small.sequences.lengths)
    check_sequences(small.sequences, small.info, "synthetic")
    np.testing.assert_array_equal(
        small.sequences.features["category"], small.item_cluster[small.sequences.item_ids] + 1
    )


def test_small_config_size_and_heavy_tailed_lengths(small: SyntheticData) -> None:
    lengths = small.sequences.lengths
    assert 100_000 <= small.sequences.num_events <= 400_000
    assert lengths.min() == 5 and lengths.max() <= 2_000
    # Heavy tail: the longest users are tens of times the median.
    assert lengths.max() > 25 * np.median(lengths)


def test_long_config_reaches_ten_thousand_events() -> None:
    data = generate(SyntheticConfig.long(num_users=1_000))
    assert data.sequences.lengths.max() >= 10_000


def test_gaps_seconds_in_sessions_days_between_and_months(small: SyntheticData) -> None:
    seqs = small.sequences
    gaps = np.diff(seqs.timestamps)
    gaps = np.delete(gaps, seqs.offsets[1:-1] - 1)  # drop the jumps between users
    assert np.median(gaps) < 5 * 60
    between = gaps[gaps > HOUR_S]
    assert 0.1 * DAY_S < np.median(between) < 5 * DAY_S
    assert (gaps > 30 * DAY_S).mean() > 0.001


def test_sessions_stick_to_one_cluster(small: SyntheticData) -> None:
    seqs = small.sequences
    same_user = np.ones(seqs.num_events - 1, dtype=bool)
    same_user[seqs.offsets[1:-1] - 1] = False
    close = same_user & (np.diff(seqs.timestamps) < 10 * 60)
    cat = seqs.features["category"]
    assert (cat[1:] == cat[:-1])[close].mean() > 0.7


def test_popularity_is_power_law_within_clusters(small: SyntheticData) -> None:
    per_item = np.bincount(small.sequences.item_ids, minlength=small.info.num_items + 1)[1:]
    by_rank = per_item.reshape(small.info.feature_cardinalities["category"], -1).sum(0)
    assert (np.diff(by_rank[:10]) < 0).all()
    # Zipf(1.1): rank 1 is about 2**1.1 times rank 2 and 10**1.1 times rank 10.
    assert 1.7 < by_rank[0] / by_rank[1] < 2.6
    assert 8 < by_rank[0] / by_rank[9] < 18


def _cluster_share(clusters: np.ndarray, num_clusters: int) -> np.ndarray:
    return np.bincount(clusters, minlength=num_clusters) / clusters.size


def test_preferences_drift_but_core_stays() -> None:
    data = generate(dataclasses.replace(SyntheticConfig.small(), num_users=400, median_length=600))
    seqs, k = data.sequences, data.info.feature_cardinalities["category"]
    drift, noise, core_kept = [], [], []
    for u in np.flatnonzero(seqs.lengths >= 800):
        c = seqs.rows(u, u + 1).features["category"] - 1
        q = c.size // 4
        first, last = _cluster_share(c[:q], k), _cluster_share(c[-q:], k)
        drift.append(np.abs(first - last).sum() / 2)
        noise.append(np.abs(_cluster_share(c[0::2], k) - _cluster_share(c[1::2], k)).sum() / 2)
        core_kept.append(first.argmax() == last.argmax() or last[first.argmax()] > 0.2)
    assert len(drift) >= 20
    # Early and late interests differ far more than two interleaved halves (stationary noise).
    assert np.mean(drift) > 2 * np.mean(noise)
    assert np.mean(core_kept) > 0.6


def test_long_gaps_bring_back_old_interests() -> None:
    def revisit_rate(return_prob: float) -> float:
        config = dataclasses.replace(
            SyntheticConfig.small(), num_users=600, median_length=300, return_prob=return_prob
        )
        seqs = generate(config).sequences
        hits, total = 0, 0
        for u in range(seqs.num_users):
            user = seqs.rows(u, u + 1)
            cat = user.features["category"]
            for i in np.flatnonzero(np.diff(user.timestamps) > 30 * DAY_S) + 1:
                recent, old = set(cat[max(0, i - 100) : i]), set(cat[: max(0, i - 100)])
                if i >= 200:
                    total += 1
                    hits += cat[i] in old and cat[i] not in recent
        assert total >= 50
        return hits / total

    assert revisit_rate(1.0) > 2 * revisit_rate(0.0)


def test_planted_intent_is_learnable(small: SyntheticData) -> None:
    """HR@10 on each user's test event: knowing the planted intent beats popularity by far,
    and so does guessing the intent from the last input event (what a model can learn)."""
    seqs, per_cluster = small.sequences, small.info.num_items // small.info.feature_cardinalities["category"]
    intent = small.heldout_intent(Split.TEST)
    users = np.flatnonzero(intent >= 0)
    _, target = split_positions(seqs.lengths, Split.TEST)
    target_item = seqs.item_ids[seqs.offsets[users] + target[users]]

    def hr(top10: np.ndarray) -> float:
        return float((top10 == target_item[:, None]).any(1).mean())

    train_end, _ = split_positions(seqs.lengths, Split.TRAIN)
    position = np.arange(seqs.num_events) - np.repeat(seqs.offsets[:-1], seqs.lengths)
    seen = seqs.item_ids[position < np.repeat(train_end, seqs.lengths)]
    popular = np.argsort(-np.bincount(seen, minlength=small.info.num_items + 1))[:10]
    cluster_top10 = lambda c: 1 + c[:, None] * per_cluster + np.arange(10)  # noqa: E731
    last_input = seqs.item_ids[seqs.offsets[users] + target[users] - 1]

    hr_popular = hr(np.broadcast_to(popular, (users.size, 10)))
    hr_oracle = hr(cluster_top10(intent[users]))
    hr_last_cluster = hr(cluster_top10(small.item_cluster[last_input]))
    assert hr_oracle > 0.5
    assert hr_oracle > 3 * hr_popular
    assert hr_last_cluster > 2 * hr_popular


def test_cli_writes_a_readable_dataset(tmp_path, small: SyntheticData) -> None:
    out = tmp_path / "small.parquet"
    info = main(["small", str(out), "--row-group-size", "500"])
    seqs, read = read_sequences(out)
    assert read == info and info.num_events == small.sequences.num_events
    np.testing.assert_array_equal(seqs.item_ids, small.sequences.item_ids)
