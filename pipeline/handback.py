"""`python -m pipeline.handback`: the sweep's best values (paths.best_params) into params.yaml.

Only the tuned keys change, rounded to three significant figures (a sweep's 0.06791612352895975
is 0.0679 to anyone reading params.yaml, and no trial measures the difference); comments and
layout stay. The next `dvc repro` then trains and
evaluates exactly that configuration, and `dvc params diff` shows what moved.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import PARAMS_FILE, load_params, update_params_file
from pipeline.errors import PipelineError
from pipeline.stage import run_stage

log = logging.getLogger(__name__)


def rounded(value: Any) -> Any:
    """A float to three significant figures; anything else as it is."""
    return float(f"{value:.3g}") if isinstance(value, float) else value


def apply_best(params_file: Path, best_file: Path) -> dict[str, Any]:
    """Sets the tuned keys of `params_file` to the values in `best_file`, rounded; returns them.

    update_params_file refuses a key params.yaml lacks or a value out of range, naming it."""
    try:
        best = yaml.safe_load(best_file.read_text())
    except FileNotFoundError:
        raise PipelineError(f"{best_file}: missing; run the sweep first (`make tune`)") from None
    found = best.get("params") if isinstance(best, dict) else None
    if not isinstance(found, dict):
        raise PipelineError(f"{best_file}: expected a 'params' mapping of dotted names to values")
    values = {str(name): value for name, value in found.items()}
    numbers = [v for v in values.values() if isinstance(v, float)]
    if not values or not all(math.isfinite(number) for number in numbers):
        raise PipelineError(f"{best_file}: no usable values under 'params'")
    values = {name: rounded(value) for name, value in values.items()}
    update_params_file(params_file, values)
    return values


def main() -> None:
    params = load_params()
    for name, value in apply_best(PARAMS_FILE, params.paths.best_params).items():
        log.info("params.yaml: %s = %s", name, value)


if __name__ == "__main__":
    run_stage(main)
