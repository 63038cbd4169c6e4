"""`python -m pipeline.dashboard` (`make dashboard`): optuna-dashboard on the sweep's study.

Serves the study's storage (tune.storage, or OPTUNA_STORAGE when set) on 127.0.0.1 until Ctrl-C:
its trials, their intermediate values, the parameters' importances, live while a sweep runs.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import wsgiref.simple_server
from pathlib import Path

import optuna_dashboard

from pipeline.config import load_params, redacted, storage_url
from pipeline.errors import PipelineError
from pipeline.stage_runner import configure_logging

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
    # The server runs in a thread with SIGINT and SIGTERM blocked, and the main thread waits for
    # them: an interrupt raised inside a request would be caught and logged by wsgiref's handler,
    # leaving the server up. The handlers are set first so SIGINT counts even where it arrives
    # ignored, as in a background job.
    stop = {signal.SIGINT, signal.SIGTERM}
    for signum in stop:
        signal.signal(signum, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)
    try:
        server = wsgiref.simple_server.make_server("127.0.0.1", port, optuna_dashboard.wsgi(url))
    except OSError as error:  # the port is taken or not ours to bind
        log.error("127.0.0.1:%d: %s; choose another with --port", port, error.strerror)
        sys.exit(1)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(f"optuna-dashboard for {redacted(url)}: http://127.0.0.1:{port}/", flush=True)
    signal.sigwait(stop)  # a request cut at exit leaves the storage whole: writes are transactions
    server.server_close()
    log.info("dashboard stopped")


if __name__ == "__main__":
    main()
