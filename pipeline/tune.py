"""Stage `tune` (sweep/dvc.yaml): a sweep worker, running trials of one Optuna study.

Who talks to what: this worker alone talks to the Optuna storage (opened in study.py, which
also holds retries and the clean-up) and reports each epoch to it; it opens each trial's MLflow
run, nested under the study's one parent run, and trains the trial in a process of its own
(trial_process.py), which logs epochs to that run and never touches the storage. When the study
has tune.n_trials finished trials, sweep_report.py writes the outputs from the study.

Each trial trains with the same training loop as the train stage and may be pruned; the test
split is never read. The study lives in `tune.storage` (or OPTUNA_STORAGE) and `tune.n_trials`
is the total it should reach, so rerunning resumes it; any number of workers may share it.
`python -m pipeline.handback` then writes the best values into params.yaml.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import warnings
from collections.abc import Callable
from typing import Any

import optuna

from pipeline import sweep_report, tracking
from pipeline.config import (
    ChoiceParams,
    Params,
    is_integer,
    load_params,
    redacted,
    trial_values,
    with_values,
)
from pipeline.errors import PipelineError, error_line
from pipeline.splits import split_files
from pipeline.stage_runner import run_stage, stop_point
from pipeline.study import (
    Retry,
    Storage,
    finished_trials,
    is_full,
    open_study,
    settle,
    shared_parent_run,
)
from pipeline.trial_process import Epoch, TrialJob, TrialProcessDied, run_in_process

# Heartbeats and the plots are marked experimental; the marks say nothing to a user.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

log = logging.getLogger(__name__)

# --- one trial ----------------------------------------------------------------------------------


def suggest(trial: optuna.Trial, params: Params) -> dict[str, Any]:
    """The trial's values, by dotted params.yaml name: a choice, or a float or integer range
    (integers for keys that hold integers, such as train.augment.cutout)."""
    current = params.flat()
    values: dict[str, Any] = {}
    for dotted, dimension in params.tune.space.items():
        if isinstance(dimension, ChoiceParams):
            choices: list[Any] = list(dimension.choices)
            values[dotted] = trial.suggest_categorical(dotted, choices)
        elif is_integer(current[dotted]):
            values[dotted] = trial.suggest_int(
                dotted, int(dimension.low), int(dimension.high), log=dimension.log
            )
        else:
            values[dotted] = trial.suggest_float(
                dotted, dimension.low, dimension.high, log=dimension.log
            )
    return values


class TrialFailed(PipelineError):
    """A trial that could not finish through no fault of its values; it is retried."""


class TrackingUnavailable(PipelineError):
    """The MLflow tracking store refused or dropped this worker's writes past their retries."""


# A trial process's failure: lost tracking fails the trial, which is retried while the worker
# goes on; bad params or data stop the worker with their message; a bug, with its traceback.
FAILURES: dict[str, type[Exception]] = {
    "tracking_lost": TrialFailed, "bad_input": PipelineError, "crashed": RuntimeError,
}  # fmt: skip


class Objective:
    """One trial: its values, its MLflow run, and its training in a process of its own.

    Returns the final validation accuracy; raises TrialPruned for a pruned or diverged trial,
    TrialFailed for one whose process died or whose MLflow writes gave up.
    """

    def __init__(self, params: Params) -> None:
        self.params = params
        self.number: int | None = None  # the trial in hand
        self.unstored_run_id: str | None = None  # its run, until Optuna has stored its result

    def __call__(self, trial: optuna.Trial) -> float:
        self.number, self.unstored_run_id = trial.number, None
        try:
            return self.run(trial)
        except tracking.TrackingError as error:
            raise TrackingUnavailable(
                f"MLflow tracking store {tracking.tracking_uri()} failed past its retries "
                f"(about tune.connect_seconds = {self.params.tune.connect_seconds} s): "
                f"{error_line(error)}; this worker stops"
            ) from None

    def run(self, trial: optuna.Trial) -> float:
        stop_point()  # a signal came as Optuna started this trial: hand it back at once
        previous_run = trial.user_attrs.get("mlflow_run_id")  # a retry inherits its attributes
        if previous_run:
            tracking.end_abandoned_run(previous_run, "FAILED", f"retried as trial {trial.number}")
            for inherited in ("process", "fail_reason", "pruned_reason"):
                if inherited in trial.user_attrs:
                    trial.set_user_attr(inherited, None)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        values = suggest(trial, self.params)
        params = with_values(self.params, trial_values(self.params, values))
        tags = {
            "optuna.study": trial.study.study_name,
            "optuna.trial": str(trial.number),
            "optuna.state": "RUNNING",
        }
        with tracking.tracked_run(
            params.mlflow.experiment,
            run_name=f"trial-{trial.number}",
            nested=True,  # under the study's parent run, which sweep() holds open
            tags=tags,
            finished_on=(optuna.TrialPruned,),
        ) as run:
            trial.set_user_attr("mlflow_run_id", run.info.run_id)
            self.unstored_run_id = run.info.run_id
            tracking.log_params(params)
            job = TrialJob(
                params, trial.number, tracking.tracking_uri(), run.info.run_id, os.getcwd()
            )
            try:
                outcome = run_in_process(
                    job, judge=lambda epoch: self.judge(trial, epoch),
                    started=lambda pid: trial.set_user_attr("process", pid),
                )  # fmt: skip
            except TrialProcessDied as died:
                self.fail(trial, str(died))
                raise TrialFailed(str(died)) from None
            except BaseException:
                tracking.set_tags({"optuna.state": "FAIL"})
                raise
            fit = {"seconds": outcome.fit_seconds, "peak_rss_mb": outcome.peak_rss_mb}
            trial.set_user_attr("fit", fit)  # one storage write: each costs every trial ~8 ms
            if outcome.state == "pruned":
                trial.set_user_attr("pruned_reason", outcome.reason)
                tags = {"optuna.state": "PRUNED", "optuna.pruned_reason": outcome.reason}
                tracking.set_tags(tags)
                raise optuna.TrialPruned(outcome.reason)
            if outcome.state != "complete" or outcome.value is None:
                self.fail(trial, outcome.reason.strip().splitlines()[-1])
                raise FAILURES[outcome.state](f"trial {trial.number}: {outcome.reason}")
            tracking.log_summary(
                {"objective_val_accuracy": outcome.value}, tags={"optuna.state": "COMPLETE"}
            )
        return outcome.value

    def judge(self, trial: optuna.Trial, epoch: Epoch) -> bool:
        """Reports an epoch to Optuna (retried through a database restart); True: prune."""
        trial.report(epoch.val_accuracy, step=epoch.epoch)
        return bool(trial.should_prune())

    def fail(self, trial: optuna.Trial, reason: str) -> None:
        log.warning("trial %d failed: %s", trial.number, reason)
        trial.set_user_attr("fail_reason", reason[:500])
        tracking.set_tags({"optuna.state": "FAIL"})

    def stored(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """An optimize callback: Optuna has stored the trial's result."""
        self.unstored_run_id = None

    def abandon(self, reason: str) -> None:
        """The trial's result could not be stored: its run must not read as a finished trial."""
        if self.unstored_run_id:
            tracking.end_abandoned_run(self.unstored_run_id, "FAILED", reason)
            self.unstored_run_id = None


class OneLineErrors(logging.Filter):
    """Optuna logs every failed trial with its traceback; a PipelineError (a dead trial process,
    a tracking server gone) or an interrupt says all there is in its message."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], (PipelineError, KeyboardInterrupt)):
            record.exc_info = None
        return True


def log_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    reason = trial.user_attrs.get("pruned_reason") or trial.user_attrs.get("fail_reason") or ""
    log.info("trial %d %s: values %s %s", trial.number, trial.state.name, trial.values, reason)


# --- the stage ----------------------------------------------------------------------------------


def run_trials(study: optuna.Study, storage: Storage, params: Params) -> None:
    """Runs trials until the study has tune.n_trials finished ones (or tune.timeout passes).

    Workers never wait on each other: each runs trials while the study is short, so the last
    ones to finish may add up to `workers - 1` trials beyond n_trials. A database outage is
    waited out for up to tune.connect_seconds, then the worker stops naming it. Ctrl-C or
    SIGTERM fails the trial in hand and queues it for the other workers.
    """
    tune = params.tune
    objective = Objective(params)
    deadline = None if tune.timeout is None else time.monotonic() + tune.timeout

    def after_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        stop_point()  # a signal that came as this trial ended: start no other one
        if is_full(study, tune.n_trials):
            study.stop()

    callbacks: list[Callable[[optuna.Study, optuna.trial.FrozenTrial], None]] = [
        objective.stored,
        log_trial,
        Retry(tune.n_trials),  # a failed trial's values go back in the queue
        after_trial,
    ]
    while True:
        remaining = None if deadline is None else deadline - time.monotonic()
        try:
            if is_full(study, tune.n_trials) or (remaining is not None and remaining <= 0):
                return
            study.optimize(
                objective, timeout=remaining, callbacks=callbacks, catch=(TrialFailed,),
                gc_after_trial=True,
            )  # fmt: skip
        except optuna.exceptions.StorageInternalError as error:
            objective.abandon(f"its result could not be stored: {error_line(error)}")
            log.warning("Optuna storage %s: %s", redacted(storage.url), error_line(error))
            try:  # loading the study reads the storage, retried for up to tune.connect_seconds
                optuna.load_study(study_name=study.study_name, storage=storage)
            except optuna.exceptions.StorageInternalError as lasting:
                raise PipelineError(
                    f"Optuna storage {redacted(storage.url)} unusable for tune.connect_seconds = "
                    f"{tune.connect_seconds} s ({error_line(lasting)}); this worker stops"
                ) from None
        except (KeyboardInterrupt, TrackingUnavailable):
            requeue(study, objective.number, tune.n_trials)
            raise


def requeue(study: optuna.Study, number: int | None, n_trials: int) -> None:
    """The trial this worker held when it had to stop: Optuna failed it; queue it again for
    whichever worker is free next."""
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,)):
        if trial.number == number:
            Retry(n_trials)(study, trial)
            log.info("trial %d failed as this worker stopped; queued again", number)


def sweep(params: Params) -> dict[str, Any]:
    """Runs trials until the study has tune.n_trials finished ones, then writes the outputs;
    returns the best trial. Any number of workers may run this against one storage.

    Raises PipelineError when the study ends short of tune.n_trials (tune.timeout passed), after
    writing the outputs of what it has.
    """
    tune = params.tune
    tracking.prepare_sweep_client(tune.connect_seconds)
    tracking.wait_for_store(tune.connect_seconds)
    tracking.check_access()  # before the study: a refused worker stores nothing
    study, storage = open_study(tune)
    parent_run_id = shared_parent_run(study, storage, params)
    with tracking.tracked_run(params.mlflow.experiment, run_id=parent_run_id):
        full = is_full(study, tune.n_trials)
        log.info(
            "study %r has %d of %d trials; %s", study.study_name, finished_trials(study),
            tune.n_trials, "nothing to run" if full else "running trials",
        )  # fmt: skip
        if not full:
            for split in ("train", "validation"):  # before any trial: one clear error
                split_files(params.paths.prepared, split)
            run_trials(study, storage, params)
        settle(study, params)
        if not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            raise PipelineError(
                f"study {study.study_name!r} has no complete trial yet; "
                "widen tune.space or raise tune.n_trials"
            )
        best = sweep_report.write_outputs(study, params)
    if not is_full(study, tune.n_trials):
        raise PipelineError(
            f"study {study.study_name!r} ended short: {finished_trials(study)} of tune.n_trials = "
            f"{tune.n_trials} "
            f"finished trials (tune.timeout = {tune.timeout} s passed); rerun to go on"
        )
    return best


def main() -> None:
    for handler in logging.getLogger("optuna").handlers:
        handler.addFilter(OneLineErrors())
    best = sweep(load_params())
    log.info(
        "best: trial %d, val_accuracy %.4f, %s", best["trial"], best["val_accuracy"], best["params"]
    )


if __name__ == "__main__":
    run_stage(main)
