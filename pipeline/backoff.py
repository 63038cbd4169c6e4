"""The project's one way to retry: tenacity, with exponential backoff and one log line a retry."""

from __future__ import annotations

import logging

import tenacity

from pipeline.errors import error_line
from pipeline.stage_runner import pause

log = logging.getLogger(__name__)


def retrying(
    what: str,
    *,
    retry: tenacity.retry_base,
    stop: tenacity.stop.stop_base,
    first_wait: float = 1.0,
    max_wait: float = 15.0,
) -> tenacity.Retrying:
    """Retries while `retry` says so, waiting `first_wait` seconds, then twice as long each time
    up to `max_wait`, and warning before each wait with `what` and the error; once `stop` says
    so, the last error is raised as it is."""

    def before_sleep(state: tenacity.RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        log.warning("%s: %s; retrying in %.1f s", what, error_line(error), state.upcoming_sleep)

    return tenacity.Retrying(
        retry=retry,
        stop=stop,
        wait=tenacity.wait_exponential(multiplier=first_wait, max=max_wait),
        before_sleep=before_sleep,
        sleep=pause,  # Ctrl-C ends the wait
        reraise=True,
    )
