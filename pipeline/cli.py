"""The shell shared by every stage's `main()`: logging, SIGTERM, and one-line errors."""

from __future__ import annotations

import logging
import resource
import signal
import sys
import time
from collections.abc import Callable
from types import FrameType

from pipeline.errors import PipelineError

log = logging.getLogger("pipeline")


def _terminate(signum: int, frame: FrameType | None) -> None:
    # SIGTERM (a killed `dvc repro`, a scheduler) unwinds like Ctrl-C, so open MLflow runs end
    # KILLED and partial outputs are cleaned up by the same code paths.
    raise KeyboardInterrupt(f"received signal {signal.Signals(signum).name}")


def configure_logging() -> None:
    """Timestamped INFO lines on stderr, for the stages and the processes they start."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True
    )


def peak_memory_mb() -> float:
    """This process's peak resident memory so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_stage(main: Callable[[], None]) -> None:
    """Runs a stage; a PipelineError becomes one line on stderr and exit status 1.

    Any other exception keeps its traceback: it is a bug, not bad input.
    """
    configure_logging()
    signal.signal(signal.SIGTERM, _terminate)
    started = time.perf_counter()
    try:
        main()
        log.info(
            "done in %.1f s; peak memory %s MB",
            time.perf_counter() - started,
            f"{peak_memory_mb():,.0f}",
        )
    except PipelineError as error:
        log.error("%s", error)
        sys.exit(1)
    except KeyboardInterrupt as interrupt:
        log.error("interrupted (%s); rerun `dvc repro` to resume", interrupt or "Ctrl-C")
        sys.exit(130)
