from pathlib import Path

import pytest

from torchrec_hytrec.data.synthetic import SyntheticConfig
from torchrec_hytrec.models.retrieval import RetrievalConfig
from torchrec_hytrec.modules.config import HyTRecConfig
from torchrec_hytrec.training.config import TrainConfig, config_reference, load_config
from torchrec_hytrec.training.metrics_log import MetricsLogger, format_table

DEFAULT_YAML = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"


def test_defaults_file_and_overrides_compose(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 7\nmodel:\n  preset: sasrec_like\noptim:\n  dense_lr: 1\n")
    cfg = load_config(str(path), ["model.encoder.embedding_dim=32", "epochs=2", "eval_ks=[10, 50]"])
    assert cfg.epochs == 2
    assert cfg.model.preset == "sasrec_like"
    assert cfg.model.encoder == HyTRecConfig.sasrec_like(embedding_dim=32)
    assert cfg.optim.dense_lr == 1.0 and isinstance(cfg.optim.dense_lr, float)
    assert cfg.eval_ks == [10, 50]
    assert cfg.data == TrainConfig().data


def test_nested_sections_are_typed_and_apply_over_the_preset() -> None:
    cfg = load_config(
        overrides=[
            "data.synthetic.num_users=50",
            "model.encoder.short_window=8",
            "model.retrieval.temperature=0.5",
        ]
    )
    assert cfg.data.synthetic == SyntheticConfig(num_users=50)
    assert cfg.model.encoder == HyTRecConfig.hytrec(short_window=8)
    assert cfg.model.retrieval == RetrievalConfig(loss="full", temperature=0.5)
    # The encoder's width is the tables' width: it is stored once, in the encoder.
    assert not hasattr(cfg.model, "embedding_dim")


def test_readme_override_with_an_exponent_parses() -> None:
    assert load_config(overrides=["optim.dense_lr=3e-4"]).optim.dense_lr == 3e-4


def test_every_key_is_documented_in_help() -> None:
    from torchrec_hytrec.train import build_parser

    text = build_parser().format_help()
    for key in (
        "data.synthetic.num_users",
        "model.encoder.embedding_dim",
        "model.retrieval.loss",
        "optim.dense_lr",
        "checkpoint.keep_last",
        "data.train.max_seq_len",
        "data.eval.max_tokens",
    ):
        assert f"  {key} = " in text, key
    lines = config_reference().splitlines()
    # Each key line is followed by its indented description.
    missing = [
        line
        for i, line in enumerate(lines)
        if not line.startswith("      ") and (i + 1 == len(lines) or not lines[i + 1].startswith("      "))
    ]
    assert not missing, f"keys without a description: {missing}"


def test_shipped_default_config_is_the_built_in_default() -> None:
    # `python -m torchrec_hytrec.train` with no arguments and with the shipped file run the same job.
    assert load_config(str(DEFAULT_YAML)) == TrainConfig()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.embeding_dim=3"], "model.embeding_dim"),
        (["epochs=two"], "'epochs' must be int"),
        (["epochs"], "section.key=value"),
        (["epochs=3", "epochs.x=1"], "'epochs' is not a section"),
        (["model=3"], "'model' must be a mapping"),
        (["epochs=0"], "'epochs' must be >= 1"),
        (["model.encoder.embedding_dim=0"], "model.encoder: embedding_dim"),
        (["data.train.max_tokens=0"], r"data.train: need 1 <= max_seq_len \(2000\) <= max_tokens \(0\)"),
        (["data.eval.max_seq_len=20000"], r"data.eval: need 1 <= max_seq_len \(20000\) <= max_tokens"),
        (["data.train.window_overlap=2000"], r"data.train: window_overlap must be in \[0, max_seq_len"),
        (["data.row_group_size=0"], "'data.row_group_size' must be >= 1"),
        (["checkpoint.every_n_steps=-1"], "'checkpoint.every_n_steps' must be >= 0"),
        (["eval_ks=[]"], "eval_ks must be a non-empty list"),
        (["model.preset=hstu"], "model.preset' must be one of"),
        (["model.sharding=diagonal"], "model.sharding must be one of"),
        (
            ["optim.dense_lr_warmup_epochs=2", "optim.dense_lr_decay_epochs=1"],
            r"'optim.dense_lr_decay_epochs' \(1.0\) must be 0 \(no decay\) or above",
        ),
        (["optim.dense_lr_warmup_epochs=-1"], "'optim.dense_lr_warmup_epochs' must be >= 0"),
    ],
)
def test_bad_overrides_name_the_key(overrides: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_config(overrides=overrides)


def test_bad_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("checkpoint:\n  keep: 2\n")
    with pytest.raises(ValueError, match=r"bad\.yaml.*checkpoint\.keep"):
        load_config(str(path))


def test_metrics_logger_writes_all_formats_and_drops_rows_of_a_redone_epoch(tmp_path: Path) -> None:
    logger = MetricsLogger(tmp_path)
    logger.log(0, {"train_loss": 2.0, "valid_hr@10": 0.1})
    logger.log(1, {"train_loss": 1.5, "valid_hr@10": 0.2})
    logger.close()
    # A resumed attempt redoes epoch 1.
    logger = MetricsLogger(tmp_path, start_epoch=1)
    logger.log(1, {"train_loss": 1.25, "valid_hr@10": 0.3})
    logger.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert lines == [
        '{"epoch": 0, "train_loss": 2.0, "valid_hr@10": 0.1}',
        '{"epoch": 1, "train_loss": 1.25, "valid_hr@10": 0.3}',
    ]
    assert (tmp_path / "metrics.csv").read_text() == "epoch,train_loss,valid_hr@10\n0,2.0,0.1\n1,1.25,0.3\n"
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert format_table(logger.rows).splitlines()[-1].split() == ["1", "1.2500", "0.3000"]


def test_metrics_logger_off_rank_writes_nothing(tmp_path: Path) -> None:
    logger = MetricsLogger(tmp_path / "r1", enabled=False)
    logger.log(0, {"train_loss": 1.0})
    logger.close()
    assert not (tmp_path / "r1").exists()
