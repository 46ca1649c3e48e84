"""HyTRecRanker: derived ranking rows, training with TorchRec's DLRM archs, AUC/NE, the example."""

import importlib.util
from pathlib import Path

import pytest
import torch
from helpers import NUM_ITEMS, SIDE, make_batch
from test_models_retrieval import DIM, make_encoder

from torchrec_hytrec.data.batch import CANDIDATE_KEY, ITEM_KEY, TIMESTAMP_KEY
from torchrec_hytrec.data.ranking import RECENT_ITEMS_KEY, USER_BUCKET_KEY, ranking_batch_from_sequences
from torchrec_hytrec.models.ranking import (
    HyTRecRanker,
    HyTRecRankerTrain,
    RankerConfig,
    ranking_metric_inputs,
    ranking_metric_module,
)

USER_BUCKETS = 7
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_ranker.py"


def make_ranker(seed: int = 0) -> HyTRecRankerTrain:
    config = RankerConfig(
        num_items=NUM_ITEMS,
        embedding_dim=DIM,
        dense_in_features=2,
        sparse_features={USER_BUCKET_KEY: USER_BUCKETS, RECENT_ITEMS_KEY: NUM_ITEMS + 1},
        side_features=SIDE,
        over_arch_layer_sizes=[16, 1],
    )
    return HyTRecRankerTrain(HyTRecRanker(config, make_encoder(seed)))


def test_ranking_rows_from_training_sequences() -> None:
    seq = make_batch([4, 2, 7], seed=1)
    out = ranking_batch_from_sequences(
        seq,
        num_items=NUM_ITEMS,
        num_negatives=3,
        user_buckets=USER_BUCKETS,
        num_recent=2,
        generator=torch.Generator().manual_seed(0),
    )
    items, offsets = seq.item_ids, seq.offsets()
    assert out.batch_size == 12
    assert out.labels.tolist() == [1, 0, 0, 0] * 3
    assert out.weights.tolist() == [1.0] * 12
    candidates = out.sequence[CANDIDATE_KEY]
    assert candidates.lengths().tolist() == [4, 4, 4]  # a user's rows are adjacent
    candidates = candidates.values()
    histories = out.sequence[ITEM_KEY].to_dense()
    history_times = out.sequence[TIMESTAMP_KEY].to_dense()
    for user in range(3):
        rows = slice(4 * user, 4 * user + 4)
        start, end = int(offsets[user]), int(offsets[user + 1])
        assert int(candidates[4 * user]) == int(items[end - 1])  # the real next item
        assert bool((candidates[rows][1:] != items[end - 1]).all())
        assert histories[user].tolist() == items[start : end - 1].tolist()
        assert history_times[user].tolist() == seq.timestamps[start : end - 1].tolist()
        for row in range(4 * user, 4 * user + 4):
            assert (
                out.sparse_features[RECENT_ITEMS_KEY].to_dense()[row].tolist()
                == items[max(start, end - 3) : end - 1].tolist()
            )
        assert int(out.request_timestamps[user]) == int(seq.timestamps[end - 1])
        gap = float(seq.timestamps[end - 1] - seq.timestamps[end - 2])
        assert float(out.dense_features[4 * user, 1]) == pytest.approx(torch.log1p(torch.tensor(gap)).item())
    assert out.sequence.keys() == [TIMESTAMP_KEY, ITEM_KEY, *SIDE, CANDIDATE_KEY]
    assert (
        out.sparse_features[USER_BUCKET_KEY].values().tolist()
        == (seq.user_ids % USER_BUCKETS).repeat_interleave(4).tolist()
    )


def test_ranking_rows_need_two_events_in_training_form() -> None:
    with pytest.raises(ValueError, match=r"history event before the positive.*user_ids \[1001\]"):
        ranking_batch_from_sequences(
            make_batch([3, 1], seed=1), num_items=NUM_ITEMS, num_negatives=1, user_buckets=3
        )


def test_ranker_from_torchrec_archs_trains_and_reports_auc_ne() -> None:
    """HyTRecEncoder as the sequence arch of a model of TorchRec's own modules with KJT input."""
    model = make_ranker()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    generator = torch.Generator().manual_seed(0)
    batches = [
        ranking_batch_from_sequences(
            make_batch([8, 5, 12, 6], seed=s),
            num_items=NUM_ITEMS,
            num_negatives=3,
            user_buckets=USER_BUCKETS,
            generator=generator,
        )
        for s in range(4)
    ]
    losses = []
    for _ in range(16):
        for batch in batches:
            loss, _ = model(batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss))
    assert sum(losses[-4:]) < 0.5 * sum(losses[:4]), losses
    metrics = ranking_metric_module(batch_size=16)
    model.eval()
    with torch.no_grad():
        for batch in batches:
            metrics.update(ranking_metric_inputs(model(batch)[1]))
    result = {k: float(v) for k, v in metrics.compute().items()}
    assert result["auc-ctr|window_auc"] > 0.9 and result["ne-ctr|window_ne"] < 0.8, result


def test_padding_rows_move_nothing() -> None:
    """A reader's padding batch (zero weights) has zero loss and zero gradients."""
    model = make_ranker()
    seq = make_batch([8, 5], seed=3)
    seq.weights = torch.zeros(2)
    batch = ranking_batch_from_sequences(seq, num_items=NUM_ITEMS, num_negatives=2, user_buckets=USER_BUCKETS)
    assert batch.weights.tolist() == [0.0] * 6
    loss, _ = model(batch)
    loss.backward()
    assert float(loss) == 0.0
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(float(g.abs().max()) == 0.0 for g in grads)


@pytest.mark.slow
def test_example_trains_ranker_and_auc_improves(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("train_ranker", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    history = example.main(
        [
            "--users",
            "200",
            "--epochs",
            "2",
            "--embedding-dim",
            "16",
            "--max-tokens",
            "1024",
            "--workdir",
            str(tmp_path),
        ]
    )
    assert len(history) == 3  # before training, then each epoch
    assert history[-1]["auc"] > history[0]["auc"] + 0.05 and history[-1]["ne"] < history[0]["ne"], history


@pytest.mark.slow
@pytest.mark.e2e
def test_example_runs_on_two_ranks_with_torchrun(tmp_path: Path) -> None:
    """The documented ``torchrun --nproc-per-node 2 examples/train_ranker.py``: both ranks finish the
    same number of pipelined steps (the reader pads) and report the metrics."""
    import os
    import subprocess
    import sys

    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        "localhost:0",
        str(EXAMPLE),
        "--users",
        "200",
        "--epochs",
        "1",
        "--embedding-dim",
        "16",
        "--max-tokens",
        "1024",
        "--workdir",
        str(tmp_path),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LOGLEVEL": "WARNING"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    assert "epoch 0  valid auc" in log and "epoch 1  train bce" in log, log[-3000:]
