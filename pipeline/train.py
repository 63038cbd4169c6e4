"""Stage `train`: paths.untrained_model + train/validation splits -> paths.model, history, metrics.

Opens the pipeline execution's MLflow run (evaluate continues it; the run id is in
paths.run_info). After every epoch the model, optimiser state and history go to paths.checkpoint,
so an interrupted `dvc repro` resumes from the last completed epoch instead of starting over.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import keras

from pipeline import tracking
from pipeline.atomic import replacing, write_json, write_text
from pipeline.config import PARAMS_FILE, Params, load_params
from pipeline.dataset import load_split
from pipeline.fit import (
    HISTORY_KEYS,
    BestWeights,
    History,
    compile_model,
    distribution_strategy,
    fit,
    seed_everything,
    steps_per_epoch,
)
from pipeline.model import load_model, portable, save_model, with_precision
from pipeline.stage import run_stage

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
BEST_WEIGHTS_FILE = "best.weights.h5"


# --- resuming -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointState:
    epoch: int  # epochs completed
    model_file: str  # inside the checkpoint folder
    run_id: str  # the MLflow run to continue
    fingerprint: str  # of what the run trains; a different one means start over
    history: History


def run_fingerprint(params: Params) -> str:
    """What a checkpoint must match to be resumed: model and train params, start weights, data."""
    digest = hashlib.sha256()
    digest.update(json.dumps([params.section("model"), params.section("train")]).encode())
    digest.update(hashlib.md5(params.paths.untrained_model.read_bytes()).hexdigest().encode())
    for split in ("train", "validation"):
        for file in sorted((params.paths.prepared / split).glob("*.npy")):
            digest.update(f"{file.name}:{file.stat().st_size}:{file.stat().st_mtime_ns}".encode())
    return digest.hexdigest()


def load_checkpoint(directory: Path, fingerprint: str) -> CheckpointState | None:
    """The last completed epoch, if its fingerprint matches; otherwise None."""
    try:
        state = CheckpointState(**json.loads((directory / STATE_FILE).read_text()))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError) as error:
        log.warning("ignoring unreadable checkpoint %s: %s", directory, error)
        return None
    if state.fingerprint != fingerprint:
        log.info("checkpoint in %s is for other params or data; starting over", directory)
        tracking.end_abandoned_run(state.run_id)
        return None
    if not (directory / state.model_file).is_file():
        log.warning("checkpoint %s lacks %s; starting over", directory, state.model_file)
        return None
    return state


class EpochCheckpoint(keras.callbacks.Callback):
    """After each completed epoch: the model (with optimiser state), then the state file.

    The state file is replaced last, so it always names a whole model file. Keras'
    BackupAndRestore would not do: it sets the epoch to resume from only once `fit` has begun
    (the shuffle order is seeded from that epoch before), and its weights and epoch file are not
    replaced together with the MLflow run id, history and fingerprint a resume needs with them.
    """

    def __init__(
        self, directory: Path, fingerprint: str, run_id: str, history: History, best: BestWeights
    ) -> None:
        super().__init__()
        self.directory, self.fingerprint, self.run_id = directory, fingerprint, run_id
        self.history = {key: list(values) for key, values in history.items()}
        self.best = best

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if not logs:  # a diverged epoch (see fit.EpochRecorder) is not worth keeping
            return
        for key in HISTORY_KEYS:
            self.history.setdefault(key, []).append(float(logs[key]))
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.best.improved:  # the best epoch's weights survive an interruption too
            with replacing(self.directory / BEST_WEIGHTS_FILE) as tmp:
                self.model.save_weights(tmp)
        model_file = f"epoch-{epoch + 1:04d}.keras"
        save_model(self.model, self.directory / model_file)
        state = CheckpointState(epoch + 1, model_file, self.run_id, self.fingerprint, self.history)
        write_json(asdict(state), self.directory / STATE_FILE)
        for old in self.directory.glob("epoch-*.keras"):
            if old.name != model_file:
                old.unlink()


def resume_best(model: keras.Model, directory: Path, state: CheckpointState | None) -> BestWeights:
    """The best epoch so far: nothing for a new run, the checkpointed weights for a resumed one."""
    if state is None or not (directory / BEST_WEIGHTS_FILE).is_file():
        return BestWeights()
    current = model.get_weights()
    model.load_weights(directory / BEST_WEIGHTS_FILE)
    best = BestWeights(max(state.history["val_accuracy"]), model.get_weights())
    model.set_weights(current)
    return best


def run_identity() -> dict[str, Any]:
    """A new run's name and tags: the DVC experiment's name (DVC sets DVC_EXP_NAME in
    `dvc exp run`) and its baseline commit, or the time it started. MLflow's own random names
    repeat here, drawn after the stage has seeded Python's `random`."""
    experiment = os.environ.get("DVC_EXP_NAME")
    if not experiment:
        return {"run_name": f"train-{time.strftime('%Y%m%d-%H%M%S')}"}
    tags = {"dvc.experiment": experiment}
    if os.environ.get("DVC_EXP_BASELINE_REV"):
        tags["dvc.baseline_rev"] = os.environ["DVC_EXP_BASELINE_REV"]
    return {"run_name": experiment, "tags": tags}


# --- outputs ------------------------------------------------------------------------------------


def history_csv(history: History) -> str:
    """One row per epoch: epoch, loss, accuracy, val_loss, val_accuracy, learning_rate."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["epoch", *HISTORY_KEYS])
    for index in range(len(history["loss"])):
        writer.writerow([index + 1, *(f"{history[key][index]:.6g}" for key in HISTORY_KEYS)])
    return out.getvalue()


def summarize(history: History) -> dict[str, float | int]:
    """Final-epoch figures and the best epoch by validation accuracy (whose weights the model
    keeps when train.restore_best is on)."""
    best = max(range(len(history["val_accuracy"])), key=lambda i: history["val_accuracy"][i])
    summary: dict[str, float | int] = {"epochs": len(history["loss"])}
    summary.update({f"final_{key}": round(history[key][-1], 6) for key in HISTORY_KEYS})
    summary["best_epoch"] = best + 1
    summary.update({f"best_{key}": round(history[key][best], 6) for key in HISTORY_KEYS[:4]})
    return summary


# --- the stage ----------------------------------------------------------------------------------


def main() -> None:
    params = load_params()
    paths = params.paths
    train = load_split(paths.prepared, "train")
    validation = load_split(paths.prepared, "validation")
    fingerprint = run_fingerprint(params)
    state = load_checkpoint(paths.checkpoint, fingerprint)
    seed_everything(params.train)
    with distribution_strategy(params.train).scope():
        if state is None:
            shutil.rmtree(paths.checkpoint, ignore_errors=True)
            untrained = load_model(paths.untrained_model)
            model = with_precision(untrained, params.model, params.train.precision)
            compile_model(model, params.train, steps_per_epoch(len(train), params.train))
        else:
            log.info("resuming from epoch %d of %d", state.epoch, params.train.epochs)
            model = load_model(paths.checkpoint / state.model_file)  # compiled, with optimiser
    best = resume_best(model, paths.checkpoint, state)

    identity = {"run_id": state.run_id} if state else run_identity()  # a resumed run keeps its name
    with tracking.tracked_run(params.mlflow.experiment, system_metrics=True, **identity) as run:
        run_id = run.info.run_id
        if state is None:
            tracking.log_params(params)
            tracking.log_provenance(params)
            tracking.log_dataset(train, "train", paths.prepared / "train", "training")
            tracking.log_dataset(
                validation, "validation", paths.prepared / "validation", "validation"
            )
        else:
            tracking.backfill_history(run_id, state.history)
        history = fit(
            model,
            train,
            validation,
            params.train,
            initial_epoch=state.epoch if state else 0,
            history=state.history if state else None,
            callbacks=[
                EpochCheckpoint(
                    paths.checkpoint, fingerprint, run_id, state.history if state else {}, best
                ),
                tracking.epoch_logger(),
            ],
            best=best,
        )
        summary = summarize(history)
        summary["model_epoch"] = (
            summary["best_epoch"] if params.train.restore_best else summary["epochs"]
        )
        save_model(portable(model, params.model), paths.model)
        write_text(history_csv(history), paths.history)
        write_json({**summary, "mlflow_run_id": run_id}, paths.train_metrics)  # for dvc exp show
        tracking.log_summary(
            {key: value for key, value in summary.items() if key.startswith(("best_", "model_"))}
        )
        tracking.log_artifacts(
            [paths.history, paths.train_metrics, paths.model_summary, PARAMS_FILE]
        )
        write_json({"run_id": run_id, "experiment": params.mlflow.experiment}, paths.run_info)
    shutil.rmtree(paths.checkpoint, ignore_errors=True)
    log.info(
        "trained %d epochs: val_accuracy %.4f (best %.4f at epoch %d); %s keeps epoch %d",
        summary["epochs"],
        summary["final_val_accuracy"],
        summary["best_val_accuracy"],
        summary["best_epoch"],
        paths.model,
        summary["model_epoch"],
    )


if __name__ == "__main__":
    run_stage(main)
