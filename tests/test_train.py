import json
import os
from pathlib import Path
from typing import List

import numpy as np
import pytest
import torch

from torchrec_hytrec.data import convert
from torchrec_hytrec.train import build_parser, config_from_args, main
from torchrec_hytrec.training.checkpoint import COMPLETE_MARKER, CheckpointManager
from torchrec_hytrec.training.evaluation import popularity_ranks

# Every test runs the training entry point end to end: the slow tier.
pytestmark = pytest.mark.slow

TINY = [
    "--set",
    "data.synthetic.num_users=80",
    "--set",
    "data.synthetic.max_length=60",
    "--set",
    "data.row_group_size=16",
    "--set",
    "data.train.max_tokens=512",
    "--set",
    "data.train.max_seq_len=50",
    "--set",
    "model.encoder.embedding_dim=16",
    "--set",
    "model.encoder.short_window=8",
    "--set",
    "model.encoder.dropout=0.1",
    "--set",
    "checkpoint.every_n_steps=3",
]


def test_flags_win_over_overrides_and_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 9\nseed: 4\n")
    args = build_parser().parse_args(
        [
            "--config",
            str(path),
            "--set",
            "epochs=8",
            "--epochs",
            "2",
            "--data",
            "/x/y.parquet",
            "--out-dir",
            "o",
            "--fault-at-step",
            "5",
        ]
    )
    cfg = config_from_args(args)
    assert (cfg.epochs, cfg.seed, cfg.data.path, cfg.out_dir, cfg.fault_at_step) == (
        2,
        4,
        "/x/y.parquet",
        "o",
        5,
    )


def test_popularity_ranks_order_by_count_then_id() -> None:
    counts = torch.tensor([0, 5, 9, 5, 1])
    assert popularity_ranks(counts)[1:].tolist() == [1, 0, 2, 3]


def _metrics(out_dir: Path) -> List[dict]:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("epoch_s")
    return rows


# A warm-up and a decay: a resumed run must pick the schedule up at its checkpointed position.
SCHEDULE = ["--set", "optim.dense_lr_warmup_epochs=0.5", "--set", "optim.dense_lr_decay_epochs=2"]


def test_resume_after_an_epoch_equals_training_straight_through(tmp_path: Path) -> None:
    common = [*TINY, *SCHEDULE, "--set", f"data.cache_dir={tmp_path / 'data'}"]
    straight = main([*common, "--epochs", "2", "--out-dir", str(tmp_path / "a")])
    main([*common, "--epochs", "1", "--out-dir", str(tmp_path / "b")])
    resumed = main([*common, "--epochs", "2", "--out-dir", str(tmp_path / "b"), "--resume"])
    assert [r["epoch"] for r in resumed] == [0, 1]
    assert _metrics(tmp_path / "b") == _metrics(tmp_path / "a")
    # The by-history-length figures: one line per epoch, the resumed run's equal to the straight one's.
    details = [(tmp_path / run / "eval_detail.jsonl").read_text().splitlines() for run in ("a", "b")]
    assert details[0] == details[1] and len(details[0]) == 2
    test_detail = json.loads(details[0][-1])["test"]
    assert test_detail["hr@10/len<100"] == pytest.approx(test_detail["hr@10"])
    assert len(straight) == 2
    # Step checkpoints (every 3) and epoch ends, the last keep_last=3 complete ones kept.
    names = sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir())
    assert len(names) == 3 and all(n.startswith("step_") for n in names)


def test_dense_learning_rate_follows_the_schedule_step_by_step(tmp_path: Path, monkeypatch) -> None:
    from torchrec_hytrec.data.reader import SequenceReader
    from torchrec_hytrec.training import trainer as trainer_module
    from torchrec_hytrec.training.optimizer import OptimizerConfig, dense_lr_at, set_dense_lr

    applied: List[float] = []
    groups: List[List[dict]] = []

    def recording_set_dense_lr(optimizer, lr: float) -> None:
        set_dense_lr(optimizer, lr)
        applied.append(lr)
        groups[:] = [list(opt.param_groups) for _, opt in optimizer.optimizers]

    monkeypatch.setattr(trainer_module, "set_dense_lr", recording_set_dense_lr)
    # Steps per epoch (shuffled row groups pack into a slightly different count each epoch).
    counts: List[int] = []
    num_batches = SequenceReader.num_batches

    def recording_num_batches(reader, *args, **kwargs) -> int:
        counts.append(num_batches(reader, *args, **kwargs))
        return counts[-1]

    monkeypatch.setattr(SequenceReader, "num_batches", recording_num_batches)
    main(
        [
            *TINY,
            *SCHEDULE,
            "--set",
            "optim.dense_lr=0.002",
            "--set",
            f"data.cache_dir={tmp_path / 'data'}",
            "--epochs",
            "2",
            "--out-dir",
            str(tmp_path / "o"),
        ]
    )
    config = OptimizerConfig(dense_lr=0.002, dense_lr_warmup_epochs=0.5, dense_lr_decay_epochs=2)
    # Set before each epoch's first step and after each of its n steps.
    assert len(counts) == 2 and min(counts) >= 4
    expected = [dense_lr_at(config, epoch + i / n) for epoch, n in enumerate(counts) for i in range(n + 1)]
    assert applied == pytest.approx(expected, abs=1e-15)
    assert applied[0] == 0.0 and max(applied) == pytest.approx(0.002) and applied[-1] == pytest.approx(0.0)
    fused, dense = groups
    assert {g["lr"] for g in dense} == {applied[-1]}
    assert [g["lr"] for g in fused] == pytest.approx([0.05] * len(fused)), "tables keep sparse_lr"


def test_resume_with_another_number_of_processes_is_refused(tmp_path: Path) -> None:
    common = [*TINY, "--set", f"data.cache_dir={tmp_path / 'data'}", "--out-dir", str(tmp_path / "o")]
    main([*common, "--epochs", "1"])
    manager = CheckpointManager(tmp_path / "o" / "checkpoints")
    marker = manager.latest() / COMPLETE_MARKER
    # As if two processes had written it.
    recorded = json.loads(marker.read_text())
    recorded["fingerprint"]["world_size"] = 2
    marker.write_text(json.dumps(recorded))
    with pytest.raises(ValueError, match="world_size=2, this run has world_size=1"):
        main([*common, "--epochs", "2", "--resume"])


def test_resume_refuses_another_runs_checkpoints_naming_the_fields(tmp_path: Path) -> None:
    common = [*TINY, "--set", f"data.cache_dir={tmp_path / 'data'}", "--out-dir", str(tmp_path / "o")]
    main([*common, "--epochs", "1"])
    with pytest.raises(
        ValueError,
        match=r"optim.dense_lr=0.001, this run has optim.dense_lr=0.0003; seed=0, this run has seed=1",
    ):
        main([*common, "--epochs", "2", "--resume", "--seed", "1", "--set", "optim.dense_lr=3e-4"])
    with pytest.raises(ValueError, match="data.train.max_seq_len=50, this run has data.train.max_seq_len=40"):
        main([*common, "--epochs", "2", "--resume", "--set", "data.train.max_seq_len=40"])


def test_fresh_run_never_deletes_or_continues_an_earlier_run(tmp_path: Path) -> None:
    common = [*TINY, "--set", f"data.cache_dir={tmp_path / 'data'}", "--out-dir", str(tmp_path / "o")]
    main([*common, "--epochs", "1"])
    checkpoints = sorted((tmp_path / "o" / "checkpoints").iterdir())
    with pytest.raises(FileExistsError, match="--resume.*--overwrite"):
        main([*common, "--epochs", "1", "--seed", "3"])
    assert sorted((tmp_path / "o" / "checkpoints").iterdir()) == checkpoints  # nothing deleted
    # A torchelastic restart of that refused fresh run (another launch than the one that wrote the
    # checkpoints) must not continue the earlier run either.
    os.environ.update(TORCHELASTIC_RESTART_COUNT="1", TORCHELASTIC_RUN_ID="another-launch")
    try:
        with pytest.raises(FileExistsError):
            main([*common, "--epochs", "1", "--seed", "3"])
    finally:
        del os.environ["TORCHELASTIC_RESTART_COUNT"], os.environ["TORCHELASTIC_RUN_ID"]
    rows = main([*common, "--epochs", "1", "--seed", "3", "--overwrite"])  # explicit: delete and start
    assert len(rows) == 1


def test_two_jobs_cannot_share_an_out_dir(tmp_path: Path) -> None:
    import subprocess
    import sys

    out = tmp_path / "o"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; "
            "from torchrec_hytrec.training.trainer import OutDirLock; lock = OutDirLock(Path(sys.argv[1])); "
            "print('locked', flush=True); time.sleep(60)",
            str(out),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RuntimeError, match=f"in use by another job.*pid {holder.pid}"):
            main(
                [
                    *TINY,
                    "--set",
                    f"data.cache_dir={tmp_path / 'data'}",
                    "--out-dir",
                    str(out),
                    "--epochs",
                    "1",
                ]
            )
    finally:
        holder.kill()
        holder.wait()
    assert (
        len(
            main(
                [
                    *TINY,
                    "--set",
                    f"data.cache_dir={tmp_path / 'data'}",
                    "--out-dir",
                    str(out),
                    "--epochs",
                    "1",
                ]
            )
        )
        == 1
    )


def test_trains_on_a_converted_interactions_log(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    lines = ["user,item,ts"]
    lengths = rng.integers(4, 30, size=40)
    for u, n in enumerate(lengths.tolist()):
        for e in range(n):
            lines.append(f"u{u},item{int(rng.integers(0, 50))},{1_700_000_000 + 3600 * e + u}")
    (tmp_path / "log.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "log.parquet"
    convert.main(
        [
            "--format",
            "interactions",
            str(tmp_path / "log.csv"),
            str(out),
            "--user-col",
            "user",
            "--item-col",
            "item",
            "--time-col",
            "ts",
            "--row-group-size",
            "8",
        ]
    )
    rows = main(
        [
            *TINY,
            "--data",
            str(out),
            "--epochs",
            "1",
            "--out-dir",
            str(tmp_path / "run"),
            "--set",
            "eval_protocols=[all, unseen]",
            "--set",
            "data.train.max_seq_len=8",
        ]
    )
    assert len(rows) == 1
    # Histories of up to 27 training events in windows of 8: every one but a user's first is
    # predicted once (its last two events are valid / test).
    assert rows[0]["train_targets"] == int((lengths - 3).sum())
    assert rows[0]["test_unseen_hr@10"] >= rows[0]["test_hr@10"]  # fewer items to beat
    assert not (tmp_path / "data").exists()


def test_unknown_preset_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="model.preset. must be one of"):
        main(
            [
                *TINY,
                "--set",
                "model.preset=hstu",
                "--set",
                f"data.cache_dir={tmp_path}",
                "--out-dir",
                str(tmp_path / "o"),
            ]
        )


def test_early_stopping_stops_resumes_stopped_and_saves_ranks(tmp_path: Path) -> None:
    # Learning rates of 0: every epoch's valid figures equal the first's, so none is a new best.
    frozen = [
        "--set",
        "optim.dense_lr=0.0",
        "--set",
        "optim.sparse_lr=0.0",
        "--set",
        "early_stopping.patience=2",
    ]
    common = [
        *TINY,
        *frozen,
        "--set",
        f"data.cache_dir={tmp_path / 'data'}",
        "--out-dir",
        str(tmp_path / "o"),
    ]
    rows = main([*common, "--epochs", "10", "--set", "eval_save_ranks=true"])
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert len({r["valid_ndcg@10"] for r in rows}) == 1
    stopped = json.loads((tmp_path / "o" / "early_stopped.json").read_text())
    assert stopped["before_epoch"] == 3 and stopped["best_epoch"] == 0
    # A resumed stopped run stays stopped.
    assert [r["epoch"] for r in main([*common, "--epochs", "10", "--resume"])] == [0, 1, 2]
    saved = np.load(tmp_path / "o" / "ranks" / "epoch002.npz")
    for split in ("valid", "test"):
        ranks = saved[f"{split}_ranks"]
        assert len(ranks) == len(saved[f"{split}_positive_ids"]) == len(saved[f"{split}_history_lengths"])
        assert rows[-1][f"{split}_hr@10"] == pytest.approx(float((ranks < 10).mean()))
    assert saved["test_history_lengths"].min() >= 1


def test_early_stopping_metric_must_be_reported() -> None:
    with pytest.raises(ValueError, match="early_stopping.metric.*valid_ndcg@10.*'valid_ndcg@20'"):
        config_from_args(build_parser().parse_args(["--set", "early_stopping.metric=valid_ndcg@20"]))
