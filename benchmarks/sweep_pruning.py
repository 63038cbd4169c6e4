"""Benchmark: the same sweep budget with and without pruning, on a subset of the real data.

Both sweeps have the same budget (trials, epochs per trial) and the same seeded TPE sampler,
and run through the real `pipeline.tune.sweep` on throwaway SQLite and MLflow stores; one prunes
(successive halving by default, or the median or Hyperband pruner), the other runs every trial
to the end. Reported: the best validation accuracy each found and the epochs each trained.
`--recipe` trains every trial with a recipe's settings (the sweep then tunes the keys in
params.yaml's `tune.space` on top). Needs `dvc repro preprocess`.

    python benchmarks/sweep_pruning.py --trials 16 --epochs 6 --fraction 0.1 --recipe fast

Memory: each trial trains in its own process, so the sweep's own memory must stay flat; the
report has the sweep process's resident memory after every trial and every trial process's peak.
Writes benchmarks/results/<name>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.accuracy import machine  # noqa: E402


def run_sweep(pruner: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    import optuna

    from pipeline import tune
    from pipeline.config import load_params, load_recipe, with_values

    base = load_params()
    if args.recipe:
        base = with_values(base, load_recipe(args.recipe))
    params = dataclasses.replace(
        base,
        tune=dataclasses.replace(
            base.tune,
            study_name=f"bench-{pruner}",
            storage=f"sqlite:///{workdir / f'{pruner}.db'}",
            n_trials=args.trials,
            epochs=args.epochs,
            train_fraction=args.fraction,
            pruner=pruner,
            startup_trials=args.startup,
            warmup_epochs=args.warmup,
            reduction_factor=args.reduction_factor,
        ),
        paths=dataclasses.replace(
            base.paths,
            best_params=workdir / pruner / "best.yaml",
            trials=workdir / pruner / "trials.csv",
            sweep_plots=workdir / pruner / "plots",
        ),
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
        "epochs_trained": sum(t.user_attrs.get("epochs", 0) for t in trials),
        "trials": {
            state: sum(t.state.name == state for t in trials)
            for state in ("COMPLETE", "PRUNED", "FAIL")
        },
        "seconds": round(seconds, 1),
        "sweep_rss_mb_after_each_trial": [round(r) for r in rss_after_trial],
        "sweep_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "trial_peak_rss_mb": [round(t.user_attrs.get("peak_rss_mb", 0)) for t in trials],
    }


def resident_mb() -> float:
    """This process's resident memory now (not its peak)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--fraction", type=float, default=0.1, help="share of the training split")
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
    parser.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        with tempfile.TemporaryDirectory() as tmp:
            result = run_sweep(args.side, args, Path(tmp))
        args.output.write_text(json.dumps(result))
        return

    import subprocess

    sides = {}
    for side in (args.pruner, "none"):  # each in a fresh process: its own memory figure
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            command = [sys.executable, __file__, "--side", side, "--output", out.name]
            for flag in ("trials", "epochs", "fraction", "startup", "warmup", "reduction_factor"):
                command += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
            if args.recipe:
                command += ["--recipe", args.recipe]
            subprocess.run(command, check=True)
            sides["unpruned" if side == "none" else "pruned"] = json.loads(
                Path(out.name).read_text()
            )
    pruned, unpruned = sides["pruned"], sides["unpruned"]
    report = {
        "benchmark": "sweep with and without pruning, same budget",
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("side", "output", "name")},
        "results": sides,
        "accuracy_gap_points": round(
            100 * (unpruned["best_val_accuracy"] - pruned["best_val_accuracy"]), 2
        ),
        "epochs_ratio": round(pruned["epochs_trained"] / unpruned["epochs_trained"], 3),
        "goals": {"accuracy_gap_points_at_most": 1.0, "epochs_ratio_at_most": 0.4},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
