import ast
import subprocess
import sys
from pathlib import Path
from typing import List, Tuple

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


PACKAGE = Path(torchrec_hytrec.__file__).parent
# The layers, lowest first (docs/ARCHITECTURE.md): a module imports its own layer and the ones below.
LAYERS = ("ops", "modules", "models", "data", "training", "cli")
# The contracts between data/ and the models: the batches the models consume (``batch``, ``ranking``)
# and the dataset facts they size their tables from (``schema``). They live in data/ but sit at the
# models layer: models import them, and they import nothing above models. Importing one runs
# ``data/__init__.py``, so it holds to the same rule.
CONTRACTS = {f"torchrec_hytrec.data{suffix}" for suffix in ("", ".batch", ".ranking", ".schema")}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str, importer: bool) -> int:
    """The layer of ``module`` as the importing module (``importer``) or as the one imported."""
    if module in CONTRACTS:
        return LAYERS.index("models")
    parts = module.split(".")
    if module == "torchrec_hytrec":
        # Every import runs the package's __init__ first, so what it imports must be lowest (it
        # imports only the version and loads the rest lazily); its names reach every layer.
        return 0 if importer else LAYERS.index("cli")
    if parts[1] == "version":
        return 0
    if parts[1] == "train":
        return LAYERS.index("cli")
    return LAYERS.index(parts[1])


def _imports(path: Path, module: str, known: set) -> List[Tuple[int, str]]:
    """``(line, imported module)`` of every torchrec_hytrec import in the file, nested ones included."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((node.lineno, sub if sub in known else base))
    return [(line, name) for line, name in found if name.split(".")[0] == "torchrec_hytrec"]


def test_layers_import_only_the_layers_below() -> None:
    """ops < modules < models < data < training < CLI, with data's contracts at the models layer."""
    files = sorted(PACKAGE.rglob("*.py"))
    known = {_module_name(path) for path in files}
    problems = []
    for path in files:
        module = _module_name(path)
        own = _layer(module, importer=True)
        for line, imported in _imports(path, module, known):
            theirs = _layer(imported, importer=False)
            if theirs > own:
                what = (
                    "the package root, whose names reach every layer"
                    if "." not in imported
                    else LAYERS[theirs]
                )
                where = f"{path.relative_to(PACKAGE.parent)}:{line}"
                problems.append(f"{where}: {module} ({LAYERS[own]}) imports {imported} ({what})")
    assert not problems, "imports from a higher layer:\n" + "\n".join(problems)


def test_ops_and_modules_import_without_torchrec() -> None:
    """Every module of ``ops`` and ``modules`` loads with TorchRec and FBGEMM unimportable, and so
    does the top-level ``HyTRecEncoder``."""
    probe = (
        "import pkgutil, sys\n"
        "sys.modules['torchrec'] = sys.modules['fbgemm_gpu'] = None\n"
        "import importlib, torchrec_hytrec.ops, torchrec_hytrec.modules\n"
        "for package in (torchrec_hytrec.ops, torchrec_hytrec.modules):\n"
        "    for info in pkgutil.walk_packages(package.__path__, package.__name__ + '.'):\n"
        "        importlib.import_module(info.name)\n"
        "from torchrec_hytrec import HyTRecEncoder\n"
        "assert 'torchrec' not in [name.split('.')[0] for name, m in sys.modules.items() if m is not None]\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
