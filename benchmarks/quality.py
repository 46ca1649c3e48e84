"""Accuracy of HyTRec against the baselines it replaces, trained the same way.

For every dataset, preset and seed it runs ``python -m torchrec_hytrec.train`` in a fresh
process with one shared recipe (same width, depth budget, optimiser, learning rates, epochs and
batch token budget for every preset: the baselines are configurations of the same code, see
``HyTRecConfig``), picks the epoch with the best valid NDCG@10 and reports that epoch's test
figures, leave-one-out, under both protocols of one evaluation pass (the full catalogue ranked;
the user's seen items removed), each next to the published figures of its protocol: HR@K and
NDCG@K at K = 10, 50, 500 and MRR overall, HR@10 by history length, as mean and standard
deviation over seeds. ``--presets`` also takes the paper's ablations (:data:`ABLATIONS`).

Datasets:

* ``synthetic_long``: the project's generator (``SyntheticConfig.long``), histories up to 12k.
* ``beauty``: ``../shared/data/amazon_beauty.txt`` (S3Rec preprocessing); published full-ranking
  SASRec: HR@10 0.0605, NDCG@10 0.0318 (``../shared/data/README.md``).
* ``ml100k``: ``../shared/data/ml-100k.inter`` (RecBole).

A dataset whose source file is absent is skipped with a message. Results go to ``--out``:
``quality.json`` (every run), ``quality.md`` (tables) and PNG plots.

    python benchmarks/quality.py                         # all datasets, the 5 presets, 3 seeds
    python benchmarks/quality.py --datasets beauty --presets hytrec hytrec_no_time_decay hytrec_ratio_7to1
    python benchmarks/quality.py --datasets beauty --seeds 0 1 2 --jobs 2
    python benchmarks/quality.py --tiny                  # seconds: a smoke run of the whole path
"""

import argparse
import fcntl
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from torchrec_hytrec.modules.config import PRESETS

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
REPORTED = ("hr@10", "ndcg@10", "hr@50", "ndcg@50", "hr@500", "ndcg@500", "mrr")
# Both evaluation protocols of one pass: every item ranked ("all"), or the user's seen items removed.
PROTOCOLS = {"all": "", "unseen": "unseen_"}
BUCKETS = ("len<100", "len100-1k", "len1k-5k", "len>=5k")
# Published figures on the same preprocessing, by protocol.
PUBLISHED = {
    "beauty": {
        "all": {"SASRec (TIGER, NeurIPS 2023, Table 1)": {"hr@10": 0.0605, "ndcg@10": 0.0318}},
        "unseen": {
            "eSASRec (RecSys 2025)": {"hr@10": 0.0928, "ndcg@10": 0.0523},
            "SASRec, sampled softmax (eSASRec paper)": {"hr@10": 0.0921, "ndcg@10": 0.0531},
        },
    }
}


@dataclass
class DatasetSpec:
    """How one dataset is prepared and trained.

    Args:
        name: dataset name.
        overrides: ``--set`` overrides of the training config shared by every preset.
        epochs: training epochs (the same for every preset).
        source: input file of the converter, or ``None`` for synthetic data.
        convert_format: the converter's ``--format``.
        synthetic_users: users of the long synthetic dataset.
        synthetic_overrides: fields of ``SyntheticConfig.long`` to replace.
        lr_schedule: train with :data:`SCHEDULE` (its decay ending at the last epoch) instead of
            a constant dense learning rate and early stopping.
    """

    name: str
    overrides: Dict[str, Any]
    epochs: int
    source: Optional[Path] = None
    convert_format: Optional[str] = None
    synthetic_users: int = 0
    synthetic_overrides: Dict[str, Any] = field(default_factory=dict)
    lr_schedule: bool = False


# The paper's ablations of HyTRec: its preset with encoder fields changed (the default is "TTTA", 3:1).
ABLATIONS: Dict[str, Dict[str, Any]] = {
    "hytrec_no_short_branch": {"model.encoder.use_short_branch": False},
    "hytrec_no_time_decay": {"model.encoder.tadn_time_decay": False},
    "hytrec_no_temporal_gate": {"model.encoder.tadn_temporal_gate": False},
    "hytrec_gated_delta_rule": {
        "model.encoder.tadn_time_decay": False,
        "model.encoder.tadn_temporal_gate": False,
    },
    "hytrec_ratio_1to1": {"model.encoder.long_pattern": "TATA"},
    "hytrec_ratio_7to1": {"model.encoder.long_pattern": "TTTTTTTA"},
}
# The all-softmax baseline at HyTRec's parameter count: the SASRec-like preset with wider
# feed-forward blocks (hidden 214 = 3.35 d at d = 64: 233,024 encoder parameters against
# HyTRec's 233,346; the preset itself has 166,976).
EQUAL_PARAMETER_BASELINES: Dict[str, Dict[str, Any]] = {
    "sasrec_like_wide": {"model.preset": "sasrec_like", "model.encoder.ffn_multiplier": 3.35},
}
# What a run can train: every preset, the equal-parameter baseline, then every ablation.
VARIANTS: Dict[str, Dict[str, Any]] = {
    **{p: {"model.preset": p} for p in PRESETS},
    **EQUAL_PARAMETER_BASELINES,
    **{name: {"model.preset": "hytrec", **changes} for name, changes in ABLATIONS.items()},
}

# One recipe for every preset; only data-dependent sizes differ between datasets.
COMMON = {
    "model.encoder.embedding_dim": 64,
    "model.encoder.dropout": 0.2,
    "optim.dense_lr": 0.002,
    "optim.sparse_lr": 0.05,
    "checkpoint.every_n_steps": 0,
    "checkpoint.keep_last": 1,
    "eval_ks": [10, 50, 500],
    "eval_protocols": list(PROTOCOLS),
    "eval_save_ranks": True,
    "early_stopping.patience": 3,
}
# A dataset with ``lr_schedule``: one epoch of warm-up, a cosine to 0 at the last epoch, and every
# epoch trained (stopping early would cut the decay short); the best-valid epoch is still reported.
SCHEDULE = {"optim.dense_lr_warmup_epochs": 1, "early_stopping.patience": 0}
# ``--search``: the recipe points every preset tries on seed 0, the same for every preset; the
# point with the best valid NDCG@10 trains the other seeds. Ablations take HyTRec's point.
SEARCH: Dict[str, List[Any]] = {"optim.dense_lr": [0.001, 0.003], "model.encoder.dropout": [0.2, 0.5]}
# The long bucket of the paired bootstrap: users with at least this many events before the target.
LONG_BUCKET = ("len>=5k", 5000)
BOOTSTRAP_RESAMPLES = 10_000

# The synthetic long datasets: whole histories of up to 12k events in one window, and 20k items,
# so sampled softmax (in-batch + uniform negatives, logQ) instead of the full one.
LONG_OVERRIDES = {
    "data.train.max_seq_len": 12_000,
    "data.train.max_tokens": 12_288,
    "data.eval.max_seq_len": 12_000,
    "data.eval.max_tokens": 32_768,
    "model.encoder.short_window": 64,
    "model.retrieval.loss": "sampled",
}

DATASETS = {
    "synthetic_long": DatasetSpec(
        name="synthetic_long",
        synthetic_users=800,
        epochs=3,
        overrides=LONG_OVERRIDES,
    ),
    # The long-history evidence: every user has >= 5.2k events, so all test users sit in the
    # len>=5k bucket, where the paired bootstrap compares HyTRec with each baseline.
    "synthetic_ultralong": DatasetSpec(
        name="synthetic_ultralong",
        synthetic_users=210,
        epochs=2,
        overrides=LONG_OVERRIDES,
        synthetic_overrides={"median_length": 5400.0, "length_sigma": 0.05, "min_length": 5200},
    ),
    "beauty": DatasetSpec(
        name="beauty",
        source=SHARED_DATA / "amazon_beauty.txt",
        convert_format="s3rec",
        epochs=40,
        lr_schedule=True,
        # Histories average 9 events: a window of 8 leaves the long branch something to read.
        # Sparse data (8 interactions per item): heavy dropout, small batches, many steps.
        overrides={
            "data.train.max_seq_len": 50,
            "data.train.max_tokens": 2048,
            "data.eval.max_seq_len": 50,
            "model.encoder.short_window": 8,
            "model.encoder.dropout": 0.5,
        },
    ),
    "ml100k": DatasetSpec(
        name="ml100k",
        source=SHARED_DATA / "ml-100k.inter",
        convert_format="recbole",
        epochs=20,
        lr_schedule=True,
        overrides={
            "data.train.max_seq_len": 200,
            "data.eval.max_seq_len": 200,
            "model.encoder.short_window": 32,
        },
    ),
}

TINY = {
    "synthetic_long": DatasetSpec(
        name="synthetic_long",
        synthetic_users=40,
        epochs=1,
        overrides={
            "data.train.max_seq_len": 12_000,
            "data.train.max_tokens": 16_384,
            "data.eval.max_seq_len": 12_000,
            "model.encoder.short_window": 16,
            "model.encoder.embedding_dim": 16,
            "data.row_group_size": 8,
        },
        synthetic_overrides={"max_length": 3000},
    ),
}


def prepare(spec: DatasetSpec, data_dir: Path, tiny: bool) -> Optional[Path]:
    """The dataset's Parquet file (made once), or ``None`` when its source file is absent."""
    data_dir.mkdir(parents=True, exist_ok=True)
    # Synthetic files are named by their size, so a changed recipe never reads a stale file.
    size = f"-{spec.synthetic_users}users" if spec.source is None else ""
    out = data_dir / f"{spec.name}{size}{'-tiny' if tiny else ''}.parquet"
    if out.exists():
        return out
    if spec.source is not None:
        if not spec.source.exists():
            print(f"[{spec.name}] skipped: {spec.source} not found", flush=True)
            return None
        cmd = [
            sys.executable,
            "-m",
            "torchrec_hytrec.data.convert",
            "--format",
            spec.convert_format,
            str(spec.source),
            str(out),
        ]
        subprocess.run(cmd, check=True)
        return out
    import dataclasses

    from torchrec_hytrec.data.parquet import write_sequences
    from torchrec_hytrec.data.synthetic import SyntheticConfig, generate

    config = dataclasses.replace(
        SyntheticConfig.long(seed=0, num_users=spec.synthetic_users), **spec.synthetic_overrides
    )
    data = generate(config)
    write_sequences(
        out, data.sequences, data.info, row_group_size=int(spec.overrides.get("data.row_group_size", 32))
    )
    print(
        f"[{spec.name}] {data.info.num_users} users, {data.info.num_items} items, "
        f"{data.info.num_events} events, "
        f"longest {int(np.diff(data.sequences.offsets).max())}",
        flush=True,
    )
    return out


def dataset_overrides(spec: DatasetSpec) -> Dict[str, Any]:
    """The ``--set`` overrides every preset of ``spec`` shares: :data:`COMMON`, the dataset's own,
    then, with ``spec.lr_schedule``, :data:`SCHEDULE` decaying to 0 at ``spec.epochs``."""
    schedule = {**SCHEDULE, "optim.dense_lr_decay_epochs": spec.epochs} if spec.lr_schedule else {}
    return {**COMMON, **spec.overrides, **schedule}


def search_points() -> List[Dict[str, Any]]:
    """Every combination of the :data:`SEARCH` values, as ``--set`` overrides."""
    points: List[Dict[str, Any]] = [{}]
    for key, values in SEARCH.items():
        points = [{**point, key: value} for point in points for value in values]
    return points


def recipe_tag(recipe: Dict[str, Any]) -> str:
    """A short name of a search point (``dense_lr=0.001,dropout=0.2``); ``""`` for none."""
    return ",".join(f"{key.rsplit('.', 1)[-1]}={value}" for key, value in recipe.items())


def run_name(dataset: str, preset: str, seed: int, recipe: Dict[str, Any]) -> str:
    """The name of one run's folder (and of its kept ranks file)."""
    tag = recipe_tag(recipe)
    return f"{dataset}-{preset}{'-' + tag if tag else ''}-seed{seed}"


def best_epoch_test(run_dir: Path, epochs: int) -> Dict[str, Any]:
    """Test figures (overall and by bucket) of the epoch, among the first ``epochs``, with the best
    valid NDCG@10, that epoch's valid NDCG@10 and its per-user ranks file."""
    lines = (run_dir / "eval_detail.jsonl").read_text().splitlines()
    details = [json.loads(line) for line in lines if line][:epochs]
    best = max(details, key=lambda d: d["valid"].get("ndcg@10", float("-inf")))
    ranks = run_dir / "ranks" / f"epoch{best['epoch']:03d}.npz"
    return {
        "epoch": best["epoch"],
        "valid_ndcg@10": best["valid"]["ndcg@10"],
        "ranks_file": _path_name(ranks) if ranks.exists() else None,
        **best["test"],
    }


def keep_ranks(result: Dict[str, Any], out_dir: Path) -> Dict[str, Any]:
    """``result`` with its test split's per-user ranks copied next to the tables
    (``out_dir/ranks/<run>.npz``, compressed), so a paired comparison can be recomputed from the
    results directory alone: the run directories hold checkpoints and are not kept."""
    ranks = result.get("ranks_file")
    if ranks is None or not (ROOT / ranks).exists() or (ROOT / ranks).parent == (out_dir / "ranks").resolve():
        return result
    source = np.load(ROOT / ranks)
    target = (
        out_dir
        / "ranks"
        / f"{run_name(result['dataset'], result['preset'], result['seed'], result['recipe'])}.npz"
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        target, **{k: source[k].astype(np.int32) for k in source.files if k.startswith("test_")}
    )
    return {**result, "ranks_file": _path_name(target)}


def _path_name(path: Path) -> str:
    """``path`` relative to the checkout when inside it (results stay valid in another clone)."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def run_overrides(base: Dict[str, Any], recipe: Dict[str, Any], preset: str) -> Dict[str, Any]:
    """The ``--set`` overrides of one run: the dataset's recipe ``base``, the search point
    ``recipe``, then the variant's own fields."""
    return {**base, **recipe, **VARIANTS[preset]}


def encoder_parameters(row: Dict[str, Any]) -> int:
    """Parameters of the encoder a stored run trained (the item table excluded), from its config."""
    from torchrec_hytrec.modules.encoder import HyTRecEncoder
    from torchrec_hytrec.training.config import load_config

    overrides = run_overrides(row["overrides"], row.get("recipe", {}), row["preset"])
    config = load_config(None, [f"{key}={json.dumps(value)}" for key, value in overrides.items()])
    return sum(p.numel() for p in HyTRecEncoder(config.model.encoder).parameters())


def train_command(
    spec: DatasetSpec, data: Path, preset: str, seed: int, run_dir: Path, recipe: Dict[str, Any]
) -> List[str]:
    """The ``python -m torchrec_hytrec.train`` command of one run of ``preset`` (a :data:`VARIANTS`
    name) with the search point ``recipe`` (``{}`` for the dataset's own recipe)."""
    overrides = run_overrides(dataset_overrides(spec), recipe, preset)
    cmd = [
        sys.executable,
        "-m",
        "torchrec_hytrec.train",
        "--data",
        str(data),
        "--seed",
        str(seed),
        "--epochs",
        str(spec.epochs),
        "--out-dir",
        str(run_dir),
    ]
    for key, value in overrides.items():
        cmd += ["--set", f"{key}={json.dumps(value)}"]
    return cmd


def run_one(
    spec: DatasetSpec,
    data: Path,
    preset: str,
    seed: int,
    recipe: Dict[str, Any],
    runs_dir: Path,
    threads: int,
    reuse: bool,
) -> Dict[str, Any]:
    tag = recipe_tag(recipe)
    run_dir = runs_dir / run_name(spec.name, preset, seed, recipe)
    cmd = train_command(spec, data, preset, seed, run_dir, recipe)
    started = time.perf_counter()
    done = _epochs_done(run_dir, cmd) if reuse else None
    finished = done is not None and ((run_dir / "early_stopped.json").exists() or done >= spec.epochs)
    if not finished:
        run_dir.mkdir(parents=True, exist_ok=True)
        # A shorter run of the same recipe continues from its last epoch instead of starting over.
        if done:
            cmd = [*cmd, "--resume"]
        with open(run_dir / "train.log", "a" if done else "w") as log:
            env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}); see {run_dir / 'train.log'}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line][
        : spec.epochs
    ]
    # A reused or continued run's earlier process is gone: its epochs' time is what is left to count.
    wall = sum(r["epoch_s"] for r in rows) if finished or done else time.perf_counter() - started
    result = {
        "dataset": spec.name,
        "preset": preset,
        "seed": seed,
        "recipe": recipe,
        "epochs_run": len(rows),
        "train_wall_s": wall,
        **best_epoch_test(run_dir, spec.epochs),
    }
    print(
        f"[{spec.name}] {preset:12s} {tag} seed {seed}: valid NDCG@10 {result['valid_ndcg@10']:.4f}, "
        f"test HR@10 {result['hr@10']:.4f} "
        f"NDCG@10 {result['ndcg@10']:.4f} MRR {result['mrr']:.4f} (epoch {result['epoch']}, "
        f"{wall:.0f}s)",
        flush=True,
    )
    return result


def _epochs_done(run_dir: Path, cmd: List[str]) -> Optional[int]:
    """Epochs ``run_dir`` holds of a run of the training config ``cmd`` gives, or ``None`` when it
    holds no run of that config.

    A learning-rate schedule's horizon is its own config key (not the epoch count) and an epoch's
    batches depend only on the seed and the epoch, so the first ``e`` epochs of a longer run of
    one config are exactly an ``e``-epoch run of it, and a shorter run continued with
    ``--resume`` is exactly the longer one; a run that stopped early (``early_stopped.json``)
    would have stopped at the same epoch. Where the run writes (output
    directory, checkpoint cadence) does not count.
    """
    from torchrec_hytrec.training.config import config_to_dict, load_config

    try:
        saved = json.loads((run_dir / "config.json").read_text())
        rows = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return None
    overrides = [cmd[i + 1] for i, arg in enumerate(cmd) if arg == "--set"]
    wanted = json.loads(json.dumps(config_to_dict(load_config(None, overrides))))  # as config.json holds it
    wanted["seed"] = int(cmd[cmd.index("--seed") + 1])
    wanted["data"]["path"] = cmd[cmd.index("--data") + 1]

    def recipe(config: Dict[str, Any]) -> Dict[str, Any]:
        config = {k: v for k, v in config.items() if k not in ("epochs", "out_dir", "checkpoint")}
        path = config["data"]["path"]
        config["data"] = {**config["data"], "path": str((ROOT / path).resolve()) if path else None}
        return config

    return len([r for r in rows if r]) if recipe(saved) == recipe(wanted) else None


def _mean_std(values: List[float]) -> str:
    """``mean ± std``; one value alone (one seed) has no spread to show."""
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def _presets_of(rows: List[Dict[str, Any]]) -> List[str]:
    """Variants present in ``rows``, in the order of :data:`VARIANTS` (HyTRec first)."""
    return [p for p in VARIANTS if any(r["preset"] == p for r in rows)]


def _checked_ranks(row: Dict[str, Any], k: int) -> Any:
    """The per-user ranks of the stored run ``row``, refused when their HR@``k`` is not the
    row's: the file was then written by another run of the same name (files are named by
    dataset, preset, seed and recipe) and would pair the wrong ranks."""
    ranks = np.load(ROOT / row["ranks_file"])
    for protocol, prefix in PROTOCOLS.items():
        stored, column = row.get(f"{prefix}hr@{k}"), f"test_{prefix}ranks"
        if stored is None or column not in ranks.files:
            continue
        found = float((ranks[column] < k).mean())
        if abs(found - stored) > 1e-9:
            raise ValueError(
                f"{row['ranks_file']}: HR@{k} ({protocol}) {found:.4f} from its ranks, {stored:.4f} in "
                f"the stored run (started {row.get('started')}): the ranks are another run's; re-run it"
            )
    return ranks


def paired_bootstrap(
    ours: List[Dict[str, Any]], theirs: List[Dict[str, Any]], min_length: int, k: int = 10
) -> Optional[Dict[str, Any]]:
    """HR@``k`` of ``ours`` minus ``theirs`` on the test users with >= ``min_length`` events,
    paired by user and seed, with a 95% bootstrap interval over users.

    Each resample draws the users with replacement (the same draw for every seed) and averages the
    per-user differences over users and seeds, so the interval is the uncertainty from which users
    happen to be in the bucket; the seeds' own spread is reported next to it. ``None`` when the
    two sides share no seed with saved ranks or no user is in the bucket.
    """
    by_seed = {r["seed"]: r for r in theirs if r.get("ranks_file")}
    pairs = sorted(
        ((r, by_seed[r["seed"]]) for r in ours if r.get("ranks_file") and r["seed"] in by_seed),
        key=lambda pair: pair[0]["seed"],
    )
    if not pairs:
        return None
    missing = sorted(
        {r["ranks_file"] for pair in pairs for r in pair if not (ROOT / r["ranks_file"]).exists()}
    )
    if missing:
        return {"missing": missing}
    diffs = []
    for a, b in pairs:
        files = [_checked_ranks(r, k) for r in (a, b)]
        for column in ("test_positive_ids", "test_history_lengths"):
            if not np.array_equal(files[0][column], files[1][column]):
                raise ValueError(
                    f"{a['ranks_file']} and {b['ranks_file']}: different test users ({column}); "
                    "paired runs must evaluate the same users in the same order"
                )
        inside = files[0]["test_history_lengths"] >= min_length
        diffs.append(
            (files[0]["test_ranks"][inside] < k).astype(float) - (files[1]["test_ranks"][inside] < k)
        )
    d = np.stack(diffs)  # [seeds, users]
    if d.shape[1] == 0:
        return None
    rng = np.random.default_rng(0)
    draws = rng.integers(0, d.shape[1], size=(BOOTSTRAP_RESAMPLES, d.shape[1]))
    means = d.mean(0)[draws].mean(1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {
        "users": d.shape[1],
        "seeds": [a["seed"] for a, _ in pairs],
        "diff": float(d.mean()),
        "low": float(low),
        "high": float(high),
        "per_seed": [float(x) for x in d.mean(1)],
    }


def merge_runs(stored: List[Dict[str, Any]], new: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The store after the runs ``new``: the stored runs they neither repeat nor make stale, then
    ``new``.

    A run repeats a stored one of the same dataset, preset, seed and recipe. A new search of a
    (dataset, preset) makes the stored runs of its other recipes stale; a new search of HyTRec
    also those of the ablations (they train with HyTRec's chosen recipe).
    """

    def key(r: Dict[str, Any]) -> tuple:
        return r["dataset"], r["preset"], r["seed"], recipe_tag(r.get("recipe", {}))

    done = {key(r) for r in new}
    chosen_now = {
        (r["dataset"], r["preset"]): recipe_tag(r["recipe"])
        for r in new
        if r.get("search_point") and r["chosen"]
    }

    def still_valid(r: Dict[str, Any]) -> bool:
        owner = "hytrec" if r["preset"] in ABLATIONS else r["preset"]
        searched = chosen_now.get((r["dataset"], owner))
        return key(r) not in done and (
            searched is None or (not r.get("search_point") and recipe_tag(r.get("recipe", {})) == searched)
        )

    return [r for r in stored if still_valid(r)] + new


def final_runs(results: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The runs the tables report: without a search, every run; with one, the chosen point's."""
    return [r for r in results if r.get("chosen", True)]


def search_table(rows: List[Dict[str, Any]]) -> List[str]:
    """Valid NDCG@10 of every search point of every preset (seed 0) on one dataset's ``rows``, the
    chosen one in bold."""
    searched = [r for r in rows if r.get("search_point")]
    if not searched:
        return []
    points = list(dict.fromkeys(recipe_tag(r["recipe"]) for r in searched))
    patience = {r["overrides"].get("early_stopping.patience") for r in searched}
    stopping = "every epoch trained"
    if patience != {0}:
        stopping = f"early stopping with patience {', '.join(map(str, sorted(patience)))}"
    lines = [
        f"Recipe search on {searched[0]['dataset']} (seed {searched[0]['seed']}, valid NDCG@10 of the "
        f"best-valid epoch; the same {len(points)} points for every preset, the chosen one in bold, "
        f"{stopping}):",
        "",
        "| model | " + " | ".join(points) + " |",
        "|---|" + "---|" * len(points),
    ]
    for preset in _presets_of(searched):
        cells = []
        for point in points:
            run = next(
                (r for r in searched if r["preset"] == preset and recipe_tag(r["recipe"]) == point), None
            )
            cell = "–" if run is None else f"{run['valid_ndcg@10']:.4f} ({run['epochs_run']} ep)"
            cells.append(f"**{cell}**" if run is not None and run.get("chosen") else cell)
        lines.append(f"| {preset} | " + " | ".join(cells) + " |")
    return lines + [""]


def bootstrap_table(rows: List[Dict[str, Any]], bucket: Optional[Tuple[str, int]] = None) -> List[str]:
    """HyTRec minus every other preset (:func:`paired_bootstrap`) on the test users of ``bucket``
    (name, least events), or on every test user when ``None``."""
    name, min_length = bucket or ("all", 0)
    ours = [r for r in rows if r["preset"] == "hytrec"]
    # A bucket with no user has nothing to compare, one with every user repeats the overall table.
    if bucket is not None and all(r.get(f"count/{name}", 0) in (0, r.get("count")) for r in ours):
        return []
    table: List[str] = []
    missing: Dict[str, List[str]] = {}
    for preset in _presets_of(rows):
        if preset == "hytrec":
            continue
        result = paired_bootstrap(ours, [r for r in rows if r["preset"] == preset], min_length)
        if result is None:
            continue
        if "missing" in result:
            missing[preset] = result["missing"]
            continue
        table.append(
            f"| {preset} | {result['users']} | {result['seeds']} | {result['diff']:+.4f} | "
            f"[{result['low']:+.4f}, {result['high']:+.4f}] | "
            + ", ".join(f"{x:+.4f}" for x in result["per_seed"])
            + " |"
        )
    users = "every test user" if bucket is None else f"test users with >= {min_length} events ({name})"
    if table:
        table = [
            f"HyTRec minus each model on {users}, HR@10, paired by user and seed, 95% bootstrap "
            f"interval over users ({BOOTSTRAP_RESAMPLES} resamples):",
            "",
            "| HyTRec minus | users | seeds | difference | 95% interval | per seed |",
            "|---|---|---|---|---|---|",
            *table,
            "",
        ]
    if missing:
        files = sorted({f for fs in missing.values() for f in fs})
        table += [
            f"No paired bootstrap on {users} of HyTRec minus {', '.join(missing)}: the per-user ranks "
            f"of {len(files)} of their runs are not in this checkout (e.g. {files[0]}); re-run them "
            "to compute it.",
            "",
        ]
    return table


def summarise(results: List[Dict[str, Any]]) -> str:
    """Markdown tables of each dataset: overall figures, HR@10 by history length, the paired
    differences, then the recipe search that chose the reported runs."""
    lines: List[str] = []
    for dataset in dict.fromkeys(r["dataset"] for r in results):
        rows = [r for r in final_runs(results) if r["dataset"] == dataset]
        params = {p: encoder_parameters(next(r for r in rows if r["preset"] == p)) for p in _presets_of(rows)}
        for protocol, prefix in PROTOCOLS.items():
            ranked = "every item ranked" if protocol == "all" else "the user's seen items removed"
            lines += [
                f"### {dataset}, {ranked} (test split, best-valid epoch, mean ± std over the seeds)",
                "",
                "| model | encoder params | seeds | "
                + " | ".join(m.upper() for m in REPORTED)
                + " | train s |",
                "|---|---|---|" + "---|" * (len(REPORTED) + 1),
            ]
            for preset in _presets_of(rows):
                mine = [r for r in rows if r["preset"] == preset]
                cells = [_mean_std([r[prefix + m] for r in mine if prefix + m in r]) for m in REPORTED]
                wall = statistics.median(r["train_wall_s"] for r in mine)
                used = ",".join(str(seed) for seed in sorted(r["seed"] for r in mine))
                lines.append(f"| {preset} | {params[preset]:,} | {used} | {' | '.join(cells)} | {wall:.0f} |")
            for name, figures in PUBLISHED.get(dataset, {}).get(protocol, {}).items():
                published = [f"{figures[m]:.4f}" if m in figures else "–" for m in REPORTED]
                lines.append(f"| {name}, published | – | – | {' | '.join(published)} | – |")
            lines.append("")
        present = [b for b in BUCKETS if any(f"hr@10/{b}" in r for r in rows)]
        lines += [
            "",
            f"HR@10 by history length ({dataset}):",
            "",
            "| model | " + " | ".join(f"{b} (users)" for b in present) + " |",
            "|---|" + "---|" * len(present),
        ]
        for preset in _presets_of(rows):
            mine = [r for r in rows if r["preset"] == preset]
            cells = []
            for b in present:
                count = int(statistics.median(r.get(f"count/{b}", 0) for r in mine))
                cells.append(f"{_mean_std([r[f'hr@10/{b}'] for r in mine if f'hr@10/{b}' in r])} ({count})")
            lines.append(f"| {preset} | " + " | ".join(cells) + " |")
        lines.append("")
        lines += bootstrap_table(rows) + bootstrap_table(rows, LONG_BUCKET)
        # After the dataset's own tables, so the search cannot be read as the previous dataset's.
        lines += search_table([r for r in results if r["dataset"] == dataset])
    return "\n".join(lines)


def plot(results: List[Dict[str, Any]], out_dir: Path) -> List[Path]:
    """Bar charts of HR@10 per dataset and by history length, mean with std error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    results = final_runs(results)
    datasets = list(dict.fromkeys(r["dataset"] for r in results))
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.5 * len(datasets), 3.6), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        rows = [r for r in results if r["dataset"] == dataset]
        presets = _presets_of(rows)
        values = [[r["hr@10"] for r in rows if r["preset"] == p] for p in presets]
        ax.bar(
            presets,
            [statistics.mean(v) for v in values],
            yerr=[statistics.stdev(v) if len(v) > 1 else 0 for v in values],
            capsize=4,
            color=[f"C{i}" for i in range(len(presets))],
        )
        for name, figures in PUBLISHED.get(dataset, {}).get("all", {}).items():
            ax.axhline(figures["hr@10"], color="k", ls="--", lw=1, label=f"{name}: {figures['hr@10']}")
            ax.legend(fontsize=7)
        ax.set_title(dataset)
        ax.set_ylabel("test HR@10")
    fig.tight_layout()
    paths.append(out_dir / "quality_hr10.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(datasets), figsize=(4.5 * len(datasets), 3.6), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        rows = [r for r in results if r["dataset"] == dataset]
        present = [b for b in BUCKETS if any(f"hr@10/{b}" in r for r in rows)]
        presets = _presets_of(rows)
        width = 0.8 / max(len(presets), 1)
        for i, preset in enumerate(presets):
            means = [
                statistics.mean([r.get(f"hr@10/{b}", 0.0) for r in rows if r["preset"] == preset])
                for b in present
            ]
            ax.bar([j + i * width for j in range(len(present))], means, width, label=preset)
        ax.set_xticks([j + width * (len(presets) - 1) / 2 for j in range(len(present))], present, fontsize=8)
        ax.set_title(f"{dataset}: HR@10 by history length")
        ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out_dir / "quality_buckets.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    p.add_argument(
        "--presets", nargs="+", default=list(PRESETS), choices=list(VARIANTS), help="presets and ablations"
    )
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, help="override every dataset's epochs")
    p.add_argument("--jobs", type=int, default=2, help="training runs at once (one thread each when > 1)")
    p.add_argument(
        "--threads",
        type=int,
        help="intra-op threads of each run (default: 1 when --jobs > 1, else every core)",
    )
    p.add_argument("--out", default=str(ROOT / "docs" / "results"), help="results directory")
    p.add_argument("--data-dir", default=str(ROOT / "runs" / "quality-data"), help="prepared datasets")
    p.add_argument(
        "--runs-dir", default=str(ROOT / "runs" / "quality"), help="each training run's logs and metrics"
    )
    p.add_argument(
        "--reuse-finished",
        action="store_true",
        help="take runs in --runs-dir with the same training config instead of training again: "
        "their first epochs when they hold at least the epochs asked for, else continued (--resume) "
        "up to them; their wall time is the sum of those epochs' times",
    )
    p.add_argument(
        "--search",
        action="store_true",
        help="choose each preset's recipe among the SEARCH points on the first seed's valid split "
        "(the same points for every preset; ablations take HyTRec's choice), then train the other "
        "seeds with it",
    )
    p.add_argument("--tiny", action="store_true", help="a seconds-long smoke run on tiny synthetic data")
    p.add_argument(
        "--render-only",
        action="store_true",
        help="train nothing: rewrite quality.md and the plots from the runs quality.json holds",
    )
    args = p.parse_args(argv)

    specs = dict(TINY) if args.tiny else {name: DATASETS[name] for name in args.datasets}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    threads = args.threads or (1 if args.jobs > 1 else (os.cpu_count() or 1))
    prepared = []
    for spec in specs.values() if not args.render_only else ():
        if args.epochs is not None:
            spec = DatasetSpec(**{**spec.__dict__, "epochs": args.epochs})
        data = prepare(spec, Path(args.data_dir), args.tiny)
        if data is not None:
            prepared.append((spec, data))
    if args.search and any(p in ABLATIONS for p in args.presets) and "hytrec" not in args.presets:
        p.error("--search with ablations needs hytrec among --presets (they take its recipe)")
    command = ("python benchmarks/quality.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    started = f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"

    def job_run(job: tuple) -> Dict[str, Any]:
        spec = job[0]
        return {
            **run_one(*job, runs_dir=Path(args.runs_dir), threads=threads, reuse=args.reuse_finished),
            "command": command,
            "started": started,
            "epochs": spec.epochs,
            "overrides": dataset_overrides(spec),
        }

    new: List[Dict[str, Any]] = []
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        if not args.search:
            jobs = [
                (spec, data, preset, seed, {})
                for spec, data in prepared
                for preset in args.presets
                for seed in args.seeds
            ]
            new = list(pool.map(job_run, jobs))
        else:
            first, rest = args.seeds[0], args.seeds[1:]
            searched = [p for p in args.presets if p not in ABLATIONS]
            grid = [
                (spec, data, preset, first, point)
                for spec, data in prepared
                for preset in searched
                for point in search_points()
            ]
            trials = [{**r, "search_point": True, "chosen": False} for r in pool.map(job_run, grid)]
            chosen: Dict[tuple, Dict[str, Any]] = {}
            for r in trials:
                key = (r["dataset"], r["preset"])
                if key not in chosen or r["valid_ndcg@10"] > chosen[key]["valid_ndcg@10"]:
                    chosen[key] = r
            for r in chosen.values():
                r["chosen"] = True
            jobs = [
                (
                    spec,
                    data,
                    preset,
                    seed,
                    chosen[(spec.name, "hytrec" if preset in ABLATIONS else preset)]["recipe"],
                )
                for spec, data in prepared
                for preset in args.presets
                for seed in (args.seeds if preset in ABLATIONS else rest)
            ]
            new = trials + list(pool.map(job_run, jobs))
    # Earlier invocations' runs on other (dataset, preset, seed) stay: datasets can be run one by one.
    store = out_dir / "quality.json"
    # Two invocations finishing together would each merge into the store the other has not yet
    # written, and the later write would drop the earlier one's runs.
    with open(out_dir / "quality.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        stored = json.loads(store.read_text()) if store.exists() else []
        results = [keep_ranks(r, out_dir) for r in merge_runs(stored, new)]
        store.write_text(json.dumps(results, indent=1))
    table = summarise(results)
    plots = plot(results, out_dir) if results else []
    runs_by_command: Dict[str, List[str]] = {}
    for r in results:
        runs_by_command.setdefault(
            f"`{r['command']}` (started {r['started']}; {r['dataset']}: {r['epochs']} epochs, "
            f"`{json.dumps(r['overrides'])}`)",
            [],
        ).append(r["dataset"])
    (out_dir / "quality.md").write_text(
        "Produced by:\n\n"
        + "".join(f"- {c}\n" for c in runs_by_command)
        + "\n"
        + table
        + "\n"
        + "".join(f"![{p.stem}]({p.name})\n" for p in plots)
    )
    print(table)
    return results


if __name__ == "__main__":
    main()
