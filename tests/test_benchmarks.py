"""Tiny runs of the benchmark scripts, so that they cannot rot."""

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> str:
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_paired_bootstrap_of_a_known_difference(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import quality

    rng = np.random.default_rng(1)
    users, lengths = 400, np.r_[np.full(300, 6000), np.full(100, 50)]
    runs = {}
    for preset, hit_rate in (("hytrec", 0.6), ("sasrec_like", 0.4)):
        for seed in (0, 1):
            path = tmp_path / f"{preset}{seed}.npz"
            hits = rng.random(users) < hit_rate
            ranks = np.where(hits, 3, 700)
            ranks[300:] = 0 if preset == "hytrec" else 900  # outside the bucket: must not count
            np.savez(path, test_ranks=ranks, test_positive_ids=np.arange(users), test_history_lengths=lengths)
            runs.setdefault(preset, []).append({"seed": seed, "ranks_file": str(path)})
    result = quality.paired_bootstrap(runs["hytrec"], runs["sasrec_like"], 5000)
    assert result["users"] == 300 and result["seeds"] == [0, 1]
    assert result["low"] < result["diff"] < result["high"] and result["low"] > 0.1
    assert abs(result["diff"] - 0.2) < 0.06 and result["high"] - result["low"] < 0.15
    # A ranks file another run of the same name overwrote no longer gives its row's HR@10: refused.
    first = runs["hytrec"][0]
    first["hr@10"] = float((np.load(first["ranks_file"])["test_ranks"] < 10).mean())
    assert quality.paired_bootstrap(runs["hytrec"], runs["sasrec_like"], 5000)["diff"] == result["diff"]
    first["hr@10"] += 1 / users
    with pytest.raises(ValueError, match=r"hytrec0.npz: HR@10 \(all\) .* the ranks are another run's"):
        quality.paired_bootstrap(runs["hytrec"], runs["sasrec_like"], 5000)
    del first["hr@10"]
    # Runs over different users are refused, not paired.
    np.savez(
        runs["sasrec_like"][0]["ranks_file"],
        test_ranks=np.zeros(users),
        test_positive_ids=np.zeros(users),
        test_history_lengths=lengths,
    )
    with pytest.raises(ValueError, match="different test users"):
        quality.paired_bootstrap(runs["hytrec"], runs["sasrec_like"], 5000)
    # Ranks that are gone (another checkout's runs) are named, not skipped silently.
    Path(runs["sasrec_like"][1]["ranks_file"]).unlink()
    rows = [{"preset": p, "count/len>=5k": 300, **r} for p, seeds in runs.items() for r in seeds]
    note = "\n".join(quality.bootstrap_table(rows, quality.LONG_BUCKET))
    assert "No paired bootstrap on test users with >= 5000 events" in note and "sasrec_like1.npz" in note
    # A bucket holding every test user would repeat the table over every user: it is left out.
    assert quality.bootstrap_table([{**r, "count": 300} for r in rows], quality.LONG_BUCKET) == []


def test_kept_ranks_are_named_by_their_run(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import quality

    rows = []
    for seed in (0, 1):
        source = tmp_path / "runs" / f"run{seed}" / "ranks" / "epoch003.npz"
        source.parent.mkdir(parents=True)
        np.savez(source, test_ranks=np.full(5, seed), valid_ranks=np.zeros(5))
        rows.append(
            {"dataset": "d", "preset": "hytrec", "seed": seed, "recipe": {}, "ranks_file": str(source)}
        )
    # Kept once, then kept again from the first results folder into a second one.
    for out in ("results", "copy"):
        rows = [quality.keep_ranks(r, tmp_path / out) for r in rows]
        assert [Path(r["ranks_file"]) for r in rows] == [
            tmp_path / out / "ranks" / f"d-hytrec-seed{s}.npz" for s in (0, 1)
        ]
        kept = [np.load(r["ranks_file"]) for r in rows]
        assert [k.files for k in kept] == [["test_ranks"]] * 2  # the test split only
        assert [int(k["test_ranks"][0]) for k in kept] == [0, 1]


def test_a_new_search_makes_other_recipes_and_their_ablations_stale() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import quality

    old, chosen = {"optim.dense_lr": 0.001}, {"optim.dense_lr": 0.003}

    def run(preset: str, seed: int, recipe: dict, **flags) -> dict:
        return {"dataset": "ml100k", "preset": preset, "seed": seed, "recipe": recipe, **flags}

    stored = [
        run("hytrec", 0, old, search_point=True, chosen=True),
        run("hytrec", 1, old),
        run("hytrec_no_time_decay", 0, old),  # trained with HyTRec's earlier choice
        run("sasrec_like", 0, old, search_point=True, chosen=True),
        run("sasrec_like", 1, old),
        {**run("hytrec", 1, old), "dataset": "beauty"},
    ]
    new = [
        run("hytrec", 0, old, search_point=True, chosen=False),
        run("hytrec", 0, chosen, search_point=True, chosen=True),
        run("hytrec", 1, chosen),
    ]
    merged = quality.merge_runs(stored, new)
    # The other presets, datasets and the new runs stay; HyTRec's and its ablation's runs of the
    # earlier choice go, as does the repeated search point.
    assert merged == stored[3:] + new
    # Without a new HyTRec search an ablation's stored run is kept, and a repeat replaces it.
    assert quality.merge_runs(stored[2:3], []) == stored[2:3]
    assert quality.merge_runs(stored[2:3], [dict(stored[2], hr=1.0)]) == [dict(stored[2], hr=1.0)]


def test_encoder_parameters_of_a_stored_run() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import quality

    from torchrec_hytrec.modules.config import HyTRecConfig
    from torchrec_hytrec.modules.encoder import HyTRecEncoder

    def count(config: HyTRecConfig) -> int:
        return sum(p.numel() for p in HyTRecEncoder(config).parameters())

    base = {"model.encoder.embedding_dim": 32, "model.encoder.dropout": 0.5}
    row = {"overrides": base, "recipe": {"optim.dense_lr": 0.1}, "preset": "sasrec_like"}
    assert quality.encoder_parameters(row) == count(HyTRecConfig.sasrec_like(embedding_dim=32))
    # An ablation is HyTRec's preset with its fields changed.
    row = {**row, "preset": "hytrec_no_short_branch"}
    expected = count(HyTRecConfig.hytrec(embedding_dim=32, use_short_branch=False))
    assert quality.encoder_parameters(row) == expected < count(HyTRecConfig.hytrec(embedding_dim=32))
    # The equal-parameter baseline holds HyTRec's count at the benchmark's width, to 0.5%.
    wide = {"overrides": {"model.encoder.embedding_dim": 64}, "preset": "sasrec_like_wide"}
    hytrec = count(HyTRecConfig.hytrec(embedding_dim=64))
    assert abs(quality.encoder_parameters(wide) - hytrec) < 0.005 * hytrec
    assert quality.encoder_parameters({**wide, "preset": "sasrec_like"}) < 0.75 * hytrec


def test_a_scheduled_dataset_decays_to_its_last_epoch() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import quality

    from torchrec_hytrec.training.config import load_config
    from torchrec_hytrec.training.optimizer import dense_lr_at

    spec = quality.DatasetSpec(name="x", overrides={"optim.dense_lr": 0.01}, epochs=7, lr_schedule=True)
    cmd = quality.train_command(spec, Path("x.parquet"), "sasrec_like", 0, Path("run"), {})
    sets = [cmd[i + 1] for i, arg in enumerate(cmd) if arg == "--set"]
    config = load_config(None, sets)
    assert config.early_stopping.patience == 0  # every epoch: stopping early would cut the decay short
    assert [dense_lr_at(config.optim, e) for e in (0.5, 1.0, 7.0)] == [0.005, 0.01, 0.0]
    pairs = (item.split("=", 1) for item in sets)
    assert quality.dataset_overrides(spec) == {k: json.loads(v) for k, v in pairs if k != "model.preset"}
    # --epochs replaces the spec's epochs; the decay follows them.
    shorter = dataclasses.replace(spec, epochs=3)
    assert quality.dataset_overrides(shorter)["optim.dense_lr_decay_epochs"] == 3
    constant = quality.dataset_overrides(dataclasses.replace(spec, lr_schedule=False))
    assert not any(key.startswith("optim.dense_lr_") for key in constant)
    assert constant["early_stopping.patience"] == quality.COMMON["early_stopping.patience"]


@pytest.mark.slow
def test_quality_speed_and_report_tiny(tmp_path: Path) -> None:
    results = tmp_path / "results"
    places = [
        "--out",
        str(results),
        "--data-dir",
        str(tmp_path / "data"),
        "--runs-dir",
        str(tmp_path / "runs"),
    ]
    common = ["--tiny", "--seeds", "0", "--presets", "hytrec", "--jobs", "1", *places]
    _run("benchmarks/quality.py", *common, "--epochs", "2")
    runs = json.loads((results / "quality.json").read_text())
    assert [(r["dataset"], r["preset"], r["seed"]) for r in runs] == [("synthetic_long", "hytrec", 0)]
    assert 0.0 <= runs[0]["hr@10"] <= 1.0 and "hr@10/len100-1k" in runs[0]
    run = runs[0]
    # Both protocols at every cut-off, from one pass: hit rates grow with K.
    for prefix in ("", "unseen_"):
        assert run[f"{prefix}hr@10"] <= run[f"{prefix}hr@50"] <= run[f"{prefix}hr@500"], prefix
    page = (results / "quality.md").read_text()
    assert "| hytrec |" in page and "every item ranked" in page and "seen items removed" in page
    # A finished run of the same recipe is taken instead of training again; asked for fewer epochs,
    # its first epochs are the shorter run.
    _run("benchmarks/quality.py", *common, "--epochs", "1", "--reuse-finished")
    again = json.loads((results / "quality.json").read_text())
    details = (
        (tmp_path / "runs" / "synthetic_long-hytrec-seed0" / "eval_detail.jsonl").read_text().splitlines()
    )
    assert [(r["epoch"], r["hr@10"]) for r in again] == [(0, json.loads(details[0])["test"]["hr@10"])]
    assert again[0]["train_wall_s"] < runs[0]["train_wall_s"]
    # A run of another recipe is not taken.
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import quality

    spec, run_dir = quality.TINY["synthetic_long"], tmp_path / "runs" / "synthetic_long-hytrec-seed0"
    data = next((tmp_path / "data").glob("*.parquet"))

    def held(spec: quality.DatasetSpec, seed: int = 0, recipe: Optional[dict] = None) -> Optional[int]:
        cmd = quality.train_command(spec, data, "hytrec", seed, run_dir, recipe or {})
        return quality._epochs_done(run_dir, cmd)

    assert held(spec) == 2
    other = dataclasses.replace(spec, overrides={**spec.overrides, "optim.dense_lr": 0.5})
    assert held(other) is None and held(spec, seed=1) is None
    assert held(spec, recipe={"optim.dense_lr": 0.5}) is None
    # Asked for more epochs, the shorter run is continued from its checkpoint (--resume): its
    # epochs so far stay as they were, and the store counts every epoch's time.
    before = (run_dir / "metrics.jsonl").read_text().splitlines()
    _run("benchmarks/quality.py", *common, "--epochs", "3", "--reuse-finished")
    after = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(after) == 3 and after[:2] == before
    (longer,) = json.loads((results / "quality.json").read_text())
    assert longer["epochs_run"] == 3
    assert longer["train_wall_s"] == pytest.approx(sum(json.loads(line)["epoch_s"] for line in after))

    # The recipe search: every point on seed 0, the best valid one trains seed 1, and an ablation
    # takes HyTRec's point; the page shows the search.
    presets = ["--presets", "hytrec", "hytrec_no_time_decay"]
    _run("benchmarks/quality.py", "--tiny", "--seeds", "1", *presets, *places, "--epochs", "1", "--search")
    store = json.loads((results / "quality.json").read_text())
    trials = [r for r in store if r.get("search_point")]
    assert len(trials) == len(quality.search_points()) == 4 and all(r["seed"] == 1 for r in trials)
    best = max(trials, key=lambda r: r["valid_ndcg@10"])
    assert [r["chosen"] for r in trials].count(True) == 1 and best["chosen"]
    ablation = [r for r in store if r["preset"] == "hytrec_no_time_decay"]
    assert [(r["seed"], r["recipe"]) for r in ablation] == [(1, best["recipe"])]
    # The earlier run of HyTRec with the dataset's own recipe is stale now that a search chose another.
    assert {(r["preset"], r["seed"]) for r in store} == {("hytrec", 1), ("hytrec_no_time_decay", 1)}
    page = (results / "quality.md").read_text()
    assert f"**{best['valid_ndcg@10']:.4f}" in page
    # The search is named and printed after the tables of its dataset, not before them.
    search = page.index("Recipe search on synthetic_long (")
    assert page.index("### synthetic_long, every item ranked") < search
    # The per-user ranks travel with the tables (the run directories are not kept).
    assert Path(best["ranks_file"]).parent == results / "ranks"
    saved = np.load(ROOT / best["ranks_file"])
    assert best["hr@10"] == pytest.approx(float((saved["test_ranks"] < 10).mean()))
    # The tables are a function of the store: re-rendered without training, they are the same.
    shutil.rmtree(tmp_path / "runs")
    _run("benchmarks/quality.py", "--render-only", "--out", str(results))
    assert (results / "quality.md").read_text() == page

    _run("benchmarks/speed.py", "--quick", "--out", str(results))
    speed = json.loads((results / "speed.json").read_text())
    encoders = {"hytrec_windowed", "hytrec_full", "all_softmax", "windowed_softmax", "hstu_like"}
    assert {r["encoder"] for r in speed["curves"]} == encoders == set(speed["params"])
    baselines = {"all_softmax", "windowed_softmax", "hstu_like"}
    assert all(set(r["train_x_vs"]) == set(r["infer_x_vs"]) == baselines for r in speed["curves"])
    assert all(
        r["train_ms"]["min"] <= r["train_ms"]["median"] <= r["train_ms"]["max"] for r in speed["curves"]
    )
    assert len(speed["load_average_start"]) == len(speed["load_average_end"]) == 3
    assert all(s["stream_ms"] > 0 and s["recompute_ms"] > 0 for s in speed["streaming"])

    _run("benchmarks/report.py", "--results", str(results), "--out", str(tmp_path / "RESULTS.md"))
    page = (tmp_path / "RESULTS.md").read_text()
    assert "## Accuracy" in page and "## Speed" in page and "results/quality_hr10.png" in page
    for png in ("quality_hr10.png", "quality_buckets.png", "speed_curves.png"):
        assert (results / png).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
@pytest.mark.parametrize(
    "script, args, pattern",
    [
        (
            "benchmarks/bench_tadn.py",
            ["--quick"],
            r"load average=[\d., ]+\n(.|\n)*2048x2048 matmul: [\d.]+/[\d.]+/[\d.]+ ms = \d+ GFLOP/s(.|\n)*"
            r"jagged .* fwd\+bwd: [\d./]+ ms vs [\d./]+ ms, ratio of medians [\d.]+\n"
            r"load average at the end: [\d., ]+",
        ),
        (
            "benchmarks/bench_short.py",
            ["--quick"],
            r"beauty-like batch \(32 users, .*\), K=64: hytrec [\d./]+  sasrec_like [\d./]+  ratio [\d.]+\n"
            r"beauty-like batch \(32 users, .*\), K=8: hytrec_k8 [\d./]+  sasrec_like [\d./]+  ratio [\d.]+\n"
            r"(one user of +\d+ events: .* ratio [\d.]+\n){2}single-user break-even",
        ),
        (
            "benchmarks/bench_encoder.py",
            ["--quick"],
            r"load average [\d., ]+ at the start\nparameters: hytrec_windowed [\d,]+, (.|\n)*"
            r"hytrec_windowed speed-up \(baseline median / its median\): infer [\d.]+x vs all_softmax, "
            r"[\d.]+x vs windowed_softmax, [\d.]+x vs hstu_like; train (.|\n)*"
            r"train \d+% -> at most [\d.]+x, infer \d+% -> at most [\d.]+x\n(.|\n)*"
            r"hytrec_windowed: stream [\d.]+ ms, recompute [\d.]+ ms",
        ),
        ("benchmarks/bench_reader.py", ["--num-users", "200", "--repeats", "1"], r"median [\d.]+ M events/s"),
        (
            "benchmarks/bench_tadn.py",
            ["--busy", "1", "--lengths", "256", "--repeats", "2"],
            r"beside 1 busy loops .*\n +256 events: 1 thread [\d./]+ ms, 2 threads [\d./]+ ms, "
            r"ratio of medians [\d.]+ \(2 threads (no slower|SLOWER)\)\nload average at the end",
        ),
    ],
)
def test_op_encoder_and_reader_benchmarks_quick(script: str, args: list, pattern: str) -> None:
    assert re.search(pattern, _run(script, *args)), f"{script} printed no line matching {pattern!r}"


def test_busy_loops_spin_while_the_body_runs_and_are_gone_after() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from timing import busy_loops

    def loop_states() -> list:
        """The states of this process's children that run the busy loop."""
        states = []
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                status = (proc / "status").read_text().splitlines()
                command = (proc / "cmdline").read_bytes()
            except OSError:  # ended while being read
                continue
            fields = {key: value.strip() for key, _, value in (line.partition(":") for line in status)}
            if fields.get("PPid") == str(os.getpid()) and b"while True" in command:
                states.append(fields["State"][:1])
        return states

    with busy_loops(2):
        assert loop_states() == ["R", "R"]
    assert loop_states() == []


@pytest.mark.slow
def test_catalogue_benchmark_quick(tmp_path: Path) -> None:
    out = _run("benchmarks/bench_catalogue.py", "--quick", "--json", str(tmp_path / "rows.json"))
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [r["num_items"] for r in rows] == [10_000, 100_000]
    for row in rows:
        # The top-K over the sharded table is the top-K over the table gathered from both ranks,
        # and the full-catalogue rank of every user's k-th item is k - 1.
        assert row["gathered_check"] == {"ids_equal": True, "scores_close": True}
        assert row["ranks_wrong"] == 0 and row["eval_users"] == 32
        assert 0 < row["events_per_s"]["min"] <= row["events_per_s"]["median"] <= row["events_per_s"]["max"]
        assert row["topk_ms"]["min"] > 0 and row["ranks_ms"]["min"] > 0
        # Row-wise: the two ranks hold disjoint row ranges covering the table, and each rank's
        # peak rose by at least its shard.
        shards = sorted(s for r in row["ranks"] for s in r["shards"])
        assert [s[0] for s in shards] == [0, shards[0][1]]
        assert sum(s[1] for s in shards) == row["num_items"] + 1
        for r in row["ranks"]:
            assert r["rise_kib"] * 1024 >= sum(n for _, n in r["shards"]) * row["dim"] * 4
    assert re.search(r"load average [\d., ]+ at the start", out) and "at the end" in out
    assert len(re.findall(r"^\| [\d,]+ \| 64 \|", out, re.MULTILINE)) == 2
