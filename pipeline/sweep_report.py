"""What a sweep leaves behind, from the study alone: every trial as CSV (paths.trials), the best
trial (paths.best_params, which `pipeline.handback` reads), Optuna's plots (paths.sweep_plots),
and on the MLflow parent run the best values and those files (MLflow's UI lists the trials' runs
nested under it)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pandas
import yaml

from pipeline import tracking
from pipeline.atomic import write_text
from pipeline.config import Params
from pipeline.params_edit import rounded


def trials_table(study: optuna.Study, tuned: list[str]) -> str:
    """Every trial as CSV: number, state, params, value (validation accuracy), duration (s),
    epochs run, reason."""
    frame = study.trials_dataframe(attrs=(
        "number", "state", "params", "value", "duration", "intermediate_values", "user_attrs"
    ))  # fmt: skip
    if frame.empty:
        return ""
    frame["duration"] = frame["duration"].dt.total_seconds().round(2)
    reported = frame.filter(like="intermediate_values_")  # a column per epoch
    epochs_run = reported.notna().sum(axis=1).astype(int)  # no epoch reported at all: 0, not 0.0
    frame = frame.drop(columns=reported.columns).assign(epochs_run=epochs_run)
    if "user_attrs_fit" in frame:  # one attribute in the storage; two columns, as older trials
        fit = [f if isinstance(f, dict) else {} for f in frame.pop("user_attrs_fit")]
        for key, column in (
            ("seconds", "user_attrs_fit_seconds"),
            ("peak_rss_mb", "user_attrs_peak_rss_mb"),
        ):
            values = pandas.Series([f.get(key) for f in fit], index=frame.index, dtype=float)
            frame[column] = values.fillna(frame[column]) if column in frame else values
    frame = frame.rename(columns=lambda c: c.removeprefix("params_").removeprefix("user_attrs_"))
    frame = frame.rename(columns={"duration": "duration_s"})
    first = ["number", "state", *tuned, "value", "duration_s", "epochs_run"]
    columns = [c for c in first if c in frame] + [c for c in frame if c not in first]
    return str(frame[columns].to_csv(index=False))


def best_trial_report(study: optuna.Study) -> dict[str, Any]:
    """The most accurate complete trial: what `pipeline.handback` hands back, with its values as
    params.yaml will hold them."""
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    best = max(complete, key=lambda t: t.value or 0.0)  # the first, on a tie
    return {
        "study": study.study_name,
        "trial": best.number,
        "val_accuracy": round(float(best.value or 0.0), 6),
        "params": {name: rounded(value) for name, value in best.params.items()},
    }


def draw_plots(study: optuna.Study, folder: Path) -> list[Path]:
    """Optimisation history, parameter importances and parallel coordinates, as PNG files."""
    # Here, not at the top: a sweep worker starts without matplotlib (0.3 s of its imports).
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as optuna_plots

    folder.mkdir(parents=True, exist_ok=True)
    drawn = []
    complete = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
    plots: dict[str, Callable[..., Any]] = {
        "optimization_history.png": optuna_plots.plot_optimization_history,
        "parallel_coordinate.png": optuna_plots.plot_parallel_coordinate,
    }
    if complete >= 2:  # importances need at least two finished, different trials
        plots["param_importances.png"] = optuna_plots.plot_param_importances
    for name, plot in plots.items():
        figure = plot(study).figure
        figure.set_size_inches(10, 6)
        figure.tight_layout()
        figure.savefig(folder / name, dpi=90, metadata={"Software": None})
        plt.close(figure)
        drawn.append(folder / name)
    return drawn


def write_outputs(study: optuna.Study, params: Params) -> dict[str, Any]:
    paths = params.paths
    write_text(trials_table(study, list(params.tune.space)), paths.trials)
    plots = draw_plots(study, paths.sweep_plots)
    best = best_trial_report(study)
    write_text(yaml.safe_dump(best, sort_keys=False), paths.best_params)
    tracking.log_summary(
        {"best_val_accuracy": best["val_accuracy"], "best_trial": best["trial"]},
        tags={
            f"best.{name}": f"{value:.6g}" if isinstance(value, float) else str(value)
            for name, value in best["params"].items()
        },
    )
    tracking.log_artifacts([paths.trials, paths.best_params])
    tracking.log_artifacts(plots, "plots")
    return best
