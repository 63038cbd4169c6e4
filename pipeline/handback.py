"""`python -m pipeline.handback`: the sweep's best values (paths.best_params) into params.yaml.

Only the tuned keys change, rounded to three significant figures (params_edit.rounded); comments
and layout stay. The next `dvc repro` then trains and evaluates exactly that configuration, and
`dvc params diff` shows what moved.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import PARAMS_FILE, load_params
from pipeline.errors import PipelineError
from pipeline.params_edit import rounded, update_params_file
from pipeline.stage_runner import run_stage

log = logging.getLogger(__name__)


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
        raise PipelineError(f"{best_file}: no usable values")
    values = {name: rounded(value) for name, value in values.items()}
    update_params_file(params_file, values)  # says what moved
    return values


def main() -> None:
    values = apply_best(PARAMS_FILE, load_params().paths.best_params)
    log.info("params.yaml holds the %d tuned values; `dvc repro` trains with them", len(values))


if __name__ == "__main__":
    run_stage(main)
