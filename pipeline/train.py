"""Stage `train`: paths.untrained_model + train/validation splits -> paths.model, history, metrics.

Opens the pipeline execution's MLflow run (evaluate continues it; the run id is in
paths.run_info). After every epoch checkpoint.py saves what an interrupted `dvc repro` needs to
resume from the last completed epoch instead of starting over.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import shutil
import time
from typing import Any

from pipeline import provenance, tracking
from pipeline.atomic import write_json, write_text
from pipeline.checkpoint import EpochCheckpoint, load_checkpoint, resume_best, run_fingerprint
from pipeline.config import PARAMS_FILE, load_params
from pipeline.model import load_model, portable, save_model
from pipeline.splits import load_split
from pipeline.stage_runner import run_stage
from pipeline.training_loop import HISTORY_KEYS, History, fit, prepared_model

log = logging.getLogger(__name__)


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
    if state is None:
        shutil.rmtree(paths.checkpoint, ignore_errors=True)
    else:
        log.info("resuming from epoch %d of %d", state.epoch, params.train.epochs)
    saved = paths.untrained_model if state is None else paths.checkpoint / state.model_file
    model = prepared_model(lambda: load_model(saved), params, len(train))
    best = resume_best(model, paths.checkpoint, state)

    identity = {"run_id": state.run_id} if state else run_identity()  # a resumed run keeps its name
    with tracking.tracked_run(params.mlflow.experiment, system_metrics=True, **identity) as run:
        run_id = run.info.run_id
        if state is None:
            tracking.log_params(params)
            provenance.log_provenance(params)
            provenance.log_dataset(train, "train", paths.prepared / "train", "training")
            provenance.log_dataset(
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
