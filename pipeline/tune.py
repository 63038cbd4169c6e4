"""Stage `tune` (sweep/dvc.yaml): an Optuna study over learning rate, momentum and dropouts.

Each trial trains with the same `fit` as the train stage, reports validation accuracy after every
epoch and may be pruned; the test split is never read. The study lives in `tune.storage` (or
OPTUNA_STORAGE) and `tune.n_trials` is the total it should reach, so rerunning resumes it.
Every trial is an MLflow run nested under one parent run per study. Outputs: the best trial
(paths.best_params), every trial (paths.trials) and plots (paths.sweep_plots).

`python -m pipeline.handback` then writes the best values into params.yaml.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib
import optuna
import yaml

from pipeline import tracking
from pipeline.atomic import write_text
from pipeline.cli import run_stage
from pipeline.config import (
    ChoiceParams,
    Params,
    TuneParams,
    flatten,
    load_params,
    to_plain,
    trial_values,
    with_values,
)
from pipeline.dataset import split_files
from pipeline.errors import PipelineError
from pipeline.trial import TrialJob, run_in_process

matplotlib.use("Agg")
# Heartbeats and the matplotlib plots are marked experimental; the marks say nothing to a user.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

log = logging.getLogger(__name__)

STORAGE_ENV = "OPTUNA_STORAGE"
PARENT_RUN_ATTR = "mlflow_parent_run_id"
FINISHED_STATES = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


# --- the study ----------------------------------------------------------------------------------


def storage_url(params: TuneParams) -> str:
    """OPTUNA_STORAGE, when set, overrides tune.storage."""
    return os.environ.get(STORAGE_ENV, "").strip() or params.storage


def make_sampler(params: TuneParams) -> optuna.samplers.BaseSampler:
    """Seeded with tune.seed; with OPTUNA_STORAGE set (workers sharing a study), each worker
    adds its process id, or they would all draw the same first values."""
    seed = params.seed + (os.getpid() if os.environ.get(STORAGE_ENV) else 0)
    if params.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def make_pruner(params: TuneParams) -> optuna.pruners.BasePruner:
    if params.pruner == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=params.startup_trials, n_warmup_steps=params.warmup_epochs
        )
    if params.pruner == "successive_halving":  # asynchronous: rungs at 1, r, r^2... epochs
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=1, reduction_factor=params.reduction_factor
        )
    if params.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=1, max_resource=params.epochs, reduction_factor=params.reduction_factor
        )
    return optuna.pruners.NopPruner()


def end_stale_trial_run(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """A trial whose worker died (no heartbeat for tune.grace_seconds): end its MLflow run too."""
    run_id = trial.user_attrs.get("mlflow_run_id")
    if run_id:
        tracking.end_abandoned_run(run_id, status="FAILED", tags={"optuna.state": "FAIL"})


def retry_stale_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Ends the dead trial's run, then queues the same values again (up to 3 times)."""
    end_stale_trial_run(study, trial)
    optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3)(study, trial)


def make_storage(params: TuneParams) -> optuna.storages.RDBStorage:
    """The study's database, with heartbeats so that a dead worker's trial does not stay RUNNING."""
    url = storage_url(params)
    if url.startswith("sqlite"):
        # Writers queue for the file lock instead of failing at once with "database is locked".
        engine_kwargs: dict[str, Any] = {"connect_args": {"timeout": 60}}
    else:
        engine_kwargs = {"pool_pre_ping": True}  # survive a database restart between trials
    return optuna.storages.RDBStorage(
        url,
        engine_kwargs=engine_kwargs,
        heartbeat_interval=params.heartbeat_seconds,
        grace_period=params.grace_seconds,
        heartbeat_stale_trial_callback=retry_stale_trial,
    )


def open_study(params: TuneParams) -> optuna.Study:
    """Creates the study, or loads it to resume; retries an unreachable database for a while."""
    url = storage_url(params)
    deadline = time.monotonic() + params.connect_seconds
    wait = 1.0
    while True:
        try:
            return optuna.create_study(
                storage=make_storage(params),
                study_name=params.study_name,
                direction="maximize",
                sampler=make_sampler(params),
                pruner=make_pruner(params),
                load_if_exists=True,
            )
        except Exception as error:  # SQLAlchemy and driver errors vary; name the URL and cause
            cause = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300]}"
            if time.monotonic() + wait > deadline:
                raise PipelineError(
                    f"cannot open Optuna storage {_redacted(url)} ({cause}); gave up after "
                    f"tune.connect_seconds = {params.connect_seconds} s. Check that the database "
                    f"is up and reachable, or set {STORAGE_ENV}"
                ) from None
            log.warning(
                "Optuna storage %s unreachable (%s); retrying in %.0f s",
                _redacted(url),
                cause,
                wait,
            )
            time.sleep(wait)
            wait = min(wait * 2, 15)


def finished_trials(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED_STATES))


# --- one trial ----------------------------------------------------------------------------------


def suggest(trial: optuna.Trial, params: Params) -> dict[str, Any]:
    """The trial's values, by dotted params.yaml name: a choice, or a float or integer range
    (integers for keys that hold integers, such as train.augment.cutout)."""
    current = flatten(to_plain(params))
    values: dict[str, Any] = {}
    for dotted, dimension in params.tune.space.items():
        if isinstance(dimension, ChoiceParams):
            choices: list[Any] = list(dimension.choices)
            values[dotted] = trial.suggest_categorical(dotted, choices)
        elif isinstance(current[dotted], int) and not isinstance(current[dotted], bool):
            values[dotted] = trial.suggest_int(
                dotted, int(dimension.low), int(dimension.high), log=dimension.log
            )
        else:
            values[dotted] = trial.suggest_float(
                dotted, dimension.low, dimension.high, log=dimension.log
            )
    return values


class Objective:
    """One trial: its values, its MLflow run, and its training in a process of its own.

    Returns the final validation accuracy; raises TrialPruned for a pruned or diverged trial.
    """

    def __init__(self, params: Params, parent_run_id: str) -> None:
        self.params = params
        self.parent_run_id = parent_run_id

    def __call__(self, trial: optuna.Trial) -> float:
        claim_slot(trial, self.params.tune.n_trials)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        values = suggest(trial, self.params)
        params = with_values(self.params, trial_values(self.params, values))
        tags = {"optuna.study": trial.study.study_name, "optuna.trial": str(trial.number)}
        with tracking.tracked_run(
            params.mlflow.experiment,
            run_name=f"trial-{trial.number}",
            parent_run_id=self.parent_run_id,
            tags=tags,
            finished_on=(optuna.TrialPruned,),
        ) as run:
            trial.set_user_attr("mlflow_run_id", run.info.run_id)
            tracking.log_params(params)
            tracking.set_tags({"optuna.state": "RUNNING"})
            job = TrialJob(
                params=params,
                study_name=trial.study.study_name,
                storage=storage_url(params.tune),
                trial_id=trial._trial_id,
                pruner=trial.study.pruner,
                tracking_uri=tracking.tracking_uri(),
                run_id=run.info.run_id,
                cwd=os.getcwd(),
                parent_pid=os.getpid(),
            )
            try:
                outcome = run_in_process(job, f"trial {trial.number}")
            except BaseException:
                tracking.set_tags({"optuna.state": "FAIL"})
                raise
            trial.set_user_attr("fit_seconds", outcome.fit_seconds)
            trial.set_user_attr("peak_rss_mb", outcome.peak_rss_mb)
            if outcome.state == "pruned":
                trial.set_user_attr("pruned_reason", outcome.reason)
                tags = {"optuna.state": "PRUNED", "optuna.pruned_reason": outcome.reason}
                tracking.set_tags(tags)
                raise optuna.TrialPruned(outcome.reason)
            if outcome.state != "complete" or outcome.value is None:
                tracking.set_tags({"optuna.state": "FAIL"})
                if outcome.state == "bad_input":
                    raise PipelineError(outcome.reason)
                raise RuntimeError(f"trial {trial.number} failed in its process:\n{outcome.reason}")
            tracking.set_tags({"optuna.state": "COMPLETE"})
            tracking.log_summary({"objective_val_accuracy": outcome.value})
        return outcome.value  # logged by StopWhenFull once Optuna has stored it


# --- outputs ------------------------------------------------------------------------------------


def trials_table(study: optuna.Study, tuned: list[str]) -> str:
    """Every trial as CSV: number, state, params, value, duration (s), epochs run, reason."""
    frame = study.trials_dataframe(
        attrs=("number", "state", "params", "value", "duration", "user_attrs")
    )
    if frame.empty:
        return ""
    frame["duration"] = frame["duration"].dt.total_seconds().round(2)
    frame = frame.rename(columns=lambda c: c.removeprefix("params_").removeprefix("user_attrs_"))
    frame = frame.rename(columns={"duration": "duration_s", "epochs": "epochs_run"})
    first = ["number", "state", *tuned, "value", "duration_s", "epochs_run"]
    columns = [c for c in first if c in frame] + [c for c in frame if c not in first]
    return str(frame[columns].to_csv(index=False))


def best_trial_report(study: optuna.Study) -> dict[str, Any]:
    best = study.best_trial
    return {
        "study": study.study_name,
        "trial": best.number,
        "val_accuracy": round(float(best.value), 6) if best.value is not None else None,
        "params": dict(best.params),
    }


def draw_plots(study: optuna.Study, folder: Path) -> list[Path]:
    """Optimisation history, parameter importances and parallel coordinates, as PNG files."""
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as optuna_plots

    folder.mkdir(parents=True, exist_ok=True)
    drawn = []
    complete = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
    plots: dict[str, Callable[[optuna.Study], Any]] = {
        "optimization_history.png": optuna_plots.plot_optimization_history,
        "parallel_coordinate.png": optuna_plots.plot_parallel_coordinate,
    }
    if complete >= 2:  # importances need at least two finished, different trials
        plots["param_importances.png"] = optuna_plots.plot_param_importances
    for name, plot in plots.items():
        axes = plot(study)
        figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
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
    tracking.log_summary({"best_val_accuracy": best["val_accuracy"], "best_trial": best["trial"]})
    tracking.set_tags(
        {
            f"best.{name}": f"{value:.6g}" if isinstance(value, float) else str(value)
            for name, value in best["params"].items()
        }
    )
    tracking.log_artifacts([paths.trials, paths.best_params])
    tracking.log_artifacts(plots, "plots")
    return best


# --- the stage ----------------------------------------------------------------------------------


class SurplusTrial(Exception):
    """Other workers already finished the study's tune.n_trials; this trial is not run."""


def claim_slot(trial: optuna.Trial, n_trials: int, poll_seconds: float = 1.0) -> None:
    """Lets a trial train only while the study has fewer than n_trials trials taken.

    Taken: finished trials, running trials with a lower number (numbers are unique across
    workers, so of two trials started at once exactly one counts the other), and waiting ones
    (enqueued or retried trials go before freshly sampled ones). This makes any number of workers
    stop at exactly n_trials finished trials. While the slots are held by running trials, one of
    which may yet die and be retried, it waits; once the study is full it raises SurplusTrial.
    """
    state = optuna.trial.TrialState
    study = trial.study
    while True:
        everything = study.get_trials(deepcopy=False)
        (me,) = [t for t in everything if t.number == trial.number]
        queued = "fixed_params" in me.system_attrs or "failed_trial" in me.system_attrs
        trials = [t for t in everything if t.number != trial.number]
        finished = sum(1 for t in trials if t.state in FINISHED_STATES)
        running = sum(1 for t in trials if t.state == state.RUNNING and t.number < trial.number)
        waiting = sum(
            1
            for t in trials
            if t.state == state.WAITING and (not queued or t.number < trial.number)
        )
        if finished + running + waiting < n_trials:
            return
        if finished >= n_trials:
            reason = f"surplus: the study already has its {n_trials} trials"
            trial.set_user_attr("fail_reason", reason)
            raise SurplusTrial(reason)
        time.sleep(poll_seconds)
        optuna.storages.fail_stale_trials(study)  # a dead worker's trial frees its slot


class StopWhenFull:
    """After each stored trial: log it, and stop this worker once the study has n_trials."""

    def __init__(self, n_trials: int) -> None:
        self.n_trials = n_trials

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        reason = trial.user_attrs.get("pruned_reason") or trial.user_attrs.get("fail_reason") or ""
        log.info("trial %d %s: value %s %s", trial.number, trial.state.name, trial.value, reason)
        if finished_trials(study) >= self.n_trials:
            study.stop()


def shared_parent_run(study: optuna.Study, params: Params, wait_seconds: float = 120) -> str:
    """The study's MLflow parent run id, created by whichever worker gets there first.

    The right to create it is claimed by creating a marker study (study names are unique in
    the storage, so exactly one worker succeeds); the others wait for the id to appear.
    """
    existing = study.user_attrs.get(PARENT_RUN_ATTR)
    if existing:
        return str(existing)
    claim = f"{study.study_name}.mlflow-parent-claim"
    try:
        optuna.create_study(storage=study._storage, study_name=claim)
    except optuna.exceptions.DuplicatedStudyError:
        deadline = time.monotonic() + wait_seconds
        while time.monotonic() < deadline:
            time.sleep(0.5)
            existing = study.user_attrs.get(PARENT_RUN_ATTR)
            if existing:
                return str(existing)
        raise PipelineError(
            f"another worker claimed the MLflow parent run of study {study.study_name!r} but did "
            f"not record it within {wait_seconds:.0f} s; delete the study {claim!r} and rerun"
        ) from None
    run_id = tracking.create_run(
        params.mlflow.experiment,
        run_name=f"sweep-{study.study_name}",
        tags={
            "optuna.study": study.study_name,
            "optuna.storage": _redacted(storage_url(params.tune)),
        },
        params=params,
    )
    study.set_user_attr(PARENT_RUN_ATTR, run_id)
    return run_id


def sweep(params: Params) -> dict[str, Any]:
    """Runs the trials the study still lacks, then writes the outputs; returns the best trial.

    Any number of workers may run this against one storage: together they run exactly
    tune.n_trials finished (complete or pruned) trials.
    """
    tracking.wait_for_store(params.tune.connect_seconds)
    study = open_study(params.tune)
    n_trials = params.tune.n_trials
    parent_run_id = shared_parent_run(study, params)
    with tracking.tracked_run(params.mlflow.experiment, run_id=parent_run_id) as parent:
        done = finished_trials(study)
        if done < n_trials:
            log.info(
                "study %r has %d of %d trials; running trials", study.study_name, done, n_trials
            )
            for split in ("train", "validation"):  # before any trial: one clear error
                split_files(params.paths.prepared, split)
            study.optimize(
                Objective(params, parent.info.run_id),
                timeout=params.tune.timeout,
                callbacks=[StopWhenFull(n_trials)],
                catch=(SurplusTrial,),
                gc_after_trial=True,
            )
        else:
            log.info("study %r already has %d trials; nothing to run", study.study_name, done)
        if not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            raise PipelineError(
                f"study {study.study_name!r} has no complete trial yet; "
                "widen tune.space or raise tune.n_trials"
            )
        return write_outputs(study, params)


def _redacted(url: str) -> str:
    """A storage URL without its password, for tags and logs."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    credentials, host = rest.rsplit("@", 1)
    return f"{scheme}://{credentials.split(':', 1)[0]}:***@{host}"


def main() -> None:
    best = sweep(load_params())
    log.info(
        "best: trial %d, val_accuracy %.4f, %s", best["trial"], best["val_accuracy"], best["params"]
    )


if __name__ == "__main__":
    run_stage(main)
