"""MLflow runs: the store, a run's life, params, per-epoch metrics, tags, and the sweep's runs.

With provenance.py (git and DVC hashes) and registry.py (the model and its alias), the only
modules that import mlflow.

Store: MLFLOW_TRACKING_URI when set; otherwise MLflow's own default layout in the project root
(`mlflow.db`, artifacts in `mlruns/`), so `mlflow ui` started there shows the runs. The project
root is DVC's repository root (a queued experiment runs in a temporary copy, and its runs go to
the repository's store, not the copy's), or the working directory outside DVC.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import requests
import tenacity
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run, RunTag
from mlflow.exceptions import MlflowException

from pipeline.backoff import retrying
from pipeline.config import Params
from pipeline.errors import PipelineError, error_line

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)

EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}  # as MLflow's UI reads it
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
# What a tracking call raises when the store refuses or drops it past MLflow's own retries.
TrackingError = MlflowException


def project_root() -> Path:
    """The directory whose MLflow store runs belong to: DVC_ROOT, which DVC sets for every
    stage (to the parent repository in a queued experiment), or the working directory."""
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def use_store() -> Path | None:
    """Points MLflow at the store; returns the project root when it is the default store."""
    if os.environ.get(TRACKING_URI_ENV):
        return None
    root = project_root()
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    return root


def use_tracking_uri(uri: str) -> None:
    """Points this process at the store another process used (a sweep's trial processes)."""
    mlflow.set_tracking_uri(uri)


def tracking_uri() -> str:
    return str(mlflow.get_tracking_uri())


def use_experiment(name: str) -> str:
    """Points MLflow at the store and the experiment; returns the experiment id.

    With the default store, a new experiment keeps its artifacts in `<project>/mlruns`
    (MLflow would otherwise use `./mlruns` of whatever directory created it). The experiment
    is tagged as model training, so MLflow's UI opens it in that view rather than the GenAI one.
    """
    root = use_store()
    if root is not None and mlflow.get_experiment_by_name(name) is None:
        with contextlib.suppress(MlflowException):  # another process created it meanwhile
            mlflow.create_experiment(
                name, artifact_location=(root / "mlruns").as_uri(), tags=EXPERIMENT_KIND
            )
    experiment = mlflow.set_experiment(name)
    if not EXPERIMENT_KIND.items() <= experiment.tags.items():
        try:
            for key, value in EXPERIMENT_KIND.items():
                mlflow.set_experiment_tag(key, value)
        except MlflowException as error:  # a user allowed to log runs but not to edit it
            log.warning("could not tag MLflow experiment %r: %s", name, error_line(error))
    return str(experiment.experiment_id)


@contextlib.contextmanager
def tracked_run(
    experiment: str,
    run_id: str | None = None,
    run_name: str | None = None,
    *,
    nested: bool = False,
    tags: Mapping[str, str] | None = None,
    finished_on: tuple[type[BaseException], ...] = (),
    system_metrics: bool = False,
) -> Iterator[Run]:
    """Starts (or, given `run_id`, resumes) a run and always ends it; with `system_metrics`,
    MLflow samples the machine's CPU, memory and disk use into it while it is open.

    FINISHED on success or on an exception in `finished_on` (a pruned trial is not a failure),
    KILLED on Ctrl-C or SIGTERM (a KeyboardInterrupt from stage_runner.stop_point), FAILED on
    any other exception. No run is left RUNNING. A `nested` run goes under the active run, in
    its experiment (no request to the server to find either).
    """
    parent = mlflow.active_run() if nested else None
    experiment_id = parent.info.experiment_id if parent else use_experiment(experiment)
    with mlflow.start_run(
        run_id=run_id,
        experiment_id=experiment_id,
        run_name=run_name,
        nested=nested,
        tags=dict(tags) if tags else None,
        log_system_metrics=system_metrics,
    ) as run:  # which ends it FINISHED, unless an exception below ended it first
        log.info(
            "MLflow run %s (%s) in experiment %r at %s",
            run.info.run_id,
            "resumed" if run_id else "new",
            experiment,
            mlflow.get_tracking_uri(),
        )
        try:
            yield run
        except finished_on:
            _end_run("FINISHED", run.info.run_id)
            raise
        except KeyboardInterrupt:
            _end_run("KILLED", run.info.run_id)
            raise
        except BaseException:
            _end_run("FAILED", run.info.run_id)
            raise


def _end_run(status: str, run_id: str) -> None:
    """Ends the active run while an error is on its way out. A store that cannot be reached
    is logged instead of raised, so the first error is the one reported; the run is ended
    later (train resumes it; a sweep's next worker ends it FAILED)."""
    try:
        mlflow.end_run(status)
    except MlflowException as error:
        # mlflow.end_run has already dropped the run from this process's active runs.
        log.warning(
            "could not end MLflow run %s as %s: %s",
            run_id, status, str(error).strip().splitlines()[0][:300],
        )  # fmt: skip


def create_run(experiment: str, run_name: str, tags: Mapping[str, str], params: Params) -> str:
    """Creates a run without making it active (a sweep's parent); returns its id."""
    experiment_id = use_experiment(experiment)
    client = MlflowClient()
    run = client.create_run(experiment_id, run_name=run_name, tags=dict(tags))
    client.log_batch(
        run.info.run_id, params=[Param(k, str(v)) for k, v in flat_params(params).items()]
    )
    client.set_terminated(run.info.run_id, "FINISHED")  # workers resume it while they run
    return str(run.info.run_id)


def prepare_sweep_client(seconds: float) -> None:
    """A sweep worker's MLflow client: it retries a tracking server for about `seconds`, and
    prints no link as each trial's run ends (MLflow reads the whole run back to print it).

    Its retries back off as 0, 1, 2, 4, ... seconds (backoff factor 1), so n retries wait about
    2 ** (n - 1) - 1 seconds in all. Variables the user set are kept."""
    retries = max(1, math.ceil(math.log2(seconds + 1)) + 1)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(min(retries, 10)))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


def check_access() -> None:
    """For an MLflow server: one authenticated request, so refused credentials fail at once,
    in one line naming the server and the HTTP status."""
    uri = os.environ.get(TRACKING_URI_ENV, "")
    if not uri.startswith(("http://", "https://")):
        return
    try:
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except MlflowException as error:
        status = error.get_http_status_code()
        if status in (401, 403):
            who = os.environ.get("MLFLOW_TRACKING_USERNAME")
            raise PipelineError(
                f"MLflow tracking server {uri} refused "
                f"{f'user {who!r}' if who else 'a request without credentials'} "
                f"(HTTP {status}); set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
            ) from None
        raise


def wait_for_store(seconds: float) -> None:
    """For an MLflow server: retries its /health for up to `seconds`, then fails naming the URL."""
    uri = os.environ.get(TRACKING_URI_ENV, "")
    if not uri.startswith(("http://", "https://")):
        return

    def healthy() -> None:
        requests.get(f"{uri.rstrip('/')}/health", timeout=10).raise_for_status()

    try:
        retrying(
            f"MLflow server {uri} unreachable",
            retry=tenacity.retry_if_exception_type(requests.RequestException),
            stop=tenacity.stop_after_delay(seconds),
        )(healthy)
    except requests.RequestException as error:
        raise PipelineError(
            f"MLflow tracking server {uri} unreachable ({error_line(error)}); gave up after "
            f"{seconds:.0f} s. Check that it is running, or unset {TRACKING_URI_ENV} to use "
            "the local store"
        ) from None


def get_run(run_id: str) -> Run:
    """A run of the store, or one line naming what is wrong: no such run, or no store."""
    use_store()
    wait_for_store(10)
    try:
        return MlflowClient().get_run(run_id)
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise PipelineError(f"MLflow run {run_id!r}: not found in {tracking_uri()}") from None
        raise PipelineError(
            f"MLflow run {run_id!r}: cannot read it from {tracking_uri()}: {error_line(error)}"
        ) from None


def set_tags(tags: Mapping[str, str]) -> None:
    """Tags the active run, as a batch: two sweep workers may tag the shared parent run at once,
    and MLflow's batch write retries the insert that loses the race, where `set_tag` fails."""
    mlflow.set_tags(dict(tags))


def flat_params(params: Params) -> dict[str, Any]:
    """The whole resolved params tree, with dotted keys: train.learning_rate, model.conv_dropout."""
    return {key: "null" if v is None else v for key, v in params.flat().items()}


def log_params(params: Params) -> None:
    mlflow.log_params(flat_params(params))


def log_epoch(epoch: int, logs: Mapping[str, float], run_id: str | None = None) -> None:
    """One epoch's metrics, at step = epoch number (1-based), to `run_id` or the active run.
    Nothing when `logs` is empty, as after a diverged epoch (see training_loop.EpochRecorder)."""
    metrics = {key: float(value) for key, value in logs.items()}
    if not metrics:
        return
    if run_id is None:
        mlflow.log_metrics(metrics, step=epoch)
        return
    now = int(time.time() * 1000)
    MlflowClient().log_batch(
        run_id, metrics=[Metric(key, value, now, epoch) for key, value in metrics.items()]
    )


def epoch_logger(run_id: str | None = None) -> keras.callbacks.Callback:
    """A Keras callback that logs each completed epoch to `run_id` (a run another process
    opened) or to the active run."""
    import keras  # here, not at the top: a sweep worker imports this module and never trains

    return keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: log_epoch(epoch + 1, logs or {}, run_id)
    )


def log_summary(metrics: Mapping[str, float], tags: Mapping[str, str] | None = None) -> None:
    """Figures that belong to the active run rather than to an epoch (best epoch, test scores),
    with any `tags`, in one request."""
    run = mlflow.active_run()
    assert run is not None, "log_summary needs an active run"
    now = int(time.time() * 1000)
    MlflowClient().log_batch(
        run.info.run_id,
        metrics=[Metric(key, float(value), now, 0) for key, value in metrics.items()],
        tags=[RunTag(key, value) for key, value in (tags or {}).items()],
    )


def end_abandoned_run(run_id: str, status: str = "KILLED", reason: str | None = None) -> None:
    """Ends a run that its own process can no longer end (it died, or its result never reached
    Optuna), unless it already ended FAILED or KILLED. With a `reason`, the run is a failed
    sweep trial's: tagged optuna.state FAIL and optuna.fail_reason."""
    use_store()
    client = MlflowClient()
    try:
        run = client.get_run(run_id)
    except MlflowException as error:
        log.warning("MLflow run %s, to end as %s: %s", run_id, status, error_line(error))
        return
    if run.info.status in ("FAILED", "KILLED"):
        return
    if reason is not None:  # a batch, as several workers may end one dead trial's run at once
        tags = [RunTag("optuna.state", "FAIL"), RunTag("optuna.fail_reason", reason[:500])]
        client.log_batch(run_id, tags=tags)
    client.set_terminated(run_id, status)
    log.info("ended MLflow run %s as %s%s", run_id, status, f": {reason}" if reason else "")


def find_runs(experiment: str, filter_string: str) -> list[str]:
    """Ids of the active runs of `experiment` that match `filter_string`."""
    client = MlflowClient()
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], filter_string) if found else []
    return [r.info.run_id for r in runs]


def backfill_history(run_id: str, history: Mapping[str, list[float]]) -> None:
    """Logs the epochs of `history` that the run lacks (a run killed between checkpoint and log)."""
    client = MlflowClient()
    logged = {m.step for m in client.get_metric_history(run_id, "val_accuracy")}
    epochs = len(next(iter(history.values()), []))
    for epoch in range(1, epochs + 1):
        if epoch not in logged:
            log_epoch(epoch, {key: values[epoch - 1] for key, values in history.items()})


def log_artifacts(paths: list[Path], artifact_path: str | None = None) -> None:
    for path in paths:
        if path.is_file():
            mlflow.log_artifact(str(path), artifact_path=artifact_path)
