"""`python -m pipeline.handback [--trial N]`: a sweep's values into params.yaml.

Without --trial, the most accurate trial's (paths.best_params); with it, trial N's of the study
(tune.study_name in tune.storage or OPTUNA_STORAGE), any trial on a Pareto front among them.

Only the tuned keys change, rounded to three significant figures (params_edit.rounded); comments
and layout stay. The next `dvc repro` then trains and evaluates exactly that configuration, and
`dvc params diff` shows what moved.
"""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import PARAMS_FILE, TuneParams, load_params, redacted, storage_url
from pipeline.errors import PipelineError
from pipeline.params_edit import rounded, update_params_file
from pipeline.stage_runner import run_stage

log = logging.getLogger(__name__)


def apply_best(params_file: Path, best_file: Path) -> dict[str, Any]:
    """Sets the tuned keys of `params_file` to the values in `best_file`, rounded; returns them."""
    try:
        best = yaml.safe_load(best_file.read_text())
    except FileNotFoundError:
        raise PipelineError(f"{best_file}: missing; run the sweep first (`make tune`)") from None
    found = best.get("params") if isinstance(best, dict) else None
    if not isinstance(found, dict):
        raise PipelineError(f"{best_file}: expected a 'params' mapping of dotted names to values")
    return apply_values(params_file, found, str(best_file))


def stored_trial_values(tune: TuneParams, number: int) -> dict[str, Any]:
    """Trial `number`'s values, read from the study; a trial that did not finish is refused."""
    import optuna

    url = storage_url(tune)
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        raise PipelineError(f"{url.removeprefix('sqlite:///')}: no study; run a sweep first")
    try:
        study = optuna.load_study(study_name=tune.study_name, storage=url)
    except KeyError:
        raise PipelineError(f"no study {tune.study_name!r} in {redacted(url)}") from None
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    if number not in trials:
        raise PipelineError(
            f"study {tune.study_name!r} has no trial {number} (its trials: 0 to {len(trials) - 1})"
        )
    trial = trials[number]
    if trial.state not in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED):
        raise PipelineError(f"trial {number} of {tune.study_name!r} is {trial.state.name}")
    return dict(trial.params)


def apply_values(params_file: Path, found: dict[str, Any], source: str) -> dict[str, Any]:
    """Writes the values, rounded; update_params_file refuses a key params.yaml lacks or a
    value out of range, naming it."""
    values = {str(name): value for name, value in found.items()}
    numbers = [v for v in values.values() if isinstance(v, float)]
    if not values or not all(math.isfinite(number) for number in numbers):
        raise PipelineError(f"{source}: no usable values")
    values = {name: rounded(value) for name, value in values.items()}
    update_params_file(params_file, values)  # says what moved
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trial", type=int, help="a trial number (default: the most accurate)")
    number = parser.parse_args().trial
    params = load_params()
    if number is None:
        values = apply_best(PARAMS_FILE, params.paths.best_params)
    else:
        source = f"trial {number} of study {params.tune.study_name!r}"
        values = apply_values(PARAMS_FILE, stored_trial_values(params.tune, number), source)
    log.info("params.yaml holds the %d tuned values; `dvc repro` trains with them", len(values))


if __name__ == "__main__":
    run_stage(main)
