"""One sweep trial, trained in a process of its own (the `tune` stage starts one per trial).

TensorFlow keeps about 20 MB per `fit` even after `keras.backend.clear_session()`, so a sweep that
trained every trial in one process would grow by that much per trial. Here each trial is a child
forked from a server that has TensorFlow imported already (about 0.2 s to start), and everything
it allocates goes back to the system when it exits: memory stays flat however many trials run.
The worker itself never imports TensorFlow.

The trial process trains and logs its epochs to the trial's MLflow run; it never touches the
Optuna storage. After each epoch it sends the worker its validation accuracy and waits for the
answer (prune or go on): the worker alone reports to Optuna, so a database outage is the worker's
to wait out. When the worker dies, its end of the answer pipe closes and the trial process exits
at once.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.forkserver
import os
import queue
import resource
import signal
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Literal

import optuna

from pipeline import tracking
from pipeline.config import Params, TuneParams
from pipeline.errors import PipelineError
from pipeline.splits import Split, load_split, stratified_split
from pipeline.stage_runner import configure_logging, stop_point

log = logging.getLogger(__name__)

# How long a trial process waits for the worker's answer after an epoch, beyond the time the
# worker may spend waiting out a database outage (tune.connect_seconds).
ANSWER_MARGIN_SECONDS = 60


@dataclass(frozen=True)
class TrialJob:
    """What a trial's process needs; it reads the data from disk itself."""

    params: Params  # with the trial's values (config.trial_values)
    number: int  # the Optuna trial number, for log lines
    tracking_uri: str  # the MLflow store of...
    run_id: str  # ...the trial's run, opened (and ended) by the worker
    cwd: str


@dataclass(frozen=True)
class Epoch:
    """Sent by the trial process after each completed epoch."""

    epoch: int  # 1-based
    val_accuracy: float


@dataclass(frozen=True)
class TrialOutcome:
    """Sent by the trial process once it is done."""

    state: Literal["complete", "pruned", "bad_input", "tracking_lost", "crashed"]
    value: float | None = None  # final validation accuracy, when complete
    reason: str = ""  # why pruned; the error otherwise
    fit_seconds: float = 0.0
    peak_rss_mb: float = 0.0


class TrialProcessDied(PipelineError):
    """The trial's process ended without an outcome (killed, out of memory)."""


class AskTheWorker:
    """Keras' on_epoch_end: sends the worker the validation accuracy; stops if it says prune."""

    def __init__(self, job: TrialJob, results: Connection, answers: queue.Queue[bool]) -> None:
        self.job, self.results, self.answers = job, results, answers
        self.timeout = job.params.tune.connect_seconds + ANSWER_MARGIN_SECONDS

    def __call__(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if not logs:  # a diverged epoch: fit raises TrainingDiverged right after
            return
        log.info(
            "trial %d: epoch %d of %d, val_accuracy %.4f",
            self.job.number, epoch + 1, self.job.params.train.epochs, logs["val_accuracy"],
        )  # fmt: skip
        self.results.send(Epoch(epoch + 1, float(logs["val_accuracy"])))
        try:
            prune = self.answers.get(timeout=self.timeout)
        except queue.Empty:
            raise PipelineError(
                f"trial {self.job.number}: the worker did not answer within {self.timeout} s"
            ) from None
        if prune:
            raise optuna.TrialPruned(f"pruned after epoch {epoch + 1}")


def listen_to_worker(answers: Connection, into: queue.Queue[bool], number: int) -> None:
    """Passes the worker's answers on; when the worker is gone, ends this process at once."""
    try:
        while True:
            into.put(answers.recv())
    except (EOFError, OSError):
        log.warning("trial %d: its sweep worker is gone; the trial stops", number)
        os._exit(1)


def trial_subset(train: Split, params: TuneParams) -> Split:
    """A stratified, seeded share of the training split (all of it at train_fraction 1)."""
    if params.train_fraction >= 1:
        return train
    size = round(params.train_fraction * len(train))
    _, picked = stratified_split(train.labels, size, params.seed, what="tune.train_fraction")
    return Split(train.images[picked], train.labels[picked])


def train_trial(job: TrialJob, results: Connection, answers: Connection) -> None:
    """The trial process: trains, then sends its TrialOutcome to the worker."""
    configure_logging()
    # Ctrl-C in a terminal, and a scheduler's SIGTERM (Slurm signals every process of a job),
    # reach this process too: the worker decides, hands the trial back, and kills this one.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    heard: queue.Queue[bool] = queue.Queue()
    threading.Thread(
        target=listen_to_worker, args=(answers, heard, job.number), daemon=True
    ).start()
    try:
        outcome = _train(job, results, heard)
    except PipelineError as error:  # bad data or params: one line for the user
        outcome = TrialOutcome("bad_input", reason=str(error))
    except tracking.TrackingError as error:  # the tracking server stayed away past its retries
        reason = f"MLflow at {job.tracking_uri}: {str(error).strip().splitlines()[0][:300]}"
        outcome = TrialOutcome("tracking_lost", reason=reason)
    except Exception:  # a bug: the worker fails the trial and shows this traceback
        outcome = TrialOutcome("crashed", reason=traceback.format_exc())
    try:
        results.send(outcome)
    except OSError:  # the worker died meanwhile
        log.warning("trial %d: its sweep worker is gone; the outcome is lost", job.number)
        os._exit(1)


def _train(job: TrialJob, results: Connection, answers: queue.Queue[bool]) -> TrialOutcome:
    # Imported here, in the trial's process, whose fork server has loaded them already: the
    # sweep worker imports this module only to start trials, and so runs without TensorFlow.
    import keras

    from pipeline.model import build_model
    from pipeline.training_loop import TrainingDiverged, fit, prepared_model

    os.chdir(job.cwd)
    tracking.use_tracking_uri(job.tracking_uri)
    params = job.params
    train = trial_subset(load_split(params.paths.prepared, "train"), params.tune)
    validation = load_split(params.paths.prepared, "validation")
    model = prepared_model(
        lambda: build_model(params.model, params.train.precision), params, len(train)
    )
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
                tracking.epoch_logger(job.run_id),  # first: a pruned epoch is logged
                keras.callbacks.LambdaCallback(on_epoch_end=AskTheWorker(job, results, answers)),
            ],
            verbose=0,
        )
    except TrainingDiverged as error:  # far too high a learning rate: a result, not a crash
        return outcome("pruned", reason=str(error))
    except optuna.TrialPruned as pruned:
        return outcome("pruned", reason=str(pruned))
    return outcome("complete", value=history["val_accuracy"][-1])


def trial_processes() -> Any:
    """Forks trial processes from a server with TensorFlow (and this module) imported.

    The server starts with SIGTERM ignored, and keeps it so: a scheduler's SIGTERM to every
    process of the job (Slurm's) must not take it away while the worker hands its trial back.
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["pipeline.training_loop", "pipeline.model", __name__])
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)  # inherited across exec
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        signal.signal(signal.SIGTERM, previous)
    return context


def run_in_process(
    job: TrialJob, judge: Callable[[Epoch], bool], started: Callable[[int], None]
) -> TrialOutcome:
    """Runs a trial in its own process; `judge` answers each epoch (True: prune).

    `started` gets the process id. Ctrl-C or SIGTERM here, or an error in `judge`, stops the
    trial's process too. A process that dies without an outcome raises TrialProcessDied.
    """
    context = trial_processes()
    results, results_end = context.Pipe(duplex=False)
    answers_end, answers = context.Pipe(duplex=False)
    process = context.Process(
        target=train_trial, args=(job, results_end, answers_end), name=f"trial {job.number}",
        daemon=True,
    )  # fmt: skip
    process.start()
    started(process.pid)
    # The child holds the only other ends: its death reads as EOF here, and the worker's death
    # reads as EOF there.
    results_end.close()
    answers_end.close()
    outcome: TrialOutcome | None = None
    try:
        while outcome is None:
            while not results.poll(0.2):  # a stop asked for here is taken within 0.2 s
                stop_point()
            try:
                message = results.recv()
            except EOFError:
                break
            if isinstance(message, TrialOutcome):
                outcome = message
            else:
                answers.send(judge(message))
    finally:
        process.join(timeout=30 if outcome is not None else 0)
        if process.is_alive():
            process.kill()  # it ignores SIGTERM; it has nothing to save
            process.join()
        results.close()
        answers.close()
    if outcome is None:
        raise TrialProcessDied(
            f"trial {job.number}: its process ended (exit code {process.exitcode}) before it "
            "reported a result; it may have run out of memory"
        )
    return outcome
