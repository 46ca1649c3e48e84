"""examples/serve.py at tiny sizes: the program exported and saved, loaded in a fresh process, gives
the eager encoder's top-K."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "serve.py"


@pytest.mark.slow
def test_exported_user_tower_retrieves_the_eager_top_k(tmp_path: Path) -> None:
    args = [
        "--num-items",
        "300",
        "--dim",
        "16",
        "--users",
        "1",
        "5",
        "--history",
        "3",
        "70",
        "--repeats",
        "3",
        "--k",
        "7",
        "--workdir",
        str(tmp_path),
    ]
    proc = subprocess.run([sys.executable, str(EXAMPLE), *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "top-7 of the exported program equals eager's: True" in proc.stdout, proc.stdout
    latencies = re.findall(
        r"(\d+) users x +(\d+) events +(eager|exported): p50 +[\d.]+ ms +p99 +[\d.]+ ms", proc.stdout
    )
    assert {(u, n, path) for u, n, path in latencies} == {
        (u, n, path) for u in ("1", "5") for n in ("3", "70") for path in ("eager", "exported")
    }
    assert (tmp_path / "user_tower.pt2").exists()
