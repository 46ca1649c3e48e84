import os
import subprocess
import sys
from pathlib import Path

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


def test_torchx_dryrun_prints_the_appdef() -> None:
    torchx = Path(sys.executable).with_name("torchx")
    proc = subprocess.run(
        [str(torchx), "run", "--dryrun", "-s", "local_cwd", f"{COMPONENT}:hytrec",
         "--epochs", "1", "--overrides", "seed=3"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
        env={**os.environ, "PATH": f"{torchx.parent}:{os.environ['PATH']}"},
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout + proc.stderr
    flat = " ".join(out.replace("'", " ").replace('"', " ").split())
    assert "=== APPLICATION ===" in out
    assert "'entrypoint': 'bash'" in out
    assert "'num_replicas': 1" in out
    assert "'cpu': 2" in out and "'gpu': 0" in out
    assert "--nnodes 1 --nproc_per_node 2" in flat
    assert "-m torchrec_hytrec.train --epochs 1 --set seed=3" in flat
