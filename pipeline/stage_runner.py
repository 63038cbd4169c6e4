"""The shell shared by every stage's `main()`: logging, stopping on a signal, one-line errors."""

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


_stop_asked: list[str] = []  # the signals received, by name


def _ask_to_stop(signum: int, frame: FrameType | None) -> None:
    """Ctrl-C or SIGTERM (a killed `dvc repro`, a scheduler) asks the stage to stop at its next
    stop point; the stop then unwinds as KeyboardInterrupt, so open MLflow runs end KILLED and
    partial outputs are cleaned up. Nothing is cut mid-write: the signal only leaves a note. A
    second signal means it: the stage stops at once."""
    name = signal.Signals(signum).name
    if _stop_asked:
        raise KeyboardInterrupt(f"received {_stop_asked[0]}, then {name}")
    _stop_asked.append(name)
    log.warning("received %s: stopping at the next batch or step (again to stop at once)", name)


def stop_point() -> None:
    """Raises KeyboardInterrupt if a stop has been asked for. Called where stopping cuts
    nothing: between training batches, between chunks of a download, while waiting."""
    if _stop_asked:
        raise KeyboardInterrupt(f"received signal {_stop_asked[0]}")


def pause(seconds: float) -> None:
    """time.sleep that a stop ends early (a sleep resumes after a signal that only notes)."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        stop_point()
        time.sleep(min(left, 0.2))
    stop_point()


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
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _ask_to_stop)
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
