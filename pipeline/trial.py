"""One sweep trial, trained in a process of its own (the `tune` stage starts one per trial).

TensorFlow keeps about 20 MB per `fit` even after `keras.backend.clear_session()`, so a sweep that
trained every trial in one process would grow by that much per trial. Here each trial is a child
forked from a server that has TensorFlow imported already (about 0.2 s to start), and everything
it allocates goes back to the system when it exits: memory stays flat however many trials run.

The child reports each epoch's validation accuracy to the Optuna storage itself (so the pruner
sees it at once), logs to the trial's MLflow run, and sends the parent a `TrialOutcome`.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import resource
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Literal

import keras
import optuna

from pipeline import tracking
from pipeline.cli import configure_logging
from pipeline.config import Params, TuneParams
from pipeline.dataset import Split, load_split, stratified_split
from pipeline.errors import PipelineError
from pipeline.model import build_model
from pipeline.training import (
    TrainingDiverged,
    compile_model,
    distribution_strategy,
    fit,
    seed_everything,
    steps_per_epoch,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrialJob:
    """What a trial's process needs; it reads the data from disk itself."""

    params: Params  # with the trial's values (config.trial_values)
    study_name: str
    storage: str  # the Optuna storage URL
    trial_id: int
    pruner: optuna.pruners.BasePruner
    tracking_uri: str  # the MLflow store of...
    run_id: str  # ...the trial's run, opened (and ended) by the parent
    cwd: str
    parent_pid: int


@dataclass(frozen=True)
class TrialOutcome:
    state: Literal["complete", "pruned", "bad_input", "crashed"]
    value: float | None = None  # final validation accuracy, when complete
    reason: str = ""  # why pruned; the error, when bad_input or crashed
    fit_seconds: float = 0.0
    peak_rss_mb: float = 0.0


class ReportToTrial(keras.callbacks.Callback):
    """Reports validation accuracy after each epoch; raises TrialPruned when Optuna says so."""

    def __init__(self, trial: optuna.Trial) -> None:
        super().__init__()
        self.trial = trial

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if not logs:  # a diverged epoch: fit raises TrainingDiverged right after
            return
        self.trial.set_user_attr("epochs", epoch + 1)
        self.trial.report(float(logs["val_accuracy"]), step=epoch + 1)
        log.info(
            "trial %d: epoch %d of %d, val_accuracy %.4f",
            self.trial.number, epoch + 1, self.params["epochs"], logs["val_accuracy"],
        )  # fmt: skip
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned after epoch {epoch + 1}")


class StopIfOrphaned(keras.callbacks.Callback):
    """Ends the process when the sweep that started it is gone, rather than train for nobody.

    The dead sweep's trial is failed and retried by the next worker (its heartbeat stops).
    """

    def __init__(self, parent_pid: int) -> None:
        super().__init__()
        self.parent_pid = parent_pid

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        try:
            os.kill(self.parent_pid, 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            log.warning("the sweep process %d is gone; this trial stops", self.parent_pid)
            os._exit(1)


def trial_subset(train: Split, params: TuneParams) -> Split:
    """A stratified, seeded share of the training split (all of it at train_fraction 1)."""
    if params.train_fraction >= 1:
        return train
    size = round(params.train_fraction * len(train))
    _, picked = stratified_split(train.labels, size, params.seed, what="tune.train_fraction")
    return Split(train.images[picked], train.labels[picked])


def train_trial(job: TrialJob, connection: Connection) -> None:
    """The trial process: trains, then sends its TrialOutcome to the parent."""
    configure_logging()
    try:
        outcome = _train(job)
    except PipelineError as error:  # bad data or params: one line for the user
        outcome = TrialOutcome("bad_input", reason=str(error))
    except Exception:  # a bug: the parent fails the trial and shows this traceback
        outcome = TrialOutcome("crashed", reason=traceback.format_exc())
    connection.send(outcome)
    connection.close()


def _train(job: TrialJob) -> TrialOutcome:
    os.chdir(job.cwd)
    tracking.use_tracking_uri(job.tracking_uri)
    study = optuna.load_study(
        study_name=job.study_name,
        storage=job.storage,
        sampler=optuna.samplers.RandomSampler(),  # samples nothing here; the parent did
        pruner=job.pruner,
    )
    trial = optuna.trial.Trial(study, job.trial_id)
    trial.set_user_attr("process", os.getpid())  # each trial's own, never the sweep's
    params = job.params
    train = trial_subset(load_split(params.paths.prepared, "train"), params.tune)
    validation = load_split(params.paths.prepared, "validation")
    seed_everything(params.train)
    with distribution_strategy(params.train).scope():
        model = build_model(params.model, params.train.precision)
        compile_model(model, params.train, steps_per_epoch(len(train), params.train))
    started = time.perf_counter()

    def outcome(state: Any, value: float | None = None, reason: str = "") -> TrialOutcome:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        seconds = round(time.perf_counter() - started, 3)
        return TrialOutcome(state, value, reason, seconds, round(peak, 1))

    try:
        history = fit(
            model,
            train,
            validation,
            params.train,
            callbacks=[
                tracking.EpochLogger(job.run_id),
                ReportToTrial(trial),  # after the logger: a pruned epoch is still logged
                StopIfOrphaned(job.parent_pid),
            ],
            verbose=0,
        )
    except TrainingDiverged as error:  # far too high a learning rate: a result, not a crash
        return outcome("pruned", reason=str(error))
    except optuna.TrialPruned as pruned:
        return outcome("pruned", reason=str(pruned))
    return outcome("complete", value=history["val_accuracy"][-1])


def trial_processes() -> Any:
    """Forks trial processes from a server with TensorFlow (and this module) imported."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


def run_in_process(job: TrialJob, name: str) -> TrialOutcome:
    """Runs a trial in its own process and waits for its outcome.

    Ctrl-C or SIGTERM here stops the trial's process too. A process that dies without answering
    (killed, out of memory) raises PipelineError.
    """
    context = trial_processes()
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=train_trial, args=(job, sender), name=name, daemon=True)
    process.start()
    sender.close()  # the child holds the only sending end: its death reads as EOF here
    outcome: TrialOutcome | None = None
    try:
        outcome = receiver.recv()
    except EOFError:
        pass
    finally:
        if outcome is None and process.is_alive():
            process.terminate()
        process.join()
        receiver.close()
    if outcome is None:
        raise PipelineError(
            f"{name}: its process ended (exit code {process.exitcode}) before it reported a "
            "result; it may have run out of memory"
        )
    return outcome
