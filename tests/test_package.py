import subprocess
import sys

import torchrec_hytrec


def test_version_is_exposed_and_matches_distribution() -> None:
    from importlib.metadata import version

    assert torchrec_hytrec.__version__ == version("torchrec-hytrec")


def test_import_prints_no_warnings_of_its_own() -> None:
    # A fresh interpreter, so that the import really happens and anything it prints is seen.
    proc = subprocess.run(
        [sys.executable, "-W", "always", "-c", "import torchrec_hytrec"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert proc.stdout == ""
    assert proc.stderr == ""


def test_public_names_resolve_and_carry_runnable_examples() -> None:
    """Every name ``torchrec_hytrec`` exports resolves, and its docstring has a ``>>>`` example
    (pytest runs those as doctests)."""
    names = [n for n in torchrec_hytrec.__all__ if n != "__version__"]
    assert {"HyTRecEncoder", "HyTRecRetrieval", "HyTRecRanker", "SequenceReader", "shard_model"} <= set(names)
    for name in names:
        obj = getattr(torchrec_hytrec, name)
        assert ">>>" in (obj.__doc__ or ""), f"{name} has no runnable example"
