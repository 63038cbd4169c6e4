"""The train stage's checkpoint: after every epoch the model with its optimiser state, the best
epoch's weights and a state file go to paths.checkpoint, so an interrupted `dvc repro` resumes
from the last completed epoch, in the same MLflow run, instead of starting over.

Keras' BackupAndRestore was weighed and not used: its weights and epoch file are not replaced
together (nor with the MLflow run id, history and fingerprint a resume needs), and it sets the
epoch to resume from only once `fit` has begun, after the shuffle order is seeded.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import keras

from pipeline import tracking
from pipeline.atomic import replacing, write_json
from pipeline.config import Params
from pipeline.model import save_model
from pipeline.training_loop import HISTORY_KEYS, BestWeights, History

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
    """After each completed epoch: the model (with optimiser state), then the state file,
    replaced last so that it always names a whole model file."""

    def __init__(
        self, directory: Path, fingerprint: str, run_id: str, history: History, best: BestWeights
    ) -> None:
        super().__init__()
        self.directory, self.fingerprint, self.run_id = directory, fingerprint, run_id
        self.history = {key: list(values) for key, values in history.items()}
        self.best = best

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if not logs:  # a diverged epoch (see training_loop.EpochRecorder) is not worth keeping
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
