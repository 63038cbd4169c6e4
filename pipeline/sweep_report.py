"""What a sweep leaves behind, from the study alone: every trial as CSV (paths.trials), the best
trial (paths.best_params, which `pipeline.handback` reads), Optuna's plots (paths.sweep_plots),
and on the MLflow parent run the best values, those files and a description that ranks every
trial with a link to its run."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib
import optuna
import yaml

from pipeline import tracking
from pipeline.atomic import write_text
from pipeline.config import Params
from pipeline.params_edit import rounded

matplotlib.use("Agg")


def accuracy(trial: optuna.trial.FrozenTrial) -> float | None:
    """The trial's validation accuracy: its value, or its first of several."""
    return trial.values[0] if trial.values else None


def pareto_front(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """A multi-objective study's best trade-offs, most accurate first; [] for one objective."""
    if len(study.directions) < 2:
        return []
    return sorted(study.best_trials, key=lambda t: (-(accuracy(t) or 0.0), t.number))


def trials_table(study: optuna.Study, tuned: list[str]) -> str:
    """Every trial as CSV: number, state, params, value (validation accuracy), duration (s),
    epochs run, reason; `pareto` marks a multi-objective study's front."""
    frame = study.trials_dataframe(
        attrs=("number", "state", "params", "value", "duration", "user_attrs")
    )
    if frame.empty:
        return ""
    frame["duration"] = frame["duration"].dt.total_seconds().round(2)
    frame = frame.rename(columns=lambda c: c.removeprefix("params_").removeprefix("user_attrs_"))
    frame = frame.rename(columns={"duration": "duration_s", "epochs": "epochs_run"})
    if "values_0" in frame:  # the second objective is the fit_seconds column already
        frame = frame.rename(columns={"values_0": "value"}).drop(columns="values_1")
        front = {t.number for t in pareto_front(study)}
        frame.insert(0, "pareto", frame["number"].isin(front))
    first = ["number", "state", *tuned, "value", "duration_s", "epochs_run"]
    columns = [c for c in first if c in frame] + [c for c in frame if c not in first]
    return str(frame[columns].to_csv(index=False))


def best_trial_report(study: optuna.Study) -> dict[str, Any]:
    """The most accurate complete trial (what `pipeline.handback` hands back, with its values as
    params.yaml will hold them), and for a multi-objective study its Pareto front."""
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    best = max(complete, key=lambda t: accuracy(t) or 0.0)  # the first, on a tie
    report: dict[str, Any] = {
        "study": study.study_name,
        "trial": best.number,
        "val_accuracy": round(float(accuracy(best) or 0.0), 6),
        "params": {name: rounded(value) for name, value in best.params.items()},
    }
    if len(study.directions) > 1:
        report["pareto_front"] = [
            {"trial": t.number, "val_accuracy": round(t.values[0], 6),
             "fit_seconds": round(t.values[1], 2),
             "params": {name: rounded(value) for name, value in t.params.items()}}
            for t in pareto_front(study)
        ]  # fmt: skip
    return report


def draw_plots(study: optuna.Study, folder: Path) -> list[Path]:
    """Optimisation history, parameter importances and parallel coordinates (of validation
    accuracy), and a multi-objective study's Pareto front, as PNG files."""
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as optuna_plots

    folder.mkdir(parents=True, exist_ok=True)
    drawn = []
    complete = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
    by_accuracy: dict[str, Any] = {}
    plots: dict[str, Callable[..., Any]] = {
        "optimization_history.png": optuna_plots.plot_optimization_history,
        "parallel_coordinate.png": optuna_plots.plot_parallel_coordinate,
    }
    if complete >= 2:  # importances need at least two finished, different trials
        plots["param_importances.png"] = optuna_plots.plot_param_importances
    if len(study.directions) > 1:
        by_accuracy = {"target": accuracy, "target_name": "val_accuracy"}
        plots["pareto_front.png"] = optuna_plots.plot_pareto_front
    for name, plot in plots.items():
        if name == "pareto_front.png":
            axes = plot(study, target_names=["val_accuracy", "fit_seconds"])
        else:
            axes = plot(study, **by_accuracy)
        figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
        figure.set_size_inches(10, 6)
        figure.tight_layout()
        figure.savefig(folder / name, dpi=90, metadata={"Software": None})
        plt.close(figure)
        drawn.append(folder / name)
    return drawn


def sweep_description(study: optuna.Study, tuned: list[str]) -> str:
    """The parent run's description: every trial, the complete ones best first (a pruned
    trial's value is an early epoch's, so it never outranks them), each linked to its MLflow run."""
    complete = optuna.trial.TrialState.COMPLETE
    trials = sorted(
        study.get_trials(deepcopy=False),
        key=lambda t: (t.state != complete, accuracy(t) is None, -(accuracy(t) or 0.0), t.number),
    )
    lines = [f"Optuna study `{study.study_name}`: {len(trials)} trials, best first.", ""]
    baseline = [t for t in trials if t.user_attrs.get("drawn_instead")]
    if baseline:  # the first trial is params.yaml's values, but for those outside tune.space
        first = min(baseline, key=lambda t: t.number)
        outside = ", ".join(f"{k} = {v!r}" for k, v in first.user_attrs["drawn_instead"].items())
        lines += [f"Trial {first.number} trains params.yaml's values, but for {outside}: "
                  "outside tune.space, so drawn instead.", ""]  # fmt: skip
    lines += [
        "| trial | state | val_accuracy | " + " | ".join(tuned) + " |",
        "|---" * (3 + len(tuned)) + "|",
    ]
    for trial in trials:
        run_id = trial.user_attrs.get("mlflow_run_id")
        number = f"[{trial.number}]({tracking.run_link(run_id)})" if run_id else str(trial.number)
        value = "" if accuracy(trial) is None else f"{accuracy(trial):.4f}"
        values = (f"{trial.params[k]:.3g}" if isinstance(trial.params.get(k), float)
                  else str(trial.params.get(k, "")) for k in tuned)  # fmt: skip
        lines.append(f"| {number} | {trial.state.name} | {value} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def write_outputs(study: optuna.Study, params: Params) -> dict[str, Any]:
    paths = params.paths
    write_text(trials_table(study, list(params.tune.space)), paths.trials)
    plots = draw_plots(study, paths.sweep_plots)
    best = best_trial_report(study)
    write_text(yaml.safe_dump(best, sort_keys=False), paths.best_params)
    tracking.log_summary({"best_val_accuracy": best["val_accuracy"], "best_trial": best["trial"]})
    tracking.set_tags(
        {
            f"best.{name}": f"{value:.6g}" if isinstance(value, float) else str(value)
            for name, value in best["params"].items()
        }
    )
    tracking.set_description(sweep_description(study, list(params.tune.space)))
    tracking.log_artifacts([paths.trials, paths.best_params])
    tracking.log_artifacts(plots, "plots")
    return best
