"""The shared Optuna study of the `tune` stage: its storage, sampler and pruner, retries of
failed trials, the study's one MLflow parent run, and the clean-up when a worker is done.

Called by the sweep worker (tune.py) only: it talks to the Optuna storage, and to MLflow (through
tracking.py) to find or create the parent run and to end the runs of trials that died. Everything
here uses Optuna's public API, so any number of workers, on any machines, can share one study
(README: Scaling out); the one decision that API has no call for, which worker creates the
parent run, is made under a lock the database holds (study_lock).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import time
from collections.abc import Iterator
from typing import Any

import filelock
import optuna
import sqlalchemy
import tenacity

from pipeline import tracking
from pipeline.backoff import retrying
from pipeline.config import (
    STORAGE_ENV,
    Params,
    TuneParams,
    in_space,
    is_integer,
    redacted,
    storage_url,
)
from pipeline.errors import PipelineError, error_line
from pipeline.stage_runner import pause

log = logging.getLogger(__name__)

PARENT_RUN_ATTR = "mlflow_parent_run_id"
MAX_RETRIES = 3  # times a failed trial's values are queued again
FINISHED_STATES = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
# The storage calls that are safe to repeat: reads, heartbeats, reported values, attributes.
IDEMPOTENT_CALLS = (
    "get_study_id_from_name", "get_trial", "get_all_trials", "record_heartbeat",
    "set_trial_intermediate_value", "set_trial_user_attr",
)  # fmt: skip


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


def finished_trials(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED_STATES))


def is_full(study: optuna.Study, n_trials: int) -> bool:
    """Whether the study has its tune.n_trials finished (complete or pruned) trials: the one
    test of it, for starting, retrying and settling trials."""
    return finished_trials(study) >= n_trials


class Retry:
    """Queues a failed trial's values again (Optuna's own retry, up to MAX_RETRIES times), unless
    the study already has its n_trials finished trials. The dead attempt's MLflow run is ended
    FAILED, if nothing ended it."""

    def __init__(self, n_trials: int) -> None:
        self.n_trials = n_trials
        self.retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES)

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.state != optuna.trial.TrialState.FAIL:
            return
        reason = trial.user_attrs.get("fail_reason") or "its worker stopped sending heartbeats"
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id:
            tracking.end_abandoned_run(run_id, "FAILED", reason)
        if not is_full(study, self.n_trials):
            self.retry(study, trial)


class Storage(optuna.storages.RDBStorage):
    """Optuna's RDBStorage, whose idempotent calls wait out a database restart.

    Reads, heartbeats, reported values and attributes are retried for up to `retry_seconds`
    (Optuna's heartbeat thread would otherwise end at the first refused connection, and its
    live trial be failed as stale). Creating a trial or changing its state is not retried, as
    the first attempt may have been stored: such a failure leaves the trial to be failed as
    stale and retried whole.
    """

    def __init__(self, url: str, retry_seconds: float, **kwargs: Any) -> None:
        # Optuna's own schema check holds a connection while it takes a second one: behind a
        # connection pooler whose pool is full, each starting worker then waits on the others
        # (31 of 32 workers starting at once through PgBouncer's 20 connections failed). The same
        # check here takes one connection at a time.
        super().__init__(url, skip_compatibility_check=True, **kwargs)
        self.url = url
        schema, head = self.get_current_version(), self.get_head_version()
        if schema != head:
            raise PipelineError(
                f"Optuna storage {redacted(url)} has schema {schema}, older or newer than "
                f"Optuna {optuna.__version__}'s ({head}); upgrade it with "
                "`optuna storage upgrade --storage <url>`"
            )
        if url.startswith("sqlite"):
            # SQLite ignores SELECT ... FOR UPDATE, so two workers could both take one WAITING
            # trial (a starting point, a retry). A transaction that takes the file's write lock
            # when it begins makes the read-then-claim atomic (SQLAlchemy's pysqlite recipe).
            sqlalchemy.event.listen(
                self.engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE")
            )
        retried = retrying(
            f"Optuna storage {redacted(url)}",
            retry=tenacity.retry_if_exception_type(optuna.exceptions.StorageInternalError),
            stop=tenacity.stop_after_delay(retry_seconds),
            first_wait=0.5,
            max_wait=10,
        )
        for name in IDEMPOTENT_CALLS:  # each call gets its own attempts and clock
            setattr(self, name, retried.wraps(getattr(self, name)))


def make_storage(params: TuneParams) -> Storage:
    """The study's database, with heartbeats so that a dead worker's trial does not stay RUNNING."""
    url = storage_url(params)
    if url.startswith("sqlite"):
        # Writers queue for the file lock instead of failing at once with "database is locked";
        # the driver's own transactions are off, so Storage can begin them IMMEDIATE.
        engine_kwargs: dict[str, Any] = {"connect_args": {"timeout": 60, "isolation_level": None}}
    else:
        # pool_pre_ping: a restarted database means reconnect, not fail. No server-side prepared
        # statements, so the study also works behind PgBouncer's transaction pooling (which
        # cannot carry them before 1.21): what bounds connections past a few dozen workers.
        engine_kwargs = {"pool_pre_ping": True, "connect_args": {"prepare_threshold": None}}
    return Storage(
        url,
        retry_seconds=params.connect_seconds,
        engine_kwargs=engine_kwargs,
        heartbeat_interval=params.heartbeat_seconds,
        grace_period=params.grace_seconds,
        heartbeat_stale_trial_callback=Retry(params.n_trials),
    )


def open_study(params: TuneParams) -> tuple[optuna.Study, Storage]:
    """Creates the study, or loads it to resume; waits for an unreachable database a while.

    A refused password or a schema of another Optuna version is not worth waiting for: each
    fails at once."""
    url = storage_url(params)
    waiting = retrying(
        f"Optuna storage {redacted(url)} unreachable",
        retry=tenacity.retry_if_exception(
            lambda error: (
                not isinstance(error, PipelineError) and "authentication failed" not in str(error)
            )
        ),
        stop=tenacity.stop_after_delay(params.connect_seconds),
    )

    def attempt() -> tuple[optuna.Study, Storage]:
        storage = make_storage(params)
        study = optuna.create_study(
            storage=storage,
            study_name=params.study_name,
            direction="maximize",
            sampler=make_sampler(params),
            pruner=make_pruner(params),
            load_if_exists=True,
        )
        return study, storage

    try:
        return waiting(attempt)
    except PipelineError:
        raise
    except Exception as error:  # SQLAlchemy and driver errors vary; name the URL and cause
        raise PipelineError(
            f"cannot open Optuna storage {redacted(url)} ({error_line(error)}); gave up after "
            f"tune.connect_seconds = {params.connect_seconds} s. Check that the database "
            f"is up and reachable and its credentials are right, or set {STORAGE_ENV}"
        ) from None


def shared_parent_run(study: optuna.Study, storage: Storage, params: Params) -> str:
    """The study's MLflow parent run id, created once.

    The study's user attribute `mlflow_parent_run_id` names it. The first worker to find none
    (or one whose run was deleted) creates the run and records it while it holds the study's
    lock, so workers starting at once agree on one parent; it also queues a new study's starting
    points. Every later worker reads the attribute, and takes the lock only if it finds none.
    """
    tune = params.tune

    def recorded() -> str | None:
        run_id = study.user_attrs.get(PARENT_RUN_ATTR)
        alive = run_id and tracking.find_runs(
            params.mlflow.experiment, f"attributes.run_id = '{run_id}'"
        )
        return str(run_id) if alive else None

    if found := recorded():
        return found
    # The holder may retry MLflow for up to connect_seconds; one silent past that and a grace
    # period more is stuck (one that died has released the lock already).
    with study_lock(storage, study.study_name, tune.connect_seconds + tune.grace_seconds):
        if found := recorded():  # another worker created it while this one waited
            return found
        run_id = tracking.create_run(
            params.mlflow.experiment,
            run_name=f"sweep-{study.study_name}",
            tags={"optuna.study": study.study_name, "optuna.storage": redacted(storage_url(tune))},
            params=params,
        )
        if not study.get_trials(deepcopy=False):
            queue_starting_points(study, params)
        study.set_user_attr(PARENT_RUN_ATTR, run_id)
        return run_id


@contextlib.contextmanager
def study_lock(storage: Storage, study_name: str, seconds: float) -> Iterator[None]:
    """Held by one worker at a time, for up to `seconds` of waiting: the study's one atomic
    decision (its parent run), which Optuna's API has no call for. On PostgreSQL it is an
    advisory lock of one transaction, polled for, so that waiting workers hold no connection
    (through a pooler, they would starve the holder); on SQLite, whose workers share one
    machine, a lock on a file beside the database. The database or the system releases the lock
    of a worker that dies."""
    if storage.engine.dialect.name == "sqlite":
        try:
            with filelock.FileLock(f"{storage.engine.url.database}.lock", timeout=seconds):
                yield
            return
        except filelock.Timeout:
            pass
    else:
        deadline = time.monotonic() + seconds
        take = sqlalchemy.text("SELECT pg_try_advisory_xact_lock(hashtext(:key))")
        while time.monotonic() < deadline:
            with storage.engine.connect() as connection, connection.begin():
                if connection.execute(take, {"key": f"optuna study {study_name}"}).scalar():
                    yield
                    return
            pause(random.uniform(0.05, 0.25))
    raise PipelineError(
        f"study {study_name!r}: another worker held its lock for over {seconds} s "
        "(tune.connect_seconds + tune.grace_seconds) while choosing the parent run"
    )


def queue_starting_points(study: optuna.Study, params: Params) -> None:
    """A new study's first trials: params.yaml's own values of the tuned keys (so the sweep
    measures what you have and hands back nothing it did not beat), then tune.enqueue. A value
    outside tune.space cannot be a trial's (the sampler could not model it): that key is drawn,
    and the trial's user attribute `drawn_instead` names it with params.yaml's value."""
    current = params.flat()
    own, outside = {}, {}
    for key, dimension in params.tune.space.items():
        if in_space(current[key], dimension, integer=is_integer(current[key])):
            own[key] = current[key]
        else:
            outside[key] = current[key]
    if outside:
        log.warning(
            "params.yaml's %s outside tune.space: the first trial draws %s instead",
            ", ".join(f"{key} = {value!r}" for key, value in outside.items()),
            "it" if len(outside) == 1 else "them",
        )
    points = [("params.yaml", own), *(
        (f"tune.enqueue[{index}]", point) for index, point in enumerate(params.tune.enqueue)
    )]  # fmt: skip
    for source, point in points:
        attrs: dict[str, Any] = {"starting_point": source}
        if source == "params.yaml" and outside:
            attrs["drawn_instead"] = outside
        study.enqueue_trial(dict(point), user_attrs=attrs, skip_if_exists=True)
    log.info("queued %d starting points: params.yaml's values and tune.enqueue", len(points))


def settle(study: optuna.Study, params: Params) -> None:
    """Once this worker starts no more trials: ends what a dead worker left behind.

    Waits (at most grace_seconds and two heartbeats) while trials are RUNNING, failing those
    whose heartbeat stopped; a live worker's trial simply finishes meanwhile, or is left to it.
    A retry still WAITING in a full study is not needed: it is failed with that reason.
    """
    tune = params.tune
    deadline = time.monotonic() + tune.grace_seconds + 2 * tune.heartbeat_seconds
    running = (optuna.trial.TrialState.RUNNING,)
    while study.get_trials(deepcopy=False, states=running) and time.monotonic() < deadline:
        optuna.storages.fail_stale_trials(study)
        pause(min(tune.heartbeat_seconds, 5))
    for failed in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,)):
        run_id = failed.user_attrs.get("mlflow_run_id")
        if run_id:  # left RUNNING when the tracking server was away as its trial failed
            tracking.end_abandoned_run(
                run_id, "FAILED", failed.user_attrs.get("fail_reason") or "failed"
            )
    if not is_full(study, tune.n_trials):
        return
    reason = f"not needed: the study already has its {tune.n_trials} trials"
    while waiting := study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)):
        if (
            optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(waiting[0])
            is None
        ):
            return  # queued by hand, and a rerun with a higher n_trials runs it: not ours to drop
        trial = study.ask()  # the oldest WAITING trial (or, if another worker took it, any)
        trial.set_user_attr("fail_reason", reason)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
