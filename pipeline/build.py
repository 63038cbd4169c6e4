"""Stage `build`: the untrained CNN (paths.untrained_model) and its summary (paths.model_summary).

Depends on the `model` params only, so changing an optimiser setting does not rebuild it.
"""

from __future__ import annotations

import logging

from pipeline.atomic import write_text
from pipeline.config import load_params
from pipeline.model import build_model, save_model, summary_text
from pipeline.stage_runner import run_stage

log = logging.getLogger(__name__)


def main() -> None:
    params = load_params()
    model = build_model(params.model)
    summary = summary_text(model)
    print(summary, end="")
    write_text(summary, params.paths.model_summary)
    save_model(model, params.paths.untrained_model)
    log.info("wrote %s (%s parameters)", params.paths.untrained_model, f"{model.count_params():,}")


if __name__ == "__main__":
    run_stage(main)
