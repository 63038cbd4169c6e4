"""Benchmark: the same sweep budget with and without pruning, over sampler seeds.

For each seed, both sweeps have the same budget (trials, epochs per trial) and the same seeded
TPE sampler, and run through the real `pipeline.tune.sweep` on throwaway SQLite and MLflow
stores; one prunes (successive halving by default, or the median or Hyperband pruner), the
other runs every trial to the end. Reported per seed and as a mean with its spread: the best
validation accuracy each found and the epochs each trained. `--recipe` trains every trial with
a recipe's settings (the sweep then tunes the keys in params.yaml's `tune.space` on top).
Needs `dvc repro preprocess`.

    python benchmarks/sweep_pruning.py --trials 16 --epochs 6 --fraction 0.1 --recipe fast --seeds 3

Each sweep's result is kept in benchmarks/results/runs/, keyed by its settings, so an
interrupted benchmark resumes and another pruner setting reuses the unpruned sweeps.

Memory: each trial trains in its own process, so the sweep's own memory must stay flat; the
report has the sweep process's resident memory after every trial and every trial process's peak.
Writes benchmarks/results/<name>.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.accuracy import machine  # noqa: E402

# The settings a sweep's result depends on (the unpruned side ignores the pruner's own).
SWEEP_SETTINGS = ("trials", "epochs", "fraction", "recipe")
PRUNER_SETTINGS = ("pruner", "startup", "warmup", "reduction_factor")


def run_sweep(side: str, seed: int, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    import optuna

    from pipeline import tune
    from pipeline.config import load_params, with_values
    from pipeline.params_edit import load_recipe

    params = load_params()
    if args.recipe:
        params = with_values(params, load_recipe(args.recipe))
    params = with_values(
        params,
        {
            "tune.study_name": f"bench-{side}",
            "tune.storage": f"sqlite:///{workdir / 'optuna.db'}",
            "tune.n_trials": args.trials,
            "tune.epochs": args.epochs,
            "tune.train_fraction": args.fraction,
            "tune.seed": seed,
            "tune.pruner": side,
            "tune.startup_trials": args.startup,
            "tune.warmup_epochs": args.warmup,
            "tune.reduction_factor": args.reduction_factor,
            "paths.best_params": str(workdir / "best.yaml"),
            "paths.trials": str(workdir / "trials.csv"),
            "paths.sweep_plots": str(workdir / "plots"),
        },
    )
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'mlflow.db'}"
    rss_after_trial: list[float] = []
    original = tune.log_trial

    def record(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        rss_after_trial.append(resident_mb())
        original(study, trial)

    tune.log_trial = record
    start = time.perf_counter()
    best = tune.sweep(params)
    seconds = time.perf_counter() - start
    study = optuna.load_study(study_name=params.tune.study_name, storage=params.tune.storage)
    trials = study.get_trials()
    return {
        "best_val_accuracy": best["val_accuracy"],
        "best_trial": best["trial"],
        "epochs_trained": sum(len(t.intermediate_values) for t in trials),
        "trials": {
            state: sum(t.state.name == state for t in trials)
            for state in ("COMPLETE", "PRUNED", "FAIL")
        },
        "seconds": round(seconds, 1),
        "sweep_rss_mb_after_each_trial": [round(r) for r in rss_after_trial],
        "sweep_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "trial_peak_rss_mb": [
            round(t.user_attrs.get("fit", {}).get("peak_rss_mb", 0)) for t in trials
        ],
    }


def resident_mb() -> float:
    """This process's resident memory now (not its peak)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def settings_of(side: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    keys = SWEEP_SETTINGS + (PRUNER_SETTINGS if side != "none" else ())
    return {"side": side, "seed": seed, **{key: getattr(args, key) for key in keys}}


def sweep_result(side: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """One sweep's result: kept from an earlier run with the same settings, or run now in a
    fresh process (so that its memory figure is its own)."""
    settings = settings_of(side, seed, args)
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    kept = RESULTS / "runs" / f"sweep-{side}-seed{seed}-{key}.json"
    if kept.exists():
        print(f"{side}, seed {seed}: kept in {kept}", flush=True)
        return json.loads(kept.read_text())["result"]
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        command = [sys.executable, __file__, "--side", side, "--seed", str(seed)]
        for flag in ("trials", "epochs", "fraction", "startup", "warmup", "reduction_factor"):
            command += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
        if args.recipe:
            command += ["--recipe", args.recipe]
        subprocess.run([*command, "--output", out.name], check=True)
        result = json.loads(Path(out.name).read_text())
    kept.parent.mkdir(parents=True, exist_ok=True)
    kept.write_text(json.dumps({"settings": settings, "result": result}, indent=2) + "\n")
    return result


def spread(values: list[float]) -> dict[str, Any]:
    return {
        "mean": round(statistics.mean(values), 3),
        "std": round(statistics.stdev(values), 3) if len(values) > 1 else None,
        "each": values,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--fraction", type=float, default=0.1, help="share of the training split")
    parser.add_argument("--seeds", type=int, default=3, help="sampler seeds 1..N")
    parser.add_argument(
        "--startup", type=int, default=4, help="median pruner: trials before pruning"
    )
    parser.add_argument(
        "--warmup", type=int, default=1, help="median pruner: epochs before pruning"
    )
    parser.add_argument(
        "--reduction-factor", type=int, default=3, help="successive halving, Hyperband"
    )
    parser.add_argument(
        "--pruner", choices=["median", "successive_halving", "hyperband"],
        default="successive_halving",
    )  # fmt: skip
    parser.add_argument("--recipe", help="train every trial with this recipe (recipes/NAME)")
    parser.add_argument("--name", default="sweep_pruning", help="results/<name>.json")
    parser.add_argument(
        "--side", choices=["median", "successive_halving", "hyperband", "none"],
        help=argparse.SUPPRESS,
    )  # fmt: skip
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        with tempfile.TemporaryDirectory() as tmp:
            result = run_sweep(args.side, args.seed, args, Path(tmp))
        args.output.write_text(json.dumps(result))
        return

    seeds = {}
    for seed in range(1, args.seeds + 1):
        pruned = sweep_result(args.pruner, seed, args)
        unpruned = sweep_result("none", seed, args)
        seeds[seed] = {
            "pruned": pruned,
            "unpruned": unpruned,
            "accuracy_gap_points": round(
                100 * (unpruned["best_val_accuracy"] - pruned["best_val_accuracy"]), 2
            ),
            "epochs_ratio": round(pruned["epochs_trained"] / unpruned["epochs_trained"], 3),
        }
    report = {
        "benchmark": "sweep with and without pruning, same budget, over sampler seeds",
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "settings": {
            k: v for k, v in vars(args).items() if k not in ("side", "seed", "output", "name")
        },
        "accuracy_gap_points": spread([s["accuracy_gap_points"] for s in seeds.values()]),
        "epochs_ratio": spread([s["epochs_ratio"] for s in seeds.values()]),
        "pruned_best_val_accuracy": spread(
            [s["pruned"]["best_val_accuracy"] for s in seeds.values()]
        ),
        "unpruned_best_val_accuracy": spread(
            [s["unpruned"]["best_val_accuracy"] for s in seeds.values()]
        ),
        "goals": {"accuracy_gap_points_at_most": 1.0, "epochs_ratio_at_most": 0.4},
        "seeds": seeds,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "seeds"}, indent=2))


if __name__ == "__main__":
    main()
