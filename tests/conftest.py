"""Fixtures: tiny CIFAR-format archives, a local HTTP server that serves them, the real
params.yaml to shrink, session-wide PostgreSQL and MLflow servers (helpers in helpers.py), and the
fault tests' sweeps on them (fault_sweeps.py)."""

from __future__ import annotations

import copy
import http.server
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import (
    ROOT,
    ArchiveServer,
    MlflowServer,
    Postgres,
    TinyCifar,
    archive_handler,
    make_tiny_cifar,
    start_mlflow_server,
    start_postgres,
    write_binary_archive,
    write_python_archive,
)


@pytest.fixture(scope="session")
def tiny() -> TinyCifar:
    return make_tiny_cifar()


@pytest.fixture(scope="session")
def python_archive(tmp_path_factory: pytest.TempPathFactory, tiny: TinyCifar) -> Path:
    return write_python_archive(
        tmp_path_factory.mktemp("archives") / "cifar-10-python.tar.gz", tiny
    )


@pytest.fixture(scope="session")
def binary_archive(tmp_path_factory: pytest.TempPathFactory, tiny: TinyCifar) -> Path:
    return write_binary_archive(
        tmp_path_factory.mktemp("archives") / "cifar-10-binary.tar.gz", tiny
    )


@pytest.fixture
def http_server() -> Iterator[ArchiveServer]:
    state = ArchiveServer()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), archive_handler(state))
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def params_dict() -> dict[str, Any]:
    """The real params.yaml, parsed, to be shrunk by each test."""
    return copy.deepcopy(yaml.safe_load((ROOT / "params.yaml").read_text()))


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    server = start_postgres()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def mlflow_server(
    postgres: Postgres, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MlflowServer]:
    """A real `mlflow server` on 127.0.0.1 with basic auth and the PostgreSQL cluster as its
    backend store."""
    server = start_mlflow_server(
        postgres.create_database("mlflow"), tmp_path_factory.mktemp("artifacts")
    )
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def fault_sweep(
    tmp_path: Path, postgres: Postgres, mlflow_server: MlflowServer
) -> Callable[..., Any]:
    """Makes tiny sweeps of three workers on PostgreSQL and the MLflow server (fault_sweeps.py)."""
    from tests.fault_sweeps import make_fault_sweep

    return make_fault_sweep(tmp_path, postgres, mlflow_server)
