import os
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest
from torchx.specs.builders import materialize_appdef
from torchx.specs.file_linter import validate

ROOT = Path(__file__).resolve().parents[1]
COMPONENT = ROOT / "torchx_components" / "train.py"


def _load_component():
    import importlib.util

    spec = importlib.util.spec_from_file_location("hytrec_component", COMPONENT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.hytrec


def test_component_passes_torchx_linter() -> None:
    assert validate(str(COMPONENT), "hytrec") == []


def test_appdef_defaults_are_one_node_two_cpu_processes() -> None:
    app = _load_component()()
    (role,) = app.roles
    assert app.name == "hytrec"
    assert role.entrypoint == "bash"
    assert role.num_replicas == 1
    assert role.resource.cpu == 2 and role.resource.gpu == 0
    cmd = role.args[1]
    assert "--nnodes 1 --nproc_per_node 2" in cmd
    assert cmd.endswith("-m torchrec_hytrec.train")


def test_appdef_forwards_training_arguments_and_resources() -> None:
    app = _load_component()(
        data="/d/x.parquet",
        epochs=3,
        resume=True,
        overrides=["seed=1", "model.preset=sasrec_like"],
        j="2x8",
        gpu=8,
        memMB=8000,
        max_retries=2,
        env={"A": "b"},
    )
    (role,) = app.roles
    assert role.num_replicas == 2
    assert role.max_retries == 2
    assert role.resource.gpu == 8 and role.resource.memMB == 8000
    assert role.env["A"] == "b"
    assert role.args[1].endswith(
        "-m torchrec_hytrec.train --data /d/x.parquet --epochs 3 --resume"
        " --set seed=1 --set model.preset=sasrec_like"
    )
    assert "--nnodes 2 --nproc_per_node 8" in role.args[1]


def _train_args(cli: List[str]) -> str:
    """The training command line torchx makes of ``cli``, parsed as ``torchx run`` parses it."""
    (role,) = materialize_appdef(_load_component(), cli).roles
    return role.args[1].split("-m torchrec_hytrec.train")[1]


@pytest.mark.parametrize("spelling", ["True", "true", "TRUE", "1", "yes", "Yes", "on", "ON"])
def test_every_usual_spelling_of_true_resumes(spelling: str) -> None:
    assert _train_args(["--resume", spelling]) == " --resume"


@pytest.mark.parametrize("spelling", ["False", "false", "FALSE", "0", "no", "off"])
def test_every_usual_spelling_of_false_starts_over(spelling: str) -> None:
    assert _train_args(["--resume", spelling]) == ""
    assert _train_args([]) == ""


@pytest.mark.parametrize("spelling", ["maybe", "", "2", "tru", "yes please"])
def test_other_values_of_a_boolean_are_refused_not_read_as_false(spelling: str) -> None:
    with pytest.raises(
        ValueError, match=f"--resume: {spelling!r} is not a boolean; use one of true/yes/1/on"
    ):
        _train_args(["--resume", spelling])


@pytest.mark.parametrize(
    "cli, message",
    [
        (["--epochs", "0"], "--epochs must be >= 1, got 0"),
        (["--epochs", "-3"], "--epochs must be >= 1, got -3"),
        (["--epochs", "1.5"], "--epochs: '1.5' is not an integer"),
        (["--max_retries", "-1"], "--max_retries must be >= 0, got -1"),
    ],
)
def test_out_of_range_numbers_are_refused(cli: List[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _train_args(cli)


def _dryrun(*cli: str) -> subprocess.CompletedProcess:
    torchx = Path(sys.executable).with_name("torchx")
    return subprocess.run(
        [str(torchx), "run", "--dryrun", "-s", "local_cwd", f"{COMPONENT}:hytrec", *cli],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "PATH": f"{torchx.parent}:{os.environ['PATH']}"},
    )


def test_torchx_dryrun_refuses_a_misspelt_boolean() -> None:
    proc = _dryrun("--resume", "ture")
    assert proc.returncode != 0
    assert "--resume: 'ture' is not a boolean" in proc.stderr


def test_torchx_dryrun_prints_the_appdef() -> None:
    proc = _dryrun("--epochs", "1", "--resume", "yes", "--overrides", "seed=3")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout + proc.stderr
    flat = " ".join(out.replace("'", " ").replace('"', " ").split())
    assert "=== APPLICATION ===" in out
    assert "'entrypoint': 'bash'" in out
    assert "'num_replicas': 1" in out
    assert "'cpu': 2" in out and "'gpu': 0" in out
    assert "--nnodes 1 --nproc_per_node 2" in flat
    assert "-m torchrec_hytrec.train --epochs 1 --resume --set seed=3" in flat


def test_overwrite_is_explicit_and_excludes_resume() -> None:
    assert _train_args(["--overwrite", "yes"]) == " --overwrite"
    with pytest.raises(ValueError, match="exclude each other"):
        _train_args(["--resume", "true", "--overwrite", "true"])


def test_workers_share_the_replica_cpus_out() -> None:
    (role,) = materialize_appdef(_load_component(), ["--cpu", "8", "-j", "1x2"]).roles
    assert role.env["OMP_NUM_THREADS"] == "4"
    (role,) = materialize_appdef(_load_component(), ["--env", "OMP_NUM_THREADS=1"]).roles
    assert role.env["OMP_NUM_THREADS"] == "1"  # the user's setting wins
