"""`python -m pipeline.dashboard` (`make dashboard`): optuna-dashboard on the sweep's study.

Serves the study's storage (tune.storage, or OPTUNA_STORAGE when set) on 127.0.0.1 until Ctrl-C:
its trials, their intermediate values, the parameters' importances, live while a sweep runs.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

import optuna_dashboard

from pipeline.config import load_params, redacted, storage_url
from pipeline.errors import PipelineError
from pipeline.stage import configure_logging

log = logging.getLogger("pipeline.dashboard")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8080, help="default: 8080")
    port = parser.parse_args().port
    configure_logging()
    try:
        url = storage_url(load_params().tune)
        database = url.removeprefix("sqlite:///")
        if url.startswith("sqlite:///") and not Path(database).is_file():
            raise PipelineError(f"{database}: no study yet; run a sweep first (`make tune`)")
    except PipelineError as error:
        log.error("%s", error)
        sys.exit(1)
    # Ctrl-C or SIGTERM stops the server at once (it has no stop points to wait for), even
    # where SIGINT arrives ignored, as in a background job; its server takes the interrupt and
    # returns.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.default_int_handler)
    print(f"optuna-dashboard for {redacted(url)}: http://127.0.0.1:{port}/", flush=True)
    optuna_dashboard.run_server(url, host="127.0.0.1", port=port)
    log.info("dashboard stopped")


if __name__ == "__main__":
    main()
