"""The shell shared by every stage's `main()`: logging set-up and one-line errors."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from pipeline.errors import PipelineError

log = logging.getLogger("pipeline")


def run_stage(main: Callable[[], None]) -> None:
    """Runs a stage; a PipelineError becomes one line on stderr and exit status 1.

    Any other exception keeps its traceback: it is a bug, not bad input.
    """
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True
    )
    try:
        main()
    except PipelineError as error:
        log.error("%s", error)
        sys.exit(1)
